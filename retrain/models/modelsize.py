"""How many bytes of weights a model file declares, read from its headers only.

A model file can declare far more weights than it stores: a 226 KB ``.keras`` whose config
has a Dense layer of 12,288 x 200,000 and whose HDF5 dataset of that shape holds only its fill
value makes Keras allocate 9.2 GB while it builds the model. `check_declared_size` refuses
such a file before anything is built, the way ``retrain.data`` refuses a zip bomb from the
zip's directory: it sums what the file declares, from two sources, and takes the larger:

- the model config (``config.json`` in a ``.keras`` archive, the ``model_config`` attribute
  of a legacy ``.h5``): each layer's weights computed from its settings and its input shape
  (``build_config``, the shapes on a Keras 3 functional graph's edges, or the shapes passed
  along a Sequential);
- the HDF5 dataset headers (``model.weights.h5`` in the archive, or the ``.h5`` itself):
  shape x item size of every dataset, read without reading any data.

Only the zip directory, ``config.json`` (itself bounded) and HDF5 object headers are read:
the check takes well under a second and no memory to speak of, whatever the file declares.

Limit (environment variable, read on every call):

========================  =======================================================
``RETRAIN_MAX_MODEL_MB``  weights a model file may declare, in MB (2**20 bytes).
                          Default: a quarter of this host's memory (the smaller of
                          physical memory and the container's cgroup limit), at
                          least 256 and at most 4096. Large enough for every
                          keras.applications model (ConvNeXtXLarge: 1.4 GB).
========================  =======================================================
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models.keras_helpers import MODEL_CLASS_NAMES
from retrain.sessions.workspace import env_number

_MB = 1024 * 1024
DEFAULT_MIN_MB = 256
DEFAULT_MAX_MB = 4096
#: config.json larger than this is refused unread (the largest Keras application's is ~2 MB).
MAX_CONFIG_BYTES = 64 * _MB
#: HDF5 objects visited before giving up (a model has a few thousand datasets at most).
MAX_HDF5_OBJECTS = 200_000
_CONFIG_ENTRY = "config.json"
_WEIGHTS_ENTRY = "model.weights.h5"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Optimizer state, which a model loaded with compile=False never reads (Keras 3, Keras 2).
_NEVER_LOADED = ("optimizer/", "optimizer_weights/")


def host_memory_bytes() -> int | None:
    """Physical memory, or the container's cgroup memory limit when smaller (None: unknown)."""
    sizes = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for limit_file in (
        "/sys/fs/cgroup/memory.max",  # cgroup v2 ("max" when unlimited)
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1 (a huge number)
    ):
        with contextlib.suppress(OSError, ValueError):
            sizes.append(int(Path(limit_file).read_text().strip()))
    sizes = [s for s in sizes if 0 < s < 2**60]
    return min(sizes) if sizes else None


