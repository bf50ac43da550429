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

METADATA_ENTRY = "retrain.json"


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
    import keras

    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # Keras raises many types for a bad archive; report them as one.
        raise ModelError(f"Could not load '{path.name}': {str(err).splitlines()[0]}") from err
    return model, read_metadata(path)
