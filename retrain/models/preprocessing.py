"""How raw RGB pixels (0-255) become a base model's input: one table, built as Keras layers.

Every base model has a preprocessing *key* (`models.BaseModel.preprocessing`). This module is
the one place that says what each key means and builds it, as standard Keras layers (no
Lambda, so saved models load with ``safe_mode``):

- surgery puts these layers in front of the kept base layers (`front_layers`), so a retrained
  model takes raw uint8 images;
- evaluation runs an original, un-retrained base model through the same layers
  (`with_preprocessing`) for the forgetting check;
- `preprocess` returns the layers' output as an array where a caller needs the numbers.

Adding a key is one `Preprocessing` entry in `REGISTRY`. Keras is imported inside functions:
``import retrain.models.preprocessing`` stays cheap, and this module imports nothing else of
``retrain`` but ``errors`` (models, surgery and evaluate import it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrain.errors import ModelError

#: Names of the layers `front_layers` builds start with this (surgery tells them apart by it).
LAYER_PREFIX = "retrain_"

#: ImageNet statistics of torchvision-style models, per RGB channel, for pixels in [0, 1].
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
#: ImageNet means of Keras's "caffe" mode, per **BGR** channel, in 0-255 pixels.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

Namer = Callable[[str], str]


def _no_layers(layers: Any, name: Namer) -> list[Any]:
    return []


def _rescale(scale: float, offset: float = 0.0) -> Callable[[Any, Namer], list[Any]]:
    def build(layers: Any, name: Namer) -> list[Any]:
        return [layers.Rescaling(scale, offset=offset, name=name("scale"))]

    return build


def _torch(layers: Any, name: Namer) -> list[Any]:
    return [
        layers.Normalization(
            mean=[255.0 * m for m in TORCH_MEAN],
            variance=[(255.0 * s) ** 2 for s in TORCH_STD],
            name=name("normalize"),
        )
    ]


def _caffe(layers: Any, name: Namer) -> list[Any]:
    # RGB -> BGR and the mean subtraction as one frozen 1x1 map: a permutation matrix (exact
    # in floating point) plus a bias of minus the means. Standard layers only, so it saves and
    # loads with safe_mode; it has no trainable weights (trainable=False, and surgery's freeze
    # rules never touch front layers).
    bgr = layers.Dense(3, trainable=False, name=name("bgr_mean"))
    bgr.build((None, None, None, 3))
    flip = np.eye(3, dtype="float32")[::-1]
    bgr.set_weights([flip, -np.asarray(CAFFE_BGR_MEAN, dtype="float32")])
    return [bgr]


@dataclass(frozen=True)
class Preprocessing:
    """One preprocessing key.

    Attributes:
        key: the short name stored with a base model, a run and a saved model.
        description: what it does, in the user's words.
        build: ``build(keras.layers, name) -> [layers]``: fresh layers from 0-255 pixels to
            the model's input; ``name(stem)`` names each layer. ``[]`` = values unchanged.
        rgb_only: whether it needs 3 channels (per-channel statistics, channel order).
    """

    key: str
    description: str
    build: Callable[[Any, Namer], list[Any]]
    rgb_only: bool = False


REGISTRY: dict[str, Preprocessing] = {
    p.key: p
    for p in (
        Preprocessing(
            "inside", "the model has its own preprocessing layers (takes 0-255 pixels)", _no_layers
        ),
        Preprocessing("tf", "scaled to [-1, 1] (x / 127.5 - 1)", _rescale(1.0 / 127.5, -1.0)),
        Preprocessing(
            "torch", "scaled to [0, 1], then ImageNet mean/std normalised", _torch, rgb_only=True
        ),
        Preprocessing("unit", "scaled to [0, 1] (x / 255)", _rescale(1.0 / 255.0)),
        Preprocessing("raw", "raw 0-255 pixels", _no_layers),
        Preprocessing(
            "caffe",
            "RGB turned into BGR, then the ImageNet mean pixel subtracted (no scaling)",
            _caffe,
            rgb_only=True,
        ),
    )
}

#: key -> description (the table the Model page and `models.describe` show).
PREPROCESSING: dict[str, str] = {key: p.description for key, p in REGISTRY.items()}


def get(key: str) -> Preprocessing:
    """The registry entry of ``key``.

    Raises:
        ModelError: an unknown key.
    """
    entry = REGISTRY.get(key)
    if entry is None:
        raise ModelError(f"Unknown preprocessing '{key}'. Use one of: {', '.join(REGISTRY)}.")
    return entry


def describe(key: str) -> str:
    """What ``key`` does, in the user's words (`ModelError` for an unknown key)."""
    return get(key).description


