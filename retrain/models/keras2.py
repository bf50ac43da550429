"""Keras 2 conversion: a Keras 2 ``.h5`` (Teachable Machine exports included) rebuilt as an
equivalent Keras 3 model, whose outputs are checked against ``tf_keras``'s reading of the file.

The rebuild reads the file's JSON config and weights with h5py (`rebuild_keras2_h5`: about
0.3 s for a Teachable Machine export in a warm worker). The check (`check_conversion`) loads
the file with ``tf_keras`` (about 1.5 s more), so a model worker can do it after its answer
(`retrain.models.load`); everything else does it at once (`convert_keras2_h5`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models.keras_helpers import (
    MODEL_CLASS_NAMES,
    _keras,
    make_from,
    variables_made_after,
)

#: The largest output difference a faithful conversion may show on random input.
MAX_DIFF = 1e-4


def convert_keras2_h5(path: str | Path) -> tuple[Any, float]:
    """Rebuild a Keras 2 .h5 as an equivalent Keras 3 model and check it against ``tf_keras``.

    The nesting (Sequential of Sequentials of a Functional, as Teachable Machine writes) and
    every layer name are kept.

    Returns:
        ``(keras3_model, max_abs_diff)``: the largest absolute difference of the two models'
        outputs on random input.

    Raises:
        ModelError: tf_keras is missing, a layer has no Keras 3 equivalent, or the rebuilt
            model's outputs differ by more than `MAX_DIFF`.
    """
    require_tf_keras(path)  # before the rebuild: the conversion is never used unchecked
    model = rebuild_keras2_h5(path)
    if model is None:
        return copy_from_tf_keras(path)
    return model, check_conversion(path, model)


def copy_from_tf_keras(path: str | Path) -> tuple[Any, float]:
    """`convert_keras2_h5` for a file whose weights `rebuild_keras2_h5` cannot match by
    name: the Keras 3 model is rebuilt from tf_keras's reading, weights copied layer by layer
    along the nested paths, and checked against it."""
    legacy = _read_with_tf_keras(path)
    model = _rebuild(json.loads(legacy.to_json()), None)
    _copy_weights(legacy, model)
    return model, _compare(legacy, model, path)


def warm_up(folder: str | Path) -> None:
    """Convert and check a tiny Keras 2 model shaped like a Teachable Machine export, written
    in ``folder``: a model worker does this while warming, so the first upload it converts
    does not pay for the first calls of both readers (0.2 s of the first rebuild and 0.1 s of
    its check, measured)."""
    import tf_keras

    layers = tf_keras.layers
    inp = layers.Input((16, 16, 3), name="input_1")
    x = layers.ZeroPadding2D(((0, 1), (0, 1)), name="Conv1_pad")(inp)
    x = layers.Conv2D(4, 3, strides=2, use_bias=False, name="Conv1")(x)
    x = layers.BatchNormalization(name="bn_Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="block_1_depthwise")(x)
    y = layers.BatchNormalization(name="block_1_depthwise_BN")(y)
    x = layers.Add(name="block_1_add")([x, layers.ReLU(6.0, name="block_1_relu")(y)])
    features = tf_keras.Sequential(
        [tf_keras.Model(inp, x, name="model1"), layers.GlobalAveragePooling2D(name="pool")],
        name="sequential_1",
    )
    head = tf_keras.Sequential(
        [layers.Dense(3, activation="relu", input_shape=(4,), name="dense_Dense1"),
         layers.Dense(2, activation="softmax", use_bias=False, name="dense_Dense2")],
        name="sequential_3",
    )  # fmt: skip
    path = Path(folder) / "warm_up.h5"
    tf_keras.Sequential([layers.Input((16, 16, 3)), features, head]).save(path, save_format="h5")
    try:
        convert_keras2_h5(path)
    finally:
        path.unlink(missing_ok=True)


def require_tf_keras(path: str | Path) -> None:
    """Refuse to convert without ``tf_keras``: the conversion is never used unchecked."""
    if importlib.util.find_spec("tf_keras") is None:
        raise ModelError(
            f"'{Path(path).name}' is a Keras 2 file and tf_keras is not installed to read it. "
            "pip install tf_keras, or re-save the model as .keras."
        )


def rebuild_keras2_h5(path: str | Path) -> Any | None:
    """The Keras 3 model of a Keras 2 .h5, built from its config and weights read with h5py.

    Returns:
        The model, unchecked (`check_conversion`), or None when its weights cannot all be
        matched by layer name, count and shape (`convert_keras2_h5` then copies them from
        ``tf_keras``'s reading).

    Raises:
        ModelError: a layer has no Keras 3 equivalent, or the graph cannot be rebuilt.
    """
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs["model_config"]
        config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        weights = _h5_weights(f["model_weights"]) if "model_weights" in f else None
    if weights is None:
        return None
    return _rebuild_filled(config, weights)


def check_conversion(path: str | Path, model: Any) -> float:
    """Compare ``model`` with ``tf_keras``'s reading of ``path`` on random input.

    Returns:
        The largest absolute difference of their outputs.

    Raises:
        ModelError: it is above `MAX_DIFF` (the conversion is not faithful), or tf_keras
            cannot read the file.
    """
    return _compare(_read_with_tf_keras(path), model, path)


def _read_with_tf_keras(path: str | Path) -> Any:
    require_tf_keras(path)
    import tf_keras

    class DepthwiseConv2D(tf_keras.layers.DepthwiseConv2D):
        # Teachable Machine configs carry `groups`, which DepthwiseConv2D never accepted.
        def __init__(self, *args: Any, groups: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    return tf_keras.models.load_model(
        str(path), compile=False, custom_objects={"DepthwiseConv2D": DepthwiseConv2D}
    )


def _compare(legacy: Any, model: Any, path: str | Path) -> float:
    import numpy as np

    shape = [d or 224 for d in legacy.input_shape[1:]]
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, *shape)).astype("float32")
    expected = np.asarray(legacy(x, training=False))
    got = np.asarray(model(x, training=False))
    diff = float(np.max(np.abs(expected - got)))
    if not diff <= MAX_DIFF:  # NaN fails too
        raise ModelError(
            f"'{Path(path).name}' could not be converted faithfully (outputs differ by {diff:.2g}). "
            "Re-save it with Keras 3 as .keras."
        )
    return diff


# --------------------------------------------------------------------------------------
# Rebuilding from the Keras 2 JSON config


def _rebuild(entry: dict[str, Any], input_shape: tuple | None) -> Any:
    """Rebuild one Keras 2 config entry (a layer, a Sequential or a Functional model) as
    Keras 3; ``input_shape`` (batch dimension left out) is what a nested Sequential that
    declares none receives."""
    cls = entry.get("class_name")
    if cls == "Sequential":
        return _rebuild_sequential(entry, input_shape)
    if cls in MODEL_CLASS_NAMES:
        return _rebuild_functional(entry)
    return _layer(entry)


def _layer(entry: dict[str, Any]) -> Any:
    keras = _keras()
    cls = entry.get("class_name")
    config = dict(entry.get("config") or {})
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
    target = getattr(keras.layers, str(cls), None)
    if target is None:
        raise ModelError(f"Layer '{config.get('name')}' of type {cls} has no Keras 3 equivalent.")
    return target.from_config(config)


def _declared_shape(entry: dict[str, Any]) -> tuple | None:
    shape = (entry.get("config") or {}).get("batch_input_shape")
    return tuple(shape[1:]) if isinstance(shape, list) else None


def _sequential_input(entry: dict[str, Any]) -> tuple[dict | None, list[dict], tuple | None]:
    """A Keras 2 Sequential config's InputLayer entry (or None), its other layers, and the input
    shape it declares (on the InputLayer or the first layer; None when it declares none)."""
    entries = [e for e in (entry.get("config") or {}).get("layers") or [] if isinstance(e, dict)]
    first = next((e for e in entries if e.get("class_name") == "InputLayer"), None)
    layers = [e for e in entries if e.get("class_name") != "InputLayer"]
    shape = (first and _declared_shape(first)) or (layers and _declared_shape(layers[0])) or None
    return first, layers, shape


def _rebuild_sequential(entry: dict[str, Any], input_shape: tuple | None) -> Any:
    keras = _keras()
    name = entry["config"]["name"]
    first, layers, shape = _sequential_input(entry)
    shape = shape or input_shape
    if shape is None:
        raise ModelError(f"Could not rebuild '{name}': it declares no input shape.")
    input_name = (first or {}).get("config", {}).get("name") or f"{name}_input"
    model = keras.Sequential([keras.Input(shape=tuple(shape), name=input_name)], name=name)
    for child in layers:
        model.add(_rebuild(child, tuple(model.outputs[0].shape[1:]) if model.layers else shape))
    return model


def _rebuild_functional(entry: dict[str, Any]) -> Any:
    keras = _keras()
    config = entry["config"]
    entries = {e["config"]["name"]: e for e in config["layers"]}
    produced: dict[tuple[str, int], list[Any]] = {}
    for name, _node, _tensor in config["input_layers"]:
        shape = _declared_shape(entries[name])
        if shape is None:
            raise ModelError(f"Could not rebuild '{config['name']}': input '{name}' has no shape.")
        produced[(name, 0)] = [keras.Input(shape=shape, name=name)]
    pending = [e for e in config["layers"] if e["class_name"] != "InputLayer"]
    rebuilt: dict[str, Any] = {}
    while pending:
        progress = False
        for layer_entry in list(pending):
            nodes = layer_entry.get("inbound_nodes") or []
            if not all(
                (src, idx) in produced for node in nodes for src, idx, *_ in _node_inputs(node)
            ):
                continue
            name = layer_entry["config"]["name"]
            first = _first_node(layer_entry)
            for n, node in enumerate(nodes, start=first):
                args = [produced[(src, idx)][t] for src, idx, t, *_ in _node_inputs(node)]
                if name not in rebuilt:
                    shape = tuple(args[0].shape[1:]) if len(args) == 1 else None
                    rebuilt[name] = _rebuild(layer_entry, shape)
                out = rebuilt[name](args[0] if len(args) == 1 else args)
                produced[(name, n)] = out if isinstance(out, list | tuple) else [out]
            pending.remove(layer_entry)
            progress = True
        if not progress:
            raise ModelError(
                f"Could not rebuild the graph of '{config['name']}' (unsupported wiring)."
            )
    outputs = [produced[(name, idx)][t] for name, idx, t in config["output_layers"]]
    inputs = [produced[(name, 0)][0] for name, _n, _t in config["input_layers"]]
    return keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs[0] if len(outputs) == 1 else outputs,
        name=config["name"],
    )


def _first_node(entry: dict[str, Any]) -> int:
    """The index Keras 2 gives a layer's first call in a model config: 1 for a nested model
    built on its own input (its node 0 links that input to its output, and is not saved),
    else 0."""
    if entry.get("class_name") == "Sequential":
        first, _layers, shape = _sequential_input(entry)
        return 1 if first is not None or shape is not None else 0
    return 1 if entry.get("class_name") in MODEL_CLASS_NAMES else 0


def _node_inputs(node: Any) -> list[list[Any]]:
    """Inbound-node entries ``[layer_name, node_index, tensor_index, kwargs]`` of a Keras 2 node."""
    if isinstance(node, dict):  # newer tf_keras: {"args": ..., "kwargs": ...}
        raise ModelError("This Keras 2 file uses a graph format that cannot be converted.")
    return [list(item) for item in node]


# --------------------------------------------------------------------------------------
# Weights


def _h5_weights(group: Any) -> dict[str, list[Any]] | None:
    """The weights of a Keras 2 ``model_weights`` group by layer name, each layer's in the
    file's order (its creation order: kernel then bias; gamma, beta, moving mean, variance).
    None when one layer name holds one variable twice (nested models that reuse names)."""
    import numpy as np

    found: dict[str, list[Any]] = {}
    seen: set[tuple[str, str]] = set()
    for top in group.attrs.get("layer_names", []):
        layer_group = group[_text(top)]
        for weight in layer_group.attrs.get("weight_names", []):
            name = _text(weight)
            layer, _, variable = name.rpartition("/")
            layer = layer.rpartition("/")[2]
            if (layer, variable) in seen:
                return None
            seen.add((layer, variable))
            found.setdefault(layer, []).append(np.asarray(layer_group[name]))
    return found


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _leaves(model: Any, nested: Any, prefix: str = "") -> dict[str, Any]:
    """The layers of ``model`` that hold weights, by nested path (``"model1/Conv1"``); models
    of type ``nested`` are looked into."""
    out: dict[str, Any] = {}
    for layer in model.layers:
        if isinstance(layer, nested):
            out.update(_leaves(layer, nested, f"{prefix}{layer.name}/"))
        elif layer.weights:
            out[f"{prefix}{layer.name}"] = layer
    return out


def _rebuild_filled(config: dict[str, Any], weights: dict[str, list[Any]]) -> Any | None:
    """`_rebuild` with each variable made from the file's value of it (`_by_name`), or None
    when they do not all match. Made once (`variables_made_after`), not filled at random and
    then overwritten: a Teachable Machine export's layer table took 0.30-0.36 CPU-s instead of
    0.46-0.64 in a warm model worker."""
    with variables_made_after():
        model = _rebuild(config, None)
        matched = _by_name(model, weights)
        for variable, value in matched or []:
            make_from(variable, value)
    return model if matched is not None else None


def _by_name(model: Any, weights: dict[str, list[Any]]) -> list[tuple[Any, Any]] | None:
    """Each variable of ``model`` paired with the file's value of the layer of the same name,
    in order; None unless every layer of the model and of the file is matched, with as many
    weights of the same shapes. (Keras 3 names some variables differently, e.g.
    DepthwiseConv2D's ``kernel``: the order and shapes match, and the check compares outputs.)"""
    leaves = list(_leaves(model, _keras().Model).values())
    if sorted(layer.name for layer in leaves) != sorted(weights):
        return None
    pairs = []
    for layer in leaves:
        values = weights[layer.name]
        if [tuple(v.shape) for v in layer.weights] != [tuple(v.shape) for v in values]:
            return None
        pairs += zip(layer.weights, values, strict=True)
    return pairs


def _copy_weights(source: Any, target: Any) -> None:
    """Copy weights leaf by leaf from tf_keras's reading, matching the nested layer paths."""
    import tf_keras

    src = _leaves(source, tf_keras.Model)
    dst = _leaves(target, _keras().Model)
    if set(src) != set(dst):
        missing = sorted(set(src) ^ set(dst))[:3]
        raise ModelError(f"Converted model does not match the original (layers {missing}).")
    for key, layer in src.items():
        dst[key].set_weights(layer.get_weights())
