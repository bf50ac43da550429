"""Zip or folder of images -> a validated `Dataset`, and the uint8 image cache training reads.

`ingest` extracts a zip safely into the workspace (or reads a folder in place), finds the
layout (class folders, one wrapper folder, or ``train/ val|validation/ test/`` split folders),
verifies every image by decoding it, skips and reports junk, raises `DatasetError` on input
that cannot make a classifier and warns about input that makes a poor one. The result is a
``manifest.json`` whose ``dataset_id`` is a hash of the content, so the same images give the
same id and reuse the extraction and the cache.

`load_images` decodes a split once at a given size into a memory-mapped ``.npy`` file; later
epochs and runs read that file, never the JPEGs. Decoding runs in a thread pool (Pillow and
hashlib release the GIL) and every image goes straight into the memory-mapped file, mapped a
chunk at a time, so memory stays flat however large the dataset is.

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

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import stat
import struct
import tempfile
import threading
import time
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import (  # the decoders Retrain Studio accepts, registered explicitly
    BmpImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from retrain.errors import ConfigError, DatasetError
from retrain.uploads import save_upload
from retrain.workspace import env_number, file_sha256, home, is_within, write_json

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
RESIZE_MODES: tuple[str, ...] = ("squash", "pad", "center-crop")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_IMAGES_PER_CLASS = 2
FEW_IMAGES_PER_CLASS = 10
IMBALANCE_RATIO = 3.0
TINY_SIDE = 32
MANIFEST_VERSION = 1

#: Codes of the dataset warnings (`Dataset.warning_codes`): code -> when it is given.
WARNING_CODES: dict[str, str] = {
    "few_images": f"a class has fewer than {FEW_IMAGES_PER_CLASS} (training) images",
    "imbalance": f"the largest class has {IMBALANCE_RATIO:g}x or more the images of the smallest",
    "duplicates": "exact copies of an image in the same class",
    "duplicates_across_classes": "the same image in more than one class",
    "duplicates_across_splits": "the same image in more than one split (leakage)",
    "tiny_images": f"images smaller than {TINY_SIDE} px on a side",
    "skipped_files": "files that were not used (besides routine system files)",
}
# Manifests written before warnings had codes: the code of a message, by how it is worded.
_LEGACY_WARNING_TEXT = (
    ("imbalance", "Classes are imbalanced"),
    ("duplicates_across_splits", "in more than one split"),
    ("duplicates_across_classes", "in more than one class"),
    ("duplicates", "exact cop"),
    ("tiny_images", " px on a side"),
    ("skipped_files", "skipped ("),
    ("few_images", " has only "),
    ("few_images", " classes have fewer than "),
)

# Folder names (lower case) that mean a split; anything else at the top is a class.
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
# Only these Pillow decoders are ever tried (no EPS/Ghostscript and friends).
# (The JPEG decoder also opens multi-picture MPO files from cameras.)
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
_ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst")
_SYSTEM_NAMES = {"__macosx", "thumbs.db", "desktop.ini", "$recycle.bin", "ehthumbs.db"}
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_MB = 1024 * 1024
# Skip reasons that are routine (every zip made on a Mac has them): listed, not warned about.
_ROUTINE_SKIPS = ("macOS metadata", "hidden file", "hidden folder", "Windows system file")
_CHUNK = 32  # images per task: one memory-mapped window per chunk keeps memory flat
_PARALLEL_MIN = 64  # below this many images a thread pool costs more than it saves
# Bilinear (antialiased when shrinking) like Keras' Resizing default, and cheaper than bicubic.
_FILTER = Image.Resampling.BILINEAR

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


# --------------------------------------------------------------------------------------
# Decoding (shared by ingest's check, the cache, thumbnails and predict)


class _ImageProblem(Exception):
    """An image file that cannot be used; the message is the skip reason."""


# Everything Pillow raises for a damaged or hostile file (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


# warnings.catch_warnings swaps process-global state: one decoding thread at a time may hold it.
# Image.open only parses headers, so the lock costs little; decoding happens outside it.
_OPEN_LOCK = threading.Lock()


def _open_image(source: str | Path | BinaryIO, pixel_limit: int) -> Image.Image:
    """Open an image with only the allowed decoders and the decompression-bomb guard on.

    Pillow raises above twice ``Image.MAX_IMAGE_PIXELS`` and only warns between 1x and 2x;
    both are refused here (the warning is silenced and the size checked explicitly).
    """
    bomb = _ImageProblem(
        f"too many pixels (more than {pixel_limit:,}): possible decompression bomb"
    )
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            Image.MAX_IMAGE_PIXELS = pixel_limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source, formats=_PIL_FORMATS)
    except Image.DecompressionBombError:
        raise bomb from None
    except Image.UnidentifiedImageError:
        raise _ImageProblem("not a readable image (unknown or unsupported format)") from None
    except _DECODE_ERRORS:
        raise _ImageProblem("corrupt or truncated image") from None
    width, height = im.size
    if width * height > pixel_limit:
        im.close()
        raise bomb
    return im


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return 1  # unreadable EXIF: keep the pixels as stored


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        # 16-bit and 32-bit grayscale: scale the value range down to 8 bits.
        arr = np.asarray(im)
        if arr.dtype.kind == "f":
            peak = float(np.nanmax(arr)) if arr.size else 0.0
            arr = np.nan_to_num(arr * (255.0 if peak <= 1.0 else 1.0))
        else:
            peak = int(arr.max()) if arr.size else 0
            if peak > 255:
                arr = arr.astype(np.float64) * (255.0 / (65535 if peak <= 65535 else peak))
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def _decode_resized(
    source: str | Path,
    size_hw: tuple[int, int],
    resize_mode: str,
    pixel_limit: int,
    channels: int = 3,
) -> np.ndarray:
    """Decode one image file to uint8 ``(H, W, channels)``: EXIF orientation, RGB (then L for
    1 channel), resize."""
    height, width = size_hw
    try:
        with _open_image(source, pixel_limit) as im:
            orientation = _exif_orientation(im)
            if im.format in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2..1/8 scale when the target is that much smaller.
                rotated = orientation in (5, 6, 7, 8)
                im.draft(im.mode, (height, width) if rotated else (width, height))
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
            if channels == 1:  # ITU-R 601 luma, as Pillow's convert("L")
                rgb = rgb.convert("L")
            if resize_mode == "squash":
                out = rgb if rgb.size == (width, height) else rgb.resize((width, height), _FILTER)
            elif resize_mode == "pad":
                black = 0 if channels == 1 else (0, 0, 0)
                out = ImageOps.pad(rgb, (width, height), _FILTER, color=black)
            else:
                out = ImageOps.fit(rgb, (width, height), _FILTER)
            array = np.asarray(out, dtype=np.uint8)
            return array[..., None] if array.ndim == 2 else array
    except _ImageProblem:
        raise
    except _DECODE_ERRORS:
        raise _ImageProblem("corrupt or truncated image") from None


def _check_file(
    path: str, pixel_limit: int, max_bytes: int
) -> tuple[str | None, int, int, str | None]:
    """Hash and fully decode one file; return ``(sha256, width, height, skip reason)``."""
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            limit = _human_bytes(max_bytes)
            return None, 0, 0, f"too large ({_human_bytes(size)}; the limit is {limit} per file)"
        data = Path(path).read_bytes()
    except OSError as err:
        return None, 0, 0, f"unreadable file ({err.strerror or err})"
    if not data:
        return None, 0, 0, "empty file"
    digest = hashlib.sha256(data).hexdigest()
    try:
        with _open_image(io.BytesIO(data), pixel_limit) as im:
            width, height = im.size
            if im.format in ("JPEG", "MPO"):
                # 1/8-scale decoding still reads every entropy-coded block (truncation shows).
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except _ImageProblem as err:
        return digest, 0, 0, str(err)
    except _DECODE_ERRORS:
        return digest, 0, 0, "corrupt or truncated image"
    return digest, width, height, None


def _check_chunk(
    paths: list[str], pixel_limit: int, max_bytes: int
) -> list[tuple[str | None, int, int, str | None]]:
    return [_check_file(p, pixel_limit, max_bytes) for p in paths]


def _map_chunks(
    func: Callable[..., list],
    chunks: list[tuple],
    sizes: list[int],
    report: Callable[[int], None] | None = None,
) -> list[list]:
    """Run ``func(*chunk)`` for every chunk, in a thread pool when it pays off, in order.

    Pillow's decoders, its resampling and hashlib release the GIL, so threads use every core
    without copying pixels between processes. ``sizes[i]`` is the number of images in chunk i.
    """
    workers = _num_workers()
    results: list[list] = []
    if workers <= 1 or sum(sizes) < _PARALLEL_MIN or len(chunks) < 2:
        for chunk, size in zip(chunks, sizes, strict=True):
            results.append(func(*chunk))
            if report:
                report(size)
        return results
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrain-decode") as pool:
        # A bounded window of submitted chunks: results are consumed as they finish.
        pending = [pool.submit(func, *chunk) for chunk in chunks[: workers * 2]]
        for index in range(len(chunks)):
            results.append(pending[index].result())
            pending[index] = None  # type: ignore[call-overload]  # free the finished result
            if report:
                report(sizes[index])
            if len(pending) < len(chunks):  # keep the window full
                pending.append(pool.submit(func, *chunks[len(pending)]))
    return results


def load_image_file(
    path: str | Path,
    image_size: tuple[int, int],
    resize_mode: str = "squash",
    channels: int = 3,
) -> np.ndarray:
    """Decode one image file exactly as the cache does (EXIF, RGB or grayscale, resize).

    Args:
        path: an image file.
        image_size: ``(H, W)``.
        resize_mode: ``"squash"`` (stretch), ``"pad"`` (fit, black bars) or ``"center-crop"``.
        channels: 3 (RGB) or 1 (grayscale: the RGB image converted to L).

    Returns:
        uint8 array ``(H, W, channels)``.

    Raises:
        DatasetError: the file is not a readable image.
        ConfigError: bad size or resize mode.
    """
    size = _check_size_mode(image_size, resize_mode)
    _check_channels(channels)
    try:
        return _decode_resized(path, size, resize_mode, _max_pixels(), channels)
    except _ImageProblem as err:
        raise DatasetError(
            f"'{Path(path).name}' cannot be used: {err}. Use a .jpg or .png image."
        ) from None


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"Images have 1 (grayscale) or 3 (RGB) channels, not {channels}.")


def _check_size_mode(image_size: Sequence[int], resize_mode: str) -> tuple[int, int]:
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(
            f"Unknown resize mode {resize_mode!r}. Use one of: {', '.join(RESIZE_MODES)}."
        )
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ConfigError(f"Image size {image_size!r} is not (height, width).") from None
    if not (1 <= height <= 4096 and 1 <= width <= 4096):
        raise ConfigError(f"Image size {height}x{width} is out of range; use 1 to 4096 pixels.")
    return height, width


# --------------------------------------------------------------------------------------
# Paths: what is junk, what is an image, what is safe


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _junk_reason(part: str, is_folder: bool) -> str | None:
    lower = part.lower()
    if lower == "__macosx":
        return "macOS metadata"
    if lower in _SYSTEM_NAMES:
        return "Windows system file"
    if part.startswith("."):
        return "hidden folder" if is_folder else "hidden file"
    return None


def _file_reason(relpath: str) -> str | None:
    """Why a file (relative posix path) is not an image candidate, or None if it is one."""
    parts = relpath.split("/")
    for i, part in enumerate(parts):
        reason = _junk_reason(part, is_folder=i < len(parts) - 1)
        if reason:
            return reason
    suffix = Path(parts[-1]).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    if suffix in _ARCHIVE_EXTENSIONS:
        return "archive inside the dataset (not expanded; unpack it first)"
    return f"not an image ({suffix or 'no extension'})"


def _entry_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if not info.flag_bits & 0x800:
        # Many zip tools write UTF-8 names without setting the UTF-8 flag.
        with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
            name = name.encode("cp437").decode("utf-8")
    return _nfc(name.replace("\\", "/"))


def _safe_relpath(name: str) -> str | None:
    """A zip entry name as a safe relative path, or None when it would escape the folder."""
    if name.startswith("/") or "\x00" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        return None
    if any(len(p.encode("utf-8")) > 255 for p in parts):
        return None
    return "/".join(parts)


# --------------------------------------------------------------------------------------
# Zip extraction


def _reject_zip(path: Path) -> DatasetError:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return DatasetError(f"Cannot read '{path.name}' ({err.strerror}). Upload it again.")
    if head in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return DatasetError(
            f"'{path.name}' is a truncated or damaged zip (its file list is missing). "
            "The upload may have been cut off: create the zip again and re-upload it."
        )
    return DatasetError(
        f"'{path.name}' is not a zip file. Zip the folder that holds your class folders "
        "(e.g. right-click > Compress) and upload the .zip."
    )


def _check_zip_directory(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse zip bombs from the zip's own directory, before anything is extracted."""
    files = [i for i in infos if not i.is_dir()]
    max_entries = _max_entries()
    if len(infos) > max_entries:
        raise DatasetError(
            f"'{path.name}' has {len(infos):,} entries, more than the limit of {max_entries:,} "
            "(RETRAIN_MAX_ZIP_ENTRIES). Upload fewer files or raise the limit."
        )
    total = sum(i.file_size for i in files)
    packed = sum(i.compress_size for i in files)
    max_total = _max_extract_bytes()
    if total > max_total:
        raise DatasetError(
            f"'{path.name}' would expand to {_human_bytes(total)}, more than the limit of "
            f"{_human_bytes(max_total)} (RETRAIN_MAX_EXTRACT_MB). Upload a smaller dataset "
            "or raise the limit."
        )
    max_ratio = _max_ratio()
    # Small entries may compress extremely well legitimately (a blank BMP); only volume matters.
    for info in files:
        if info.file_size >= _MB and info.file_size > max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise DatasetError(
                f"'{path.name}' looks like a zip bomb: '{info.filename}' expands {ratio:,.0f}x "
                f"({_human_bytes(info.compress_size)} to {_human_bytes(info.file_size)}; "
                f"the limit is {max_ratio:,.0f}x). Zip the images themselves, not generated data."
            )
    if total >= _MB and total > max_ratio * max(packed, 1):
        raise DatasetError(
            f"'{path.name}' looks like a zip bomb: it expands {total / max(packed, 1):,.0f}x "
            f"({_human_bytes(packed)} to {_human_bytes(total)}; the limit is {max_ratio:,.0f}x). "
            "Zip the images themselves, not generated data."
        )


