"""Decoding one image safely, and telling junk from images by name and path.

Shared by ingest's check, the image cache, thumbnails and predict: only the Pillow decoders
registered here are ever tried, the decompression-bomb guard is always on, and every image
comes out as uint8 RGB (or grayscale) at the asked size and resize mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import threading
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

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

from retrain.data.dataset import IMAGE_EXTENSIONS, _human_bytes, _max_pixels, _num_workers
from retrain.errors import ConfigError, DatasetError

RESIZE_MODES: tuple[str, ...] = ("squash", "pad", "center-crop")
# Only these Pillow decoders are ever tried (no EPS/Ghostscript and friends).
# (The JPEG decoder also opens multi-picture MPO files from cameras.)
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
_ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst")
_SYSTEM_NAMES = {"__macosx", "thumbs.db", "desktop.ini", "$recycle.bin", "ehthumbs.db"}
_PARALLEL_MIN = 64  # below this many images a thread pool costs more than it saves
# Bilinear (antialiased when shrinking) like Keras' Resizing default, and cheaper than bicubic.
_FILTER = Image.Resampling.BILINEAR


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
