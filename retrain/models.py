"""Where base models come from: uploaded files, the keras.applications zoo, the built-in model.

Every loader returns a `BaseModel`: a Keras 3 model with its original head, plus what the rest
of Retrain Studio needs to retrain it (input size, preprocessing, class names, suggested cut).

BASE specs (the same strings on the CLI and in the dashboard)::

    path/to/model.keras | path/to/model.h5           an uploaded file (labels.txt beside it is read)
    applications:<Name>[:imagenet|:none|:<weights>]  a keras.applications backbone (default imagenet)
    builtin:digits-cnn                               small CNN trained on sample digits 0-4

Loading is safe: `.keras` files load with ``safe_mode=True`` and a model that holds a Lambda
layer or unknown custom classes is refused before anything is deserialized. Keras 2 files
(Teachable Machine exports included) are read with ``tf_keras`` and rebuilt as an equivalent
Keras 3 model whose outputs are checked against the original.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain import preprocessing
from retrain.errors import ModelError

MODEL_EXTENSIONS = (".keras", ".h5", ".hdf5")


# builtin:<name> -> display name
BUILTIN_LABELS = {"digits-cnn": "Digits CNN (built-in, digits 0-4)"}

# Layer types that make up a classifier tail (the "original head"), walking back from the end.
_TAIL_FREE = {"Activation", "Softmax", "Dropout", "Flatten", "Reshape"}
_TAIL_OUTPUT = {"Dense", "Conv2D", "EinsumDense"}
_TAIL_MORE = {"Dense", "Dropout", "Activation", "Softmax", "ReLU", "EinsumDense"}
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


@dataclass(frozen=True)
class ZooEntry:
    """One keras.applications backbone.

    Attributes:
        name: the constructor's name in ``keras.applications``.
        preprocessing: key of `retrain.preprocessing.REGISTRY` (its ``preprocess_input``).
        input_size: default (H, W) of the ImageNet weights.
        classifier_start: name of the first layer of the ImageNet classifier.
    """

    name: str
    preprocessing: str
    input_size: tuple[int, int]
    classifier_start: str

    def constructor(self) -> Any:
        """Return the ``keras.applications`` function that builds this backbone."""
        return getattr(_keras().applications, self.name)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("MobileNetV2", "tf", (224, 224), "predictions"),
        ZooEntry("MobileNetV3Small", "inside", (224, 224), "logits"),
        ZooEntry("MobileNetV3Large", "inside", (224, 224), "logits"),
        ZooEntry("EfficientNetB0", "inside", (224, 224), "top_dropout"),
        ZooEntry("EfficientNetV2B0", "inside", (224, 224), "top_dropout"),
        ZooEntry("ResNet50V2", "tf", (224, 224), "predictions"),
        ZooEntry("ConvNeXtTiny", "inside", (224, 224), "convnext_tiny_head_dense"),
    )
}


@dataclass
class BaseModel:
    """A loaded base model with what retraining needs to know about it."""

    model: Any  # keras.Model, as loaded, original head included
    spec: str  # the BASE string it came from (re-loadable by load_base)
    name: str  # display name
    input_size: tuple[int, int] | None  # (H, W) the base expects; None = any
    preprocessing: str  # key of retrain.preprocessing.REGISTRY
    class_names: list[str] | None  # the original head's classes if known
    suggested_cut: str  # name of the last layer before the classifier
    has_original_head: bool  # whether layers after suggested_cut form a classifier
    # Additive: where the model came from and how it was read (conversion check, guesses).
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Channels of the images the model takes: 1 (grayscale) or 3 (RGB)."""
        return image_channels(self.model)


# --------------------------------------------------------------------------------------
# Keras helpers


def _keras() -> Any:
    """Import Keras late (``import retrain.models`` stays cheap)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def is_model(layer: Any) -> bool:
    """Whether ``layer`` is a nested Functional/Sequential model (a container of layers)."""
    keras = _keras()
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth")
    )


def iter_layers(model: Any, parent: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Yield ``(parent_path, layer)`` for every leaf layer, nested models flattened depth-first.

    Input layers are skipped; ``parent_path`` is ``"outer/inner"`` for nested models, None at
    the top. The position in this sequence is the layer *index* used by cut points.
    """
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if is_model(layer):
            yield from iter_layers(layer, f"{parent}/{layer.name}" if parent else layer.name)
        else:
            yield parent, layer


def output_leaf(model: Any) -> Any:
    """Return the leaf layer that produces ``model``'s (first) output, through nesting."""
    if not is_model(model):
        return model
    if type(model).__name__ == "Sequential":
        return output_leaf(model.layers[-1])
    layer = model.outputs[0]._keras_history[0]
    return output_leaf(layer)


def layer_output_shape(layer: Any) -> list[int | None] | None:
    """The output shape of a layer as a JSON-friendly list (None when ambiguous)."""
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    return list(shape)


def count_params(weights: Any) -> int:
    """The number of scalars in a list of weights (variables or arrays)."""
    total = 0
    for w in weights:
        n = 1
        for d in w.shape:
            n *= int(d)
        total += n
    return total


def _params(layer: Any) -> int:
    return count_params(layer.weights)


def _trainable_params(layer: Any) -> int:
    return count_params(layer.trainable_weights)


#: Channel counts of the images a model may take, with their names in the user's words.
IMAGE_CHANNELS: dict[int, str] = {1: "grayscale", 3: "RGB"}


