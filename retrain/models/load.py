"""Where base models come from: uploaded files, the keras.applications zoo, the built-in model.

Every loader returns a `BaseModel`: a Keras 3 model with its original head, plus what the rest
of Retrain Studio needs to retrain it (input size, preprocessing, class names, suggested cut).

BASE specs (the same strings on the CLI and in the dashboard)::

    path/to/model.keras | path/to/model.h5           an uploaded file (labels.txt beside it is read)
    applications:<Name>[:imagenet|:none|:<weights>]  a keras.applications backbone (default imagenet)
    builtin:digits-cnn                               small CNN trained on sample digits 0-4

Loading is safe: `.keras` files load with ``safe_mode=True`` and a model that holds a Lambda
layer or unknown custom classes is refused before anything is deserialized. Keras 2 files
(Teachable Machine exports included) are rebuilt as an equivalent Keras 3 model whose outputs
are checked against ``tf_keras``'s reading of the file (`retrain.models.keras2`); a model
worker answers first and checks after (`writes_after`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models import keras2
from retrain.models.builtin import BUILTIN_LABELS, _load_builtin
from retrain.models.keras_helpers import (
    MODEL_CLASS_NAMES,
    BaseModel,
    _cut_before,
    _keras,
    check_image_model,
    detect_preprocessing,
    iter_layers,
    not_an_image,
    not_an_image_error,
    suggest_cut,
)

MODEL_EXTENSIONS = (".keras", ".h5", ".hdf5")
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


@dataclass(frozen=True)
class ZooEntry:
    """One keras.applications backbone.

    Attributes:
        name: the constructor's name in ``keras.applications``.
        preprocessing: key of `retrain.models.preprocessing.REGISTRY` (its ``preprocess_input``).
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


def spec_label(spec: str) -> str:
    """The one line a BASE spec is shown as (the name `load_base` gives the model, which the
    Model page and the sidebar show), without loading anything."""
    spec = (spec or "").strip()
    if spec.startswith("builtin:"):
        return BUILTIN_LABELS.get(spec.partition(":")[2].strip() or "digits-cnn", spec)
    if spec.startswith("applications:"):
        try:
            return _zoo_label(*_parse_zoo(spec))
        except ModelError:
            return spec
    return Path(spec).name


