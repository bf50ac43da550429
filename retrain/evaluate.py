"""How good a model really is: metrics, mistakes, forgetting, predictions.

Every number comes from ``sklearn.metrics`` applied to the model's class probabilities, so
anyone can recompute the report from the predictions. Scoring, forgetting and prediction use
Keras 3 only (no ``tf.*``), so they run with any Keras backend; Keras is imported inside the
functions. The optional Grad-CAM needs gradients, which are backend-specific: it uses
TensorFlow's ``GradientTape`` and returns None on other backends.

Class folders of the data are matched to the model's class names *by name*: a test folder
may hold a subset of the model's classes (e.g. only the hard ones), but a folder the model
does not know is an error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrain import modelfile, preprocessing, rundir
from retrain.errors import ConfigError, DatasetError, ModelError, RunError

DEFAULT_TOP_K = 3
_BATCH = 64


# --------------------------------------------------------------------------------------
# Loading models and data
# --------------------------------------------------------------------------------------


def run_model_path(run_dir: str | Path) -> Path:
    """Return the model file of a run: ``best.keras`` (best by validation), else ``model.keras``.

    Raises:
        RunError: the run has no saved model yet.
    """
    run_dir = Path(run_dir)
    for path in (rundir.best_model_path(run_dir), rundir.final_model_path(run_dir)):
        if path.is_file():
            return path
    raise RunError(
        f"Run '{run_dir.name}' has no saved model (best.keras/model.keras). "
        "Wait for an epoch to finish or start a new run."
    )


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """Return a run's ``config.json`` as a dict (`retrain.rundir.load_config`).

    Raises:
        RunError: the folder is not a run directory.
    """
    return rundir.load_config(Path(run_dir)).to_dict()


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int) -> tuple[Any, dict[str, Any]]:
    return modelfile.load_model(path)


def load_model(model_path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a saved model and its metadata, reusing the last loads of the same unchanged file.

    Raises:
        ModelError: the file is missing or not a loadable .keras file.
    """
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"No model file at '{path}'. Train a model first or check the path.")
    return _load_cached(str(path.resolve()), path.stat().st_mtime_ns)


def model_class_names(model: Any, meta: dict[str, Any], model_path: str | Path) -> list[str]:
    """The class names stored with a model.

    Raises:
        ModelError: the model has no class names, or not one per output.
    """
    names = meta.get("class_names")
    if not names:
        raise ModelError(
            f"'{Path(model_path).name}' has no class names in its metadata. "
            "Use a model saved by Retrain Studio (a run's best.keras or an export)."
        )
    outputs = int(model.output_shape[-1])
    binary = meta.get("label_encoding") == "binary" and outputs == 1
    if not binary and outputs != len(names):
        raise ModelError(
            f"'{Path(model_path).name}' has {outputs} outputs but {len(names)} class names. "
            "Use a model saved by Retrain Studio."
        )
    return list(names)


def model_channels(model: Any) -> int:
    """Channels of the images ``model`` takes: 1 (grayscale) or 3 (RGB)."""
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    return int(shape[-1] or 3)


def model_image_size(model: Any, meta: dict[str, Any]) -> tuple[int, int]:
    """The (H, W) images are resized to for ``model``.

    Raises:
        ModelError: neither the metadata nor the input shape says it.
    """
    size = meta.get("image_size")
    if size:
        return int(size[0]), int(size[1])
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    if len(shape) == 4 and shape[1] and shape[2]:
        return int(shape[1]), int(shape[2])
    raise ModelError(
        "The model does not say which image size it takes (no image_size in its metadata, "
        "no fixed input shape). Use a model saved by Retrain Studio."
    )


def resolve_dataset(source: Any, workspace: str | Path | None = None) -> Any:
    """Return a ``data.Dataset`` for a Dataset, a manifest.json, a zip or a folder.

    Raises:
        DatasetError: the source is not usable data.
    """
    from retrain import data

    return data.resolve_dataset(source, workspace)


def available_splits(dataset: Any) -> list[str]:
    """The splits a dataset has, in the order they are preferred for scoring."""
    return [s for s in ("test", "val", "train") if dataset.splits.get(s)]


def _default_split(dataset: Any) -> str:
    for name in ("test", "val"):
        if dataset.splits.get(name):
            return name
    return "all"


