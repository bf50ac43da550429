"""Saving and reading `.keras` files together with Retrain Studio's metadata.

A saved model is a plain Keras 3 archive (loadable with ``keras.saving.load_model`` and no
custom objects) plus one extra zip entry, ``retrain.json``, holding what a user of the model
needs: class names, input size, resize mode, base model, loss. Keras ignores extra entries.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models.modelsize import check_declared_size

METADATA_ENTRY = "retrain.json"

#: What a Git LFS pointer file starts with (a clone without ``git lfs pull`` leaves these).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
# Keras 3 archives keep their weights here when saved with weights_format="npz".
_NPZ_WEIGHTS = "model.weights.npz"
_NPY_MAGIC = b"\x93NUMPY"


def lfs_pointer_error(path: str | Path) -> ModelError | None:
    """The refusal for a Git LFS pointer file (None when ``path`` is not one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER_PREFIX))
    except OSError:
        return None
    if head != LFS_POINTER_PREFIX:
        return None
    return ModelError(
        f"'{path.name}' ({path.stat().st_size} bytes of text): this is a Git LFS pointer, not the "
        "model: run `git lfs pull` and upload the real file."
    )


def pickled_weights_error(name: str) -> ModelError:
    """The refusal for weights stored as pickles (never suggest loading them anyway)."""
    return ModelError(
        f"'{name}' refused: the weights file holds pickled Python objects, which can run code "
        "when loaded; export the model again with model.save('model.keras')."
    )


def _npy_holds_objects(stream: Any, *, not_npy: bool) -> bool:
    """Whether one ``.npy`` stream would need unpickling (``not_npy`` when it is no .npy).

    Only the header is parsed (numpy reads it as a Python literal, nothing is executed).
    """
    import numpy as np

    if stream.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
        return not_npy
    fmt = np.lib.format
    try:
        major = stream.read(2)[0]
        read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        _shape, _order, dtype = read_header(stream)
    except (ValueError, IndexError, SyntaxError, TypeError):
        return True  # unreadable header: refuse rather than let numpy guess
    return bool(dtype.hasobject)


def holds_pickles(archive: zipfile.ZipFile) -> bool:
    """Whether a .keras archive's weights store holds pickled Python objects.

    Keras's ``npz`` weights format writes each layer's variables as a dict inside an object
    array, i.e. a pickle; such a file could run code when unpickled, so it is never loaded.
    Only headers are read here.
    """
    if _NPZ_WEIGHTS not in archive.namelist():
        return False
    with archive.open(_NPZ_WEIGHTS) as raw:
        if raw.read(2) != b"PK":  # not an npz: np.load unpickles anything that is no .npy
            raw.seek(0)
            return _npy_holds_objects(raw, not_npy=True)
        raw.seek(0)
        try:
            with zipfile.ZipFile(raw) as npz:  # read in place: only the headers are read
                for member in npz.namelist():
                    with npz.open(member) as stream:
                        # np.load returns a member that is no .npy as raw bytes.
                        if _npy_holds_objects(stream, not_npy=False):
                            return True
        except zipfile.BadZipFile:
            return True
    return False


def check_model_file(path: str | Path) -> None:
    """Refuse what must never reach Keras's loader: LFS pointers, pickled weights, and model
    bombs (more declared weights than ``RETRAIN_MAX_MODEL_MB``, see `retrain.models.modelsize`).

    Only the file's first bytes, the archive's listing, config.json and array and HDF5
    headers are read. Works for .keras archives, legacy .h5 models and .weights.h5 files.

    Raises:
        ModelError: the file is a Git LFS pointer, its weights are pickled objects, or it
            declares more weights than the limit.
    """
    path = Path(path)
    lfs = lfs_pointer_error(path)
    if lfs is not None:
        raise lfs
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                pickled = holds_pickles(zf)
        except (zipfile.BadZipFile, OSError):
            return  # the loader reports an unreadable archive in its own words
        if pickled:
            raise pickled_weights_error(path.name)
    check_declared_size(path)


def save_model(model: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save ``model`` to ``path`` (.keras) with ``metadata``, atomically.

    The file appears complete or not at all, so a crash mid-save never leaves a broken
    checkpoint behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as zf:
        zf.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2, default=str))
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Return the ``retrain.json`` metadata of a saved model ({} when it has none).

    Raises:
        ModelError: the file is not a .keras archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            if METADATA_ENTRY not in zf.namelist():
                return {}
            return json.loads(zf.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelError(f"'{Path(path).name}' is not a readable .keras file ({err}).") from err


def has_metadata(path: str | Path) -> bool:
    """Whether ``path`` was saved by Retrain Studio (it has a ``retrain.json`` entry)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return METADATA_ENTRY in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def load_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a saved model safely (no Lambda code runs) and its metadata.

    Raises:
        ModelError: the file is missing or cannot be loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"No model file at '{path}'. Train a model first or check the path.")
    if path.suffix.lower() != ".keras":
        raise ModelError(
            f"'{path.name}' is not a .keras model. Use a run's best.keras or model.keras, "
            "or an exported model.keras."
        )
    check_model_file(path)
    import keras

    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # Keras raises many types for a bad archive; report them as one.
        if "pickle" in str(err).lower():
            raise pickled_weights_error(path.name) from None
        raise ModelError(f"Could not load '{path.name}': {str(err).splitlines()[0]}") from err
    return model, read_metadata(path)
