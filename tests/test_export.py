"""retrain.export.export: every format loads in a fresh process and agrees with the trained
model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from retrain import evaluate
from retrain.errors import ConfigError, RunError
from retrain.export import export
from retrain.runs import rundir

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export_ws")


@pytest.fixture(scope="module")
def run_dir(make_run, workspace: Path) -> Path:
    return make_run(workspace, classes=CLASSES, per_class=10, epochs=8, run_id="run-export")


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> dict:
    """Export every format once for the module (TFLite conversion is the slow part)."""
    steps: list[tuple[str, float]] = []
    result = export.export_run(run_dir, ["all"], progress=lambda m, f: steps.append((m, f)))
    result["steps"] = steps
    return result


@pytest.fixture(scope="module")
def test_images(run_dir: Path, workspace: Path) -> tuple[np.ndarray, np.ndarray]:
    from retrain import data

    ds = data.ingest(workspace / "data" / "run-export", workspace)
    cache = data.load_images(ds, "train", (16, 16), "squash")
    return np.asarray(cache.images), np.asarray(cache.labels)


def _keras_probs(path: Path, images: np.ndarray) -> np.ndarray:
    import keras

    return np.asarray(keras.saving.load_model(path).predict(images, verbose=0))


def _tflite_outputs(path: Path, images: np.ndarray) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8, "TFLite models take raw uint8 images"
    rows = []
    for image in images:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"]).astype(np.float32)
        scale, zero = out["quantization"]
        rows.append((y[0] - zero) * scale if scale else y[0])
    return np.stack(rows)


def test_every_format_is_written_under_the_runs_export_folder(exported, run_dir):
    names = {Path(f).name for f in exported["files"]}
    assert names == set(export.FILE_NAMES.values())
    for file in exported["files"]:
        assert Path(file).exists() and Path(file).parent == run_dir / "export"
    assert (run_dir / "export" / "saved_model" / "saved_model.pb").is_file()
    assert (
        json.loads((run_dir / "export" / "export.json").read_text())["files"] == exported["files"]
    )
    fractions = [f for _, f in exported["steps"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_self_test_reloads_each_file_in_a_fresh_process(exported):
    report = exported["self_test"]
    assert list(report) == list(export.FORMATS)
    for fmt in ("keras", "savedmodel"):
        assert report[fmt]["ok"], report[fmt]
        assert report[fmt]["max_abs_diff"] < 1e-5
        assert report[fmt]["argmax_agreement"] == 1.0
    assert report["tflite"]["ok"] and report["tflite"]["max_abs_diff"] < 1e-4
    assert report["onnx"]["ok"] and report["onnx"]["max_abs_diff"] < 1e-5, report["onnx"]
    if shutil.which("node"):  # TF.js runs in Node (tests/test_export_tfjs.py covers it fully)
        assert report["tfjs"]["ok"], report["tfjs"]
        assert report["tfjs"]["runtime"].startswith("TF.js 4.22.0 (Node")
    else:
        assert "Node.js" in report["tfjs"]["error"] and not report["tfjs"]["ok"]
    int8 = report["tflite-int8"]
    assert int8["images"] > 0 and int8["max_abs_diff"] < 0.5
    assert int8["accuracy_drop"] == pytest.approx(int8["accuracy_keras"] - int8["accuracy_int8"])
    assert report["labels"]["ok"] and report["card"]["ok"]


def test_exported_keras_loads_with_plain_keras_in_a_fresh_process(exported, run_dir, test_images):
    images, _ = test_images
    path = run_dir / "export" / "model.keras"
    np.save(run_dir / "images.npy", images)
    code = (
        "import sys, numpy as np, keras\n"
        "m = keras.saving.load_model(sys.argv[1])\n"  # no custom_objects, safe mode
        "assert m.inputs[0].dtype == 'uint8', m.inputs[0].dtype\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))\n"
    )
    out = run_dir / "probs.npy"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(run_dir / "images.npy"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = np.load(out)
    assert fresh.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(fresh, _keras_probs(run_dir / "best.keras", images), atol=1e-5)
    from retrain.models.modelfile import read_metadata

    assert read_metadata(path)["class_names"] == list(CLASSES)


def test_tflite_agrees_with_keras_on_the_argmax(exported, run_dir, test_images):
    images, _ = test_images
    keras_top = _keras_probs(run_dir / "best.keras", images).argmax(axis=1)
    float_top = _tflite_outputs(run_dir / "export" / "model.tflite", images).argmax(axis=1)
    int8_top = _tflite_outputs(run_dir / "export" / "model_int8.tflite", images).argmax(axis=1)
    assert np.mean(float_top == keras_top) >= 0.98
    assert np.mean(int8_top == keras_top) >= 0.9


def test_int8_accuracy_drop_is_measured_on_the_validation_split(exported, run_dir):
    report = evaluate.evaluate_run(run_dir)
    int8 = exported["self_test"]["tflite-int8"]
    assert int8["images"] == report["num_images"]
    assert int8["accuracy_keras"] == pytest.approx(report["accuracy"])


def test_labels_and_model_card(exported, run_dir):
    out = run_dir / "export"
    assert (out / "labels.txt").read_text().splitlines() == list(CLASSES)
    card = (out / "MODEL_CARD.md").read_text()
    for section in ("## Data", "## Base model", "## Surgery", "## Training config"):
        assert section in card
    assert "## Metrics" in card and "best val accuracy" in card
    epoch = rundir.read_status_file(run_dir)["saved_epoch"]
    assert f"- exported: the model of epoch {epoch}, val accuracy " in card
    assert "bias correction" not in card
    assert "held-out validation images" in card
    assert "## Versions" in card and "keras" in card
    assert "Exported 20" in card  # the date
    assert "tf.loadLayersModel('tfjs/model.json')" in card and "[N, 16, 16, 3]" in card
    assert 'ort.InferenceSession("model.onnx")' in card
    # A card gets shared; server paths (which name the session's workspace) must not leak.
    assert str(run_dir.parent) not in card
    assert str(Path(run_dir).resolve().parent) not in card


def test_the_cards_config_table_says_what_auto_settings_resolved_to():
    rows = export.config_rows(
        {
            "lr": None,
            "lr_used": 0.011497569953977362,
            "fine_tune_lr": None,
            "image_size": None,
            "image_size_used": [32, 32],
            "batch_size": 32,
            "batch_size_used": 16,
            "epochs": 5,
            "old_data": None,
            "cut_at_used": "features",  # no "cut_at" setting: a row of its own
            "versions": {"keras": "3"},
        }
    )
    assert rows == [
        "| lr | auto: `0.0115` |",
        "| fine_tune_lr | auto (lr / 10) |",
        "| image_size | auto: `[32, 32]` |",
        "| batch_size | `32` (used `16`) |",
        "| epochs | `5` |",
        "| old_data | not set |",
        "| cut_at_used | `features` |",
    ]
    assert not any("None" in row for row in rows)


def test_zip_of_everything_holds_every_file(exported, run_dir):
    import zipfile

    bundle = export.zip_exports(run_dir, exported["files"])
    names = set(zipfile.ZipFile(bundle).namelist())
    assert {"model.keras", "model.tflite", "labels.txt", "saved_model/saved_model.pb"} <= names
    assert {"model.onnx", "tfjs/model.json", "tfjs/group1-shard1of1.bin"} <= names


def test_a_run_that_is_not_done_cannot_be_exported(run_dir, tmp_path):
    copy = tmp_path / "runs" / "run-failed"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    rundir.write_status(copy, "failed")
    with pytest.raises(RunError, match="is failed, not done"):
        export.export_run(copy, ["keras"])


def test_unknown_format_and_missing_tensorflow_are_one_line_errors(run_dir, monkeypatch):
    with pytest.raises(ConfigError, match="Unknown export format 'coreml'"):
        export.export_run(run_dir, ["coreml"])
    monkeypatch.setattr(export, "tensorflow_available", lambda: False)
    with pytest.raises(ConfigError, match="needs TensorFlow"):
        export.export_run(run_dir, ["tflite"])


def test_cli_export_prints_files_and_self_test(run_dir, capsys):
    from retrain.__main__ import main

    code = main(["export", "--run", str(run_dir), "--format", "labels", "--format", "card"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [Path(f).name for f in result["files"]] == ["labels.txt", "MODEL_CARD.md"]
    assert result["self_test"]["labels"]["ok"]
