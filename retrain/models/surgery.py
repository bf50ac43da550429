"""Head replacement: cut a base model, put a new head on it, choose what stays frozen.

`replace_head` builds three plain Keras 3 models (no custom objects, ``keras.ops`` only, so
they save/load with ``keras.saving.load_model`` and run on any backend):

- ``features``: uint8 (H, W, 3) -> [Resizing] -> the base's preprocessing as layers
  (`retrain.models.preprocessing`) -> copies of
  the base's layers up to the cut (names and weights preserved; nested models flattened);
- ``head``: the cut output -> [Conv2D + MaxPooling] -> pooling -> [Dense] -> Dropout -> output;
- ``model``: ``head(features(x, training=False))``.

BatchNorm layers are always frozen: in Keras 3 a frozen BatchNormalization runs in inference
mode even when the surrounding model trains, which is what keeps fine-tuning stable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from retrain.errors import ConfigError, ModelError
from retrain.models import preprocessing
from retrain.models.keras_helpers import (
    BaseModel,
    _keras,
    check_image_model,
    count_params,
    is_model,
    iter_layers,
    make_from,
    output_leaf,
    variables_made_after,
)
from retrain.training.config import (
    FreezeSpec,  # the one parser of the freeze text (re-exported here)
)

POOLINGS = ("auto", "avg", "max", "flatten", "none")
_FRONT_PREFIX = preprocessing.LAYER_PREFIX


@dataclass(frozen=True)
class HeadSpec:
    """The new classifier put on top of the cut."""

    pooling: str = "auto"  # auto | avg | max | flatten | none
    hidden_units: int = 0  # 0 = no hidden Dense
    hidden_activation: str = "relu"
    dropout: float = 0.2
    binary_sigmoid: bool = False  # 2 classes only: 1 sigmoid unit + binary CE
    add_conv: int = 0  # filters of an added Conv2D(3x3)+MaxPool block; 0 = none

    def validate(self) -> None:
        """Raise `ConfigError` for values that cannot build a head."""
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"Unknown pooling '{self.pooling}'. Use one of: {', '.join(POOLINGS)}."
            )
        if self.hidden_units < 0 or self.add_conv < 0:
            raise ConfigError("Hidden units and added conv filters must be 0 (none) or positive.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Dropout {self.dropout} is out of range; use 0 <= dropout < 1.")


@dataclass
class Surgery:
    """The result of `replace_head`: the new model, its parts and what changed."""

    model: Any  # uint8 (H, W, 3) -> probabilities
    features: Any  # uint8 (H, W, 3) -> the cut layer's output
    head: Any  # cut output -> probabilities
    class_names: list[str]
    loss: str  # "sparse_categorical_crossentropy" | "binary_crossentropy"
    label_encoding: str  # "index" | "binary"
    cut_at: str
    diff: dict = field(default_factory=dict)


class _CutReached(Exception):
    """Raised inside the graph replay once the cut layer's output exists."""

    def __init__(self, tensor: Any) -> None:
        super().__init__("cut reached")
        self.tensor = tensor


# --------------------------------------------------------------------------------------
# Cut points


def resolve_cut(base: BaseModel, cut_at: str | int | None) -> tuple[int, str]:
    """Resolve a cut point (name, index or None) to ``(flat index, leaf layer name)``.

    A nested model's name means its last layer. A string of digits that is not a layer name
    is read as an index (as the CLI passes it).

    Raises:
        ModelError: no such layer, or an index out of range.
    """
    leaves = [layer for _, layer in iter_layers(base.model)]
    names = [layer.name for layer in leaves]
    n = len(leaves)
    if cut_at is None or cut_at == "":
        cut_at = base.suggested_cut
    if isinstance(cut_at, str) and cut_at not in names and re.fullmatch(r"-?\d+", cut_at.strip()):
        cut_at = int(cut_at)
    if isinstance(cut_at, int) and not isinstance(cut_at, bool):
        index = cut_at + n if cut_at < 0 else cut_at
        if not 0 <= index < n:
            raise ModelError(
                f"Cut point {cut_at} is out of range: the model has {n} layers (0-{n - 1}). "
                "Pick an index from the layer table."
            )
        return index, names[index]
    if cut_at in names:
        return names.index(cut_at), str(cut_at)
    nested = _find_nested(base.model, str(cut_at))
    if nested is not None:
        leaf = output_leaf(nested)
        return names.index(leaf.name), leaf.name
    close = [name for name in names if str(cut_at).lower() in name.lower()][:3]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(
        f"No layer named '{cut_at}' in {base.name}.{hint} "
        f"Use a name or an index (0-{n - 1}) from the layer table."
    )


