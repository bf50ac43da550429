"""The `Dataset` a zip or folder becomes, the `ImageCache` of one split, and the limits.

Limits (environment variables, read on every call):

==============================  ========  ================================================
``RETRAIN_MAX_EXTRACT_MB``      2048      total uncompressed size of a zip
``RETRAIN_MAX_ZIP_ENTRIES``     100000    entries in a zip
``RETRAIN_MAX_FILE_MB``         100       one file in a zip (larger files are skipped)
``RETRAIN_MAX_ZIP_RATIO``       200       compression ratio (uncompressed / compressed)
``RETRAIN_MAX_IMAGE_PIXELS``    64000000  pixels of one image (decompression-bomb guard)
``RETRAIN_DECODE_WORKERS``      #cores    decoding threads (at most 8)
==============================  ========  ================================================
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.sessions.workspace import env_number

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)
_MB = 1024 * 1024
_CHUNK = 32  # images per task: one memory-mapped window per chunk keeps memory flat

Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------------------
# The Dataset


@dataclass(frozen=True)
class Dataset:
    """A validated image dataset, as written in its manifest.

    Attributes:
        dataset_id: content hash (16 hex characters) of the accepted images and their labels.
        name: display name (zip stem or folder name).
        root: folder the relative paths in ``splits`` are relative to.
        class_names: sorted class names; a label is an index into this list.
        splits: ``"train"`` always, ``"val"``/``"test"`` when the data had split folders;
            each a list of ``(relative path, label)``.
        skipped: files that were not used, ``{"path", "reason"}``.
        warnings: problems that do not stop training, each with advice.
        manifest_path: where the manifest is; the cache lives beside it.
        warning_codes: one code per warning, in the same order (keys of `WARNING_CODES`;
            "" for a warning of an old manifest whose code cannot be told).
    """

    dataset_id: str
    name: str
    root: Path
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    skipped: list[dict]
    warnings: list[str]
    manifest_path: Path
    warning_codes: list[str] = field(default_factory=list)

    @property
    def warning_items(self) -> list[dict[str, str]]:
        """The warnings as ``{"code", "message"}`` records, in order."""
        codes = self.warning_codes + [""] * (len(self.warnings) - len(self.warning_codes))
        return [
            {"code": code, "message": message}
            for code, message in zip(codes, self.warnings, strict=False)
        ]

    def has_warning(self, code: str) -> bool:
        """Whether the dataset has a warning with ``code`` (a key of `WARNING_CODES`)."""
        return code in self.warning_codes

    def counts(self) -> dict[str, dict[str, int]]:
        """Return ``split -> class name -> number of images`` (every class in every split)."""
        out: dict[str, dict[str, int]] = {}
        for split, items in self.splits.items():
            per = Counter(label for _, label in items)
            out[split] = {name: per.get(i, 0) for i, name in enumerate(self.class_names)}
        return out

    def num_images(self) -> int:
        """Return the number of images over all splits."""
        return sum(len(items) for items in self.splits.values())

    def summary(self) -> dict:
        """Return the JSON object that ``python -m retrain ingest`` prints."""
        return {
            "dataset_id": self.dataset_id,
            "classes": list(self.class_names),
            "splits": self.counts(),
            "num_images": self.num_images(),
            "skipped": [dict(s) for s in self.skipped],
            "warnings": list(self.warnings),
            "warning_codes": [item["code"] for item in self.warning_items],
            "manifest": str(self.manifest_path),
        }

    def image_path(self, relative: str) -> Path:
        """Return the absolute path of an image given its path relative to ``root``."""
        return self.root / relative


@dataclass(frozen=True)
class ImageCache:
    """The decoded images of one split at one size.

    Attributes:
        images: read-only memory-mapped uint8 array ``(N, H, W, 3)``.
        labels: int64 ``(N,)``, indices into ``Dataset.class_names``.
        paths: image paths relative to ``Dataset.root``, in the same order.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]


# --------------------------------------------------------------------------------------
# Limits


def _max_extract_bytes() -> int:
    return int(env_number("RETRAIN_MAX_EXTRACT_MB", 2048) * _MB)


def _max_entries() -> int:
    return int(env_number("RETRAIN_MAX_ZIP_ENTRIES", 100_000))


def _max_file_bytes() -> int:
    return int(env_number("RETRAIN_MAX_FILE_MB", 100) * _MB)


def _max_ratio() -> float:
    return env_number("RETRAIN_MAX_ZIP_RATIO", 200)


def _max_pixels() -> int:
    return int(env_number("RETRAIN_MAX_IMAGE_PIXELS", 64_000_000))


def _num_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, int(env_number("RETRAIN_DECODE_WORKERS", cores))))


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
