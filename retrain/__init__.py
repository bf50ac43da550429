"""Retrain Studio's library: data, models, surgery, training, evaluation and export.

One subpackage per concept (README, "Where things are"): `data`, `models`, `training`,
`runs`, `evaluate`, `export`, `sessions` and `service`; `__main__` is the command line and
`errors` the error kinds every package shares.

Nothing here imports Streamlit. Keras and TensorFlow are imported inside the functions
that need them, so `import retrain` and the dashboard's first page stay fast.
"""

import os

# Quiet TensorFlow's C++ start-up chatter in the CLI, the worker and the app.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from retrain.errors import ConfigError, DatasetError, ModelError, RetrainError, RunError  # noqa: E402

__all__ = ["ConfigError", "DatasetError", "ModelError", "RetrainError", "RunError"]
__version__ = "0.1.0"