def load_split(
    dataset: Any, split: str, image_size: tuple[int, int], resize_mode: str, channels: int = 3
):
    """(images uint8 (N,H,W,channels), labels into dataset.class_names, absolute paths)."""
    from retrain import data

    names = [s for s in dataset.splits if dataset.splits[s]] if split == "all" else [split]
    if split != "all" and not dataset.splits.get(split):
        have = ", ".join(available_splits(dataset)) or "none"
        raise ConfigError(
            f"The data has no '{split}' split (it has: {have}). Pick one of those or 'all'."
        )
    images, labels, paths = [], [], []
    for name in names:
        cache = data.load_images(dataset, name, tuple(image_size), resize_mode, channels=channels)
        images.append(np.asarray(cache.images))
        labels.append(np.asarray(cache.labels, dtype=np.int64))
        paths.extend(str(Path(dataset.root) / p) for p in cache.paths)
    return np.concatenate(images), np.concatenate(labels), paths


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str]) -> np.ndarray:
    """Map each data class (by position) to the model's output index, matching by name.

    A subset of the model's classes is allowed; a data class the model does not know is not.

    Raises:
        ConfigError: some data class folders are not among the model's classes.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in data_classes if name not in index]
    if unknown:
        shown = ", ".join(f"'{n}'" for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        known = ", ".join(f"'{n}'" for n in list(model_classes)[:8])
        more = " ..." if len(model_classes) > 8 else ""
        raise ConfigError(
            f"Class folders {shown} are not classes of the model (it knows {known}{more}). "
            "Name the folders after the model's classes."
        )
    return np.array([index[name] for name in data_classes], dtype=np.int64)


# --------------------------------------------------------------------------------------
# Predictions and metrics
# --------------------------------------------------------------------------------------


def raw_outputs(model: Any, images: np.ndarray, batch_size: int = _BATCH) -> np.ndarray:
    """Run ``model`` on ``images`` in batches; return its outputs as a float numpy array."""
    if len(images) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    parts = [
        np.asarray(model.predict_on_batch(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def class_probabilities(outputs: np.ndarray, label_encoding: str | None = "index") -> np.ndarray:
    """Turn a model's outputs into class probabilities (N, C), float64, rows summing to 1.

    A binary sigmoid model (``label_encoding == "binary"``, one output unit = P(class 1))
    becomes two columns ``[1 - p, p]``.
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if label_encoding == "binary" or out.shape[1] == 1:
        p = np.clip(out[:, 0], 0.0, 1.0)
        out = np.stack([1.0 - p, p], axis=1)
    out = np.clip(out, 0.0, None)
    sums = out.sum(axis=1, keepdims=True)
    sums[sums == 0] = 1.0
    return out / sums


