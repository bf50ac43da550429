"""Training: the settings, the two-phase recipe and the Keras pieces that run it.

Where things happen:

- ``config``     `TrainConfig`: every setting of a run, its CLI flags, the freeze mini-language
- ``train``      `train`: the recipe (prepare data, build, fit the head, fine-tune), one run
- ``features``   the feature cache: a frozen base's outputs computed once per split
- ``callbacks``  the batch feed and the Keras callbacks that write the run directory
- ``keep``       keep-old-classes: the old task's data, rehearsal memory, distillation
- ``lr_find``    the learning-rate range test
- ``devices``    the backend and device a run trains on, precision, jit, threads

Import the modules themselves (``from retrain.training import config``); nothing is
re-exported here. Importing `config` or `train` imports no Keras; `callbacks` does.
"""