def _zoo_label(entry: ZooEntry, weights: str) -> str:
    named = {"imagenet": "ImageNet", "none": "random weights"}.get(weights.lower())
    return f"{entry.name} ({named or Path(weights).name})"


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
    elif weights.lower() == "none":
        model = ctor(weights=None, include_top=True, input_shape=shape)
    else:
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise ModelError(
                f"Weights file '{weights}' not found. Give a path to a .weights.h5/.h5 file "
                f"for {entry.name}, or use :imagenet or :none."
            )
        from retrain.models import modelfile

        modelfile.check_model_file(wpath)  # LFS pointers and weight bombs, before building
        model = ctor(weights=None, include_top=True, input_shape=shape)
        try:
            model.load_weights(str(wpath))
        except Exception as err:  # Keras raises many types for a mismatched file.
            raise ModelError(
                f"'{wpath.name}' does not fit {entry.name} with its ImageNet head: "
                f"{_first_line(err)}. Use weights saved from the same architecture (include_top)."
            ) from None
    del keras
    _stable_names(model)
    return BaseModel(
        model=model,
        spec=spec,
        name=_zoo_label(entry, weights),
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
    from retrain.sessions.workspace import keras_home

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
    from retrain.models import modelfile

    modelfile.check_model_file(path)  # LFS pointers and pickled weights never reach Keras
    origin: dict[str, Any] = {"source": "file", "file": path.name}
    labels: list[str] | None = None
    if suffix == ".keras":
        model, labels = _load_keras_file(path)
        origin["format"] = "Keras 3 (.keras)"
    else:
        model = _load_h5_file(path, origin)
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
    if first is not None and first.get("class_name") in MODEL_CLASS_NAMES:
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


def _known_keras3(cls: str, entry: dict) -> bool:
    keras = _keras()
    registered = entry.get("registered_name")
    module = str(entry.get("module") or "keras")
    if registered not in (None, cls) or not (module == "keras" or module.startswith("keras.")):
        return False
    if cls in MODEL_CLASS_NAMES or hasattr(keras.layers, cls):
        return True
    # Keras's own unexported layers (e.g. ConvNeXt's LayerScale) live in keras.src modules.
    import importlib

    try:
        return isinstance(getattr(importlib.import_module(module), cls, None), type)
    except ImportError:
        return False


def _known_legacy(cls: str, entry: dict) -> bool:
    keras = _keras()
    return cls in MODEL_CLASS_NAMES or hasattr(keras.layers, cls)


def _load_keras_file(path: Path) -> tuple[Any, list[str] | None]:
    from retrain.models import modelfile

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


def _load_h5_file(path: Path, origin: dict[str, Any]) -> Any:
    """Load a .h5 model; ``origin`` gets its format and, for a converted Keras 2 file, how."""
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
    origin["format"] = f"HDF5 (Keras {version or '?'})"
    keras = _keras()
    origin["teachable_machine"] = _looks_like_teachable_machine(config)
    first_error: Exception | None = None
    if not origin["teachable_machine"]:  # Keras 3 never reads those: straight to conversion
        try:
            return keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as err:  # Keras 2 files Keras 3 cannot read: convert below
            first_error = err
    try:
        return _converted(path, origin)
    except ModelError:
        raise
    except Exception as err:  # report the first failure; conversion was the fallback
        reason = err if "tf_keras" in str(err) or first_error is None else first_error
        raise ModelError(f"Could not load '{path.name}': {_first_line(reason)}") from None


def _converted(path: Path, origin: dict[str, Any]) -> Any:
    """The checked Keras 3 model of a Keras 2 file: kept from an earlier conversion (any
    session), else rebuilt now and checked against tf_keras's reading (`keras2`).

    In a model worker (`writes_after`) the check runs after the answer: the answer says
    ``conversion_check: "after this answer"`` (as long as the base's ``origin`` does, answers
    from it rest on an unchecked model: `service.kinds.unchecked`), and the check then fills
    ``origin`` in (the worker keeps this base loaded) or refuses the file for good (a
    ``.refused`` file beside the kept copies), and the worker drops the base."""
    target = _converted_path(path)
    refused = target.with_suffix(".refused")
    if refused.is_file():
        raise ModelError(refused.read_text(encoding="utf-8", errors="replace").strip())
    origin["converted"] = "Keras 2 file rebuilt as Keras 3"
    cached = _converted_copy(target)
    if cached is not None:
        model, origin["conversion_max_abs_diff"] = cached
        return model
    keras2.require_tf_keras(path)
    model = keras2.rebuild_keras2_h5(path)
    if model is None:  # weights not matched by name: copied from tf_keras's reading, checked
        model, diff = keras2.copy_from_tf_keras(path)
        origin["conversion_max_abs_diff"] = diff
        _later(lambda: _keep_converted_copy(target, model, diff))
        return model

    def check() -> None:
        try:
            diff = keras2.check_conversion(path, model)
        except Exception as err:  # not faithful, or tf_keras cannot read it: refused for good
            transient = not_the_files_fault(err)
            if not isinstance(err, ModelError):
                err = ModelError(
                    f"Could not check '{path.name}' against tf_keras ({_first_line(err)}); "
                    "try again in a minute."
                    if transient
                    else f"Could not load '{path.name}': {_first_line(err)}"
                )
            if not transient:
                with contextlib.suppress(OSError):
                    refused.parent.mkdir(parents=True, exist_ok=True)
                    refused.write_text(str(err), encoding="utf-8")
            raise err from None
        origin.pop("conversion_check", None)
        origin["conversion_max_abs_diff"] = diff
        _keep_converted_copy(target, model, diff)

    if _AFTER is not None:
        origin["conversion_check"] = "after this answer"
    _later(check)
    return model


def not_the_files_fault(err: BaseException) -> bool:
    """Whether a failed conversion check says nothing about the file: the host ran out of
    memory or could not read or write (TensorFlow's ResourceExhaustedError is its OOM). Such a
    file is refused this time, not remembered as refused."""
    return isinstance(err, MemoryError | OSError) or type(err).__name__ == "ResourceExhaustedError"


# What a model worker does once its answer is out (`writes_after`): checking a converted Keras 2
# model against tf_keras (1.7 CPU-s for a Teachable Machine export, whose answer took 0.3 s)
# and saving its checked Keras 3 copy (0.3 s). None outside `writes_after`: then they run at once.
_AFTER: list[Callable[[], None]] | None = None


def _later(write: Callable[[], None]) -> None:
    if _AFTER is None:
        write()
    else:
        _AFTER.append(write)


@contextlib.contextmanager
def writes_after() -> Iterator[list[Callable[[], None]]]:
    """Collect the best-effort cache writes of the loads inside, instead of doing them; the
    caller runs the collected functions when it has answered (the model worker does)."""
    global _AFTER
    collected: list[Callable[[], None]] = []
    _AFTER = collected
    try:
        yield collected
    finally:
        _AFTER = None


def _converted_path(path: Path) -> Path:
    """Where the Keras 3 copy of a converted Keras 2 file is kept: named by the file's SHA-256,
    in the shared Keras cache, so the same upload in any session converts once."""
    from retrain.sessions.workspace import file_sha256, keras_home

    return keras_home() / "converted" / f"{file_sha256(path)}.keras"


def _converted_copy(target: Path) -> tuple[Any, float] | None:
    """The kept Keras 3 copy at ``target`` (`_converted_path`) and its recorded conversion
    difference, or None."""
    record = target.with_suffix(".json")
    if not (target.is_file() and record.is_file()):
        return None
    try:
        diff = float(json.loads(record.read_text())["max_abs_diff"])
        model = _keras().saving.load_model(target, compile=False, safe_mode=True)
    except Exception:  # a broken copy is converted again, never trusted
        return None
    return model, diff


def _keep_converted_copy(target: Path, model: Any, diff: float) -> None:
    """Save the checked conversion at ``target`` (`_converted_path`; best effort: a read-only
    cache only costs time)."""
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