def default_limit_mb() -> float:
    """A quarter of the host's memory, between 256 MB and 4096 MB (4096 when unknown)."""
    memory = host_memory_bytes()
    if memory is None:
        return float(DEFAULT_MAX_MB)
    return float(min(DEFAULT_MAX_MB, max(DEFAULT_MIN_MB, memory // 4 // _MB)))


def max_model_bytes() -> int:
    """The limit: ``$RETRAIN_MAX_MODEL_MB`` MB, else `default_limit_mb`.

    Raises:
        ConfigError: ``$RETRAIN_MAX_MODEL_MB`` is not a positive number.
    """
    return int(env_number("RETRAIN_MAX_MODEL_MB", default_limit_mb()) * _MB)


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps it at least 1 (``9.2 GB``)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------------------
# The declared size


@dataclass
class Declared:
    """What one source declares: total bytes and the largest single item."""

    source: str  # "config" | "weights"
    total: int = 0
    largest: int = 0
    largest_name: str = ""

    def add(self, name: str, nbytes: int) -> None:
        self.total += nbytes
        if nbytes > self.largest:
            self.largest, self.largest_name = nbytes, name


def declared_sizes(path: str | Path) -> list[Declared]:
    """What a ``.keras`` archive or a legacy ``.h5`` file declares, from each source.

    Unreadable parts count as nothing: the loader reports them in its own words.

    Raises:
        ModelError: ``config.json`` is itself too large to read, or the HDF5 file has more
            than `MAX_HDF5_OBJECTS` objects.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_HDF5_MAGIC))
    except OSError:
        return []  # missing or unreadable: the loader says so in its own words
    if head == _HDF5_MAGIC:
        return _declared_h5_file(path)
    if zipfile.is_zipfile(path):
        return _declared_keras_archive(path)
    return []


def check_declared_size(path: str | Path, label: str | None = None) -> None:
    """Refuse a model file that declares more weights than ``RETRAIN_MAX_MODEL_MB``.

    Raises:
        ModelError: one line naming the declared size, the limit and what to do.
    """
    path = Path(path)
    label = label or path.name
    limit = max_model_bytes()
    found = [d for d in declared_sizes(path) if d.total > limit]
    if not found:
        return
    worst = max(found, key=lambda d: d.total)
    where = "its config" if worst.source == "config" else "its weights file"
    largest = ""
    if worst.largest_name and worst.largest > worst.total / 2:
        largest = f" ({worst.largest_name} alone: {human_bytes(worst.largest)})"
    raise ModelError(
        f"'{label}' declares {human_bytes(worst.total)} of weights in {where}{largest}, more "
        f"than the limit of {human_bytes(limit)} (RETRAIN_MAX_MODEL_MB): loading it would "
        "exhaust memory, so nothing was built. Use a smaller model, or raise "
        "RETRAIN_MAX_MODEL_MB on a host with the memory for it."
    )


def _declared_keras_archive(path: Path) -> list[Declared]:
    found = []
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if _CONFIG_ENTRY in names:
                info = zf.getinfo(_CONFIG_ENTRY)
                if info.file_size > MAX_CONFIG_BYTES:
                    raise ModelError(
                        f"'{path.name}' has a config.json of {human_bytes(info.file_size)}, more "
                        f"than {human_bytes(MAX_CONFIG_BYTES)}: not a model config. Save the "
                        "model again with model.save('name.keras')."
                    )
                with contextlib.suppress(ValueError, RecursionError, UnicodeDecodeError):
                    found.append(config_declared(json.loads(zf.read(_CONFIG_ENTRY))))
            if _WEIGHTS_ENTRY in names:
                info = zf.getinfo(_WEIGHTS_ENTRY)
                stored = Declared("weights")
                stored.add(f"the zip entry {_WEIGHTS_ENTRY}", info.file_size)
                found.append(stored)  # the weights file itself, as the zip directory says
                if info.file_size <= max_model_bytes():
                    with _member_file(zf, info, path) as member:
                        found.append(hdf5_declared(member))
    except (zipfile.BadZipFile, OSError):
        pass
    return found


def _declared_h5_file(path: Path) -> list[Declared]:
    import h5py

    found = [hdf5_declared(path)]
    with contextlib.suppress(OSError, ValueError, RecursionError, UnicodeDecodeError):
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        if raw is not None:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            found.append(config_declared(json.loads(text)))
    return found


# --------------------------------------------------------------------------------------
# HDF5 dataset headers


def hdf5_declared(source: str | Path | Any) -> Declared:
    """Shape x item size of every dataset of an HDF5 file (a path or a seekable file object),
    from the object headers only.

    Raises:
        ModelError: more than `MAX_HDF5_OBJECTS` objects.
    """
    import h5py

    declared = Declared("weights")
    seen = 0

    def visit(name: str, obj: Any) -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_HDF5_OBJECTS:
            raise ModelError(
                f"The model's weights file has more than {MAX_HDF5_OBJECTS:,} HDF5 objects: "
                "not a model's weights. Save the model again with model.save('name.keras')."
            )
        if isinstance(obj, h5py.Dataset) and not name.startswith(_NEVER_LOADED):
            shape = obj.shape or ()
            declared.add(f"dataset '{name}'", math.prod(shape) * obj.dtype.itemsize)

    try:
        with h5py.File(source, "r") as f:
            f.visititems(visit)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError):
        pass  # not HDF5, or a broken one: the loader says so in its own words
    return declared


class _StoredMember(io.RawIOBase):
    """A read-only, seekable view of one uncompressed zip member, in place in the archive.

    ``ZipFile.open`` seeks backwards by decompressing again from the start (Python 3.11),
    which makes h5py's scattered header reads quadratic; a stored member needs no
    decompression, so its bytes are read straight from the archive.
    """

    def __init__(self, archive: Path, start: int, size: int) -> None:
        super().__init__()
        self._file = open(archive, "rb")  # noqa: SIM115 (closed with this object)
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._file.seek(self._start + self._pos)
        data = self._file.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def _member_file(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> Iterator[Any]:
    """A seekable file object for one member: in place when stored (what Keras writes),
    else extracted to a temporary file (at most ``info.file_size`` bytes, on disk)."""
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        with open(archive, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if len(local) == 30 and local[:4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            view = _StoredMember(archive, start, info.file_size)
            try:
                yield view
            finally:
                view.close()
            return
    with tempfile.TemporaryDirectory(prefix="retrain-modelsize-") as tmp:
        target = Path(tmp) / "weights.h5"
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield target


# --------------------------------------------------------------------------------------
# The model config


def config_declared(config: Any) -> Declared:
    """The weight bytes a Keras model config (Keras 3 or Keras 2 JSON) declares.

    Each layer's weights come from its settings and its input shape: the ``build_config``
    Keras 3 writes, the shapes on a Keras 3 functional graph's edges, the shapes a Sequential
    or a Keras 2 functional graph passes from layer to layer. Where a shape is unknown the
    layer counts what it declares without it (e.g. a Dense layer's bias).
    """
    declared = Declared("config")
    with contextlib.suppress(RecursionError):
        _walk(config, None, declared)
    return declared


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _shape(value: Any) -> list[int | None] | None:
    """A tensor shape (list of ints / None), or None when ``value`` is not one."""
    if not isinstance(value, list) or not value or len(value) > 16:
        return None
    dims = []
    for v in value:
        if v is None:
            dims.append(None)
        elif (d := _int(v)) is not None:
            dims.append(d)
        else:
            return None
    return dims


def _ints(value: Any, rank: int, default: int = 1) -> list[int]:
    if _int(value) is not None:
        return [_int(value)] * rank  # type: ignore[list-item]
    if isinstance(value, list) and len(value) == rank and all(_int(v) is not None for v in value):
        return [int(v) for v in value]
    return [default] * rank


def _itemsize(cfg: dict) -> int:
    dtype = cfg.get("dtype")
    if isinstance(dtype, dict):  # Keras 3: {"class_name": "DTypePolicy", "config": {"name": ...}}
        dtype = (dtype.get("config") or {}).get("name")
    name = str(dtype or "float32")
    if name.startswith("mixed_"):
        return 4  # mixed policies keep float32 variables
    return {"float64": 8, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}.get(name, 4)


_WRAPPERS = {"Bidirectional", "TimeDistributed"}
_CHANNELS_FIRST = "channels_first"


def _channels(cfg: dict, shape: list | None) -> int | None:
    if not shape or len(shape) < 2:
        return None
    return shape[1] if cfg.get("data_format") == _CHANNELS_FIRST else shape[-1]


def _layer_params(cls: str, cfg: dict, shape: list | None) -> int:
    """Trainable + non-trainable weights of one layer with input ``shape`` (0 when unknown)."""
    bias = 1 if cfg.get("use_bias", True) else 0
    ch = _channels(cfg, shape)
    last = shape[-1] if shape else None
    if cls == "Dense":
        units = _int(cfg.get("units")) or 0
        return (last or 0) * units + bias * units
    if cls in ("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose"):
        rank = int(cls[4])
        filters = _int(cfg.get("filters")) or 0
        kernel = math.prod(_ints(cfg.get("kernel_size"), rank))
        groups = _int(cfg.get("groups")) or 1
        return kernel * ((ch or 0) // max(groups, 1)) * filters + bias * filters
    if cls in ("Conv3DTranspose",):
        filters = _int(cfg.get("filters")) or 0
        return math.prod(_ints(cfg.get("kernel_size"), 3)) * (ch or 0) * filters + bias * filters
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
        rank = int(cls[13])
        mult = _int(cfg.get("depth_multiplier")) or 1
        kernel = math.prod(_ints(cfg.get("kernel_size"), rank))
        return kernel * (ch or 0) * mult + bias * (ch or 0) * mult
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        rank = int(cls[13])
        mult = _int(cfg.get("depth_multiplier")) or 1
        filters = _int(cfg.get("filters")) or 0
        kernel = math.prod(_ints(cfg.get("kernel_size"), rank))
        return kernel * (ch or 0) * mult + (ch or 0) * mult * filters + bias * filters
    if cls == "Embedding":
        return (_int(cfg.get("input_dim")) or 0) * (_int(cfg.get("output_dim")) or 0)
    if cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and axis else axis
        size = (
            shape[axis]
            if shape and isinstance(axis, int) and -len(shape) <= axis < len(shape)
            else None
        )
        return 4 * (size or 0)
    if cls in ("LayerNormalization", "GroupNormalization", "UnitNormalization"):
        return 2 * (last or 0)
    if cls in ("SimpleRNN", "GRU", "LSTM"):
        units = _int(cfg.get("units")) or 0
        gates = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}[cls]
        biases = 2 if cls == "GRU" and cfg.get("reset_after", True) else 1
        return gates * ((last or 0) * units + units * units + biases * units)
    if cls == "PReLU":
        return math.prod(d or 1 for d in (shape or [None])[1:])
    return 0


def _conv_length(n: int | None, k: int, s: int, d: int, padding: str) -> int | None:
    if n is None:
        return None
    if padding == "same":
        return -(-n // max(s, 1))
    return max(0, (n - d * (k - 1) - 1) // max(s, 1) + 1)


_SAME_SHAPE = {
    "Activation", "ActivityRegularization", "AlphaDropout", "BatchNormalization", "Dropout",
    "ELU", "GaussianDropout", "GaussianNoise", "GroupNormalization", "Identity",
    "LayerNormalization", "LeakyReLU", "Masking", "Normalization", "PReLU", "RandomBrightness",
    "RandomContrast", "RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "ReLU",
    "Rescaling", "Softmax", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "ThresholdedReLU", "UnitNormalization",
}  # fmt: skip


def _output_shape(cls: str, cfg: dict, shape: list | None) -> list | None:
    """The output shape of one (non-container) layer, or None when not worked out here."""
    if cls == "InputLayer":
        return _shape(cfg.get("batch_shape")) or _shape(cfg.get("batch_input_shape"))
    if shape is None:
        return None
    if cls in _SAME_SHAPE:
        return shape
    first = cfg.get("data_format") == _CHANNELS_FIRST
    if cls == "Dense":
        return [*shape[:-1], _int(cfg.get("units"))]
    if cls == "Embedding":
        return [*shape, _int(cfg.get("output_dim"))]
    if cls == "Flatten":
        rest = shape[1:]
        return [shape[0], math.prod(rest) if all(d is not None for d in rest) else None]
    if cls == "Reshape":
        target = _shape(cfg.get("target_shape"))
        return [shape[0], *target] if target else None
    conv = cls.startswith(("Conv", "DepthwiseConv", "SeparableConv")) and "Transpose" not in cls
    pool = "Pooling" in cls and not cls.startswith("Global")
    if conv or pool:
        rank = len(shape) - 2
        if rank < 1:
            return None
        spatial = shape[2:] if first else shape[1:-1]
        if pool:
            kernel = _ints(cfg.get("pool_size"), rank, 2)
            strides = _ints(cfg.get("strides"), rank, 0)
            strides = [s or k for s, k in zip(strides, kernel, strict=True)]
            dilation = [1] * rank
        else:
            kernel = _ints(cfg.get("kernel_size"), rank)
            strides = _ints(cfg.get("strides"), rank)
            dilation = _ints(cfg.get("dilation_rate"), rank)
        padding = str(cfg.get("padding", "valid")).lower()
        out = [
            _conv_length(n, k, s, d, padding)
            for n, k, s, d in zip(spatial, kernel, strides, dilation, strict=True)
        ]
        if cls.startswith("Depthwise"):
            ch = _channels(cfg, shape)
            channels = ch * (_int(cfg.get("depth_multiplier")) or 1) if ch is not None else None
        elif pool:
            channels = _channels(cfg, shape)
        else:
            channels = _int(cfg.get("filters"))
        return [shape[0], channels, *out] if first else [shape[0], *out, channels]
    if cls.startswith("Global") and "Pooling" in cls:
        channels = _channels(cfg, shape)
        if cfg.get("keepdims"):
            ones = [1] * (len(shape) - 2)
            return [shape[0], channels, *ones] if first else [shape[0], *ones, channels]
        return [shape[0], channels]
    if cls == "ZeroPadding2D" and len(shape) == 4:
        pad = cfg.get("padding", 1)
        if _int(pad) is not None:
            rows = cols = (_int(pad), _int(pad))
        elif isinstance(pad, list) and len(pad) == 2:
            rows, cols = (_ints(p, 2, 0) if not _int(p) else [_int(p)] * 2 for p in pad)
        else:
            return None
        h, w = (shape[2], shape[3]) if first else (shape[1], shape[2])
        h = h + sum(rows) if h is not None else None
        w = w + sum(cols) if w is not None else None
        return [shape[0], shape[1], h, w] if first else [shape[0], h, w, shape[3]]
    if cls == "Resizing" and len(shape) == 4:
        h, w = _int(cfg.get("height")), _int(cfg.get("width"))
        return [shape[0], shape[1], h, w] if first else [shape[0], h, w, shape[3]]
    return None


def _merge_output(cls: str, cfg: dict, shapes: list[list]) -> list | None:
    if cls in ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"):
        return shapes[0]
    if cls == "Concatenate":
        axis = cfg.get("axis", -1)
        if not isinstance(axis, int) or any(len(s) != len(shapes[0]) for s in shapes):
            return None
        parts = [s[axis] for s in shapes]
        out = list(shapes[0])
        out[axis] = sum(parts) if all(p is not None for p in parts) else None
        return out
    return None


def _edge_shapes(entry: dict, outputs: dict[str, list | None]) -> list[tuple[Any, Any]]:
    """The inputs of a functional graph's layer, each as (the shape passed along from the
    layer it comes from, the shape written on the edge (Keras 3 only))."""
    nodes = entry.get("inbound_nodes")
    if not isinstance(nodes, list) or not nodes:
        return []
    node = nodes[0]
    shapes: list[tuple[Any, Any]] = []

    def tensors(value: Any, depth: int = 0) -> None:
        if depth > 8:
            return
        if isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__":
                config = value.get("config") if isinstance(value.get("config"), dict) else {}
                history = config.get("keras_history")
                source = history[0] if isinstance(history, list) and history else None
                shapes.append((outputs.get(str(source)), _shape(config.get("shape"))))
            return
        if isinstance(value, list):
            for item in value:
                tensors(item, depth + 1)

    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        tensors(node.get("args"))
    elif isinstance(node, list):  # Keras 2: [[layer_name, node_index, tensor_index, kwargs]]
        for edge in node:
            if isinstance(edge, list) and edge and isinstance(edge[0], str):
                shapes.append((outputs.get(edge[0]), None))
    return shapes


def _walk(
    entry: Any, in_shape: list | None, declared: Declared, written: list | None = None
) -> list | None:
    """Count one layer entry's weights into ``declared``; return its output shape.

    ``in_shape`` is the shape passed along to it, ``written`` the one on its edge (a file can
    write anything there); the layer counts the most weights any of them or its
    ``build_config`` would give it.
    """
    if not isinstance(entry, dict):
        return None
    cls = str(entry.get("class_name", ""))
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    build = entry.get("build_config")
    built = _shape(build.get("input_shape")) if isinstance(build, dict) else None
    if cls in MODEL_CLASS_NAMES or isinstance(cfg.get("layers"), list):
        return _walk_model(cls, cfg, in_shape or written or built, declared)
    if cls in _WRAPPERS and isinstance(cfg.get("layer"), dict):
        shape = in_shape or written or built
        if cls == "TimeDistributed" and shape is not None:
            shape = [shape[0], *shape[2:]] if len(shape) > 2 else None
        inner = Declared("config")
        _walk(cfg["layer"], shape, inner)
        copies = 2 if cls == "Bidirectional" else 1  # a forward and a backward copy
        if inner.total:
            declared.add(f"{cls} layer '{cfg.get('name', '?')}'", copies * inner.total)
        return None
    params = max(_layer_params(cls, cfg, s) for s in (built, in_shape, written))
    if params:
        declared.add(f"{cls} layer '{cfg.get('name', '?')}'", params * _itemsize(cfg))
    return _output_shape(cls, cfg, in_shape or written or built)


def _walk_model(cls: str, cfg: dict, in_shape: list | None, declared: Declared) -> list | None:
    layers = [e for e in cfg.get("layers") or [] if isinstance(e, dict)]
    if cls == "Sequential" or not any("inbound_nodes" in e for e in layers):
        shape = in_shape
        for key in ("batch_shape", "batch_input_shape"):
            shape = shape or _shape(cfg.get(key))
        for layer in layers:
            layer_cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
            for key in ("batch_shape", "batch_input_shape"):
                if shape is None:
                    shape = _shape(layer_cfg.get(key))
            shape = _walk(layer, shape, declared)
        return shape
    outputs: dict[str, list | None] = {}
    for layer in layers:
        layer_cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        name = str(layer.get("name") or layer_cfg.get("name") or "")
        edges = _edge_shapes(layer, outputs)
        layer_cls = str(layer.get("class_name", ""))
        if len(edges) > 1:
            _walk(layer, None, declared)
            shapes = [passed or written for passed, written in edges]
            known = all(s is not None for s in shapes)
            outputs[name] = _merge_output(layer_cls, layer_cfg, shapes) if known else None
        else:
            passed, written = edges[0] if edges else (None, None)
            outputs[name] = _walk(layer, passed, declared, written)
    out = cfg.get("output_layers")
    if isinstance(out, list) and out and isinstance(out[0], list) and out[0]:
        return outputs.get(str(out[0][0]))
    return None