def score(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The metrics report of class probabilities ``probs`` against true labels ``y_true``.

    ``y_true`` indexes ``class_names`` (the model's classes). Per-class rows and the
    macro/weighted averages cover the classes present in the data; the confusion matrix
    covers every class of the model (rows of absent classes are zero).
    """
    from sklearn import metrics

    n_classes = len(class_names)
    all_labels = list(range(n_classes))
    present = sorted({int(y) for y in y_true})
    y_pred = probs.argmax(axis=1)
    report: dict[str, Any] = {
        "num_images": len(y_true),
        "class_names": list(class_names),
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "loss": float(metrics.log_loss(y_true, probs, labels=all_labels)),
    }
    p, r, f, s = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=present, zero_division=0
    )
    report["per_class"] = {
        class_names[c]: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, c in enumerate(present)
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = metrics.precision_recall_fscore_support(
            y_true, y_pred, labels=present, average=average, zero_division=0
        )
        report[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    report["confusion_matrix"] = metrics.confusion_matrix(
        y_true, y_pred, labels=all_labels
    ).tolist()
    if n_classes > DEFAULT_TOP_K:
        report["top_k"] = {
            "k": DEFAULT_TOP_K,
            "accuracy": float(
                metrics.top_k_accuracy_score(y_true, probs, k=DEFAULT_TOP_K, labels=all_labels)
            ),
        }
    confidence = probs[np.arange(len(y_pred)), y_pred]
    wrong = np.flatnonzero(y_pred != y_true)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    report["misclassified"] = [
        {
            "path": paths[i] if paths is not None else str(i),
            "true": class_names[int(y_true[i])],
            "predicted": class_names[int(y_pred[i])],
            "confidence": float(confidence[i]),
        }
        for i in wrong
    ]
    return report


def _with_predictions(report: dict, y_true, probs, paths, class_names) -> dict:
    y_pred = probs.argmax(axis=1)
    report["predictions"] = [
        {
            "path": paths[i],
            "true": class_names[int(y_true[i])],
            "predicted": class_names[int(y_pred[i])],
            "confidence": float(probs[i, y_pred[i]]),
        }
        for i in range(len(y_true))
    ]
    return report


def evaluate_model(
    model_path: str | Path,
    dataset: Any,
    split: str | None = None,
    *,
    workspace: str | Path | None = None,
    include_predictions: bool = False,
    preprocessing_choice: str = "auto",
) -> dict[str, Any]:
    """Score a saved model on labelled images; the `evaluate` CLI JSON.

    Args:
        model_path: a .keras file saved by Retrain Studio (raw uint8 in, probabilities out),
            or any image classifier .keras (then its outputs are named like an original
            model's, `models.original_class_names`, and its preprocessing is detected).
        dataset: a ``data.Dataset``, a manifest.json, a zip or a folder of class folders.
        split: "test", "val", "train" or "all"; default test, else val, else all images.
        workspace: where a zip is extracted (default: the home folder).
        include_predictions: also return ``predictions``, one record per image (for the
            confusion-matrix drill-down).
        preprocessing_choice: how pixels reach the model: ``auto`` (a Retrain Studio model
            has its preprocessing inside; another model gets the detected one) or a key of
            `retrain.preprocessing.REGISTRY`, put in front of the model.

    Returns:
        accuracy, loss (log loss), class_names, per_class {name: precision, recall, f1,
        support}, macro, weighted, confusion_matrix (rows true, columns predicted, in the
        model's class order), top_k (k=3, only with more than 3 classes), misclassified
        (most confidently wrong first), plus split, num_images and preprocessing.

    Raises:
        ModelError: the model cannot be loaded or its outputs cannot be named.
        ConfigError: class folders do not match the model's classes, or no such split.
        DatasetError: the data cannot be read.
    """
    model, meta = load_model(model_path)
    ds = resolve_dataset(dataset, workspace)
    key = "inside" if preprocessing_choice == "auto" else preprocessing_choice
    source = "inside the model" if key == "inside" else "set by hand (--preprocessing)"
    if meta.get("class_names") or modelfile.has_metadata(model_path):
        class_names = model_class_names(model, meta, model_path)
    else:  # not saved by Retrain Studio: read it as a base model (names, preprocessing)
        from retrain import models

        base = models.load_base(str(model_path))
        class_names, _rule = models.original_class_names(base, list(ds.class_names))
        base = models.resolve_preprocessing(base, preprocessing_choice)
        key = base.preprocessing
        source = base.origin.get("preprocessing_source")
    preprocessing.get(key)  # an unknown key is a ModelError
    if key not in ("inside", "raw"):
        model = preprocessing.with_preprocessing(model, key)
    mapping = match_classes(class_names, ds.class_names)
    split = split or _default_split(ds)
    size = model_image_size(model, meta)
    channels = model_channels(model)
    resize_mode = meta.get("resize_mode", "squash")
    images, labels, paths = load_split(ds, split, size, resize_mode, channels)
    if len(images) == 0:
        raise DatasetError(f"The '{split}' split has no images. Pick another split.")
    report = _report(
        model, meta, class_names, mapping[labels], images, paths, split, include_predictions
    )
    report["preprocessing"] = key
    report["preprocessing_source"] = source
    return report


def _report(
    model: Any,
    meta: dict[str, Any],
    class_names: list[str],
    y_true: np.ndarray,
    images: np.ndarray,
    paths: list[str],
    split: str,
    include_predictions: bool,
) -> dict[str, Any]:
    """Predict ``images`` and score them against ``y_true`` (model class indices)."""
    probs = class_probabilities(raw_outputs(model, images), meta.get("label_encoding"))
    report = score(y_true, probs, class_names, paths)
    report["split"] = split
    if include_predictions:
        _with_predictions(report, y_true, probs, paths, class_names)
    return report


def run_dataset(run_dir: str | Path, config: dict[str, Any] | None = None) -> Any:
    """The ``data.Dataset`` a run was trained on.

    Raises:
        RunError: the run's data can no longer be found.
    """
    from retrain import data

    run_dir = Path(run_dir)
    config = config if config is not None else read_run_config(run_dir)
    # Training records manifest_path and dataset_id (rundir.RunConfig); data is the source.
    candidates: list[Any] = [config.get("manifest_path")]
    workspace = run_dir.parent.parent if run_dir.parent.name == "runs" else None
    if workspace is not None and config.get("dataset_id"):
        candidates.append(workspace / "datasets" / str(config["dataset_id"]) / "manifest.json")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return data.load_dataset(candidate)
    source = config.get("data")
    if source and Path(source).exists():
        # Same content -> same dataset id, so this reuses the extraction and the image cache.
        return resolve_dataset(source, workspace)
    raise RunError(
        f"The data of run '{run_dir.name}' ({source}) is gone. "
        "Evaluate the model on a test zip or folder instead."
    )


def validation_indices(
    dataset: Any, config: dict[str, Any], train_labels: np.ndarray
) -> np.ndarray | None:
    """Indices into the train split that the run held out for validation.

    Returns None when the data has its own val split (the run validated on that). For runs
    from before runs recorded their split (`rundir.read_split` is None), the split is
    recomputed as training did then: ``data.stratified_split`` of the train cache's labels
    with the run's val_split and seed. `recorded_validation` reads a recorded split.

    Raises:
        ConfigError: the run held out nothing (val_split 0).
    """
    from retrain import data

    if dataset.splits.get("val"):
        return None
    val_fraction = float(config.get("val_split") or 0)
    if val_fraction <= 0:
        raise ConfigError(
            "The run held out no validation images (val_split 0). "
            "Evaluate it on a separate test zip or folder."
        )
    _, val = data.stratified_split(
        np.asarray(train_labels), val_fraction, int(config.get("seed", 42))
    )
    return np.sort(np.asarray(val))


def recorded_validation(
    dataset: Any, recorded: dict[str, list[str]], train_paths: list[str]
) -> np.ndarray:
    """Indices into the train split (``train_paths``, absolute) of the images the run's
    recorded split (`rundir.read_split`) held out for validation.

    Raises:
        ConfigError: the run held out nothing (val_split 0).
        RunError: recorded images are no longer in the data.
    """
    if not recorded["val"]:
        raise ConfigError(
            "The run held out no validation images (val_split 0). "
            "Evaluate it on a separate test zip or folder."
        )
    root = Path(dataset.root)
    relative = [Path(p).relative_to(root).as_posix() for p in train_paths]
    return rundir.indices_of(relative, recorded["val"])


def run_images(
    run_dir: str | Path, config: dict[str, Any], meta: dict[str, Any], model: Any, split: str
):
    """A run's images for ``split`` ("val" = held out in training): (images, labels, paths).

    Labels index the dataset's class names.
    """
    dataset = run_dataset(run_dir, config)
    size = model_image_size(model, meta)
    channels = model_channels(model)
    resize_mode = meta.get("resize_mode", config.get("resize_mode", "squash"))
    if split != "val" or dataset.splits.get("val"):
        return dataset, *load_split(dataset, split, size, resize_mode, channels)
    images, labels, paths = load_split(dataset, "train", size, resize_mode, channels)
    recorded = rundir.read_split(Path(run_dir))
    if recorded is None:  # a run from before runs recorded their split
        held_out = validation_indices(dataset, config, labels)
    else:
        held_out = recorded_validation(dataset, recorded, paths)
    return dataset, images[held_out], labels[held_out], [paths[i] for i in held_out]


def evaluate_run(
    run_dir: str | Path, split: str | None = None, *, include_predictions: bool = True
) -> dict[str, Any]:
    """Score a run's model on its own data: the validation images (default) or another split.

    "val" is the data's own val split, or else the images the run held out of train (its
    recorded split), so the numbers match the run's val_accuracy; for a keep-old-classes
    run it includes the old data's held-out images too (``old_images`` counts them).

    Raises:
        RunError: no model or no data for the run.
        ConfigError: no such split.
    """
    run_dir = Path(run_dir)
    model_path = run_model_path(run_dir)
    config = read_run_config(run_dir)
    model, meta = load_model(model_path)
    class_names = model_class_names(model, meta, model_path)
    split = split or "val"
    dataset, images, labels, paths = run_images(run_dir, config, meta, model, split)
    y_true = match_classes(class_names, dataset.class_names)[labels]
    old_count = 0
    if split == "val":  # a keep-old-classes run also validated on the old held-out images
        old = _old_held_out(run_dir, class_names, meta, model)
        if old is not None:
            old_images, old_true, old_paths = old
            images = np.concatenate([images, old_images]) if len(images) else old_images
            y_true = np.concatenate([y_true, old_true])
            paths, old_count = [*paths, *old_paths], len(old_true)
    if len(images) == 0:
        raise DatasetError(f"The '{split}' split of this run has no images. Pick another split.")
    report = _report(model, meta, class_names, y_true, images, paths, split, include_predictions)
    report["model_file"] = model_path.name
    if old_count:
        report["old_images"] = old_count
    return report


def _old_held_out(
    run_dir: Path, class_names: list[str], meta: dict[str, Any], model: Any
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The old data's held-out images of a keep-old-classes run (`rundir.read_old_task`):
    ``(images, model class indices, paths)``, or None when the run has none or they are gone."""
    from retrain import data

    record = rundir.read_old_task(run_dir) or {}
    if not record.get("val") or not record.get("manifest_path"):
        return None
    try:
        old = data.load_dataset(record["manifest_path"])
    except (DatasetError, OSError):
        return None
    split = record.get("val_split", "train")
    size = model_image_size(model, meta)
    images, labels, paths = load_split(
        old, split, size, meta.get("resize_mode", "squash"), model_channels(model)
    )
    positions = {p: i for i, p in enumerate(rel for rel, _ in old.splits.get(split, []))}
    chosen = np.asarray([positions[p] for p in record["val"] if p in positions], dtype=np.int64)
    y_true = match_classes(class_names, old.class_names)[labels[chosen]]
    return images[chosen], y_true, [paths[i] for i in chosen]


# --------------------------------------------------------------------------------------
# Forgetting
# --------------------------------------------------------------------------------------


def _leaf_layers(model: Any) -> list[Any]:
    """Every non-container layer of ``model``, nested models flattened."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _find_features(model: Any) -> Any | None:
    for layer in model.layers:
        if layer.name == "features" and hasattr(layer, "layers"):
            return layer
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            found = _find_features(layer)
            if found is not None:
                return found
    return None


def transplant_weights(source_features: Any, target: Any) -> dict[str, int]:
    """Copy the weights of ``source_features``' layers into ``target``'s layers of the same name.

    Returns:
        counts: copied (layers with weights copied) and changed (of those, how many differ
        from what ``target`` had).
    """
    targets = {layer.name: layer for layer in _leaf_layers(target)}
    copied = changed = 0
    for layer in _leaf_layers(source_features):
        weights = layer.get_weights()
        other = targets.get(layer.name)
        if not weights or other is None:
            continue
        old = other.get_weights()
        if len(old) != len(weights) or any(
            a.shape != b.shape for a, b in zip(old, weights, strict=True)
        ):
            continue
        if any(not np.array_equal(a, b) for a, b in zip(old, weights, strict=True)):
            changed += 1
            other.set_weights(weights)
        copied += 1
    return {"copied": copied, "changed": changed}


def forgetting(
    original_spec: str,
    run_dir: str | Path,
    old_data: Any,
    workspace: str | Path,
    original_classes: str | list[str] | None = None,
    preprocessing_choice: str = "auto",
) -> dict[str, Any]:
    """Measure catastrophic forgetting: the original task scored before and after retraining.

    ``before`` is the original model on the old task's images. ``after`` depends on the run:

    - a keep-old-classes run (``method`` "retrained-model"): the retrained model itself on
      the same images, among *all* its classes: an old image counts as right only when the
      model names its old class (what a user of the exported model gets). When the old data
      is the run's own ``--old-data``, only the images it held out are scored (never the
      rehearsal memory);
    - a replace-the-head run (``method`` "original-head"): the run's kept base layers are
      copied by name into the original model, whose original head is re-attached: how much
      the shared features drifted (the exported model has no old classes at all).

    Args:
        original_spec: the BASE string of the original model (``models.load_base`` syntax).
        run_dir: the retraining run.
        old_data: the original task's data (Dataset, zip, folder or manifest.json).
        workspace: where zips are extracted and models cached.
        original_classes: names of the original outputs in output order when the model
            carries none (else the run's ``--original-classes``, else the old data's class
            folders, sorted: `models.original_class_names`).
        preprocessing_choice: how pixels reach the original model: ``auto`` = what the run
            used when it was retrained from ``original_spec`` (its config.json), else the
            detected one; or a key of `retrain.preprocessing.REGISTRY`.

    Returns:
        before, after, drop (before - after), preprocessing, method, method_help, class_names_rule,
        original_classes, per_class {name: {before, after}}, note, num_images, split, and for
        "original-head" layers_copied and layers_changed.

    Raises:
        ModelError: the original model has no classifier head, or its outputs cannot be named.
        ConfigError: the data's classes are not the original classes.
        RunError: the run has no model, or nothing to compare.
    """
    from retrain import models

    run_dir = Path(run_dir)
    run_path = run_model_path(run_dir)
    config = rundir.read_config(run_dir)
    base = models.load_base(original_spec, workspace=Path(workspace))
    dataset = resolve_dataset(old_data, workspace)
    flag = original_classes or config.get("original_classes")
    names, rule = models.original_class_names(base, list(dataset.class_names), flag)
    mapping = match_classes(names, dataset.class_names)
    run_model, run_meta = load_model(run_path)
    keep = bool(config.get("keep_old_classes"))
    resize_mode = run_meta.get("resize_mode", config.get("resize_mode", "squash"))
    split, chosen = _old_images(run_dir, dataset, keep)

    def old_images(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = load_split(dataset, split, size, resize_mode, base.channels)
        if chosen is not None:
            images, labels = images[chosen], labels[chosen]
        return images, labels

    images, labels = old_images(tuple(base.input_size or model_image_size(run_model, run_meta)))
    if len(labels) == 0:
        raise DatasetError(f"The old data's '{split}' images are empty; pass the old task's data.")
    original = base.model
    # The original model takes its preprocessing's output: put the same Keras layers that a
    # retrained model has inside (retrain.preprocessing) in front of it. A model whose input
    # is already uint8 has its preprocessing inside.
    key = _original_preprocessing(base, config, original_spec, preprocessing_choice)
    if "int" in str(getattr(original.inputs[0], "dtype", "float32")):
        scored = original
    else:
        scored = preprocessing.with_preprocessing(original, key)
    y_before = mapping[labels]
    right_before = _predicted(scored, images, "index") == y_before
    extra: dict[str, Any] = {}
    run_names: list[str] = []
    if keep:
        run_names = model_class_names(run_model, run_meta, run_path)
        images, labels = old_images(model_image_size(run_model, run_meta))
        y_after = match_classes(run_names, dataset.class_names)[labels]
        right_after = _predicted(run_model, images, run_meta.get("label_encoding")) == y_after
        method = "retrained-model"
    else:
        features = _find_features(run_model)
        if features is None:
            raise RunError(
                f"'{run_path.name}' has no 'features' part to copy from. "
                "Use a run trained by Retrain Studio."
            )
        # load_base gives this call its own model: put the retrained layers into it in place.
        counts = transplant_weights(features, original)
        if counts["copied"] == 0:
            raise RunError(
                f"No layer of run '{run_dir.name}' matches a layer of '{base.name}' by name. "
                "Pick the original model the run was retrained from."
            )
        right_after = _predicted(scored, images, "index") == y_before  # now retrained weights
        method = "original-head"
        extra = {"layers_copied": counts["copied"], "layers_changed": counts["changed"]}
    before, after = float(right_before.mean()), float(right_after.mean())
    drop = before - after
    per_class = {
        name: {
            "before": float(right_before[labels == i].mean()),
            "after": float(right_after[labels == i].mean()),
        }
        for i, name in enumerate(dataset.class_names)
        if (labels == i).any()
    }
    change = f"{'a drop' if drop > 0 else 'a change'} of {abs(drop):.1%}"
    if keep:
        note = (
            f"The retrained model names the old class of {after:.1%} of the old images among "
            f"all its {len(run_names)} classes; the "
            f"original model named {before:.1%} ({change})."
        )
    elif extra["layers_changed"] == 0:
        note = (
            f"The base stayed frozen: all {extra['layers_copied']} kept layers are unchanged, "
            "so the original task keeps its accuracy under its own head (drop 0 by "
            "construction); the retrained model itself has no old classes."
        )
    else:
        note = (
            f"{extra['layers_changed']} of {extra['layers_copied']} kept layers changed in "
            f"retraining; with the original head re-attached, accuracy on the original task "
            f"went from {before:.1%} to {after:.1%} ({change})."
        )
    return {
        "before": before,
        "after": after,
        "drop": drop,
        "preprocessing": key,
        "method": method,
        "method_help": FORGETTING_METHODS[method],
        "class_names_rule": rule,
        "original_classes": names,
        "per_class": per_class,
        "note": note,
        "num_images": int(len(labels)),
        "split": split if chosen is None else "held out by the run",
        **extra,
    }


def _original_preprocessing(base: Any, config: dict[str, Any], spec: str, choice: str) -> str:
    """The preprocessing key the original model is scored with (see `forgetting`)."""
    if choice and choice != "auto":
        from retrain import models

        return models.resolve_preprocessing(base, choice).preprocessing
    recorded = config.get("preprocessing")
    if recorded in preprocessing.REGISTRY and str(config.get("base")) == str(spec):
        return str(recorded)
    return base.preprocessing


#: What `forgetting`'s ``after`` measures, by ``method``.
FORGETTING_METHODS = {
    "retrained-model": "the retrained model itself on the old images, among all its classes",
    "original-head": "the retrained base under the re-attached original head",
}


def _predicted(model: Any, images: np.ndarray, label_encoding: str | None) -> np.ndarray:
    return class_probabilities(raw_outputs(model, images), label_encoding).argmax(axis=1)


def _old_images(run_dir: Path, dataset: Any, keep: bool) -> tuple[str, np.ndarray | None]:
    """Which old images to score: the run's held-out old images when ``dataset`` is its old
    data, else the data's test/val split or all of it. Returns ``(split, indices or None)``."""
    recorded = rundir.read_old_task(run_dir) if keep else None
    if recorded and recorded.get("dataset_id") == dataset.dataset_id and recorded.get("val"):
        split = recorded.get("val_split", "train")
        positions = {path: i for i, (path, _) in enumerate(dataset.splits.get(split, []))}
        chosen = [positions[p] for p in recorded["val"] if p in positions]
        if chosen:
            return split, np.asarray(chosen, dtype=np.int64)
    return _default_split(dataset), None


# --------------------------------------------------------------------------------------
# Predict and Grad-CAM
# --------------------------------------------------------------------------------------


def _image_array(
    image: Any, size: tuple[int, int], resize_mode: str, channels: int = 3
) -> np.ndarray:
    from retrain import data

    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, str | Path) and not Path(image).is_file():
        raise DatasetError(f"No image at '{image}'. Check the path.")
    return data.load_image_file(image, size, resize_mode, channels)


def predict(
    model_path: str | Path, images: Sequence[Any], top_k: int = DEFAULT_TOP_K
) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image.

    Args:
        model_path: a .keras file saved by Retrain Studio.
        images: image paths (or open image files); decoded and resized exactly like the
            training cache (``data.load_image_file`` with the model's size and resize mode).
        top_k: how many classes per image (capped at the number of classes).

    Returns:
        one ``{"path", "top_k": [{"class", "probability"}, ...]}`` per image, best first.

    Raises:
        ConfigError: top_k < 1 or no images.
        ModelError: the model cannot be loaded or has no class names.
        DatasetError: an image is missing or unreadable.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}.")
    if not images:
        raise ConfigError("No images given. Pass one or more image files.")
    model, meta = load_model(model_path)
    class_names = model_class_names(model, meta, model_path)
    size = model_image_size(model, meta)
    resize_mode = meta.get("resize_mode", "squash")
    channels = model_channels(model)
    batch = np.stack([_image_array(img, size, resize_mode, channels) for img in images])
    probs = class_probabilities(raw_outputs(model, batch), meta.get("label_encoding"))
    k = min(top_k, len(class_names))
    results = []
    for image, row in zip(images, probs, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        results.append(
            {
                "path": str(image) if isinstance(image, str | Path) else getattr(image, "name", ""),
                "top_k": [{"class": class_names[i], "probability": float(row[i])} for i in order],
            }
        )
    return results


def _last_spatial_layer(features: Any) -> Any | None:
    """The last layer of ``features`` whose output is a spatial map (batch, H, W, C)."""
    for layer in reversed(features.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and (shape[1] or 0) > 1 and (shape[2] or 0) > 1:
            return layer
    return None


def grad_cam(model_path: str | Path, image: Any, class_index: int | None = None) -> Any:
    """Grad-CAM heatmap (H', W') in [0, 1] for one image, or None where it does not apply.

    The map is taken at the last spatial (conv) layer of the model's "features" part and
    weighted by the gradient of the class score. It needs the TensorFlow backend (gradients
    are backend-specific); elsewhere, and for bases without a spatial map, it returns None.

    Args:
        model_path: a .keras file saved by Retrain Studio.
        image: an image path (or an uint8 array at the model's size).
        class_index: the class to explain; default the predicted one.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    model, meta = load_model(model_path)
    features = _find_features(model)
    if features is None:
        return None
    spatial = _last_spatial_layer(features)
    if spatial is None:
        return None
    position = model.layers.index(features)
    head_layers = model.layers[position + 1 :]
    probe = keras.Model(features.input, [spatial.output, features.output])
    size = model_image_size(model, meta)
    x = _image_array(image, size, meta.get("resize_mode", "squash"), model_channels(model))[None]
    with tf.GradientTape() as tape:
        fmap, out = probe(x, training=False)
        for layer in head_layers:
            out = layer(out, training=False)
        if out.shape[-1] == 1:
            positive = class_index == 1 if class_index is not None else float(out[0, 0]) >= 0.5
            target = out[:, 0] if positive else 1 - out[:, 0]
        else:
            idx = int(class_index) if class_index is not None else int(tf.argmax(out[0]))
            target = out[:, idx]
    grads = tape.gradient(target, fmap)
    if grads is None:
        return None
    weights = tf.reduce_mean(grads, axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(fmap * weights[:, None, None, :], axis=-1))[0].numpy()
    peak = float(cam.max())
    return cam / peak if peak > 0 and math.isfinite(peak) else cam


def grad_cam_overlay(model_path: str | Path, image: Any, alpha: float = 0.5) -> Any:
    """The image at the model's input size with its Grad-CAM map blended in red (uint8), or
    None where Grad-CAM does not apply (see `grad_cam`)."""
    from PIL import Image

    model, meta = load_model(model_path)
    size = model_image_size(model, meta)
    pixels = _image_array(image, size, meta.get("resize_mode", "squash"), model_channels(model))
    cam = grad_cam(model_path, pixels)
    if cam is None:
        return None
    if pixels.shape[-1] == 1:  # grayscale: blend the heat into a gray RGB picture
        pixels = np.repeat(pixels, 3, axis=-1)
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(
        (size[1], size[0]), Image.BILINEAR
    )
    weight = (np.asarray(heat, dtype=np.float32) / 255.0 * alpha)[..., None]
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    return np.uint8(pixels.astype(np.float32) * (1 - weight) + red * weight)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def cli_evaluate(args: Any) -> dict[str, Any]:
    """`python -m retrain evaluate --model MODEL.keras --data DATA [--split S]
    [--preprocessing KEY]`."""
    return evaluate_model(
        args.model,
        args.data,
        args.split,
        workspace=args.workspace,
        preprocessing_choice=getattr(args, "preprocessing", "auto") or "auto",
    )


def cli_forgetting(args: Any) -> dict[str, Any]:
    """`python -m retrain forgetting --original MODEL --run RUN_DIR --data OLD_DATA
    [--original-classes a,b,c]`."""
    return forgetting(
        args.original,
        args.run,
        args.data,
        args.workspace,
        original_classes=getattr(args, "original_classes", None),
        preprocessing_choice=getattr(args, "preprocessing", "auto") or "auto",
    )


def cli_predict(args: Any) -> dict[str, Any]:
    """`python -m retrain predict --model MODEL.keras IMAGE...` -> ``{"model", "predictions"}``."""
    return {
        "model": str(args.model),
        "predictions": predict(args.model, list(args.images), args.top_k),
    }
