"""Keras 2 conversion: a Keras 2 ``.h5`` (Teachable Machine exports included), read with
``tf_keras`` and rebuilt as an equivalent Keras 3 model whose outputs are checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models.keras_helpers import _keras


def convert_keras2_h5(path: str | Path) -> tuple[Any, float]:
    """Read a Keras 2 .h5 with ``tf_keras`` and rebuild it as an equivalent Keras 3 model.

    The nesting (Sequential of Sequentials of a Functional, as Teachable Machine writes) and
    every layer name are kept; weights are copied layer by layer.

    Returns:
        ``(keras3_model, max_abs_diff)``: the largest absolute difference of the two models'
        outputs on random input.

    Raises:
        ModelError: tf_keras is missing, or the rebuilt model's outputs differ by > 1e-4.
    """
    import numpy as np

    try:
        import tf_keras
    except ImportError:
        raise ModelError(
            f"'{Path(path).name}' is a Keras 2 file and tf_keras is not installed to read it. "
            "pip install tf_keras, or re-save the model as .keras."
        ) from None

    class DepthwiseConv2D(tf_keras.layers.DepthwiseConv2D):
        # Teachable Machine configs carry `groups`, which DepthwiseConv2D never accepted.
        def __init__(self, *args: Any, groups: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    legacy = tf_keras.models.load_model(
        str(path), compile=False, custom_objects={"DepthwiseConv2D": DepthwiseConv2D}
    )
    model = _rebuild(legacy, tf_keras)
    _copy_weights(legacy, model, tf_keras)
    shape = [d or 224 for d in legacy.input_shape[1:]]
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, *shape)).astype("float32")
    expected = np.asarray(legacy(x, training=False))
    got = np.asarray(model(x, training=False))
    diff = float(np.max(np.abs(expected - got)))
    if diff > 1e-4:
        raise ModelError(
            f"'{Path(path).name}' could not be converted faithfully (outputs differ by {diff:.2g}). "
            "Re-save it with Keras 3 as .keras."
        )
    return model, diff


def _rebuild(layer: Any, tf_keras: Any) -> Any:
    """Rebuild one tf_keras layer/model as a Keras 3 one (same names, nesting kept)."""
    keras = _keras()
    if isinstance(layer, tf_keras.Sequential):
        children = [_rebuild(child, tf_keras) for child in layer.layers]
        inp = keras.Input(shape=tuple(layer.input_shape[1:]), name=f"{layer.name}_input")
        return keras.Sequential([inp, *children], name=layer.name)
    if isinstance(layer, tf_keras.Model):
        return _rebuild_functional(layer, tf_keras)
    cls = type(layer).__name__
    # tf_keras wraps lists (ListWrapper); a JSON round trip gives plain Python values.
    config = json.loads(json.dumps(layer.get_config(), default=_plain))
    for key in ("batch_input_shape", "batch_shape", "ragged"):
        config.pop(key, None)
    if cls == "DepthwiseConv2D":
        config.pop("groups", None)
    axis = config.get("axis")
    if (
        cls in ("BatchNormalization", "LayerNormalization")
        and isinstance(axis, list)
        and len(axis) == 1
    ):
        config["axis"] = axis[0]
    target = getattr(keras.layers, cls, None)
    if target is None:
        raise ModelError(f"Layer '{layer.name}' of type {cls} has no Keras 3 equivalent.")
    return target.from_config(config)


def _rebuild_functional(model: Any, tf_keras: Any) -> Any:
    keras = _keras()
    config = model.get_config()
    by_name = {layer.name: layer for layer in model.layers}
    produced: dict[tuple[str, int], list[Any]] = {}
    for name, _node, _tensor in config["input_layers"]:
        shape = tuple(by_name[name].get_config()["batch_input_shape"][1:])
        produced[(name, 0)] = [keras.Input(shape=shape, name=name)]
    pending = [e for e in config["layers"] if e["class_name"] != "InputLayer"]
    rebuilt: dict[str, Any] = {}
    while pending:
        progress = False
        for entry in list(pending):
            nodes = entry.get("inbound_nodes") or []
            if not all(
                (src, idx) in produced for node in nodes for src, idx, *_ in _node_inputs(node)
            ):
                continue
            name = entry["config"]["name"]
            layer = rebuilt.setdefault(name, _rebuild(by_name[name], tf_keras))
            for n, node in enumerate(nodes):
                args = [produced[(src, idx)][t] for src, idx, t, *_ in _node_inputs(node)]
                out = layer(args[0] if len(args) == 1 else args)
                produced[(name, n)] = out if isinstance(out, list | tuple) else [out]
            pending.remove(entry)
            progress = True
        if not progress:
            raise ModelError(f"Could not rebuild the graph of '{model.name}' (unsupported wiring).")
    outputs = [produced[(name, idx)][t] for name, idx, t in config["output_layers"]]
    inputs = [produced[(name, 0)][0] for name, _n, _t in config["input_layers"]]
    return keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs[0] if len(outputs) == 1 else outputs,
        name=model.name,
    )


def _plain(value: Any) -> Any:
    """JSON fallback for tf_keras configs: numpy scalars/arrays and ListWrapper."""
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _node_inputs(node: Any) -> list[list[Any]]:
    """Inbound-node entries ``[layer_name, node_index, tensor_index, kwargs]`` of a Keras 2 node."""
    if isinstance(node, dict):  # newer tf_keras: {"args": ..., "kwargs": ...}
        raise ModelError("This Keras 2 file uses a graph format that cannot be converted.")
    return [list(item) for item in node]


def _copy_weights(source: Any, target: Any, tf_keras: Any) -> None:
    """Copy weights leaf by leaf, matching the two models' nested layer paths."""

    def leaves(model: Any, prefix: str, nested: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for layer in model.layers:
            key = f"{prefix}{layer.name}"
            if isinstance(layer, nested):
                out.update(leaves(layer, key + "/", nested))
            elif layer.weights:
                out[key] = layer
        return out

    keras = _keras()
    src = leaves(source, "", tf_keras.Model)
    dst = leaves(target, "", keras.Model)
    if set(src) != set(dst):
        missing = sorted(set(src) ^ set(dst))[:3]
        raise ModelError(f"Converted model does not match the original (layers {missing}).")
    for key, layer in src.items():
        dst[key].set_weights(layer.get_weights())
