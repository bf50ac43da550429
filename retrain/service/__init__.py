"""Model requests from the web tier to warm model workers: the seam between drawing and computing.

The Streamlit server never imports TensorFlow, Keras, JAX or torch. Whatever needs a model
(describe, the head preview, the preprocessing probe, evaluate, predict, Grad-CAM, forgetting,
export) is a *request*: a kind (`retrain.service.kinds.KINDS`) and JSON arguments. `ask` sends
it and returns the JSON answer:

- ``kinds``    the request kinds: what each computes (worker side) and which files and
               arguments define its answer (web side); the one contract both sides share
- ``cache``    answers on disk, addressed by content (file hashes + options), so a reload,
               another visitor or another web replica reuses them
- ``queue``    the host's request queue on disk (under ``$RETRAIN_HOME/service``), fair across
               sessions, with positions and cancel; any web replica on the same home uses it
- ``pool``     the bounded pool of warm worker processes (``RETRAIN_MODEL_WORKERS``)
- ``worker``   the worker process (``python -m retrain.service.worker``)
- ``on_ray``   the same requests as tasks of Ray actors (``RETRAIN_RUNNER=ray``)
- ``client``   `ask`: cache, then inline / local pool / Ray; `prefetch`: queue a request
               whose answer a page will soon want, without waiting
"""

from retrain.service.client import WorkerLost, ask, cached, cancel, prefetch, warm_up

__all__ = ["WorkerLost", "ask", "cached", "cancel", "prefetch", "warm_up"]