def _find_nested(model: Any, name: str) -> Any | None:
    for layer in model.layers:
        if is_model(layer):
            if layer.name == name:
                return layer
            found = _find_nested(layer, name)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------------
# Graph replay (nested models flattened)


class _Replay:
    """Re-run a base model's graph on new symbolic tensors with fresh copies of its layers."""

    def __init__(self, cut_name: str, taken: set[str]) -> None:
        self.cut_name = cut_name
        self.copies: dict[int, Any] = {}
        self.taken = taken  # names already used in the new graph (front layers)
        self.renamed: dict[str, str] = {}
        self.mixed = _keras().config.dtype_policy().name != "float32"

    def run(self, model: Any, inputs: Any) -> Any:
        keras = _keras()
        if isinstance(model, keras.Sequential):
            x = inputs
            for layer in model.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                x = self.call(layer, (x,), {})
            return x
        flat_inputs = keras.tree.flatten(inputs)
        tensors = {id(ref): new for ref, new in zip(model.inputs, flat_inputs, strict=False)}
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(x) not in tensors for x in node.input_tensors):
                    continue
                args, kwargs = node.arguments.fill_in(tensors)
                outputs = self.call(node.operation, args, kwargs)
                for ref, new in zip(node.outputs, keras.tree.flatten(outputs), strict=False):
                    tensors[id(ref)] = new
        outs = [tensors[id(x)] for x in model.outputs]
        return outs[0] if len(outs) == 1 else outs

    def call(self, op: Any, args: tuple, kwargs: dict) -> Any:
        if is_model(op):
            return self.run(op, args[0] if len(args) == 1 else list(args))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("training",)}
        if not isinstance(op, _keras().layers.Layer):  # a stateless op (``x + y``) in the graph
            return op(*args, **kwargs)
        copy = self.copies.get(id(op))
        first = copy is None
        if first:
            copy = self._clone(op)
            self.copies[id(op)] = copy
        out = copy(*args, **kwargs)
        if first and op.weights:
            _made_from(copy, op)
        if op.name == self.cut_name:
            raise _CutReached(out)
        return out

    def _clone(self, layer: Any) -> Any:
        config = layer.get_config()
        name = config.get("name", layer.name)
        if name in self.taken:  # duplicate names across nested models: keep them unique
            new = f"{name}_{len(self.taken)}"
            self.renamed[name] = new
            config = {**config, "name": new}
            name = new
        self.taken.add(name)
        if self.mixed and _is_float32_policy(config.get("dtype")):
            # Let the global mixed-precision policy apply to the kept layers too.
            config = {k: v for k, v in config.items() if k != "dtype"}
        copy = type(layer).from_config(config)
        copy.trainable = layer.trainable
        return copy


def _made_from(copy: Any, layer: Any) -> None:
    """Have the variables ``copy`` declared (`variables_made_after`) made from ``layer``'s
    values, as a copy of each (the base stays as it is while the new model trains).

    Raises:
        ModelError: they differ in shape: the layer cannot run at this image size.
    """
    mine, theirs = copy.weights, layer.weights
    needs, has = [tuple(v.shape) for v in mine], [tuple(v.shape) for v in theirs]
    if needs != has:  # the first weight that differs, else (a count that differs) all
        pairs = zip(needs, has, strict=False)
        needed, found = next(((a, b) for a, b in pairs if a != b), (needs, has))
        raise ModelError(
            f"Layer '{layer.name}' cannot run at this image size (it would need weights "
            f"shaped {needed}, the base's are {found}). Use the base model's own input size."
        )
    ops = _keras().ops
    for variable, source in zip(mine, theirs, strict=True):
        make_from(variable, ops.copy(source.value))


def _is_float32_policy(dtype: Any) -> bool:
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    return dtype in (None, "float32")


# --------------------------------------------------------------------------------------
# Building blocks