def _extract_zip(
    path: Path, dest: Path, progress: Progress | None
) -> tuple[list[str], list[dict], list[dict]]:
    """Extract the image files of a zip into ``dest``; return candidates, skips, junk skips."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _reject_zip(path) from None
    except OSError as err:
        raise DatasetError(
            f"Cannot read '{path.name}' ({err.strerror}). Upload it again."
        ) from None
    skipped: list[dict] = []
    junk: list[dict] = []
    junk_folders: Counter[str] = Counter()
    with zf:
        infos = zf.infolist()
        _check_zip_directory(path, infos)
        max_file = _max_file_bytes()
        plan: list[tuple[zipfile.ZipInfo, str]] = []
        seen: set[str] = set()
        for info in infos:
            mode = info.external_attr >> 16
            if info.is_dir() or stat.S_ISDIR(mode):
                continue
            name = _entry_name(info)
            rel = _safe_relpath(name)
            if rel is None:
                skipped.append({"path": name, "reason": "unsafe path (outside the dataset)"})
                continue
            if stat.S_ISLNK(mode):
                skipped.append({"path": rel, "reason": "symbolic link (not extracted)"})
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                skipped.append({"path": rel, "reason": "special file (device, pipe or socket)"})
                continue
            reason = _file_reason(rel)
            if reason in _ROUTINE_SKIPS:
                # One line per system folder (a __MACOSX folder can hold thousands of files).
                parts = rel.split("/")
                folder = next((p for p in parts[:-1] if _junk_reason(p, is_folder=True)), None)
                if folder is not None:
                    key = "/".join(parts[: parts.index(folder) + 1]) + "/"
                    junk_folders[key] += 1
                else:
                    junk.append({"path": rel, "reason": reason})
                continue
            if reason:
                skipped.append({"path": rel, "reason": reason})
                continue
            if info.flag_bits & 0x1:
                skipped.append({"path": rel, "reason": "password-protected (encrypted) entry"})
                continue
            if info.compress_type not in _ZIP_METHODS:
                skipped.append({"path": rel, "reason": "unsupported zip compression method"})
                continue
            if info.file_size > max_file:
                skipped.append(
                    {
                        "path": rel,
                        "reason": f"too large ({_human_bytes(info.file_size)}; the limit is "
                        f"{_human_bytes(max_file)} per file)",
                    }
                )
                continue
            if rel in seen:
                skipped.append({"path": rel, "reason": "duplicate name in the zip"})
                continue
            seen.add(rel)
            plan.append((info, rel))
        for folder, n in sorted(junk_folders.items()):
            reason = _junk_reason(folder.rstrip("/").split("/")[-1], is_folder=True)
            junk.append({"path": folder, "reason": f"{reason} ({n} files)"})

        candidates: list[str] = []
        dest_resolved = dest.resolve()
        for done, (info, rel) in enumerate(plan):
            target = dest / rel
            if not is_within(target, dest_resolved):
                skipped.append({"path": rel, "reason": "unsafe path (outside the dataset)"})
                continue
            problem = _extract_one(zf, info, target, max_file)
            if problem:
                skipped.append({"path": rel, "reason": problem})
            else:
                candidates.append(rel)
            if progress and done % 200 == 0:
                progress(0.3 * done / max(len(plan), 1), f"Extracting {done:,}/{len(plan):,} files")
    return candidates, skipped, junk


def _extract_one(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, max_file: int
) -> str | None:
    """Copy one entry, never writing more than its declared size; return a problem or None."""
    limit = min(info.file_size, max_file)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        # "xb": never follow or overwrite anything already there.
        with zf.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise _ImageProblem("larger than its zip entry says (not extracted)")
                dst.write(chunk)
    except _ImageProblem as err:
        target.unlink(missing_ok=True)
        return str(err)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError):
        target.unlink(missing_ok=True)
        return "damaged zip entry (failed its checksum)"
    except OSError as err:
        if not isinstance(err, FileExistsError):
            target.unlink(missing_ok=True)
        return f"could not be extracted ({err.strerror or err})"
    return None


# --------------------------------------------------------------------------------------
# Folders read in place


def _walk_folder(root: Path) -> tuple[list[str], list[dict], list[dict]]:
    candidates: list[str] = []
    skipped: list[dict] = []
    junk: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in sorted(dirnames):
            reason = _junk_reason(d, is_folder=True)
            if reason:
                junk.append({"path": f"{prefix}{d}/", "reason": reason})
            elif (here / d).is_symlink():
                skipped.append({"path": f"{prefix}{d}/", "reason": "symbolic link (not followed)"})
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = prefix + f
            full = here / f
            if full.is_symlink():
                skipped.append({"path": rel, "reason": "symbolic link (not followed)"})
                continue
            if not full.is_file():
                skipped.append({"path": rel, "reason": "special file (device, pipe or socket)"})
                continue
            reason = _file_reason(rel)
            if reason in _ROUTINE_SKIPS:
                junk.append({"path": rel, "reason": reason})
            elif reason:
                skipped.append({"path": rel, "reason": reason})
            else:
                candidates.append(rel)
    return candidates, skipped, junk


# --------------------------------------------------------------------------------------
# Layout, checks, warnings


def _find_layout(
    candidates: list[str], label: str
) -> tuple[str, dict[str, dict[str, list[str]]], list[dict]]:
    """Return ``(prefix, split -> class -> relative paths, skipped)`` for candidate images.

    ``prefix`` is the wrapper folder(s) to strip; paths in the result are relative to it.
    """
    if not candidates:
        raise DatasetError(
            f"No images found in '{label}'. Allowed formats: {' '.join(IMAGE_EXTENSIONS)}"
        )
    paths = list(candidates)
    prefix = ""
    # Strip wrapper folders: one folder at the top, no images beside it, folders inside it.
    while True:
        tops = {p.split("/", 1)[0] for p in paths if "/" in p}
        loose = [p for p in paths if "/" not in p]
        if loose or len(tops) != 1:
            break
        top = tops.pop()
        if not any(p.count("/") >= 2 for p in paths):
            break  # the single folder holds images directly: it is a class, not a wrapper
        prefix += top + "/"
        paths = [p[len(top) + 1 :] for p in paths]

    skipped: list[dict] = []
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    split_dirs = {
        p.split("/", 1)[0]
        for p in paths
        if p.count("/") >= 2 and p.split("/", 1)[0].lower() in _SPLIT_ALIASES
    }
    if split_dirs:
        by_split: dict[str, list[str]] = defaultdict(list)
        for d in split_dirs:
            by_split[_SPLIT_ALIASES[d.lower()]].append(d)
        for split, dirs in by_split.items():
            if len(dirs) > 1:
                raise DatasetError(
                    f"Found {' and '.join(sorted(d + '/' for d in dirs))} in '{label}': both mean "
                    f"the '{split}' split. Merge them into one folder."
                )
        for p in paths:
            parts = p.split("/")
            split = _SPLIT_ALIASES.get(parts[0].lower())
            if split is None or parts[0] not in split_dirs:
                skipped.append({"path": prefix + p, "reason": "outside the train/val/test folders"})
            elif len(parts) < 3:
                skipped.append(
                    {
                        "path": prefix + p,
                        "reason": f"image directly in '{parts[0]}/', not in a class folder",
                    }
                )
            else:
                groups[split][_nfc(parts[1])].append(p)
        if "train" not in groups:
            found = ", ".join(sorted(d + "/" for d in split_dirs))
            raise DatasetError(
                f"Found split folders {found} but no train/ folder in '{label}'. Add "
                "train/<class>/ folders, or zip plain class folders and a validation split "
                "is made for you."
            )
    else:
        loose = [p for p in paths if "/" not in p]
        for p in paths:
            if "/" in p:
                groups["train"][_nfc(p.split("/", 1)[0])].append(p)
        if not groups:
            raise DatasetError(
                f"Found {len(loose)} images in '{label}' but no class folders. Put each class's "
                "images in its own folder (e.g. cats/1.jpg, dogs/1.jpg) and zip those folders."
            )
        skipped.extend(
            {"path": prefix + p, "reason": "image outside any class folder"} for p in loose
        )
    return prefix, {s: dict(c) for s, c in groups.items()}, skipped


def _check_classes(label: str, groups: dict[str, dict[str, list]]) -> list[str]:
    """Raise DatasetError for class structures that cannot train; return the class names."""
    train_classes = set(groups.get("train", {}))
    for split in SPLITS[1:]:
        if split not in groups:
            continue
        other = set(groups[split])
        if other != train_classes:
            parts = []
            missing = sorted(train_classes - other)
            extra = sorted(other - train_classes)
            if missing:
                parts.append(f"{split}/ lacks {', '.join(repr(c) for c in missing)}")
            if extra:
                parts.append(f"{split}/ has {', '.join(repr(c) for c in extra)} that train/ lacks")
            raise DatasetError(
                f"The split folders of '{label}' have different classes: {'; '.join(parts)}. "
                "Every split needs the same class folders (with at least one image each)."
            )
    if len(train_classes) < 2:
        only = next(iter(train_classes), "")
        n = len(groups.get("train", {}).get(only, []))
        raise DatasetError(
            f"Found only 1 class ('{only}', {n} images) in '{label}'; a classifier needs at "
            "least 2 classes. Put each class's images in its own folder (e.g. cats/, dogs/)."
        )
    for name in sorted(train_classes):
        n = len(groups["train"][name])
        if n < MIN_IMAGES_PER_CLASS:
            where = " in train/" if len(groups) > 1 else ""
            raise DatasetError(
                f"Class '{name}' has only {n} usable image{where}; every "
                f"class needs at least {MIN_IMAGES_PER_CLASS} (10 or more recommended). Add "
                "images to it or remove its folder."
            )
    return sorted(train_classes)


def _skip_category(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0]


def _n(count: int, one: str, many: str) -> str:
    return f"{count:,} {one if count == 1 else many}"


def _warnings(
    class_names: list[str],
    groups: dict[str, dict[str, list[str]]],
    info: dict[str, tuple[str, int, int]],
    skipped: list[dict],
) -> list[tuple[str, str]]:
    """Problems that do not stop training, each with concrete advice: ``(code, message)``."""
    out: list[tuple[str, str]] = []
    multi = len(groups) > 1
    train = {c: len(groups["train"][c]) for c in class_names}
    few = [(c, n) for c, n in train.items() if n < FEW_IMAGES_PER_CLASS]
    where = "training images" if multi else "images"
    if len(few) == 1:
        c, n = few[0]
        out.append(
            (
                "few_images",
                f"Class '{c}' has only {n} {where}; add at least {FEW_IMAGES_PER_CLASS} "
                "(50 or more works much better).",
            )
        )
    elif few:
        listed = ", ".join(f"'{c}': {n}" for c, n in few[:6]) + (", ..." if len(few) > 6 else "")
        out.append(
            (
                "few_images",
                f"{len(few)} classes have fewer than {FEW_IMAGES_PER_CLASS} {where} ({listed}); "
                f"add at least {FEW_IMAGES_PER_CLASS} per class (50 or more works much better).",
            )
        )
    big = max(train, key=lambda c: train[c])
    small = min(train, key=lambda c: train[c])
    if train[big] >= IMBALANCE_RATIO * train[small]:
        out.append(
            (
                "imbalance",
                f"Classes are imbalanced: '{big}' has {train[big]} {where} but '{small}' only "
                f"{train[small]} ({train[big] / train[small]:.1f}x). Add images to the smaller "
                "classes, or turn on class weights when training.",
            )
        )

    by_hash: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for split in (s for s in SPLITS if s in groups):
        for cls, rels in groups[split].items():
            for rel in rels:
                by_hash[info[rel][0]].append((split, cls, rel))
    within: list[tuple[str, str]] = []
    across_classes: list[tuple[str, str]] = []
    across_splits: list[tuple[str, str]] = []
    for copies in by_hash.values():
        if len(copies) < 2:
            continue
        first = copies[0]
        for other in copies[1:]:
            pair = (first[2], other[2])
            if other[0] != first[0]:
                across_splits.append(pair)
            elif other[1] != first[1]:
                across_classes.append(pair)
            else:
                within.append(pair)
    if within:
        a, b = within[0]
        out.append(
            (
                "duplicates",
                f"{_n(len(within), 'image is an exact copy', 'images are exact copies')} of "
                "another image in the same class "
                f"(e.g. '{a}' = '{b}'); copies count twice in training. Delete the copies.",
            )
        )
    if across_classes:
        a, b = across_classes[0]
        out.append(
            (
                "duplicates_across_classes",
                f"{_n(len(across_classes), 'image appears', 'images appear')} in more than one "
                f"class (e.g. '{a}' = '{b}'); "
                "the same picture with two labels confuses the model. Keep each in one class.",
            )
        )
    if across_splits:
        a, b = across_splits[0]
        out.append(
            (
                "duplicates_across_splits",
                f"{_n(len(across_splits), 'image appears', 'images appear')} in more than one "
                f"split (e.g. '{a}' = '{b}'): "
                "test images seen in training make scores look better than they are (leakage). "
                "Remove them from one split.",
            )
        )

    tiny = [
        (rel, info[rel][1], info[rel][2])
        for classes in groups.values()
        for rels in classes.values()
        for rel in rels
        if min(info[rel][1], info[rel][2]) < TINY_SIDE
    ]
    if tiny:
        rel, w, h = tiny[0]
        out.append(
            (
                "tiny_images",
                f"{_n(len(tiny), 'image is', 'images are')} smaller than {TINY_SIDE} px on a "
                f"side (e.g. '{rel}' is "
                f"{w}x{h}); they get upscaled and look blurry. Use larger images if you have them.",
            )
        )

    if skipped:
        kinds = Counter(_skip_category(s["reason"]) for s in skipped)
        listed = "; ".join(f"{kind}: {n}" for kind, n in kinds.most_common())
        out.append(
            (
                "skipped_files",
                f"{_n(len(skipped), 'file was', 'files were')} skipped ({listed}); see the list "
                "of skipped files. "
                "Fix or remove them if they should be part of the dataset.",
            )
        )
    return out


def _content_id(groups: dict[str, dict[str, list[str]]], info: dict[str, tuple]) -> str:
    digest = hashlib.sha256(f"retrain-dataset-v{MANIFEST_VERSION}\n".encode())
    for split in SPLITS:
        for cls in sorted(groups.get(split, {})):
            for rel in sorted(groups[split][cls]):
                digest.update(f"{split}\t{cls}\t{rel}\t{info[rel][0]}\n".encode())
    return digest.hexdigest()[:16]


def _scan(
    root: Path,
    candidates: list[str],
    skipped: list[dict],
    junk: list[dict],
    label: str,
    progress: Progress | None,
    start: float,
) -> dict[str, Any]:
    """Layout -> decode check -> class checks -> warnings; return the manifest's content."""
    prefix, groups, layout_skips = _find_layout(candidates, label)
    skipped = skipped + layout_skips
    base = root / prefix if prefix else root
    rels = sorted(rel for classes in groups.values() for rels in classes.values() for rel in rels)

    pixel_limit = _max_pixels()
    max_bytes = _max_file_bytes()
    chunks = [
        ([str(base / r) for r in rels[i : i + _CHUNK]], pixel_limit, max_bytes)
        for i in range(0, len(rels), _CHUNK)
    ]
    done = [0]

    def report(n: int) -> None:
        done[0] += n
        if progress:
            frac = start + (1.0 - start) * done[0] / max(len(rels), 1)
            progress(min(frac, 1.0), f"Checking images {done[0]:,}/{len(rels):,}")

    sizes = [len(c[0]) for c in chunks]
    results = [r for chunk in _map_chunks(_check_chunk, chunks, sizes, report) for r in chunk]
    info: dict[str, tuple[str, int, int]] = {}
    for rel, (digest, width, height, problem) in zip(rels, results, strict=True):
        if problem:
            skipped.append({"path": prefix + rel, "reason": problem})
        else:
            info[rel] = (digest or "", width, height)
    if not info:
        examples = "; ".join(f"'{s['path']}': {s['reason']}" for s in skipped[:2])
        raise DatasetError(
            f"No readable images found in '{label}' ({len(skipped)} files skipped, e.g. "
            f"{examples}). Allowed formats: {' '.join(IMAGE_EXTENSIONS)}"
        )
    groups = {
        split: {c: sorted(r for r in rs if r in info) for c, rs in classes.items()}
        for split, classes in groups.items()
    }
    groups = {
        split: {c: rs for c, rs in classes.items() if rs} for split, classes in groups.items()
    }
    class_names = _check_classes(label, groups)
    warns = _warnings(class_names, groups, info, skipped)
    index = {c: i for i, c in enumerate(class_names)}
    splits = {
        split: [(rel, index[c]) for c in class_names for rel in groups[split][c]]
        for split in SPLITS
        if split in groups
    }
    return {
        "dataset_id": _content_id(groups, info),
        "prefix": prefix,
        "class_names": class_names,
        "splits": splits,
        "skipped": skipped + junk,
        "warnings": [message for _, message in warns],
        "warning_codes": [code for code, _ in warns],
        "image_sizes": _size_stats(info),
    }