def _shape_text(shape: Any) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def not_an_image(shape: Any) -> str | None:
    """What an input of ``shape`` (batch dimension first) takes when it is no image input.

    Returns None for ``(batch, height, width, 1 or 3)``, else the words for the message
    "'x' takes <this>", e.g. ``"sequences of shape (None, 60, 1)"``.
    """
    dims = tuple(None if d is None else int(d) for d in shape)
    text = _shape_text(dims)
    if len(dims) == 4 and dims[-1] in IMAGE_CHANNELS:
        return None
    if len(dims) == 2:
        return f"vectors of shape {text}"
    if len(dims) == 3:
        return f"sequences of shape {text}"
    if len(dims) == 4 and dims[1] in IMAGE_CHANNELS:
        return f"channels-first images of shape {text}"
    if len(dims) == 4:
        return f"images with {dims[-1]} channels, shape {text}"
    if len(dims) == 5:
        return f"videos or volumes of shape {text}"
    return f"input of shape {text}"


def not_an_image_error(label: str, kind: str) -> ModelError:
    """The refusal of a model whose input is ``kind`` (from `not_an_image`)."""
    return ModelError(
        f"'{label}' takes {kind}; Retrain Studio retrains image classifiers (input "
        "(height, width, 1) grayscale or (height, width, 3) RGB). Upload an image classifier."
    )


def image_channels(model: Any) -> int:
    """How many channels (1 grayscale, 3 RGB) the images ``model`` takes have."""
    return int(model.inputs[0].shape[-1])


def describe_input(size: tuple[int, int] | list[int] | None, channels: int) -> str:
    """The input in the user's words: ``"28x28 grayscale"``, ``"any size RGB"``."""
    where = f"{size[0]}x{size[1]}" if size else "any size"
    return f"{where} {IMAGE_CHANNELS.get(channels, f'{channels}-channel')}"


def check_image_model(model: Any, label: str) -> tuple[int, int] | None:
    """Check that ``model`` takes one image; return its (H, W) or None when any size.

    Images may be grayscale (1 channel) or RGB (3); `image_channels` says which.

    Raises:
        ModelError: several inputs, not an image input (see `not_an_image`), or not a graph
            model.
    """
    if not is_model(model):
        raise ModelError(
            f"'{label}' is a subclassed Keras model; only Sequential and Functional models can "
            "be inspected and retrained. Save it as a Functional model."
        )
    if len(model.inputs) != 1:
        raise ModelError(
            f"'{label}' has {len(model.inputs)} inputs; an image classifier with one image "
            "input (height, width, 1 or 3) is expected."
        )
    shape = tuple(model.inputs[0].shape)
    kind = not_an_image(shape)
    if kind is not None:
        raise not_an_image_error(label, kind)
    if shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def suggest_cut(model: Any) -> tuple[str, bool]:
    """Find the last layer before the classifier tail; return (name, has_original_head).

    The tail is: trailing activations/dropout/flatten, one output layer (Dense or Conv2D),
    then any Dense/Dropout/Activation before it (a hidden layer of the old head).
    """
    leaves = [layer for _, layer in iter_layers(model)]
    i = len(leaves) - 1
    while i >= 0 and type(leaves[i]).__name__ in _TAIL_FREE:
        i -= 1
    if i < 0 or type(leaves[i]).__name__ not in _TAIL_OUTPUT:
        return leaves[-1].name, False
    i -= 1
    while i >= 0 and type(leaves[i]).__name__ in _TAIL_MORE:
        i -= 1
    if i < 0:
        return leaves[0].name, False
    return leaves[i].name, True


def _cut_before(model: Any, classifier_start: str) -> str:
    """Name of the last non-Dropout leaf before ``classifier_start`` (zoo entries)."""
    leaves = [layer for _, layer in iter_layers(model)]
    names = [layer.name for layer in leaves]
    i = names.index(classifier_start) - 1
    while i > 0 and type(leaves[i]).__name__ == "Dropout":
        i -= 1
    return names[i]


def detect_preprocessing(model: Any) -> tuple[str, str]:
    """Guess the preprocessing of a loaded model; return (key, how it was found).

    The key is one of `retrain.preprocessing.REGISTRY`; a model retrained here has its
    preprocessing inside (layers named ``retrain_...``).
    """
    leaves = [layer for _, layer in iter_layers(model)][:4]
    for layer in leaves:
        if type(layer).__name__ in ("Rescaling", "Normalization") or layer.name.startswith(
            preprocessing.LAYER_PREFIX
        ):
            return "inside", f"{type(layer).__name__} layer '{layer.name}' inside the model"
    names = {layer.name for _, layer in iter_layers(model)}
    if {"Conv1", "bn_Conv1", "out_relu"} <= names or "expanded_conv_depthwise" in names:
        return "tf", "MobileNetV2 family (Keras preprocess_input: [-1, 1])"
    if {"conv1_conv", "post_relu"} <= names:
        return "tf", "ResNetV2 family (Keras preprocess_input: [-1, 1])"
    return "unit", ASSUMED_PREPROCESSING


#: How `detect_preprocessing` says that it found nothing and fell back to "unit".
ASSUMED_PREPROCESSING = "not detectable; assumed [0, 1] scaling"


def preprocessing_warning(base: BaseModel) -> str | None:
    """A one-line warning when the preprocessing was assumed, not detected, probed or set."""
    if base.origin.get("preprocessing_source") != ASSUMED_PREPROCESSING:
        return None
    return (
        f"'{base.name}' has no preprocessing layer and does not say how its pixels were scaled; "
        "[0, 1] (unit) is assumed. Give the original task's images (--old-data) to find it, or "
        "set it with --preprocessing."
    )


