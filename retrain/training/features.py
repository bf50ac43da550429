"""The feature cache: a frozen base's outputs, computed once per dataset split and kept.

When nothing changes the base's output between epochs (frozen base, no augmentation) the head
trains on these features: that is what makes head-only retraining fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def feature_cache_path(
    dataset: Any,
    base_spec: str,
    cut_at: str,
    image_size: tuple[int, int],
    resize_mode: str,
    split: str,
    policy: str = "float32",
    preprocessing: str = "",
) -> Path:
    """Where the cached base outputs of one dataset split live.

    The key is (dataset id, base spec, cut layer, image size, resize mode, dtype policy,
    backend, preprocessing: features of pixels scaled another way are other features); a base given as a file also keys on the file's size and modification time, so
    a replaced file is never served stale features.
    """
    import keras

    spec = base_spec
    path = Path(base_spec)
    if path.is_file():
        stat = path.stat()
        spec = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = json.dumps(
        [dataset.dataset_id, spec, cut_at, list(image_size), resize_mode, policy]
        + [keras.backend.backend()]
        + ([preprocessing] if preprocessing else [])
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(dataset.manifest_path).parent / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"features_{split}_{digest}.npy"


def cached_features(
    features_model: Any, images: np.ndarray, path: Path, batch_size: int = 64
) -> np.ndarray:
    """Return ``features_model``'s outputs for ``images``, computed once and kept at ``path``.

    The outputs are computed with batched ``predict`` in chunks written straight into a
    memory-mapped ``.npy`` (bounded memory), then renamed into place, so a crash never leaves
    a partial cache behind. Later calls read the file (memory-mapped).
    """
    path = Path(path)
    if path.is_file():
        cached = np.load(path, mmap_mode="r")
        if len(cached) == len(images):
            return cached
    chunk = max(batch_size, 256)
    shape = tuple(int(d) for d in features_model.outputs[0].shape[1:])
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), *shape))
    chunk = chunk // batch_size * batch_size
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        batch = np.asarray(images[start:stop])
        short = -len(batch) % batch_size
        if short:
            # Pad the last batch to full size: a new batch shape would trace the model again.
            batch = np.concatenate([batch, np.zeros((short, *batch.shape[1:]), batch.dtype)])
        out[start:stop] = features_model.predict(batch, batch_size=batch_size, verbose=0)[
            : stop - start
        ]
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")
