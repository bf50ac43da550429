"""Predictions and metrics: the model's class probabilities and the report computed from them.

Every number comes from ``sklearn.metrics`` applied to the model's class probabilities, so
anyone can recompute the report from the predictions. Keras 3 only (no ``tf.*``), so it runs
with any Keras backend; Keras is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError, DatasetError, RunError
from retrain.evaluate.loading import (
    DEFAULT_TOP_K,
    _default_split,
    load_model,
    load_split,
    match_classes,
    model_channels,
    model_class_names,
    model_image_size,
    read_run_config,
    resolve_dataset,
    run_model_path,
)
from retrain.models import modelfile, preprocessing
from retrain.runs import rundir

_BATCH = 64


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
            `retrain.models.preprocessing.REGISTRY`, put in front of the model.

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
        from retrain.models.load import load_base
        from retrain.models.summary import original_class_names, resolve_preprocessing

        base = load_base(str(model_path))
        class_names, _rule = original_class_names(base, list(ds.class_names))
        base = resolve_preprocessing(base, preprocessing_choice)
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
    from retrain.data.checks import load_dataset

    run_dir = Path(run_dir)
    config = config if config is not None else read_run_config(run_dir)
    # Training records manifest_path and dataset_id (rundir.RunConfig); data is the source.
    candidates: list[Any] = [config.get("manifest_path")]
    workspace = run_dir.parent.parent if run_dir.parent.name == "runs" else None
    if workspace is not None and config.get("dataset_id"):
        candidates.append(workspace / "datasets" / str(config["dataset_id"]) / "manifest.json")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return load_dataset(candidate)
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
    from retrain.data.splits import stratified_split

    if dataset.splits.get("val"):
        return None
    val_fraction = float(config.get("val_split") or 0)
    if val_fraction <= 0:
        raise ConfigError(
            "The run held out no validation images (val_split 0). "
            "Evaluate it on a separate test zip or folder."
        )
    _, val = stratified_split(np.asarray(train_labels), val_fraction, int(config.get("seed", 42)))
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
    from retrain.data.checks import load_dataset

    record = rundir.read_old_task(run_dir) or {}
    if not record.get("val") or not record.get("manifest_path"):
        return None
    try:
        old = load_dataset(record["manifest_path"])
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
