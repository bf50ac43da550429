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


def frozen_split(features: Any) -> tuple[Any, Any, str] | None:
    """Split ``features`` (the image -> the cut layer's output, its top layers trainable, as in
    phase 2) at one tensor below every trainable layer: ``(bottom, top, boundary layer name)``
    with ``top(bottom(x)) == features(x)``, or None when there is no such tensor above the
    input (nothing trainable, no single tensor between the input and the trainable layers, or
    no weights below it).

    Phase 2 trains the top on ``bottom``'s outputs computed once: its epochs skip the frozen
    layers, which are most of a backbone. The split is moved down from the first trainable
    layer (in graph order) until only one tensor crosses it (a residual block's shortcut
    crosses inside the block, not at its output); the frozen layers above the split run
    every epoch, as before.
    """
    import keras

    # Operations, not only layers: a Keras 3 graph also holds ops such as ``x + 3`` (MobileNetV3).
    layers = [x for x in features.operations if not isinstance(x, keras.layers.InputLayer)]
    first = next(
        (i for i, x in enumerate(layers) if getattr(x, "trainable", False) and x.trainable_weights),
        None,
    )
    if not first:
        return None
    nodes: dict[int, list[Any]] = {}
    for depth_nodes in features._nodes_by_depth.values():
        for node in depth_nodes:
            nodes.setdefault(id(node.operation), []).append(node)
    for start in range(first, 0, -1):
        if any(len(nodes.get(id(x), [])) != 1 for x in layers[start:]):
            continue  # a layer used twice in the graph above the split: not one place
        top = {id(x) for x in layers[start:]}
        crossing = {
            id(tensor): tensor
            for layer in layers[start:]
            for node in nodes.get(id(layer), [])
            for tensor in node.input_tensors
            if id(tensor._keras_history.operation) not in top
        }
        if len(crossing) == 1:
            (tensor,) = crossing.values()
            source = tensor._keras_history.operation
            if not any(
                getattr(x, "weights", None) and not isinstance(x, keras.layers.Normalization)
                for x in layers[:start]
            ):
                return None  # nothing below computes much: caching would only copy pixels
            bottom = keras.Model(features.inputs, tensor, name="frozen_bottom")
            upper = keras.Model(tensor, features.outputs, name="trained_top")
            return bottom, upper, source.name
    return None