def _front(
    base: BaseModel, image_size: tuple[int, int], taken: set[str]
) -> tuple[Any, Any, list[Any]]:
    """Input (uint8) -> [Resizing] -> the base's preprocessing; returns (input, output, layers).

    The layers come from `retrain.models.preprocessing.front_layers`, the same ones evaluation uses.
    """
    keras = _keras()

    def name(stem: str) -> str:
        new = _FRONT_PREFIX + stem
        while new in taken:
            new += "_"
        taken.add(new)
        return new

    # Grayscale (1-channel) bases take (H, W, 1); RGB ones (H, W, 3).
    inp = keras.Input(shape=(*image_size, base.channels), dtype="uint8", name=name("image"))
    resize = None
    if base.input_size is not None and tuple(base.input_size) != tuple(image_size):
        resize = tuple(base.input_size)
    added = preprocessing.front_layers(
        base.preprocessing, resize_to=resize, name=name, channels=base.channels
    )
    x = inp
    for layer in added:
        x = layer(x)
    return inp, x, added


def _image_size(base: BaseModel, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) the new model takes: ``image_size``, else the base's input size, else 224x224."""
    if image_size is None:
        image_size = tuple(base.input_size) if base.input_size else (224, 224)
    return (int(image_size[0]), int(image_size[1]))


class _Cut(NamedTuple):
    features: Any  # keras.Model: the uint8 image -> the front layers -> the base up to the cut
    tensor: Any  # the cut layer's output in the new graph
    front: list[Any]  # the layers added in front of the base (see `_front`)
    replay: _Replay  # its ``renamed`` says which copied layers got new names
    taken: set[str]  # layer names already used (the base's and the front's)


def _cut(base: BaseModel, image_size: tuple[int, int], cut_name: str) -> _Cut:
    """Copy ``base`` up to the layer ``cut_name`` behind a uint8 input of ``image_size``.

    Raises:
        ModelError: the cut layer is not reachable from the input, or has several outputs.
    """
    taken = {layer.name for _, layer in iter_layers(base.model)}
    inp, x, front = _front(base, image_size, taken)
    replay = _Replay(cut_name, {layer.name for layer in front} | {inp.name})
    try:
        with variables_made_after():  # each copied variable made once, from the base's value
            replay.run(base.model, x)
    except _CutReached as reached:
        cut_tensor = reached.tensor
    else:  # pragma: no cover - the cut is always one of the model's leaves
        raise ModelError(f"Cut layer '{cut_name}' is not reachable from the model's input.")
    if isinstance(cut_tensor, list | tuple):
        raise ModelError(f"Layer '{cut_name}' has several outputs; cut at a layer with one.")
    features = _keras().Model(inp, cut_tensor, name="features")
    return _Cut(features, cut_tensor, front, replay, taken)


def _head(
    cut_shape: tuple, n_classes: int, spec: HeadSpec, taken: set[str]
) -> tuple[Any, list[str]]:
    """The new head as a keras.Model from the cut output shape."""
    keras = _keras()
    layers = keras.layers
    names: list[str] = []

    def name(stem: str) -> str:
        new = f"head_{stem}"
        while new in taken:
            new += "_"
        taken.add(new)
        names.append(new)
        return new

    rank = len(cut_shape) + 1
    inp = keras.Input(shape=tuple(cut_shape), name=name("input"))
    names.pop()  # the input is not an added layer
    x = inp
    if spec.add_conv:
        if rank != 4:
            raise ModelError(
                f"An added Conv2D block needs a 4-D cut output (height, width, channels); the cut "
                f"gives shape {[None, *cut_shape]}. Cut at an earlier conv layer or set add_conv 0."
            )
        x = layers.Conv2D(spec.add_conv, 3, padding="same", activation="relu", name=name("conv"))(x)
        x = layers.MaxPooling2D(2, padding="same", name=name("conv_pool"))(x)
    pooling = spec.pooling
    if pooling == "auto":
        pooling = "avg" if rank in (3, 4) else "none"
    if pooling in ("avg", "max"):
        if rank == 4:
            cls = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
        elif rank == 3:
            cls = layers.GlobalAveragePooling1D if pooling == "avg" else layers.GlobalMaxPooling1D
        else:
            raise ModelError(
                f"Pooling '{pooling}' needs a 3-D or 4-D cut output; the cut gives "
                f"{[None, *cut_shape]}. Use pooling 'none'."
            )
        x = cls(name=name("pool"))(x)
    elif pooling == "flatten":
        x = layers.Flatten(name=name("flatten"))(x)
    elif rank != 2:
        raise ModelError(
            f"Pooling 'none' needs a flat cut output; the cut gives {[None, *cut_shape]}. "
            "Use pooling auto, avg, max or flatten."
        )
    if spec.hidden_units:
        x = layers.Dense(spec.hidden_units, activation=spec.hidden_activation, name=name("hidden"))(
            x
        )
    if spec.dropout > 0:
        x = layers.Dropout(spec.dropout, name=name("dropout"))(x)
    if spec.binary_sigmoid:
        out = layers.Dense(1, activation="sigmoid", dtype="float32", name=name("output"))(x)
    else:
        out = layers.Dense(n_classes, activation="softmax", dtype="float32", name=name("output"))(x)
    return keras.Model(inp, out, name="new_head"), names


