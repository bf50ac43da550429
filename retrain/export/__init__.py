"""Export: a finished run's model in formats that load anywhere, each checked in a fresh process.

Where things happen:

- ``export``       `export_run`: the formats, the model card, the self-test, the zip
- ``export_onnx``  ONNX through Keras's own ``model.export``
- ``export_tfjs``  TF.js Layers (``model.json`` + weight shards), checked in Node

Import the modules themselves (``from retrain.export import export``); nothing is
re-exported here.
"""