def _size_stats(info: dict[str, tuple[str, int, int]]) -> dict[str, int]:
    widths = [w for _, w, _ in info.values()]
    heights = [h for _, _, h in info.values()]
    return {
        "min_width": min(widths),
        "min_height": min(heights),
        "median_width": int(np.median(widths)),
        "median_height": int(np.median(heights)),
        "max_width": max(widths),
        "max_height": max(heights),
    }


# --------------------------------------------------------------------------------------
# Manifest


def _write_manifest(
    folder: Path, scan: dict[str, Any], name: str, root: Path, source: Path
) -> Dataset:
    manifest_path = folder / "manifest.json"
    try:
        stored_root = root.relative_to(folder).as_posix()  # inside the workspace: relocatable
    except ValueError:
        stored_root = str(root)
    counts = {
        split: dict(Counter(scan["class_names"][label] for _, label in items))
        for split, items in scan["splits"].items()
    }
    data = {
        "version": MANIFEST_VERSION,
        "dataset_id": scan["dataset_id"],
        "name": name,
        "root": stored_root,
        "source": str(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "class_names": scan["class_names"],
        "counts": counts,
        "num_images": sum(len(v) for v in scan["splits"].values()),
        "image_sizes": scan["image_sizes"],
        "splits": {
            s: [[rel, label] for rel, label in items] for s, items in scan["splits"].items()
        },
        "skipped": scan["skipped"],
        "warnings": scan["warnings"],
        "warning_codes": scan["warning_codes"],
    }
    write_json(manifest_path, data)
    return load_dataset(manifest_path)


def _warning_codes(manifest: dict[str, Any]) -> list[str]:
    """The manifest's warning codes; for a manifest written before codes, told from the text."""
    messages = [str(w) for w in manifest.get("warnings", [])]
    codes = manifest.get("warning_codes")
    if isinstance(codes, list) and len(codes) == len(messages):
        return [str(c) for c in codes]
    return [
        next((code for code, text in _LEGACY_WARNING_TEXT if text in message), "")
        for message in messages
    ]


def load_dataset(manifest_path: str | Path) -> Dataset:
    """Read a dataset back from its ``manifest.json``.

    Raises:
        DatasetError: the manifest is missing or unreadable, or its images are gone.
    """
    path = Path(manifest_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        root = Path(data["root"])
        if not root.is_absolute():
            root = path.parent / root
        dataset = Dataset(
            dataset_id=str(data["dataset_id"]),
            name=str(data["name"]),
            root=root,
            class_names=[str(c) for c in data["class_names"]],
            splits={
                s: [(str(rel), int(label)) for rel, label in items]
                for s, items in data["splits"].items()
            },
            skipped=[dict(s) for s in data.get("skipped", [])],
            warnings=[str(w) for w in data.get("warnings", [])],
            manifest_path=path,
            warning_codes=_warning_codes(data),
        )
    except FileNotFoundError:
        raise DatasetError(f"No dataset manifest at '{path}'. Upload the dataset again.") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(
            f"The dataset manifest '{path}' is unreadable ({type(err).__name__}). "
            "Upload the dataset again."
        ) from None
    if not root.is_dir():
        raise DatasetError(
            f"The images of dataset '{dataset.name}' are gone (no folder '{root}'). "
            "Upload the dataset again."
        )
    return dataset


# --------------------------------------------------------------------------------------
# ingest


def _datasets_dir(workspace: Path) -> Path:
    folder = Path(workspace) / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ingest(source: str | Path, workspace: Path, *, progress: Progress | None = None) -> Dataset:
    """Check a zip file or folder of images and write its manifest into ``workspace``.

    Zips are extracted (safely) to ``<workspace>/datasets/<dataset_id>/files``; folders are read
    in place. Ingesting the same content again returns the same dataset without re-extracting.

    Args:
        source: a .zip file, a folder of class folders (or split folders), or a manifest.json.
        workspace: the session's workspace folder.
        progress: optional ``callback(fraction 0..1, message)`` for a progress bar.

    Returns:
        The validated `Dataset`.

    Raises:
        DatasetError: the input cannot make a classifier; the message says what to do.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DatasetError(
            f"'{source}' does not exist. Give a .zip file or a folder of class folders."
        )
    if source.is_dir():
        return _ingest_folder(source, Path(workspace), progress)
    if source.name == "manifest.json":
        return load_dataset(source)
    return _ingest_zip(source, Path(workspace), progress)


def resolve_dataset(
    source: Dataset | str | Path,
    workspace: str | Path | None = None,
    *,
    what: str = "data",
    hint: str = "Pass a zip or a folder of class folders.",
) -> Dataset:
    """A `Dataset` for a Dataset, a manifest.json, a zip or a folder (ingested into
    ``workspace``, default the home folder).

    Args:
        what, hint: the words of the error when nothing is there:
            ``No {what} at '{path}'. {hint}``.

    Raises:
        DatasetError: nothing at ``source``, or not usable images.
    """
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    if path.name == "manifest.json" and path.is_file():
        return load_dataset(path)
    if not path.exists():
        raise DatasetError(f"No {what} at '{path}'. {hint}")
    return ingest(path, Path(home() if workspace is None else workspace))


def _ingest_folder(folder: Path, workspace: Path, progress: Progress | None) -> Dataset:
    folder = folder.resolve()
    if progress:
        progress(0.0, "Listing files")
    candidates, skipped, junk = _walk_folder(folder)
    scan = _scan(folder, candidates, skipped, junk, folder.name, progress, 0.0)
    target = _datasets_dir(workspace) / scan["dataset_id"]
    target.mkdir(exist_ok=True)
    root = folder / scan["prefix"] if scan["prefix"] else folder
    return _write_manifest(target, scan, folder.name, root, folder)


def _ingest_zip(path: Path, workspace: Path, progress: Progress | None) -> Dataset:
    datasets = _datasets_dir(workspace)
    name = _nfc(path.stem) or "dataset"
    if progress:
        progress(0.0, "Reading the zip")
    zip_digest = file_sha256(path)
    known = datasets / "zips" / f"{zip_digest[:32]}.json"
    reused = _reuse(known, datasets)
    if reused is not None:
        return reused if reused.name == name else _rename(reused, name)
    tmp = Path(tempfile.mkdtemp(prefix=".ingest-", dir=datasets))
    try:
        files = tmp / "files"
        files.mkdir()
        candidates, skipped, junk = _extract_zip(path, files, progress)
        scan = _scan(files, candidates, skipped, junk, path.name, progress, 0.3)
        target = datasets / scan["dataset_id"]
        target.mkdir(exist_ok=True)
        prefix = scan["prefix"]
        final_files = target / "files"
        if not (final_files / prefix).is_dir():
            # First time (or the same images under another wrapper name): keep this extraction.
            if final_files.exists():
                shutil.rmtree(final_files)
            files.rename(final_files)
        dataset = _write_manifest(target, scan, name, final_files / prefix, path)
        known.parent.mkdir(exist_ok=True)
        write_json(known, {"dataset_id": dataset.dataset_id})
        return dataset
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reuse(known: Path, datasets: Path) -> Dataset | None:
    try:
        dataset_id = json.loads(known.read_text())["dataset_id"]
        return load_dataset(datasets / str(dataset_id) / "manifest.json")
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        return None


def _rename(dataset: Dataset, name: str) -> Dataset:
    """The same zip uploaded under another name: keep everything, show the new name."""
    manifest = json.loads(dataset.manifest_path.read_text(encoding="utf-8"))
    manifest["name"] = name
    write_json(dataset.manifest_path, manifest)
    return load_dataset(dataset.manifest_path)


def ingest_upload(
    fileobj: BinaryIO, filename: str, workspace: Path, *, progress: Progress | None = None
) -> Dataset:
    """Save an uploaded zip into ``workspace/uploads``, ingest it, then delete the upload.

    The dataset's name is the upload's file name (cleaned by `retrain.uploads`) without
    ``.zip``.
    """
    target = save_upload(
        Path(workspace) / "uploads" / "datasets", filename, fileobj, default_name="dataset.zip"
    )
    try:
        return ingest(target, workspace, progress=progress)
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: another upload is being ingested
            target.parent.parent.rmdir()


# --------------------------------------------------------------------------------------
# Image cache


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


# --------------------------------------------------------------------------------------
# Splits, thumbnails, CLI


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
