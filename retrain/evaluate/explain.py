"""Predict and Grad-CAM: top-k classes for images, and where the model looked.

The optional Grad-CAM needs gradients, which are backend-specific: it uses TensorFlow's
``GradientTape`` and returns None on other backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError, DatasetError
from retrain.evaluate.loading import (
    DEFAULT_TOP_K,
    load_model,
    model_channels,
    model_class_names,
    model_image_size,
)
from retrain.evaluate.metrics import class_probabilities, raw_outputs
from retrain.evaluate.retention import _find_features


def _image_array(
    image: Any, size: tuple[int, int], resize_mode: str, channels: int = 3
) -> np.ndarray:
    from retrain.data.images import load_image_file

    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, str | Path) and not Path(image).is_file():
        raise DatasetError(f"No image at '{image}'. Check the path.")
    return load_image_file(image, size, resize_mode, channels)


def predict(
    model_path: str | Path, images: Sequence[Any], top_k: int = DEFAULT_TOP_K
) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image.

    Args:
        model_path: a .keras file saved by Retrain Studio.
        images: image paths (or open image files); decoded and resized exactly like the
            training cache (``data.load_image_file`` with the model's size and resize mode).
        top_k: how many classes per image (capped at the number of classes).

    Returns:
        one ``{"path", "top_k": [{"class", "probability"}, ...]}`` per image, best first.

    Raises:
        ConfigError: top_k < 1 or no images.
        ModelError: the model cannot be loaded or has no class names.
        DatasetError: an image is missing or unreadable.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}.")
    if not images:
        raise ConfigError("No images given. Pass one or more image files.")
    model, meta = load_model(model_path)
    class_names = model_class_names(model, meta, model_path)
    size = model_image_size(model, meta)
    resize_mode = meta.get("resize_mode", "squash")
    channels = model_channels(model)
    batch = np.stack([_image_array(img, size, resize_mode, channels) for img in images])
    probs = class_probabilities(raw_outputs(model, batch), meta.get("label_encoding"))
    k = min(top_k, len(class_names))
    results = []
    for image, row in zip(images, probs, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        results.append(
            {
                "path": str(image) if isinstance(image, str | Path) else getattr(image, "name", ""),
                "top_k": [{"class": class_names[i], "probability": float(row[i])} for i in order],
            }
        )
    return results


def _last_spatial_layer(features: Any) -> Any | None:
    """The last layer of ``features`` whose output is a spatial map (batch, H, W, C)."""
    for layer in reversed(features.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and (shape[1] or 0) > 1 and (shape[2] or 0) > 1:
            return layer
    return None


def grad_cam(model_path: str | Path, image: Any, class_index: int | None = None) -> Any:
    """Grad-CAM heatmap (H', W') in [0, 1] for one image, or None where it does not apply.

    The map is taken at the last spatial (conv) layer of the model's "features" part and
    weighted by the gradient of the class score. It needs the TensorFlow backend (gradients
    are backend-specific); elsewhere, and for bases without a spatial map, it returns None.

    Args:
        model_path: a .keras file saved by Retrain Studio.
        image: an image path (or an uint8 array at the model's size).
        class_index: the class to explain; default the predicted one.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    model, meta = load_model(model_path)
    features = _find_features(model)
    if features is None:
        return None
    spatial = _last_spatial_layer(features)
    if spatial is None:
        return None
    position = model.layers.index(features)
    head_layers = model.layers[position + 1 :]
    probe = keras.Model(features.input, [spatial.output, features.output])
    size = model_image_size(model, meta)
    x = _image_array(image, size, meta.get("resize_mode", "squash"), model_channels(model))[None]
    with tf.GradientTape() as tape:
        fmap, out = probe(x, training=False)
        for layer in head_layers:
            out = layer(out, training=False)
        if out.shape[-1] == 1:
            positive = class_index == 1 if class_index is not None else float(out[0, 0]) >= 0.5
            target = out[:, 0] if positive else 1 - out[:, 0]
        else:
            idx = int(class_index) if class_index is not None else int(tf.argmax(out[0]))
            target = out[:, idx]
    grads = tape.gradient(target, fmap)
    if grads is None:
        return None
    weights = tf.reduce_mean(grads, axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(fmap * weights[:, None, None, :], axis=-1))[0].numpy()
    peak = float(cam.max())
    return cam / peak if peak > 0 and math.isfinite(peak) else cam


def grad_cam_overlay(model_path: str | Path, image: Any, alpha: float = 0.5) -> Any:
    """The image at the model's input size with its Grad-CAM map blended in red (uint8), or
    None where Grad-CAM does not apply (see `grad_cam`)."""
    from PIL import Image

    model, meta = load_model(model_path)
    size = model_image_size(model, meta)
    pixels = _image_array(image, size, meta.get("resize_mode", "squash"), model_channels(model))
    cam = grad_cam(model_path, pixels)
    if cam is None:
        return None
    if pixels.shape[-1] == 1:  # grayscale: blend the heat into a gray RGB picture
        pixels = np.repeat(pixels, 3, axis=-1)
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(
        (size[1], size[0]), Image.BILINEAR
    )
    weight = (np.asarray(heat, dtype=np.float32) / 255.0 * alpha)[..., None]
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    return np.uint8(pixels.astype(np.float32) * (1 - weight) + red * weight)