def _model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")[:60] or "model"


def kept_layers(surgery: Surgery) -> list[Any]:
    """The base layers kept in ``surgery.features`` (front layers excluded), in graph order."""
    keras = _keras()
    return [
        layer
        for layer in surgery.features.layers
        if not isinstance(layer, keras.layers.InputLayer)
        and not layer.name.startswith(_FRONT_PREFIX)
    ]


# --------------------------------------------------------------------------------------
# Public API


def replace_head(
    base: BaseModel,
    class_names: list[str],
    *,
    cut_at: str | int | None = None,
    head: HeadSpec = HeadSpec(),  # noqa: B008 (frozen dataclass, immutable default)
    freeze: FreezeSpec = FreezeSpec(),  # noqa: B008
    image_size: tuple[int, int] | None = None,
) -> Surgery:
    """Cut ``base`` at ``cut_at`` and put a new head for ``class_names`` on it.

    Args:
        base: the loaded base model (not modified: kept layers are copies).
        class_names: the new classes; the output has one unit per class (or 1 sigmoid unit
            for 2 classes with ``head.binary_sigmoid``).
        cut_at: the last kept layer: a name, a flat index (see `models.describe`) or a nested
            model's name; default the base's suggested cut.
        head: the new head's layout.
        freeze: which kept layers train (BatchNorm always stays frozen).
        image_size: (H, W) of the images the new model takes; default the base's input size.
            When it differs, a Resizing layer feeds the base at its own size.

    Returns:
        The new model, its ``features``/``head`` parts, loss and label encoding, and a diff.

    Raises:
        ConfigError: fewer than 2 classes, binary_sigmoid without 2 classes, bad head values.
        ModelError: invalid cut point, an added conv block on a non-4-D cut, bad freeze spec.
    """
    keras = _keras()
    head.validate()
    class_names = [str(c) for c in class_names]
    if len(class_names) < 2:
        raise ConfigError(
            f"A classifier needs at least 2 classes; got {len(class_names)}. Add image folders."
        )
    if head.binary_sigmoid and len(class_names) != 2:
        raise ConfigError(
            f"A single sigmoid output works for exactly 2 classes; the data has "
            f"{len(class_names)}. Turn off binary_sigmoid (softmax handles any number)."
        )
    image_size = _image_size(base, image_size)
    if min(image_size) < 8:
        raise ConfigError(f"Image size {image_size} is too small; use at least 8x8 pixels.")
    check_image_model(base.model, base.name)
    cut_index, cut_name = resolve_cut(base, cut_at)
    cut = _cut(base, image_size, cut_name)
    features, cut_tensor, front, replay = cut.features, cut.tensor, cut.front, cut.replay
    head_model, head_names = _head(tuple(cut_tensor.shape[1:]), len(class_names), head, cut.taken)
    image = keras.Input(shape=(*image_size, base.channels), dtype="uint8", name="image")
    outputs = head_model(features(image, training=False))
    model = keras.Model(image, outputs, name=_model_name(f"retrained_{base.model.name}"))

    binary = head.binary_sigmoid
    kept = {layer.name for layer in features.layers}
    removed = [layer.name for _, layer in iter_layers(base.model) if layer.name not in kept]
    surgery = Surgery(
        model=model,
        features=features,
        head=head_model,
        class_names=class_names,
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        label_encoding="binary" if binary else "index",
        cut_at=cut_name,
        diff={
            "cut_at": cut_name,
            "cut_index": cut_index,
            "cut_output_shape": list(cut_tensor.shape),
            "image_size": list(image_size),
            "preprocessing": base.preprocessing,
            "removed": removed,
            "added": [layer.name for layer in front] + head_names,
            "renamed": dict(replay.renamed),
            "params_before": count_params(base.model.weights),
        },
    )
    apply_freeze(surgery, freeze)
    return surgery


