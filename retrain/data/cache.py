"""The uint8 image cache training reads: `load_images`.

`load_images` decodes a split once at a given size into a memory-mapped ``.npy`` file; later
epochs and runs read that file, never the JPEGs. Decoding runs in a thread pool (Pillow and
hashlib release the GIL) and every image goes straight into the memory-mapped file, mapped a
chunk at a time, so memory stays flat however large the dataset is.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from retrain.data.dataset import _CHUNK, Dataset, ImageCache, Progress, _max_pixels
from retrain.data.images import (
    _check_channels,
    _check_size_mode,
    _decode_resized,
    _ImageProblem,
    _map_chunks,
)
from retrain.errors import DatasetError


def _decode_into(
    npy_path: str,
    offset: int,
    start: int,
    paths: list[str],
    size_hw: tuple[int, int],
    resize_mode: str,
    pixel_limit: int,
    channels: int = 3,
) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start...`` of the .npy file; return ``(row, problem)``s.

    Only this chunk's rows are mapped, and unmapped on return, so memory stays flat.
    """
    height, width = size_hw
    row = height * width * channels
    window = np.memmap(
        npy_path,
        dtype=np.uint8,
        mode="r+",
        offset=offset + start * row,
        shape=(len(paths), height, width, channels),
    )
    problems: list[tuple[int, str]] = []
    try:
        for k, path in enumerate(paths):
            try:
                window[k] = _decode_resized(path, size_hw, resize_mode, pixel_limit, channels)
            except _ImageProblem as err:
                problems.append((start + k, str(err)))
    finally:
        del window
    return problems


def load_images(
    dataset: Dataset,
    split: str,
    image_size: tuple[int, int],
    resize_mode: str = "squash",
    *,
    channels: int = 3,
    progress: Progress | None = None,
) -> ImageCache:
    """Return one split decoded at ``image_size``, building its cache file the first time.

    The cache is ``<dataset folder>/cache/<split>_<H>x<W>_<mode>.npy`` for RGB and
    ``<split>_<H>x<W>x1_<mode>.npy`` for grayscale (+ ``_labels.npy``), shared by every run on
    the same dataset id.

    Args:
        dataset: from `ingest` or `load_dataset`.
        split: ``"train"``, ``"val"`` or ``"test"`` (one the dataset has).
        image_size: ``(H, W)``.
        resize_mode: ``"squash"`` | ``"pad"`` | ``"center-crop"``.
        channels: 3 (RGB) or 1 (grayscale, what a 1-channel model takes).
        progress: optional ``callback(fraction, message)``.

    Raises:
        DatasetError: no such split, or an image became unreadable since ingest.
        ConfigError: bad size or resize mode.
    """
    height, width = _check_size_mode(image_size, resize_mode)
    _check_channels(channels)
    if split not in dataset.splits:
        raise DatasetError(
            f"Dataset '{dataset.name}' has no '{split}' split (it has "
            f"{', '.join(dataset.splits)}). Use one of those."
        )
    items = dataset.splits[split]
    paths = [rel for rel, _ in items]
    labels = np.array([label for _, label in items], dtype=np.int64)
    cache_dir = dataset.manifest_path.parent / "cache"
    cache_dir.mkdir(exist_ok=True)
    stem = f"{split}_{height}x{width}{'' if channels == 3 else f'x{channels}'}_{resize_mode}"
    images_path = cache_dir / f"{stem}.npy"
    labels_path = cache_dir / f"{stem}_labels.npy"
    cached = _read_cache(images_path, labels_path, labels, (height, width, channels))
    if cached is not None:
        return ImageCache(images=cached, labels=labels, paths=paths)

    token = secrets.token_hex(4)
    tmp_images = cache_dir / f".{stem}.{token}.npy"
    tmp_labels = cache_dir / f".{stem}_labels.{token}.npy"
    try:
        created = np.lib.format.open_memmap(
            tmp_images, mode="w+", dtype=np.uint8, shape=(len(items), height, width, channels)
        )
        offset = int(created.offset)
        del created  # rows are written through per-chunk windows (flat memory)
        pixel_limit = _max_pixels()
        chunks = [
            (
                str(tmp_images),
                offset,
                i,
                [str(dataset.image_path(rel)) for rel in paths[i : i + _CHUNK]],
                (height, width),
                resize_mode,
                pixel_limit,
                channels,
            )
            for i in range(0, len(paths), _CHUNK)
        ]
        done = [0]

        def report(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0] / len(paths), f"Decoding images {done[0]:,}/{len(paths):,}")

        sizes = [len(c[3]) for c in chunks]
        problems = [p for chunk in _map_chunks(_decode_into, chunks, sizes, report) for p in chunk]
        if problems:
            row, problem = problems[0]
            raise DatasetError(
                f"'{paths[row]}' of dataset '{dataset.name}' cannot be read any more ({problem}); "
                f"{len(problems)} image(s) changed since the upload. Upload the dataset again."
            )
        np.save(tmp_labels, labels)
        os.replace(tmp_labels, labels_path)
        os.replace(tmp_images, images_path)
    finally:
        tmp_images.unlink(missing_ok=True)
        tmp_labels.unlink(missing_ok=True)
    images = np.load(images_path, mmap_mode="r")
    return ImageCache(images=images, labels=labels, paths=paths)


def _read_cache(
    images_path: Path, labels_path: Path, labels: np.ndarray, shape_hwc: tuple[int, int, int]
) -> np.ndarray | None:
    if not (images_path.exists() and labels_path.exists()):
        return None
    try:
        images = np.load(images_path, mmap_mode="r")
        stored = np.load(labels_path)
    except (OSError, ValueError):
        return None
    if (
        images.dtype != np.uint8
        or images.shape != (len(labels), *shape_hwc)
        or not np.array_equal(stored, labels)
    ):
        return None
    return images