# --------------------------------------------------------------------------------------
# Loading


def load_base(spec: str, *, workspace: Path | None = None) -> BaseModel:
    """Load a base model from a BASE spec.

    Args:
        spec: a path to .keras/.h5, ``applications:<Name>[:imagenet|:none|:<weights file>]``
            or ``builtin:<name>``.
        workspace: folder relative paths are looked up in when not found as given.

    Returns:
        The model with its original head and what retraining needs to know about it.

    Raises:
        ModelError: unknown spec, unreadable or unsafe file, not an image model, offline
            ImageNet download.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ModelError(
            "No base model given. Use a .keras/.h5 path, applications:<Name> or builtin:digits-cnn."
        )
    if spec.startswith("applications:"):
        return _load_zoo(spec)
    if spec.startswith("builtin:"):
        return _load_builtin(spec)
    path = Path(spec).expanduser()
    if not path.exists() and workspace is not None and (Path(workspace) / spec).exists():
        path = Path(workspace) / spec
    return _load_file(path, spec)


def _parse_zoo(spec: str) -> tuple[ZooEntry, str]:
    _, _, rest = spec.partition(":")
    name, _, weights = rest.partition(":")
    lookup = {k.lower(): v for k, v in ZOO.items()}
    entry = lookup.get(name.strip().lower())
    if entry is None:
        raise ModelError(
            f"Unknown model '{name}' in applications. Choose one of: {', '.join(ZOO)}."
        )
    return entry, (weights.strip() or "imagenet")


def _load_zoo(spec: str) -> BaseModel:
    entry, weights = _parse_zoo(spec)
    keras = _keras()
    shape = (*entry.input_size, 3)
    ctor = entry.constructor()
    origin: dict[str, Any] = {"source": "keras.applications", "weights": weights}
    if weights.lower() == "imagenet":
        _use_keras_home()
        try:
            model = ctor(weights="imagenet", include_top=True, input_shape=shape)
        except Exception as err:  # Keras wraps URLError in a bare Exception; inspect the chain.
            if _is_network_error(err):
                raise ModelError(
                    f"Could not download the ImageNet weights of {entry.name} (no network?). "
                    f"Use 'applications:{entry.name}:none' (random weights), upload a "
                    ".keras/.h5 model, or 'builtin:digits-cnn'."
                ) from None
            raise
        label = f"{entry.name} (ImageNet)"
    elif weights.lower() == "none":
        model = ctor(weights=None, include_top=True, input_shape=shape)
        label = f"{entry.name} (random weights)"
    else:
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise ModelError(
                f"Weights file '{weights}' not found. Give a path to a .weights.h5/.h5 file "
                f"for {entry.name}, or use :imagenet or :none."
            )
        from retrain import modelfile

        modelfile.check_model_file(wpath)  # LFS pointers and weight bombs, before building
        model = ctor(weights=None, include_top=True, input_shape=shape)
        try:
            model.load_weights(str(wpath))
        except Exception as err:  # Keras raises many types for a mismatched file.
            raise ModelError(
                f"'{wpath.name}' does not fit {entry.name} with its ImageNet head: "
                f"{_first_line(err)}. Use weights saved from the same architecture (include_top)."
            ) from None
        label = f"{entry.name} ({wpath.name})"
    del keras
    _stable_names(model)
    return BaseModel(
        model=model,
        spec=spec,
        name=label,
        input_size=entry.input_size,
        preprocessing=entry.preprocessing,
        class_names=None,
        suggested_cut=_cut_before(model, entry.classifier_start),
        has_original_head=True,
        origin={**origin, "preprocessing_source": f"keras.applications.{entry.name}"},
    )


def _use_keras_home() -> None:
    """Point Keras's download cache at the shared `workspace.keras_home()` folder.

    ``keras.utils.get_file`` caches under ``keras.config`` 's home, which Keras reads from
    ``$KERAS_HOME`` once at import; set it here so every process shares one download.
    """
    from retrain.workspace import keras_home

    try:
        from keras.src.backend import config as keras_config
    except ImportError:  # another Keras layout: keep its own cache folder
        return
    keras_config._KERAS_DIR = str(keras_home())


def _stable_names(model: Any) -> None:
    """Rename auto-named layers (``activation_57``) to names that depend only on the model.

    Keras numbers unnamed layers per process, so the same backbone built in the page and in
    a training worker would otherwise disagree on a cut point's name.
    """
    leaves = [layer for _, layer in iter_layers(model)]
    explicit = set()
    auto = []
    for layer in leaves:
        stem = _snake_case(type(layer).__name__)
        if re.fullmatch(rf"{re.escape(stem)}(_\d+)?", layer.name):
            auto.append((stem, layer))
        else:
            explicit.add(layer.name)
    counts: dict[str, int] = {}
    for stem, layer in auto:
        n = counts.get(stem, 0)
        name = stem if n == 0 else f"{stem}_{n}"
        while name in explicit:
            n += 1
            name = f"{stem}_{n}"
        counts[stem] = n + 1
        explicit.add(name)
        layer.name = name


def _snake_case(name: str) -> str:
    """Keras's own auto-naming rule (``GlobalAveragePooling2D`` -> ``global_average_pooling2d``)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a failed download."""
    import socket
    import urllib.error

    kinds = (*_NETWORK_ERRORS, urllib.error.URLError, socket.gaierror, socket.timeout)
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kinds) or "URL fetch failure" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _read_labels(folder: Path, names: list[str] | None = None) -> list[str] | None:
    """Read a labels.txt (Teachable Machine writes ``"0 name"`` lines)."""
    candidates = [folder / "labels.txt"]
    for path in candidates:
        if path.is_file():
            return parse_labels(path.read_text(encoding="utf-8", errors="replace"))
    return names