def _keras() -> Any:
    import keras

    return keras


def _default_name(stem: str) -> str:
    return LAYER_PREFIX + stem


def front_layers(
    key: str,
    *,
    resize_to: tuple[int, int] | None = None,
    name: Namer = _default_name,
    channels: int = 3,
) -> list[Any]:
    """Fresh Keras layers that turn images (0-255, uint8 or float) into a model's input.

    Args:
        key: a preprocessing key (`REGISTRY`).
        resize_to: (H, W) to resize to first (a ``Resizing`` layer), or None.
        name: makes each layer's name from a stem (``"resize"``, ``"scale"``, ``"normalize"``,
            ``"bgr_mean"``, ``"to_float"``); default ``"retrain_" + stem``.
        channels: of the images: 3 (RGB) or 1 (grayscale).

    Returns:
        At least one layer; its output is float. Where the key changes no values and nothing
        is resized, one ``Rescaling(1.0)`` (``"to_float"``) only turns uint8 into float.

    Raises:
        ModelError: an unknown key, or an RGB-only key for grayscale images.
    """
    entry = get(key)
    if entry.rgb_only and channels != 3:
        raise ModelError(
            f"Preprocessing '{key}' works on RGB images (3 channels); this model takes "
            f"{channels}-channel images. Use a model that takes RGB images."
        )
    layers = _keras().layers
    out: list[Any] = []
    if resize_to is not None:
        out.append(layers.Resizing(int(resize_to[0]), int(resize_to[1]), name=name("resize")))
    out += entry.build(layers, name)
    if not out:
        out.append(layers.Rescaling(1.0, name=name("to_float")))
    return out


def preprocessor(key: str, image_size: tuple[int, int] | None = None, channels: int = 3) -> Any:
    """A Keras model: uint8 images (H, W, channels) -> the model input ``key`` describes.

    ``image_size`` fixes (H, W) of the input; None takes any size.
    """
    keras = _keras()
    shape = (*(image_size or (None, None)), channels)
    inp = keras.Input(shape=shape, dtype="uint8", name=_default_name("image"))
    x = inp
    for layer in front_layers(key, channels=channels):
        x = layer(x)
    return keras.Model(inp, x, name=f"preprocess_{key}")


def with_preprocessing(model: Any, key: str) -> Any:
    """``model`` behind the layers of ``key``: a Keras model that takes uint8 images.

    The returned model calls ``model`` itself (shared weights: changing ``model``'s weights
    changes what it computes). ``model`` must take one float image input.
    """
    keras = _keras()
    shape = tuple(model.inputs[0].shape[1:])
    inp = keras.Input(shape=shape, dtype="uint8", name=_default_name("image"))
    x = inp
    for layer in front_layers(key, channels=int(shape[-1])):
        x = layer(x)
    return keras.Model(inp, model(x), name=f"{model.name}_from_uint8")


def preprocess(images: np.ndarray, key: str, batch_size: int = 64) -> np.ndarray:
    """Apply ``key``'s layers to uint8 images (N, H, W, C); float32 (N, H, W, C) out."""
    model = preprocessor(key, tuple(images.shape[1:3]), int(images.shape[3]))
    if len(images) == 0:
        return np.zeros(images.shape, dtype=np.float32)
    parts = [
        np.asarray(model.predict_on_batch(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)