def apply_freeze(surgery: Surgery, freeze: FreezeSpec) -> None:
    """Set ``trainable`` on the kept base layers; BatchNorm always stays frozen.

    ``top:K`` unfreezes the last K kept layers (in graph order, layers without weights
    included, as ``base.layers[-K:]`` would); the new head always trains.

    Raises:
        ModelError: K out of range, unknown layer names, or an unknown mode.
    """
    keras = _keras()
    kept = kept_layers(surgery)
    n = len(kept)
    if freeze.mode == "all":
        chosen: set[str] = set()
    elif freeze.mode == "none":
        chosen = {layer.name for layer in kept}
    elif freeze.mode == "top":
        if not 1 <= freeze.k <= n:
            raise ModelError(
                f"top:{freeze.k} is out of range: the kept base has {n} layers; use 1 <= K <= {n}."
            )
        chosen = {layer.name for layer in kept[n - freeze.k :]}
    elif freeze.mode == "names":
        known = {layer.name for layer in kept}
        unknown = [name for name in freeze.names if name not in known]
        if unknown:
            raise ModelError(
                f"Cannot unfreeze {', '.join(repr(u) for u in unknown[:3])}: not a kept layer. "
                "Pick names from the layer table above the cut."
            )
        chosen = set(freeze.names)
    else:
        raise ModelError(f"Unknown freeze mode '{freeze.mode}'. Use all, none, top or names.")
    for layer in kept:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer.name in chosen and not is_bn
    surgery.head.trainable = True
    with_weights = [layer for layer in kept if layer.weights]
    frozen = [layer.name for layer in with_weights if not layer.trainable]
    surgery.diff.update(
        freeze=str(freeze),
        frozen=len(frozen),
        trainable=len(with_weights) - len(frozen),
        frozen_layers=frozen,
        batchnorm_frozen=sum(
            isinstance(layer, keras.layers.BatchNormalization) for layer in with_weights
        ),
        params_after=count_params(surgery.model.weights),
        trainable_params=count_params(surgery.model.trainable_weights),
        frozen_params=count_params(surgery.model.non_trainable_weights),
    )


def preview(surgery: Surgery) -> dict[str, Any]:
    """What the Model page shows of a surgery: the diff, the layer rows (`summary`), the loss,
    the label encoding and the output shape."""
    return {
        "diff": surgery.diff,
        "rows": summary(surgery),
        "loss": surgery.loss,
        "label_encoding": surgery.label_encoding,
        "output_shape": list(surgery.model.outputs[0].shape),
    }


def summary(surgery: Surgery) -> list[dict[str, Any]]:
    """The new model's layer table: front, kept base layers and head, each with a status.

    ``status`` is ``"new"`` (added), ``"trainable"`` or ``"frozen"``; ``part`` says where the
    layer sits (``front``, ``base``, ``head``).
    """
    from retrain.models.keras_helpers import layer_output_shape

    keras = _keras()
    rows = []
    for part, model in (("features", surgery.features), ("head", surgery.head)):
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            front = layer.name.startswith(_FRONT_PREFIX)
            new = front or part == "head"
            rows.append(
                {
                    "index": len(rows),
                    "name": layer.name,
                    "type": type(layer).__name__,
                    "output_shape": layer_output_shape(layer),
                    "params": count_params(layer.weights),
                    "part": "front" if front else ("base" if part == "features" else "head"),
                    "status": "new" if new else ("trainable" if layer.trainable else "frozen"),
                }
            )
    return rows


# --------------------------------------------------------------------------------------
# Keep the old classes: extend the original head instead of replacing it

