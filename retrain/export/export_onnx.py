"""ONNX export through Keras's own ``model.export(path, format="onnx")`` (tf2onnx underneath).

The exported graph keeps the Keras model's input: raw uint8 images (N, H, W, C) named
``image``, resizing and preprocessing inside; its output is ``probabilities``. It runs in
onnxruntime (the self-test) and any other ONNX runtime.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from retrain.errors import ConfigError

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def onnx_available() -> bool:
    """Whether tf2onnx and onnxruntime are installed (requirements.txt pins them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tf2onnx", "onnx", "onnxruntime"))


def check_can_export() -> None:
    """Raise `ConfigError` when this installation cannot write ONNX."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ConfigError(
            f"The 'onnx' export converts through TensorFlow (tf2onnx), not the '{backend}' "
            "backend. Run with KERAS_BACKEND=tensorflow, or export tflite/keras."
        )
    if not onnx_available():
        raise ConfigError(
            "The 'onnx' export needs tf2onnx, onnx and onnxruntime, which this installation "
            "lacks. Install them with `pip install -r requirements.txt`."
        )


def _rename(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new


def write_onnx(model: Any, path: str | Path) -> None:
    """Write ``model`` as ONNX: ``image`` (uint8, batch dimension free) -> ``probabilities``.

    Raises:
        ConfigError: not the TensorFlow backend, or tf2onnx/onnxruntime missing.
    """
    check_can_export()
    import onnx
    import tensorflow as tf

    spec = model.inputs[0]
    shape = (None, *[int(d) if d is not None else None for d in spec.shape[1:]])
    signature = [tf.TensorSpec(shape, tf.as_dtype(spec.dtype), name=INPUT_NAME)]
    path = Path(path)
    with warnings.catch_warnings():  # Keras's tf2onnx numpy-2 patch probes np.object
        warnings.filterwarnings("ignore", message=".*np.object.*", category=FutureWarning)
        model.export(str(path), format="onnx", verbose=False, input_signature=signature)
    # tf2onnx names the output after TensorFlow's Identity op and the batch axis "unk__N";
    # plain names make the file easier to use.
    proto = onnx.load(str(path))
    graph = proto.graph
    if len(graph.output) == 1 and graph.output[0].name != OUTPUT_NAME:
        _rename(graph, graph.output[0].name, OUTPUT_NAME)
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
