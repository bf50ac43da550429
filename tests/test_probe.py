"""The preprocessing probe: candidates scored on the old data through the original head."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from retrain import models
from retrain.errors import ConfigError, DatasetError, ModelError
from retrain.models import probe
from tests.done_when_models import trained


def test_old_dataset_says_what_to_pass_when_nothing_is_there(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"^No old data at .*Pass the original task's images"):
        probe.old_dataset(tmp_path / "nothing", tmp_path)


def test_choose_breaks_accuracy_ties_by_loss_and_says_when_unsure():
    # A scale-only difference: the same answers, but full confidence on blends -> clear.
    best, clear, runner = probe.choose(
        {"unit": 1.0, "raw": 1.0}, {"unit": 0.003, "raw": 0.0}, {"unit": 1.5, "raw": 8.3}
    )
    assert (best, clear, runner) == ("unit", True, "raw")
    # 1 point less accurate but lower losses: tied on accuracy, the loss decides.
    best, clear, _ = probe.choose(
        {"tf": 0.96, "torch": 0.95}, {"tf": 0.20, "torch": 0.10}, {"tf": 2.0, "torch": 1.5}
    )
    assert best == "torch" and clear
    # Neither 5 points nor 1.25x apart in either loss: not clearly ahead.
    best, clear, runner = probe.choose(
        {"tf": 0.96, "torch": 0.93}, {"tf": 0.20, "torch": 0.22}, {"tf": 1.8, "torch": 1.9}
    )
    assert (best, clear, runner) == ("tf", False, "torch")
    # Clearly more accurate wins even with worse losses.
    best, clear, _ = probe.choose(
        {"tf": 0.90, "unit": 0.60}, {"tf": 0.5, "unit": 0.4}, {"tf": 2.0, "unit": 1.9}
    )
    assert best == "tf" and clear


def test_candidates_follow_the_model():
    assert probe.candidates(3, False) == ["tf", "torch", "unit", "raw", "caffe"]
    assert probe.candidates(3, True) == ["inside", "tf", "torch", "unit", "caffe"]
    assert probe.candidates(1, False) == ["tf", "unit", "raw"]
    assert probe.candidates(3, True, takes_uint8=True) == ["inside"]


def test_grayscale_mnist_model_probes_unit(tmp_path: Path):
    made = trained("mnist_cnn")
    base = models.load_base(str(made["model"]))
    assert base.preprocessing == "unit"  # today's guess, now checked
    found = models.resolve_preprocessing(base, "auto", made["old"], workspace=tmp_path)
    scores = found.origin["preprocessing_probe"]
    info = found.origin["preprocessing_probe_info"]
    assert found.preprocessing == "unit" and info["best"] == "unit" and info["clear"]
    assert set(scores) == {"raw", "unit", "tf"}  # RGB-only keys are not tried on grayscale
    assert scores["unit"] >= 0.9 and info["images"] == 100 and info["warning"] is None
    # Scaled 255x, the ReLU network answers blends of two digits with full confidence.
    assert info["blend_loss"]["raw"] >= 3 * info["blend_loss"]["unit"]
    assert found.origin["preprocessing_source"].startswith("probe on 100 old images: unit")
    assert base.preprocessing == "unit" and "preprocessing_probe" not in base.origin  # a copy
    # Assumed, not found: said out loud (describe JSON, Model page, the run's warnings) ...
    warning = models.preprocessing_warning(base)
    assert "[0, 1] (unit) is assumed" in warning and "--old-data" in warning
    assert models.describe(base)["preprocessing_warning"] == warning
    # ... and no longer once the probe has found it.
    assert models.preprocessing_warning(found) is None


def test_rgb_model_trained_on_minus_one_to_one_probes_tf(tmp_path: Path):
    made = trained("rgb_cnn")
    base = models.load_base(str(made["model"]))
    assert base.preprocessing == "unit"  # what detection alone would have used: wrong
    found = models.resolve_preprocessing(base, "auto", made["old"], workspace=tmp_path)
    scores = found.origin["preprocessing_probe"]
    assert found.preprocessing == "tf" and found.origin["preprocessing_probe_info"]["clear"]
    assert set(scores) == {"raw", "unit", "tf", "torch", "caffe"}
    assert scores["tf"] >= 0.9 and scores["unit"] <= 0.5


def test_a_model_with_preprocessing_inside_is_confirmed(tmp_path: Path):
    import keras

    made = trained("rgb_cnn")
    inner = keras.saving.load_model(made["model"])
    inp = keras.Input((32, 32, 3), name="pixels")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inp)
    path = tmp_path / "inside.keras"
    keras.Model(inp, inner(scaled)).save(path)
    base = models.load_base(str(path))
    assert base.preprocessing == "inside"
    found = models.resolve_preprocessing(base, "auto", made["old"], workspace=tmp_path)
    info = found.origin["preprocessing_probe_info"]
    assert found.preprocessing == "inside" and info["clear"]
    assert "raw" not in found.origin["preprocessing_probe"]  # the same pixels as inside


def test_builtin_uint8_model_is_confirmed_inside(keras_cache: Path, tmp_path: Path):
    from retrain.data.sample import sample_dataset

    base = models.load_base("builtin:digits-cnn")
    old = sample_dataset(tmp_path, "0-4")
    found = models.resolve_preprocessing(base, "auto", old, workspace=tmp_path)
    assert found.preprocessing == "inside"
    assert list(found.origin["preprocessing_probe"]) == ["inside"]
    assert found.origin["preprocessing_probe"]["inside"] >= 0.9


def test_preprocessing_set_by_hand_wins_and_is_warned_about(tmp_path: Path):
    made = trained("rgb_cnn")
    base = models.load_base(str(made["model"]))
    alone = models.resolve_preprocessing(base, "torch")
    assert alone.preprocessing == "torch"
    assert alone.origin["preprocessing_source"] == "set by hand (--preprocessing)"
    checked = models.resolve_preprocessing(base, "unit", made["old"], workspace=tmp_path)
    assert checked.preprocessing == "unit"
    warning = checked.origin["preprocessing_probe_info"]["warning"]
    assert "'unit' was set by hand" in warning and "tf: 100% accuracy" in warning


def test_bad_choices_and_old_data_are_one_line(tmp_path: Path, make_image_folder):
    made = trained("mnist_cnn")
    base = models.load_base(str(made["model"]))
    with pytest.raises(ModelError, match="Unknown preprocessing 'nope'"):
        models.resolve_preprocessing(base, "nope")
    with pytest.raises(ModelError, match="'caffe' works on RGB images; .* 28x28 grayscale"):
        models.resolve_preprocessing(base, "caffe")
    wrong = make_image_folder(
        classes=("digit 0", "digit 1", "digit 2", "digit 3", "cat"), per_class=2
    )
    with pytest.raises(ConfigError, match="Old data class folders 'cat' are not among"):
        models.resolve_preprocessing(
            base,
            "auto",
            wrong,
            workspace=tmp_path,
            original_classes=[f"digit {d}" for d in range(5)],
        )


def test_describe_json_has_the_probe_scores(tmp_path: Path):
    made = trained("mnist_cnn")
    args = argparse.Namespace(
        base=str(made["model"]),
        workspace=tmp_path,
        preprocessing="auto",
        old_data=str(made["old"]),
        original_classes=None,
    )
    info = models.cli_describe(args)
    assert info["preprocessing"] == "unit"
    assert info["input"] == "28x28 grayscale" and info["channels"] == 1
    assert set(info["preprocessing_probe"]) == {"raw", "unit", "tf"}
    assert info["preprocessing_probe_info"]["margin"].startswith("clearly ahead = ")
    with pytest.raises(ConfigError):
        probe.sample_images(
            probe.old_dataset(made["old"], tmp_path), ["a", "b"], (28, 28), channels=1
        )


def test_rgb_minus_one_to_one_model_retrains_through_the_cli(tmp_path: Path):
    """Done when (b): RGB model trained on [-1, 1], no preprocessing layer; probe -> tf."""
    import json

    from retrain.models import modelfile
    from tests.test_grayscale import run_cli

    made = trained("rgb_cnn")
    ws, run = tmp_path / "ws", tmp_path / "run"
    run_cli(
        "train", "--base", made["model"], "--data", made["new"], "--old-data", made["old"],
        "--out", run, "--epochs", 15, "--lr", 0.005, "--fine-tune-epochs", 0, "--workspace", ws,
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["preprocessing"] == "tf"
    assert max(config["preprocessing_probe"], key=config["preprocessing_probe"].get) == "tf"
    assert modelfile.read_metadata(run / "model.keras")["preprocessing"] == "tf"
    report = run_cli(
        "evaluate", "--model", run / "model.keras", "--data", made["new"], "--workspace", ws
    )
    assert report["accuracy"] >= 0.6
    # The original model scored on its own data: detection alone says unit (wrong), the flag fixes it.
    wrong = run_cli("evaluate", "--model", made["model"], "--data", made["old"], "--workspace", ws)
    right = run_cli("evaluate", "--model", made["model"], "--data", made["old"],
                    "--preprocessing", "tf", "--workspace", ws)  # fmt: skip
    assert wrong["preprocessing"] == "unit" and right["preprocessing"] == "tf"
    assert right["accuracy"] >= 0.9 > 0.5 > wrong["accuracy"]
    exported = run_cli("export", "--run", run, "--format", "keras", "--format", "tflite")
    assert all(exported["self_test"][f]["ok"] for f in ("keras", "tflite")), exported


def test_a_resumed_run_keeps_the_preprocessing_it_used():
    """config.json's ``preprocessing`` is the key training used; as a setting it reproduces
    the run, so --resume does not probe or detect again."""
    from retrain.runs import rundir
    from retrain.training.config import TrainConfig

    saved = {"base": "m.keras", "data": "d", "preprocessing": "tf", "image_size_used": [32, 32]}
    run_config = rundir.RunConfig.from_dict(saved)
    assert run_config.preprocessing == "tf" and run_config.settings["preprocessing"] == "tf"
    assert TrainConfig.from_json(run_config.settings).preprocessing == "tf"
    assert run_config.to_dict()["preprocessing"] == "tf"
    with pytest.raises(ConfigError, match="--preprocessing 'nope' is not one of: auto, inside"):
        TrainConfig(preprocessing="nope")


def test_pages_find_tf_for_the_rgb_model_and_train_with_it(tmp_path: Path):
    """Done when (b) through the pages: the Model page probes, the Train page starts the run."""
    import io
    import json
    import zipfile

    from conftest import wait_for_run
    from streamlit.testing.v1 import AppTest

    from retrain import data

    made = trained("rgb_cnn")
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    new = data.ingest(made["new"], ws)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(made["old"].rglob("*.png")):
            zf.write(path, path.relative_to(made["old"].parent).as_posix())
    root = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(root / "pages" / "model.py"), default_timeout=180)
    at.session_state["workspace"] = ws
    at.session_state["dataset"] = str(new.manifest_path)
    at.run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    at.file_uploader(key="model_upload").set_value(
        ("rgb_cnn.keras", made["model"].read_bytes(), "application/zip")
    ).run()
    at.session_state["preprocessing_options"] = True  # the Preprocessing expander, opened
    at.run()
    at.file_uploader(key="probe_old_data").set_value(
        ("old.zip", buf.getvalue(), "application/zip")
    ).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    scores = next(d.value for d in at.dataframe if "log loss" in d.value.columns)
    assert list(scores[scores["chosen"]]["preprocessing"]) == ["tf"]
    assert {m.label: m.value for m in at.metric}["Input (RGB)"] == "32×32"
    surgery, base = at.session_state["surgery"], at.session_state["base"]
    assert surgery["preprocessing"] == "tf"

    train = AppTest.from_file(str(root / "app.py"), default_timeout=60)
    train.switch_page("pages/train.py")
    for key, value in {"workspace": ws, "dataset": str(new.manifest_path), "base": base,
                       "surgery": surgery}.items():  # fmt: skip
        train.session_state[key] = value
    train.session_state["train_more_fine_tune"] = True  # its expander, opened
    train.run()
    train.number_input(key="epochs").set_value(2)
    train.number_input(key="fine_tune_epochs").set_value(0)
    train.button(key="start_training").click().run()
    assert not train.exception, train.exception
    run_dir = ws / "runs" / train.session_state["run_id"]
    assert wait_for_run(run_dir)["state"] == "done"
    assert json.loads((run_dir / "config.json").read_text())["preprocessing"] == "tf"
