"""The built-in starter model (``builtin:digits-cnn``): a small CNN trained once per host on
the sample digits 0-4 and cached.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models.keras_helpers import BaseModel, _keras

# builtin:<name> -> display name
BUILTIN_LABELS = {"digits-cnn": "Digits CNN (built-in, digits 0-4)"}


_BUILTIN_LOCK = threading.Lock()


def builtin_path(name: str = "digits-cnn") -> Path:
    """Where the built-in model ``name`` is cached (trained once per host)."""
    from retrain.sessions.workspace import keras_home

    folder = keras_home() / "builtin"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.keras"


def _load_builtin(spec: str) -> BaseModel:
    from retrain.models import modelfile

    name = spec.partition(":")[2].strip()
    if name not in BUILTIN_LABELS:
        raise ModelError(
            f"Unknown built-in model '{name}'. Available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_LABELS)
        )
    path = ensure_builtin(name)
    model, meta = modelfile.load_model(path)
    return BaseModel(
        model=model,
        spec=f"builtin:{name}",
        name=BUILTIN_LABELS[name],
        input_size=(32, 32),
        preprocessing="inside",
        class_names=list(meta.get("class_names") or []) or None,
        suggested_cut="features",
        has_original_head=True,
        origin={
            "source": "built-in",
            "trained_on": meta.get("trained_on"),
            "train_seconds": meta.get("train_seconds"),
            "holdout_accuracy": meta.get("holdout_accuracy"),
            "preprocessing_source": "Rescaling layer inside the model",
        },
    )


def ensure_builtin(name: str = "digits-cnn") -> Path:
    """Return the cached built-in model file, training it first when absent.

    A file lock (and a thread lock, for Streamlit's threads) makes concurrent sessions wait
    for one training instead of each training its own; the file appears atomically.
    """
    import fcntl

    path = builtin_path(name)
    if path.is_file():
        return path
    with _BUILTIN_LOCK, open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                _train_digits_cnn(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def build_digits_cnn(num_classes: int = 5, seed: int = 0) -> Any:
    """The built-in architecture: uint8 32x32x3 -> Rescaling -> 3 conv blocks -> GAP -> Dense."""
    keras = _keras()
    layers = keras.layers

    def init(i: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + i)

    inp = keras.Input(shape=(32, 32, 3), dtype="uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inp)
    x = layers.Conv2D(
        16, 3, padding="same", activation="relu", kernel_initializer=init(1), name="conv1"
    )(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(
        32, 3, padding="same", use_bias=False, kernel_initializer=init(2), name="conv2"
    )(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(
        64, 3, padding="same", activation="relu", kernel_initializer=init(3), name="conv3"
    )(x)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    x = layers.Dropout(0.2, seed=seed, name="dropout")(x)
    out = layers.Dense(
        num_classes, activation="softmax", kernel_initializer=init(4), name="predictions"
    )(x)
    return keras.Model(inp, out, name="digits_cnn")


def _train_digits_cnn(path: Path, seed: int = 0) -> dict[str, Any]:
    """Train the built-in CNN on digits 0-4 (seconds on a CPU) and save it to ``path``."""
    import numpy as np

    from retrain.data.sample import ORIGINAL_TASK, digit_images
    from retrain.models import modelfile

    keras = _keras()
    images, labels, class_names = digit_images(ORIGINAL_TASK)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_val = len(labels) // 5
    model = build_digits_cnn(len(class_names), seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(images[n_val:], labels[n_val:], epochs=20, batch_size=32, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    pred = np.argmax(model.predict(images[:n_val], verbose=0), axis=-1)
    accuracy = float(np.mean(pred == labels[:n_val]))
    meta = {
        "class_names": class_names,
        "image_size": [32, 32],
        "resize_mode": "squash",
        "base": "builtin:digits-cnn",
        "loss": "sparse_categorical_crossentropy",
        "label_encoding": "index",
        "trained_on": f"sample digits {ORIGINAL_TASK} ({len(labels) - n_val} images)",
        "train_seconds": round(seconds, 2),
        "holdout_accuracy": round(accuracy, 4),
        "seed": seed,
    }
    modelfile.save_model(model, path, meta)
    return meta
