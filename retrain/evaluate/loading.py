"""Loading what an evaluation needs: a run's model and config, the model's classes and input
size, and the data split, with the data's class folders matched to the model's classes.

Class folders of the data are matched to the model's class names *by name*: a test folder
may hold a subset of the model's classes (e.g. only the hard ones), but a folder the model
does not know is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError, ModelError, RunError
from retrain.models import modelfile
from retrain.runs import rundir

DEFAULT_TOP_K = 3


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
    """Return a run's ``config.json`` as a dict (`retrain.runs.rundir.load_config`).

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
    from retrain.data.store import resolve_dataset

    return resolve_dataset(source, workspace)


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
    from retrain.data.cache import load_images

    names = [s for s in dataset.splits if dataset.splits[s]] if split == "all" else [split]
    if split != "all" and not dataset.splits.get(split):
        have = ", ".join(available_splits(dataset)) or "none"
        raise ConfigError(
            f"The data has no '{split}' split (it has: {have}). Pick one of those or 'all'."
        )
    images, labels, paths = [], [], []
    for name in names:
        cache = load_images(dataset, name, tuple(image_size), resize_mode, channels=channels)
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
