"""Forgetting: how much of the original task a retrained model still gets right.

`forgetting` scores the original model and the retrained one on the old task's data (the
retrained model's features with the original head, `transplant_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import DatasetError, RunError
from retrain.evaluate.loading import (
    _default_split,
    load_model,
    load_split,
    match_classes,
    model_class_names,
    model_image_size,
    resolve_dataset,
    run_model_path,
)
from retrain.evaluate.metrics import class_probabilities, raw_outputs
from retrain.models import preprocessing
from retrain.runs import rundir


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
            detected one; or a key of `retrain.models.preprocessing.REGISTRY`.

    Returns:
        before, after, drop (before - after), preprocessing, method, method_help, class_names_rule,
        original_classes, per_class {name: {before, after}}, note, num_images, split, and for
        "original-head" layers_copied and layers_changed.

    Raises:
        ModelError: the original model has no classifier head, or its outputs cannot be named.
        ConfigError: the data's classes are not the original classes.
        RunError: the run has no model, or nothing to compare.
    """
    from retrain.models.load import load_base
    from retrain.models.summary import original_class_names

    run_dir = Path(run_dir)
    run_path = run_model_path(run_dir)
    config = rundir.read_config(run_dir)
    base = load_base(original_spec, workspace=Path(workspace))
    dataset = resolve_dataset(old_data, workspace)
    flag = original_classes or config.get("original_classes")
    names, rule = original_class_names(base, list(dataset.class_names), flag)
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
    # retrained model has inside (retrain.models.preprocessing) in front of it. A model whose input
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
        from retrain.models.summary import resolve_preprocessing

        return resolve_preprocessing(base, choice).preprocessing
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
