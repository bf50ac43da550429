"""Grayscale (1-channel) and non-square models: the image cache, surgery, training, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
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
    assert shown["Input (grayscale)"] == "28×28"  # the colour in the label: the value fits
    at.session_state["preprocessing_options"] = True  # the Preprocessing expander, opened
    at.run()
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
    # Set by hand: the page names its own control, never the CLI's --preprocessing flag.
    at.selectbox(key="preprocessing_choice").set_value("tf").run()
    assert not at.exception, at.exception
    assert any("(set by hand)" in c.value for c in at.caption)
    shown = [c.value for c in at.caption] + [w.value for w in at.warning]
    assert not [text for text in shown if "--preprocessing" in text], shown


def run_cli(*args: object) -> dict:
    """``python -m retrain ARGS`` (in this process: `conftest.run_main`); its JSON. The test
    fails on a non-zero exit."""
    code, out, err = run_main(*args)
    assert code == 0, err[-3000:]
    return out


def test_mnist_model_retrains_evaluates_and_exports_through_the_cli(tmp_path: Path):
    """Done when (a): the 28x28x1 model trained on x / 255, old data -> probe -> unit."""
    import json

    from retrain.models import modelfile
    from tests.done_when_models import trained

    made = trained("mnist_cnn")
    ws, run = tmp_path / "ws", tmp_path / "run"
    info = run_cli("describe", made["model"], "--old-data", made["old"], "--workspace", ws)
    assert info["input"] == "28x28 grayscale" and info["input_shape"] == [None, 28, 28, 1]
    assert info["preprocessing"] == "unit" and info["preprocessing_probe"]["unit"] >= 0.9
    summary = run_cli(
        "train", "--base", made["model"], "--data", made["new"], "--old-data", made["old"],
        "--out", run, "--epochs", 4, "--fine-tune-epochs", 0, "--workspace", ws,
    )  # fmt: skip
    assert summary["preprocessing"] == "unit" and summary["warnings"] == []
    assert summary["preprocessing_probe"] == info["preprocessing_probe"]
    config = json.loads((run / "config.json").read_text())
    assert config["preprocessing"] == "unit"
    assert config["preprocessing_probe"] == info["preprocessing_probe"]  # seeded: the same
    assert config["image_size_used"] == [28, 28]
    meta = modelfile.read_metadata(run / "model.keras")
    assert meta["preprocessing"] == "unit" and meta["image_size"] == [28, 28]
    model, _ = modelfile.load_model(run / "model.keras")
    assert tuple(model.inputs[0].shape) == (None, 28, 28, 1)
    report = run_cli("evaluate", "--model", run / "model.keras", "--data", made["new"],
                     "--workspace", ws)  # fmt: skip
    assert report["accuracy"] >= 0.6 and report["num_images"] > 0  # 5 new classes: chance 0.2
    exported = run_cli(
        "export", "--run", run, "--format", "keras", "--format", "tflite", "--format", "tflite-int8"
    )  # fmt: skip
    assert exported["self_test"]["tflite-int8"]["ok"]  # calibrated on grayscale images
    for fmt in ("keras", "tflite"):
        check = exported["self_test"][fmt]
        assert check["ok"] and check["argmax_agreement"] == 1.0, check
    forgot = run_cli("forgetting", "--original", made["model"], "--run", run, "--data",
                     made["old"], "--workspace", ws)  # fmt: skip
    assert forgot["preprocessing"] == "unit" and forgot["before"] >= 0.9


def test_surgery_keeps_one_channel_and_a_non_square_size(tmp_path: Path, make_image_folder):
    import keras

    from retrain import models
    from retrain.models import surgery

    inp = keras.Input((20, 36, 1), name="pixels")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    path = tmp_path / "gray_wide.keras"
    keras.Model(inp, out).save(path)
    base = models.load_base(str(path))
    assert base.input_size == (20, 36) and base.channels == 1
    assert models.describe(base)["input"] == "20x36 grayscale"
    made = surgery.replace_head(base, ["a", "b"])
    assert tuple(made.model.inputs[0].shape) == (None, 20, 36, 1)
    assert made.model.inputs[0].dtype == "uint8" and made.diff["image_size"] == [20, 36]
    dataset = data.ingest(make_image_folder(classes=("a", "b"), per_class=2), tmp_path / "ws")
    images = data.load_images(dataset, "train", (20, 36), channels=1).images
    probs = made.model.predict(np.asarray(images), verbose=0)
    assert probs.shape == (4, 2)
    bigger = surgery.replace_head(base, ["a", "b"], image_size=(40, 72))
    assert tuple(bigger.model.inputs[0].shape) == (None, 40, 72, 1)
    assert any("resize" in name for name in bigger.diff["added"])  # feeds the base 20x36


def test_train_page_starts_a_grayscale_run_with_the_found_preprocessing(tmp_path: Path):
    import json
    import shutil

    from conftest import wait_for_run
    from streamlit.testing.v1 import AppTest

    from retrain.runs import jobs
    from tests.done_when_models import trained

    made = trained("mnist_cnn")
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    model = Path(shutil.copy(made["model"], ws / "models" / "mnist_cnn.keras"))
    new = data.ingest(made["new"], ws)
    root = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(root / "app.py"), default_timeout=60)
    at.switch_page("pages/train.py")
    at.session_state["workspace"] = ws
    at.session_state["dataset"] = str(new.manifest_path)
    at.session_state["base"] = str(model)
    # What the Model page remembers after its probe (see the Model page test above).
    at.session_state["surgery"] = {"cut_at": "flatten", "freeze": "all", "preprocessing": "unit"}
    at.session_state["train_more_fine_tune"] = True  # its expander, opened
    at.run()
    at.number_input(key="epochs").set_value(2)
    at.number_input(key="fine_tune_epochs").set_value(0)
    at.button(key="start_training").click().run()
    assert not at.exception, at.exception
    run_dir = ws / "runs" / at.session_state["run_id"]
    status = wait_for_run(run_dir)
    assert status["state"] == "done", (status.get("error"), jobs.read_log_tail(run_dir))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preprocessing"] == "unit" and config["image_size_used"] == [28, 28]
    assert config["preprocessing_source"] == "set by hand (--preprocessing)"
    # What the Evaluate page shows for the run: its held-out images, a prediction, Grad-CAM.
    from retrain import evaluate

    report = evaluate.evaluate_run(run_dir)
    assert report["num_images"] > 0 and report["accuracy"] > 0.4  # 5 classes: chance 0.2
    image = next(made["new"].rglob("*.png"))
    best = run_dir / "best.keras"
    top = evaluate.predict(best, [image])[0]["top_k"]
    assert len(top) == 3 and abs(sum(t["probability"] for t in top) - 1) < 0.5
    overlay = evaluate.grad_cam_overlay(best, image)
    assert overlay is None or overlay.shape == (28, 28, 3)  # grayscale shown in colour


def test_a_non_square_grayscale_base_trains_and_exports_at_its_own_size(
    tmp_path: Path, make_image_folder
):
    import keras

    from retrain.export import export
    from retrain.models import modelfile
    from retrain.training.config import TrainConfig
    from retrain.training.train import train

    keras.utils.set_random_seed(0)
    inp = keras.Input((20, 36, 1), name="pixels")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    base = tmp_path / "wide.keras"
    keras.Model(inp, out).save(base)
    folder = make_image_folder(classes=("a", "b"), per_class=6, size=40)
    run_dir = tmp_path / "run"
    config = TrainConfig(
        data=str(folder), base=str(base), out=str(run_dir), epochs=1, preprocessing="unit",
        fine_tune_epochs=0,
    )  # fmt: skip
    train(config, run_dir, workspace=tmp_path / "ws")
    meta = modelfile.read_metadata(run_dir / "model.keras")
    assert meta["image_size"] == [20, 36] and meta["preprocessing"] == "unit"
    cache = next((tmp_path / "ws" / "datasets").rglob("train_20x36x1_squash.npy"))
    assert np.load(cache, mmap_mode="r").shape[1:] == (20, 36, 1)
    result = export.export_run(run_dir, ["keras", "tflite"])
    assert result["self_test"]["tflite"]["ok"], result["self_test"]