#: Output layer types an original head can be extended from (one row per class).
_EXTENDABLE = ("Dense",)


def merged_classes(old: list[str], new: list[str]) -> list[str]:
    """The extended head's classes: the old ones in output order, then the new ones.

    A new class whose name equals an old one is that old class (its images join it).
    """
    merged = list(old)
    for name in new:
        if name not in merged:
            merged.append(name)
    return merged


def _tail(base: BaseModel, cut_name: str) -> list[Any]:
    """The original head's leaf layers after ``cut_name``, in graph order."""
    leaves = [layer for _, layer in iter_layers(base.model)]
    names = [layer.name for layer in leaves]
    return leaves[names.index(cut_name) + 1 :]


def extend_head(
    base: BaseModel,
    old_class_names: list[str],
    new_class_names: list[str],
    *,
    freeze: FreezeSpec = FreezeSpec(),  # noqa: B008 (frozen dataclass, immutable default)
    image_size: tuple[int, int] | None = None,
) -> Surgery:
    """Keep the original head and add outputs for new classes (old classes first, in order).

    The model is cut at the base's suggested cut (just before its classifier); the original
    head's layers are copied with their weights, and its output layer gets one row per new
    class appended. New rows start from the mean of the old rows with a bias 2 + log(#new)
    lower, so every new logit starts below the largest old logit for *any* input: the
    extended model predicts exactly what the original predicted (the old outputs' logits
    are untouched; argmax and the old classes' relative probabilities are the same).

    Args:
        base: the loaded base model (not modified).
        old_class_names: names of the original outputs in output order
            (`models.original_class_names`).
        new_class_names: the new data's classes; a name equal to an old one is that class.
        freeze: which kept base layers train (the head always trains).
        image_size: (H, W) the new model takes; default the base's input size.

    Returns:
        A `Surgery` whose ``class_names`` are `merged_classes`; ``diff`` also has
        ``old_classes``, ``new_classes`` (the added ones) and ``kept_head``.

    Raises:
        ModelError: no classifier head, an output layer that is not a softmax Dense, or a
            head that could not be rebuilt faithfully.
        ConfigError: names that do not fit the outputs.
    """
    import numpy as np

    keras = _keras()
    if not base.has_original_head:
        raise ModelError(
            f"'{base.name}' has no classifier head to keep (it ends in "
            f"{type(output_leaf(base.model)).__name__} '{output_leaf(base.model).name}'); "
            "turn off keep-old-classes to put a new head on it."
        )
    check_image_model(base.model, base.name)
    n_old = int(base.model.outputs[0].shape[-1] or 0)
    if len(old_class_names) != n_old:
        raise ConfigError(
            f"{len(old_class_names)} original class names for {n_old} outputs of "
            f"'{base.name}'; give one name per output, in output order."
        )
    class_names = merged_classes(
        [str(c) for c in old_class_names], [str(c) for c in new_class_names]
    )
    added_names = class_names[n_old:]
    cut_name = base.suggested_cut
    tail = _tail(base, cut_name)
    dense = [i for i, layer in enumerate(tail) if type(layer).__name__ in _TAIL_WEIGHTED]
    out_i = dense[-1] if dense else -1
    if out_i < 0 or type(tail[out_i]).__name__ not in _EXTENDABLE:
        kind = type(tail[out_i]).__name__ if out_i >= 0 else "no output layer"
        raise ModelError(
            f"'{base.name}' ends in {kind}; classes can be added only to a Dense classifier. "
            "Turn off keep-old-classes to put a new head on it."
        )
    output = tail[out_i]
    after = [type(layer).__name__ for layer in tail[out_i + 1 :]]
    activation = output.get_config().get("activation")
    softmax_after = any(
        t == "Softmax" or (t == "Activation" and layer.get_config().get("activation") == "softmax")
        for t, layer in zip(after, tail[out_i + 1 :], strict=True)
    )
    if activation == "sigmoid" or "sigmoid" in str(
        [layer.get_config().get("activation") for layer in tail[out_i + 1 :]]
    ):
        raise ModelError(
            f"'{base.name}' has a sigmoid output (independent yes/no outputs), not a softmax "
            "over classes; classes can be added only to a softmax classifier."
        )
    image_size = _image_size(base, image_size)
    cut_index, _ = resolve_cut(base, cut_name)
    cut = _cut(base, image_size, cut_name)
    features, cut_tensor, front, replay = cut.features, cut.tensor, cut.front, cut.replay

    # The head: copies of the original tail, the output layer widened.
    head_in = keras.Input(shape=tuple(cut_tensor.shape[1:]), name="head_input")
    h = head_in
    kernel, bias = (output.get_weights() + [None])[:2]
    for i, layer in enumerate(tail):
        config = layer.get_config()
        if i == out_i:
            config = {**config, "units": len(class_names), "dtype": "float32"}
            if activation in (None, "linear") and not softmax_after:
                config["activation"] = "softmax"  # the saved model outputs probabilities
        copy = type(layer).from_config(config)
        h = copy(h)
        if i == out_i:
            n_new = len(class_names) - n_old
            margin = 2.0 + float(np.log(max(n_new, 1)))
            if bias is None:  # use_bias=False: the new rows' offset needs a bias
                raise ModelError(
                    f"The output layer '{output.name}' of '{base.name}' has no bias; classes "
                    "can be added only to a Dense output with a bias."
                )
            new_kernel = np.repeat(kernel.mean(axis=1, keepdims=True), n_new, axis=1)
            new_bias = np.full(n_new, bias.mean() - margin, dtype=bias.dtype)
            copy.set_weights(
                [np.concatenate([kernel, new_kernel], axis=1), np.concatenate([bias, new_bias])]
            )
        elif layer.weights:
            copy.set_weights(layer.get_weights())
    head_model = keras.Model(head_in, h, name="kept_head")
    image = keras.Input(shape=(*image_size, base.channels), dtype="uint8", name="image")
    model = keras.Model(
        image,
        head_model(features(image, training=False)),
        name=_model_name(f"extended_{base.model.name}"),
    )
    _check_same_old_task(base, model, features, n_old, image_size)

    surgery = Surgery(
        model=model,
        features=features,
        head=head_model,
        class_names=class_names,
        loss="sparse_categorical_crossentropy",
        label_encoding="index",
        cut_at=cut_name,
        diff={
            "mode": "keep",
            "cut_at": cut_name,
            "cut_index": cut_index,
            "cut_output_shape": list(cut_tensor.shape),
            "image_size": list(image_size),
            "preprocessing": base.preprocessing,
            "removed": [],
            "added": [layer.name for layer in front],
            "renamed": dict(replay.renamed),
            "kept_head": [layer.name for layer in tail],
            "widened": output.name,
            "old_classes": list(class_names[:n_old]),
            "new_classes": added_names,
            "params_before": count_params(base.model.weights),
        },
    )
    apply_freeze(surgery, freeze)
    return surgery