def parse_labels(text: str) -> list[str]:
    """Parse labels.txt text: one class per line, an optional leading ``"<index> "`` dropped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all(re.match(r"^\d+\s+\S", line) for line in lines):
        lines = [line.split(None, 1)[1] for line in lines]
    return lines


def _load_file(path: Path, spec: str) -> BaseModel:
    if not path.is_file():
        raise ModelError(f"No model file at '{path}'. Check the path or upload the model again.")
    suffix = path.suffix.lower()
    if suffix not in MODEL_EXTENSIONS:
        raise ModelError(
            f"'{path.name}' is not a model file: expected .keras (Keras 3) or .h5 (legacy Keras)."
        )
    from retrain import modelfile

    modelfile.check_model_file(path)  # LFS pointers and pickled weights never reach Keras
    origin: dict[str, Any] = {"source": "file", "file": path.name}
    labels: list[str] | None = None
    if suffix == ".keras":
        model, labels = _load_keras_file(path)
        origin["format"] = "Keras 3 (.keras)"
    else:
        model, info = _load_h5_file(path)
        origin.update(info)
    input_size = check_image_model(model, path.name)
    labels = _read_labels(path.parent, labels)
    cut, has_head = suggest_cut(model)
    n_out = model.outputs[0].shape[-1]
    if labels is not None and has_head and n_out not in (len(labels), None):
        origin["labels_ignored"] = f"labels.txt has {len(labels)} names, the model {n_out} outputs"
        labels = None
    if origin.get("teachable_machine"):
        prep, how = "tf", "Teachable Machine export ([-1, 1])"
    else:
        prep, how = detect_preprocessing(model)
    origin["preprocessing_source"] = how
    return BaseModel(
        model=model,
        spec=spec,
        name=path.name,
        input_size=input_size,
        preprocessing=prep,
        class_names=labels,
        suggested_cut=cut,
        has_original_head=has_head,
        origin=origin,
    )


def _check_config(config: Any, label: str, allowed: Any) -> None:
    """Refuse non-image models, Lambda layers and classes Keras does not know, before
    deserializing anything.

    ``config`` is a model config (Keras 3 or Keras 2 JSON); ``allowed(class_name, entry)``
    says whether a layer class is known.
    """
    shape = config_input_shape(config)
    kind = not_an_image(shape) if shape is not None else None
    if kind is not None:
        raise not_an_image_error(label, kind)
    for entry in _layer_entries(config):
        cls = entry.get("class_name", "?")
        name = (entry.get("config") or {}).get("name", "?")
        if cls in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
            raise ModelError(
                f"'{label}' contains a {cls} layer ('{name}'): loading it would run arbitrary "
                "Python code, so it is refused. Rebuild the model with standard Keras layers."
            )
        if not allowed(cls, entry):
            raise ModelError(
                f"'{label}': layer class {cls} (layer '{name}') is not part of Keras, and custom "
                "code from a file is never run. Rebuild the model with built-in Keras layers "
                "and save it again."
            )


def config_input_shape(config: Any) -> list[int | None] | None:
    """The (first) input's batch shape a model config declares, read without deserializing.

    Keras 3 writes ``batch_shape``, Keras 2 ``batch_input_shape``, on the InputLayer or on a
    Sequential's first layer; a nested first model is looked into. None when not declared.
    """
    inner = config.get("config") if isinstance(config, dict) else None
    if not isinstance(inner, dict):
        return None
    entries = [e for e in inner.get("layers") or [] if isinstance(e, dict)]
    first = next((e for e in entries if e.get("class_name") == "InputLayer"), None)
    first = first or (entries[0] if entries else None)
    for source in (first.get("config") if first else None, inner):
        if isinstance(source, dict):
            for key in ("batch_shape", "batch_input_shape"):
                if isinstance(source.get(key), list):
                    return list(source[key])
    if first is not None and first.get("class_name") in _CONTAINERS:
        return config_input_shape(first)
    build = config.get("build_config")
    shape = build.get("input_shape") if isinstance(build, dict) else None
    return list(shape) if isinstance(shape, list) else None


def _layer_entries(config: Any) -> Iterator[dict]:
    """Every layer entry of a (possibly nested) model config."""
    if isinstance(config, dict):
        inner = config.get("config")
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if isinstance(layers, list):
            for entry in layers:
                if isinstance(entry, dict):
                    yield entry
                    yield from _layer_entries(entry)
        # Sequential wrappers in some Keras 2 files keep layers at this level.
        elif isinstance(config.get("layers"), list):
            for entry in config["layers"]:
                if isinstance(entry, dict):
                    yield entry
                    yield from _layer_entries(entry)


_CONTAINERS = {"Sequential", "Functional", "Model"}


def _known_keras3(cls: str, entry: dict) -> bool:
    keras = _keras()
    registered = entry.get("registered_name")
    module = str(entry.get("module") or "keras")
    if registered not in (None, cls) or not (module == "keras" or module.startswith("keras.")):
        return False
    if cls in _CONTAINERS or hasattr(keras.layers, cls):
        return True
    # Keras's own unexported layers (e.g. ConvNeXt's LayerScale) live in keras.src modules.
    import importlib

    try:
        return isinstance(getattr(importlib.import_module(module), cls, None), type)
    except ImportError:
        return False


def _known_legacy(cls: str, entry: dict) -> bool:
    keras = _keras()
    return cls in _CONTAINERS or hasattr(keras.layers, cls)


def _load_keras_file(path: Path) -> tuple[Any, list[str] | None]:
    from retrain import modelfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "config.json" not in names:
                raise ModelError(f"'{path.name}' is not a Keras model archive (no config.json).")
            config = json.loads(zf.read("config.json"))
            labels = None
            if "labels.txt" in names:
                labels = parse_labels(zf.read("labels.txt").decode("utf-8", "replace"))
            if "retrain.json" in names:
                meta = json.loads(zf.read("retrain.json"))
                labels = meta.get("class_names") or labels
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"'{path.name}' is not a readable .keras file ({_first_line(err)}). "
            "Upload a model saved with model.save('name.keras')."
        ) from None
    _check_config(config, path.name, _known_keras3)
    keras = _keras()
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # Keras raises many types for a bad archive; report them as one.
        if "pickle" in str(err).lower():  # never repeat numpy's "load it unsafely" advice
            raise modelfile.pickled_weights_error(path.name) from None
        raise ModelError(f"Could not load '{path.name}': {_first_line(err)}") from None
    return model, labels


def _load_h5_file(path: Path) -> tuple[Any, dict[str, Any]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            version = f.attrs.get("keras_version", b"")
    except OSError as err:
        raise ModelError(
            f"'{path.name}' is not a readable HDF5 model (truncated or corrupt: "
            f"{_first_line(err)}). Export or upload the file again."
        ) from None
    if raw is None:
        raise ModelError(
            f"'{path.name}' holds only weights, not a model. Save the whole model "
            "(model.save('name.h5') or .keras)."
        )
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    if isinstance(version, bytes):
        version = version.decode("utf-8")
    try:
        config = json.loads(raw)
    except ValueError:
        raise ModelError(f"'{path.name}' has an unreadable model config.") from None
    _check_config(config, path.name, _known_legacy)
    info: dict[str, Any] = {"format": f"HDF5 (Keras {version or '?'})"}
    keras = _keras()
    info["teachable_machine"] = _looks_like_teachable_machine(config)
    first_error: Exception | None = None
    if not info["teachable_machine"]:  # Keras 3 never reads those: straight to conversion
        try:
            return keras.saving.load_model(path, compile=False, safe_mode=True), info
        except Exception as err:  # Keras 2 files Keras 3 cannot read: convert below
            first_error = err
    cached = _converted_copy(path)
    if cached is not None:  # converted before (any session): the checked Keras 3 copy
        model, diff = cached
    else:
        try:
            model, diff = convert_keras2_h5(path)
        except ModelError:
            raise
        except Exception as err:  # report the first failure; conversion was the fallback
            reason = err if "tf_keras" in str(err) or first_error is None else first_error
            raise ModelError(f"Could not load '{path.name}': {_first_line(reason)}") from None
        _keep_converted_copy(path, model, diff)
    info.update(
        converted="Keras 2 file rebuilt as Keras 3 (read with tf_keras)",
        conversion_max_abs_diff=diff,
    )
    return model, info


def _converted_path(path: Path) -> Path:
    """Where the Keras 3 copy of a converted Keras 2 file is kept: named by the file's SHA-256,
    in the shared Keras cache, so the same upload in any session converts once."""
    from retrain.workspace import file_sha256, keras_home

    return keras_home() / "converted" / f"{file_sha256(path)}.keras"


def _converted_copy(path: Path) -> tuple[Any, float] | None:
    """The kept Keras 3 copy of ``path`` and its recorded conversion difference, or None."""
    target = _converted_path(path)
    record = target.with_suffix(".json")
    if not (target.is_file() and record.is_file()):
        return None
    try:
        diff = float(json.loads(record.read_text())["max_abs_diff"])
        model = _keras().saving.load_model(target, compile=False, safe_mode=True)
    except Exception:  # a broken copy is converted again, never trusted
        return None
    return model, diff


def _keep_converted_copy(path: Path, model: Any, diff: float) -> None:
    """Save the checked conversion (best effort: a read-only cache only costs time)."""
    import contextlib

    target = _converted_path(path)
    with contextlib.suppress(OSError, ValueError):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.stem}.{os.getpid()}.keras")
        model.save(partial)
        os.replace(partial, target)
        target.with_suffix(".json").write_text(json.dumps({"max_abs_diff": diff}))


def _looks_like_teachable_machine(config: dict) -> bool:
    """Teachable Machine: Sequential(Sequential(MobileNetV2 'model1' + GAP), Sequential(Dense...))."""
    names = {(e.get("config") or {}).get("name") for e in _layer_entries(config)}
    return "model1" in names and any(str(n).startswith("dense_Dense") for n in names)


# --------------------------------------------------------------------------------------
# Keras 2 conversion


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


# --------------------------------------------------------------------------------------
# Built-in starter model

_BUILTIN_LOCK = threading.Lock()


def builtin_path(name: str = "digits-cnn") -> Path:
    """Where the built-in model ``name`` is cached (trained once per host)."""
    from retrain.workspace import keras_home

    folder = keras_home() / "builtin"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.keras"


def _load_builtin(spec: str) -> BaseModel:
    from retrain import modelfile

    name = spec.partition(":")[2].strip()
    if name not in BUILTIN_LABELS:
        raise ModelError(
            f"Unknown built-in model '{name}'. Available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_LABELS)
        )
    path = ensure_builtin(name)
    model, meta = modelfile.load_model(path)
    return BaseModel(
        model=model,
        spec=f"builtin:{name}",
        name=BUILTIN_LABELS[name],
        input_size=(32, 32),
        preprocessing="inside",
        class_names=list(meta.get("class_names") or []) or None,
        suggested_cut="features",
        has_original_head=True,
        origin={
            "source": "built-in",
            "trained_on": meta.get("trained_on"),
            "train_seconds": meta.get("train_seconds"),
            "holdout_accuracy": meta.get("holdout_accuracy"),
            "preprocessing_source": "Rescaling layer inside the model",
        },
    )


def ensure_builtin(name: str = "digits-cnn") -> Path:
    """Return the cached built-in model file, training it first when absent.

    A file lock (and a thread lock, for Streamlit's threads) makes concurrent sessions wait
    for one training instead of each training its own; the file appears atomically.
    """
    import fcntl

    path = builtin_path(name)
    if path.is_file():
        return path
    with _BUILTIN_LOCK, open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                _train_digits_cnn(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def build_digits_cnn(num_classes: int = 5, seed: int = 0) -> Any:
    """The built-in architecture: uint8 32x32x3 -> Rescaling -> 3 conv blocks -> GAP -> Dense."""
    keras = _keras()
    layers = keras.layers

    def init(i: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + i)

    inp = keras.Input(shape=(32, 32, 3), dtype="uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inp)
    x = layers.Conv2D(
        16, 3, padding="same", activation="relu", kernel_initializer=init(1), name="conv1"
    )(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(
        32, 3, padding="same", use_bias=False, kernel_initializer=init(2), name="conv2"
    )(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(
        64, 3, padding="same", activation="relu", kernel_initializer=init(3), name="conv3"
    )(x)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    x = layers.Dropout(0.2, seed=seed, name="dropout")(x)
    out = layers.Dense(
        num_classes, activation="softmax", kernel_initializer=init(4), name="predictions"
    )(x)
    return keras.Model(inp, out, name="digits_cnn")


def _train_digits_cnn(path: Path, seed: int = 0) -> dict[str, Any]:
    """Train the built-in CNN on digits 0-4 (seconds on a CPU) and save it to ``path``."""
    import numpy as np

    from retrain import modelfile
    from retrain.sample import ORIGINAL_TASK, digit_images

    keras = _keras()
    images, labels, class_names = digit_images(ORIGINAL_TASK)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_val = len(labels) // 5
    model = build_digits_cnn(len(class_names), seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(images[n_val:], labels[n_val:], epochs=20, batch_size=32, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    pred = np.argmax(model.predict(images[:n_val], verbose=0), axis=-1)
    accuracy = float(np.mean(pred == labels[:n_val]))
    meta = {
        "class_names": class_names,
        "image_size": [32, 32],
        "resize_mode": "squash",
        "base": "builtin:digits-cnn",
        "loss": "sparse_categorical_crossentropy",
        "label_encoding": "index",
        "trained_on": f"sample digits {ORIGINAL_TASK} ({len(labels) - n_val} images)",
        "train_seconds": round(seconds, 2),
        "holdout_accuracy": round(accuracy, 4),
        "seed": seed,
    }
    modelfile.save_model(model, path, meta)
    return meta


# --------------------------------------------------------------------------------------
# Describe


def layer_rows(model: Any) -> list[dict[str, Any]]:
    """The layer table: one row per leaf layer (nested models flattened, ``parent`` set)."""
    rows = []
    for index, (parent, layer) in enumerate(iter_layers(model)):
        rows.append(
            {
                "index": index,
                "name": layer.name,
                "type": type(layer).__name__,
                "output_shape": layer_output_shape(layer),
                "params": _params(layer),
                "trainable": bool(layer.trainable) and _trainable_params(layer) > 0
                if layer.weights
                else bool(layer.trainable),
                "parent": parent,
            }
        )
    return rows


def layer_stack(
    base_rows: list[dict[str, Any]], new_rows: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The layers of the layer-stack picture, input first, each with ``part`` and ``status``.

    Args:
        base_rows: the base model's `layer_rows` (``describe(...)["layers"]``).
        new_rows: the new model's `surgery.summary` rows, or None before a surgery exists.

    Returns:
        The new model's front layers, then every base layer (``"removed"`` when the cut drops
        it, else its status in the new model), then the new head's layers. A base layer that
        is also a head layer (the original head kept and widened) is listed once, in the head.
        Without ``new_rows``: the base layers, all ``"frozen"``.
    """
    if new_rows is None:
        return [{**row, "status": "frozen", "part": "base"} for row in base_rows]
    kept = {row["name"]: row for row in new_rows}
    head = [row for row in new_rows if row["part"] == "head"]
    in_head = {row["name"] for row in head}  # a kept, widened original head ("keep" mode)
    stack = [row for row in new_rows if row["part"] == "front"]
    for row in base_rows:
        if row["name"] in in_head:
            continue  # drawn once, as a head layer (with its new size), not twice
        status = kept[row["name"]]["status"] if row["name"] in kept else "removed"
        stack.append({**row, "status": status, "part": "base"})
    return stack + head


def layer_block(row: dict[str, Any]) -> str:
    """A readable group for a layer: its numbered block, else its nested model, else itself."""
    match = re.match(r"^(.*?(?:block|stage|conv)_?\d+[a-z]?)(?:_|$)", row["name"])
    if match:
        return match.group(1)
    if row.get("part") in ("front", "head"):
        return "new head" if row["part"] == "head" else "input + preprocessing"
    return row.get("parent") or row["name"]


def _group_status(statuses: list[str]) -> str:
    """One colour per block: new, else trainable if any layer trains, else frozen/removed."""
    for status in ("new", "trainable", "frozen"):
        if status in statuses:
            return status
    return "removed"


def group_layers(rows: list[dict[str, Any]], max_groups: int = 48) -> list[dict[str, Any]]:
    """Group layer rows into the bars of the layer-stack picture.

    Consecutive layers of one block (`layer_block`) and of one kind (base, new, removed) form
    a group; while there are more than ``max_groups``, neighbours of one kind merge pairwise
    (``"conv1 … conv2"``).

    Args:
        rows: layers in order, each with ``name``, ``params``, ``status`` (``"new"``,
            ``"trainable"``, ``"frozen"`` or ``"removed"``) and optionally ``part``/``parent``
            (`layer_stack` gives them).
        max_groups: at most this many groups, where merging can reach it.

    Returns:
        One dict per group, in order: ``block`` (its label), ``kind``, ``params`` (sum),
        ``layers`` (names), ``statuses`` (per layer) and ``status`` (the group's colour).
    """
    groups: list[dict[str, Any]] = []
    for row in rows:
        kind = {"removed": "removed", "new": "new"}.get(row["status"], "base")
        key = (layer_block(row), kind)
        if groups and (groups[-1]["block"], groups[-1]["kind"]) == key:
            group = groups[-1]
        else:
            group = {"block": key[0], "kind": kind, "params": 0, "layers": [], "statuses": []}
            groups.append(group)
        group["params"] += row["params"]
        group["layers"].append(row["name"])
        group["statuses"].append(row["status"])
    while len(groups) > max_groups:
        merged: list[dict[str, Any]] = []
        for group in groups:
            last = merged[-1] if merged else None
            if last is not None and last["kind"] == group["kind"] and not last["closed"]:
                last["params"] += group["params"]
                last["layers"] += group["layers"]
                last["statuses"] += group["statuses"]
                last["block"] = f"{last['block'].split(' … ')[0]} … {group['block']}"
                last["closed"] = True
            else:
                merged.append({**group, "closed": False})
        if len(merged) == len(groups):
            break
        groups = merged
    for group in groups:
        group.pop("closed", None)
        group["status"] = _group_status(group["statuses"])
    return groups


def describe(base: BaseModel) -> dict[str, Any]:
    """Describe a base model: the `describe` CLI JSON (layer table, totals, cut, preprocessing).

    Beyond the CLI contract it adds ``name``, ``spec``, ``input_size``, ``class_names``,
    ``has_original_head``, ``head_layers`` (what the suggested cut removes), ``num_layers``,
    ``preprocessing_help`` and ``origin``.
    """
    model = base.model
    rows = layer_rows(model)
    names = [r["name"] for r in rows]
    cut_index = names.index(base.suggested_cut) if base.suggested_cut in names else len(rows) - 1
    total = _params(model)
    trainable = _trainable_params(model)
    return {
        "name": base.name,
        "spec": base.spec,
        "input_shape": list(model.inputs[0].shape),
        "output_shape": list(model.outputs[0].shape),
        "total_params": total,
        "trainable_params": trainable,
        "layers": rows,
        "suggested_cut": base.suggested_cut,
        "preprocessing": base.preprocessing,
        "preprocessing_help": preprocessing.describe(base.preprocessing),
        "input_size": list(base.input_size) if base.input_size else None,
        "class_names": base.class_names,
        "has_original_head": base.has_original_head,
        "head_layers": names[cut_index + 1 :],
        "num_layers": len(rows),
        "origin": base.origin,
        "channels": base.channels,
        "input": describe_input(base.input_size, base.channels),
        "preprocessing_warning": preprocessing_warning(base),
        **(
            {
                "preprocessing_probe": base.origin["preprocessing_probe"],
                "preprocessing_probe_info": base.origin.get("preprocessing_probe_info"),
            }
            if base.origin.get("preprocessing_probe")
            else {}
        ),
    }


#: What ``--preprocessing`` accepts: "auto" (detection, or the probe when old data is given)
#: or a key of `retrain.preprocessing.REGISTRY`.
PREPROCESSING_CHOICES: tuple[str, ...] = ("auto", *preprocessing.REGISTRY)


def resolve_preprocessing(
    base: BaseModel,
    choice: str | None = "auto",
    old_data: Any = None,
    *,
    workspace: Path | None = None,
    original_classes: str | list[str] | None = None,
    image_size: tuple[int, int] | None = None,
    resize_mode: str = "squash",
    seed: int = 0,
) -> BaseModel:
    """Set the base's preprocessing by hand, or find it with the probe on the old data.

    ``auto`` without old data keeps the detected key. With old data (the original task's
    images), every candidate is scored through the original head (`retrain.probe`); under
    ``auto`` the best wins, and a key set by hand is kept but warned about when it scores
    clearly worse. The scores land in ``origin["preprocessing_probe"]`` (key -> accuracy) and
    ``origin["preprocessing_probe_info"]`` (log losses, sample, margin, warning).

    Returns:
        A copy of ``base`` (the Keras model is shared) with ``preprocessing`` and ``origin`` set.

    Raises:
        ModelError: an unknown key, an RGB-only key for a grayscale model, or old data whose
            classes cannot be matched to the model's outputs.
        ConfigError, DatasetError: unusable old data.
    """
    import dataclasses

    from retrain import probe

    choice = (choice or "auto").strip()
    origin = dict(base.origin)
    key = base.preprocessing
    if choice != "auto":
        entry = preprocessing.get(choice)
        if entry.rgb_only and base.channels != 3:
            raise ModelError(
                f"Preprocessing '{choice}' works on RGB images; '{base.name}' takes "
                f"{describe_input(base.input_size, base.channels)} images. Use one of: "
                + ", ".join(k for k, e in preprocessing.REGISTRY.items() if not e.rgb_only)
                + "."
            )
        key = choice
        origin["preprocessing_source"] = "set by hand (--preprocessing)"
    if old_data:
        dataset = probe.old_dataset(old_data, workspace)
        names, _rule = original_class_names(base, dataset.class_names, original_classes)
        result = probe.probe(
            base.model,
            names,
            dataset,
            image_size=tuple(base.input_size or image_size or (224, 224)),
            channels=base.channels,
            has_layers_inside=base.preprocessing == "inside",
            resize_mode=resize_mode,
            seed=seed,
        )
        info = result.summary()
        if choice == "auto":
            key = result.best
            origin["preprocessing_source"] = (
                f"probe on {result.images} old images: {result.describe(result.best)}"
                + ("" if result.clear else " (not clearly ahead)")
            )
        else:
            info["warning"] = probe.check_choice(result, choice)
        origin["preprocessing_probe"] = result.accuracy
        origin["preprocessing_probe_info"] = info
    return dataclasses.replace(base, preprocessing=key, origin=origin)


#: How `original_class_names` named the original outputs.
CLASS_NAME_RULES = {
    "model": "the model carries them (labels.txt, built-in or Retrain Studio metadata)",
    "flag": "given with --original-classes, in output order",
    "folders": "the old data's class folders, sorted (image_dataset_from_directory's order)",
}


def output_count(base: BaseModel) -> int:
    """How many classes the original head tells apart (a 1-unit sigmoid head counts 2)."""
    n = base.model.outputs[0].shape[-1]
    return 2 if n == 1 else int(n or 0)


def original_class_names(
    base: BaseModel,
    old_class_folders: list[str] | None = None,
    original_classes: str | list[str] | None = None,
) -> tuple[list[str], str]:
    """Name the original head's outputs, in output order; return ``(names, rule)``.

    The rule (a key of `CLASS_NAME_RULES`) is, by priority: ``"flag"`` when
    ``original_classes`` is given (``"a,b,c"`` or a list), ``"model"`` when the model carries
    names, ``"folders"`` when only the old data's class folders are known: sorted, they map
    to output indices as ``keras.utils.image_dataset_from_directory`` assigned them.

    Raises:
        ModelError: the model has no classifier head; the names do not match the number of
            outputs; duplicate or empty names; nothing to name the outputs with.
    """
    if not base.has_original_head:
        raise ModelError(
            f"'{base.name}' has no classifier head (it ends in "
            f"{type(output_leaf(base.model)).__name__} '{output_leaf(base.model).name}'), so it "
            "has no original classes. Use a model whose last layer is a Dense classifier."
        )
    n = output_count(base)
    if original_classes is not None and not isinstance(original_classes, str):
        original_classes = ",".join(str(c) for c in original_classes)
    if original_classes is not None and original_classes.strip():
        names = [c.strip() for c in original_classes.split(",")]
        rule = "flag"
        if any(not c for c in names) or len(set(names)) != len(names):
            raise ModelError(
                f"--original-classes '{original_classes}' has empty or repeated names; give "
                f"{n} distinct names, comma-separated, in output order."
            )
        if len(names) != n:
            raise ModelError(
                f"--original-classes names {len(names)} classes but '{base.name}' has {n} "
                f"outputs; pass {n} names, comma-separated, in output order."
            )
        return names, rule
    if base.class_names:
        return list(base.class_names), "model"
    if old_class_folders:
        names = sorted(str(c) for c in old_class_folders)
        if len(names) != n:
            raise ModelError(
                f"'{base.name}' carries no class names and the old data has {len(names)} class "
                f"folders for its {n} outputs; pass --original-classes with {n} names in "
                "output order."
            )
        return names, "folders"
    raise ModelError(
        f"'{base.name}' carries no class names for its {n} outputs; pass --original-classes "
        f'"a,b,..." ({n} names in output order) or the old data (its class folders, sorted).'
    )


def describe_choice(
    base: BaseModel,
    preprocessing: str = "auto",
    old_data: Any = None,
    *,
    workspace: Path | None = None,
    original_classes: str | list[str] | None = None,
) -> dict[str, Any]:
    """`describe` of ``base`` with its preprocessing set by hand or probed on ``old_data``, and
    its outputs named by ``original_classes`` when given (``class_names_rule`` says which rule
    named them). ``base`` itself is never changed (the model workers share loaded bases)."""
    if preprocessing != "auto" or old_data:
        base = resolve_preprocessing(
            base, preprocessing, old_data, workspace=workspace, original_classes=original_classes
        )
    if original_classes:
        names, rule = original_class_names(base, None, original_classes)
        out = describe(dataclasses.replace(base, class_names=names))
        out["class_names_rule"] = rule
        return out
    out = describe(base)
    if base.class_names:
        out["class_names_rule"] = "model"
    return out


def cli_describe(args: Any) -> dict[str, Any]:
    """``python -m retrain describe BASE [--original-classes a,b,c]``: the layer table.

    With ``--original-classes`` the output names replace what the model carries, and
    ``class_names_rule`` says which rule named them.
    """
    workspace = getattr(args, "workspace", None)
    return describe_choice(
        load_base(args.base, workspace=workspace),
        getattr(args, "preprocessing", "auto"),
        getattr(args, "old_data", None),
        workspace=workspace,
        original_classes=getattr(args, "original_classes", None),
    )
