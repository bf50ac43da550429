"""Train/validation splits, preview thumbnails, and the ``ingest`` command."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from retrain.data.dataset import Dataset, _max_pixels
from retrain.data.images import _decode_resized, _ImageProblem
from retrain.data.store import ingest
from retrain.errors import ConfigError


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and validation, class by class.

    Every class with at least 2 images keeps at least 1 on each side; a class with 1 image
    stays in train.

    Args:
        labels: int labels ``(N,)``.
        val_fraction: share of each class for validation, between 0 and 1.
        seed: makes the split repeatable.

    Returns:
        ``(train indices, val indices)``, both sorted int64 arrays.

    Raises:
        ConfigError: ``val_fraction`` is not between 0 and 1.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"Validation share {val_fraction} must be between 0 and 1 (e.g. 0.2).")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_val = 0 if n < 2 else min(n - 1, max(1, int(math.floor(n * val_fraction + 0.5))))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    train = (
        np.sort(np.concatenate(train_idx)).astype(np.int64) if train_idx else np.zeros(0, np.int64)
    )
    val = np.sort(np.concatenate(val_idx)).astype(np.int64) if val_idx else np.zeros(0, np.int64)
    return train, val


def thumbnails(
    dataset: Dataset, per_class: int = 4, size: int = 96, split: str = "train"
) -> dict[str, list[np.ndarray]]:
    """Return a few square uint8 thumbnails ``(size, size, 3)`` per class, for a preview.

    Images are spread evenly over each class; unreadable files are left out.
    """
    items = dataset.splits.get(split) or next(iter(dataset.splits.values()))
    by_class: dict[int, list[str]] = defaultdict(list)
    for rel, label in items:
        by_class[label].append(rel)
    pixel_limit = _max_pixels()
    out: dict[str, list[np.ndarray]] = {}
    for label, name in enumerate(dataset.class_names):
        rels = by_class.get(label, [])
        if not rels:
            out[name] = []
            continue
        picks = sorted({int(i) for i in np.linspace(0, len(rels) - 1, min(per_class, len(rels)))})
        images = []
        for i in picks:
            try:
                images.append(
                    _decode_resized(
                        dataset.image_path(rels[i]), (size, size), "center-crop", pixel_limit
                    )
                )
            except _ImageProblem:
                continue
        out[name] = images
    return out


def cli_ingest(args: Any) -> dict:
    """``python -m retrain ingest DATA --workspace W``: the dataset's summary as JSON."""
    return ingest(args.data, Path(args.workspace)).summary()  # __main__ defaults the workspace
