"""Grayscale (1-channel) and non-square models: the image cache, surgery, training, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain import data


def test_cache_converts_rgb_to_l_for_one_channel(tmp_path: Path, make_image_folder):
    folder = make_image_folder(classes=("a", "b"), per_class=3, size=40)
    dataset = data.ingest(folder, tmp_path / "ws")
    gray = data.load_images(dataset, "train", (28, 20), channels=1)
    rgb = data.load_images(dataset, "train", (28, 20))
    cache = dataset.manifest_path.parent / "cache"
    assert (cache / "train_28x20x1_squash.npy").is_file()  # the channel count is in the key
    assert (cache / "train_28x20_squash.npy").is_file()
    assert gray.images.shape == (6, 28, 20, 1) and rgb.images.shape == (6, 28, 20, 3)
    want = Image.fromarray(np.asarray(rgb.images[0])).convert("L")
    # Resizing then converting and converting then resizing differ by rounding only.
    diff = np.abs(np.asarray(want, dtype=int) - gray.images[0, ..., 0].astype(int))
    assert diff.max() <= 2
    one = data.load_image_file(dataset.image_path(gray.paths[0]), (28, 20), "pad", channels=1)
    assert one.shape == (28, 20, 1) and one.dtype == np.uint8
    again = data.load_images(dataset, "train", (28, 20), channels=1)
    np.testing.assert_array_equal(again.images, gray.images)


def test_other_channel_counts_are_refused(tmp_path: Path, make_image_folder):
    from retrain.errors import ConfigError

    dataset = data.ingest(make_image_folder(per_class=2), tmp_path / "ws")
    with pytest.raises(ConfigError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, not 4"):
        data.load_images(dataset, "train", (8, 8), channels=4)
