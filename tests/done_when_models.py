"""The two models of issue 13's "Done when", built and trained here (no downloads).

- `mnist_cnn`: the most common Keras tutorial model: input 28x28x1 float, trained on
  ``x / 255`` of white-on-black digits, no preprocessing layer inside.
- `rgb_cnn`: an RGB 32x32 CNN trained on ``x / 127.5 - 1`` ([-1, 1]) of coloured digits, no
  preprocessing layer inside.

Each comes with its old data (the original task, digits 0-4, as class folders named
``digit 0`` ...) and new data (digits 5-9) written as PNG files, like a user would have them.
Training takes a few seconds on a CPU.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from retrain.data.sample import digit_images

OLD, NEW = "0-4", "5-9"


def mnist_digits(digits: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """White-on-black 28x28 grayscale digits (like MNIST): uint8 (N, 28, 28), labels, names."""
    images, labels, names = digit_images(digits)
    gray = [
        255 - np.asarray(Image.fromarray(im).convert("L").resize((28, 28), Image.BILINEAR))
        for im in images
    ]
    return np.stack(gray).astype(np.uint8), labels, names


def coloured_digits(digits: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Digits in random ink and paper colours, RGB 32x32: uint8 (N, 32, 32, 3), labels, names."""
    images, labels, names = digit_images(digits)
    rng = np.random.default_rng(seed)
    # Dark ink on light paper, each in a random colour: always readable.
    ink = rng.integers(0, 110, size=(len(images), 1, 1, 3))
    paper = rng.integers(150, 256, size=(len(images), 1, 1, 3))
    alpha = images[..., :1].astype(np.float64) / 255.0  # 1 = paper, 0 = ink
    out = alpha * paper + (1 - alpha) * ink
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), labels, names


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """Write ``images`` as PNG class folders under ``root``; return ``root``."""
    counts = dict.fromkeys(names, 0)
    for image, label in zip(images, labels, strict=True):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(folder / f"{counts[names[label]]:04d}.png")
        counts[names[label]] += 1
    return root


def _fit(model, x: np.ndarray, y: np.ndarray, epochs: int) -> float:
    import keras

    keras.utils.set_random_seed(0)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    n_val = len(y) // 5
    model.fit(x[n_val:], y[n_val:], epochs=epochs, batch_size=32, verbose=0)
    return float(np.mean(model.predict(x[:n_val], verbose=0).argmax(-1) == y[:n_val]))


def mnist_cnn(folder: Path) -> dict:
    """Train the MNIST-style CNN on ``x / 255``; write model.keras, old/ and new/ under ``folder``."""
    import keras

    keras.utils.set_random_seed(0)
    images, labels, names = mnist_digits(OLD)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(name="flatten"),  # the cut the page tests choose by name
            layers.Dropout(0.5),
            layers.Dense(len(names), activation="softmax"),
        ],
        name="mnist_cnn",
    )
    accuracy = _fit(model, images[..., None] / 255.0, labels, epochs=8)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "mnist_cnn.keras")
    write_folder(folder / "old", images, labels, names)
    write_folder(folder / "new", *mnist_digits(NEW))
    return {"model": folder / "mnist_cnn.keras", "old": folder / "old", "new": folder / "new",
            "holdout_accuracy": accuracy}  # fmt: skip


def rgb_cnn(folder: Path) -> dict:
    """Train the RGB CNN on ``x / 127.5 - 1``; write model.keras, old/ and new/ under ``folder``."""
    import keras

    keras.utils.set_random_seed(0)
    images, labels, names = coloured_digits(OLD)
    order = np.random.default_rng(1).permutation(len(labels))
    images, labels = images[order], labels[order]
    layers = keras.layers
    inp = keras.Input((32, 32, 3), name="image")
    x = inp
    for i, filters in enumerate((16, 32, 64), start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.ReLU(6.0, name=f"relu{i}")(x)  # ReLU6, as in the MobileNets
        if i < 3:
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(len(names), activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="rgb_cnn")
    accuracy = _fit(model, images / 127.5 - 1.0, labels, epochs=20)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "rgb_cnn.keras")
    write_folder(folder / "old", images, labels, names)
    write_folder(folder / "new", *coloured_digits(NEW, seed=1))
    return {"model": folder / "rgb_cnn.keras", "old": folder / "old", "new": folder / "new",
            "holdout_accuracy": accuracy}  # fmt: skip


@functools.cache
def trained(name: str) -> dict:
    """``mnist_cnn`` or ``rgb_cnn``, trained once per test process (in a temporary folder)."""
    folder = Path(tempfile.mkdtemp(prefix=f"retrain-{name}-"))
    atexit.register(shutil.rmtree, folder, True)
    return {"mnist_cnn": mnist_cnn, "rgb_cnn": rgb_cnn}[name](folder)
