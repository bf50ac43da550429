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


# --- the done-when model (a): MNIST-style CNN, 28x28x1, trained on x / 255 ---------------------


def zipped(folder: Path, target: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return target.read_bytes()


def test_model_page_shows_grayscale_input_and_probe_scores(tmp_path: Path):
    from streamlit.testing.v1 import AppTest

    from tests.done_when_models import trained

    made = trained("mnist_cnn")
    new = data.ingest(made["new"], tmp_path / "ws")
    page = str(Path(__file__).resolve().parents[1] / "pages" / "model.py")
    at = AppTest.from_file(page, default_timeout=180)
    at.session_state["dataset"] = str(new.manifest_path)
    at.run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    at.file_uploader(key="model_upload").set_value(
        ("mnist_cnn.keras", made["model"].read_bytes(), "application/zip")
    ).run()
    assert not at.exception, at.exception
    shown = {m.label: m.value for m in at.metric}
    assert shown["Input"] == "28×28 grayscale"
    at.file_uploader(key="probe_old_data").set_value(
        ("old.zip", zipped(made["old"], tmp_path / "old.zip"), "application/zip")
    ).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    scores = next(d.value for d in at.dataframe if "log loss" in d.value.columns)
    assert set(scores["preprocessing"]) == {"raw", "unit", "tf"}
    chosen = scores[scores["chosen"]]
    assert list(chosen["preprocessing"]) == ["unit"] and float(chosen["accuracy"].iloc[0]) >= 0.9
    assert any("best: **unit**" in c.value for c in at.caption)
    assert not at.warning  # unit is clearly ahead
    assert at.session_state["surgery"]["preprocessing"] == "unit"
    assert any("28×28 grayscale images" in m.value for m in at.markdown)