_TAIL_WEIGHTED = ("Dense", "EinsumDense", "Conv2D")


def _check_same_old_task(
    base: BaseModel, model: Any, features: Any, n_old: int, image_size: tuple[int, int]
) -> None:
    """Check on random images that the old outputs' argmax and relative probabilities match.

    Raises:
        ModelError: the rebuilt head computes something else (unusual wiring in the head).
    """
    import numpy as np

    from retrain.models import preprocessing as prep

    shape = (4, *image_size, base.channels)
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    original = base.model
    if "int" not in str(getattr(original.inputs[0], "dtype", "float32")):
        original = prep.with_preprocessing(original, base.preprocessing)
    if base.input_size is not None and tuple(base.input_size) != tuple(image_size):
        return  # resized input: the original cannot take these pixels directly
    want = np.asarray(original.predict_on_batch(pixels), dtype=np.float64)
    got = np.asarray(model.predict_on_batch(pixels), dtype=np.float64)[:, :n_old]
    if want.min() < 0 or np.abs(want.sum(axis=1) - 1).max() > 1e-3:  # logits: softmax them
        want = np.exp(want - want.max(axis=1, keepdims=True))
    want = want / want.sum(axis=1, keepdims=True)
    got = got / got.sum(axis=1, keepdims=True)
    if not np.allclose(want, got, atol=1e-4):
        raise ModelError(
            f"The head of '{base.name}' could not be rebuilt faithfully (its layers are not a "
            "simple chain); turn off keep-old-classes to put a new head on it."
        )
