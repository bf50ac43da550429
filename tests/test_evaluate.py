"""retrain.evaluate: the report equals sklearn on the model's predictions; forgetting; predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_classifier, write_image_folder

from retrain import evaluate
from retrain.__main__ import main
from retrain.errors import ConfigError, DatasetError, ModelError, RunError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox", "owl")  # sorted, as ingest orders them


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval_ws")


@pytest.fixture(scope="module")
def run_dir(make_run, workspace: Path) -> Path:
    # Few epochs on purpose: an imperfect model has mistakes to report.
    return make_run(workspace, classes=CLASSES, per_class=8, epochs=3, run_id="run-eval")


@pytest.fixture(scope="module")
def dataset(run_dir: Path, workspace: Path):
    from retrain import data

    return data.ingest(workspace / "data" / "run-eval", workspace)


def _model_probs(model_path: Path, images: np.ndarray, encoding: str = "index") -> np.ndarray:
    import keras

    model = keras.saving.load_model(model_path)
    return evaluate.class_probabilities(model.predict(images, verbose=0), encoding)


def test_report_equals_sklearn_on_the_models_predictions(run_dir, dataset, workspace):
    from sklearn import metrics

    from retrain import data

    report = evaluate.evaluate_model(run_dir / "best.keras", dataset, "train", workspace=workspace)
    cache = data.load_images(dataset, "train", (16, 16), "squash")
    y = np.asarray(cache.labels)
    probs = _model_probs(run_dir / "best.keras", np.asarray(cache.images))
    pred = probs.argmax(axis=1)
    labels = list(range(len(CLASSES)))

    assert report["class_names"] == list(CLASSES)
    assert report["num_images"] == len(y) == 4 * 8
    assert report["accuracy"] == metrics.accuracy_score(y, pred)
    assert report["loss"] == pytest.approx(metrics.log_loss(y, probs, labels=labels), rel=1e-6)
    assert report["confusion_matrix"] == metrics.confusion_matrix(y, pred, labels=labels).tolist()
    p, r, f, s = metrics.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(CLASSES):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (
            p[i],
            r[i],
            f[i],
            s[i],
        )
    for average in ("macro", "weighted"):
        p, r, f, _ = metrics.precision_recall_fscore_support(
            y, pred, labels=labels, average=average, zero_division=0
        )
        assert report[average] == {"precision": p, "recall": r, "f1": f}
    assert report["top_k"] == {
        "k": 3,
        "accuracy": metrics.top_k_accuracy_score(y, probs, k=3, labels=labels),
    }
    # Misclassified: exactly the wrong ones, most confidently wrong first.
    wrong = report["misclassified"]
    assert len(wrong) == int((pred != y).sum())
    assert all(m["true"] != m["predicted"] for m in wrong)
    confidences = [m["confidence"] for m in wrong]
    assert confidences == sorted(confidences, reverse=True)
    assert all(Path(m["path"]).is_file() for m in wrong)


def test_evaluate_run_scores_exactly_the_images_held_out_in_training(run_dir, dataset):
    from retrain import data

    report = evaluate.evaluate_run(run_dir)
    cache = data.load_images(dataset, "train", (16, 16), "squash")
    _, val_idx = data.stratified_split(np.asarray(cache.labels), 0.25, 0)
    assert report["split"] == "val"
    assert report["num_images"] == len(val_idx)
    held_out = {str(Path(dataset.root) / cache.paths[i]) for i in val_idx}
    assert {p["path"] for p in report["predictions"]} == held_out
    assert sum(map(sum, report["confusion_matrix"])) == len(val_idx)


def test_a_test_folder_with_a_subset_of_the_classes_is_matched_by_name(run_dir, tmp_path):
    # Folders in a different order than the model's classes, and only two of four.
    folder = tmp_path / "subset"
    for cls, label in (("owl", 3), ("cat", 0)):
        write_image_folder(folder, (cls,), 4, label_offset=label)
    report = evaluate.evaluate_model(run_dir / "best.keras", folder, workspace=tmp_path)
    assert set(report["per_class"]) == {"cat", "owl"}
    assert len(report["confusion_matrix"]) == len(CLASSES)
    # Rows of classes absent from the data are zero; present rows sum to their support.
    assert sum(report["confusion_matrix"][1]) == sum(report["confusion_matrix"][2]) == 0
    assert sum(report["confusion_matrix"][3]) == report["per_class"]["owl"]["support"] == 4


def test_class_folders_the_model_does_not_know_are_a_one_line_error(run_dir, tmp_path):
    folder = write_image_folder(tmp_path / "zoo", ("cat", "zebra"), 3)
    with pytest.raises(ConfigError, match=r"'zebra' are not classes of the model") as err:
        evaluate.evaluate_model(run_dir / "best.keras", folder, workspace=tmp_path)
    assert "\n" not in str(err.value)


def test_a_model_without_class_names_is_refused(tmp_path, run_dir):
    from retrain.models.modelfile import save_model

    path = save_model(build_tiny_classifier(4), tmp_path / "anon.keras", {})
    with pytest.raises(ModelError, match="has no class names"):
        evaluate.evaluate_model(path, run_dir.parent.parent / "data" / "run-eval")


def test_missing_split_says_which_splits_exist(run_dir, dataset):
    with pytest.raises(ConfigError, match=r"no 'test' split \(it has: train\)"):
        evaluate.evaluate_model(run_dir / "best.keras", dataset, "test")


def test_binary_sigmoid_model_is_scored_as_two_classes(make_run, tmp_path):
    from sklearn import metrics

    from retrain import data

    run = make_run(tmp_path, classes=("no", "yes"), binary=True, epochs=3, run_id="run-bin")
    report = evaluate.evaluate_model(run / "best.keras", tmp_path / "data" / "run-bin", "train")
    ds = data.ingest(tmp_path / "data" / "run-bin", tmp_path)
    cache = data.load_images(ds, "train", (16, 16), "squash")
    probs = _model_probs(run / "best.keras", np.asarray(cache.images), "binary")
    y = np.asarray(cache.labels)
    assert probs.shape == (len(y), 2)
    assert report["accuracy"] == metrics.accuracy_score(y, probs.argmax(axis=1))
    assert report["loss"] == pytest.approx(metrics.log_loss(y, probs, labels=[0, 1]), rel=1e-6)
    assert "top_k" not in report


def test_predict_returns_top_k_per_image_best_first(run_dir, dataset):
    paths = [Path(dataset.root) / p for p, _ in dataset.splits["train"][:3]]
    results = evaluate.predict(run_dir / "best.keras", paths, top_k=2)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    for result in results:
        probs = [t["probability"] for t in result["top_k"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True)
        assert {t["class"] for t in result["top_k"]} <= set(CLASSES)
    everything = evaluate.predict(run_dir / "best.keras", paths[:1], top_k=10)
    assert len(everything[0]["top_k"]) == len(CLASSES)
    assert sum(t["probability"] for t in everything[0]["top_k"]) == pytest.approx(1.0)


def test_predict_missing_image_and_bad_k(run_dir, tmp_path):
    with pytest.raises(DatasetError, match="No image at"):
        evaluate.predict(run_dir / "best.keras", [tmp_path / "nope.png"])
    with pytest.raises(ConfigError, match="at least 1"):
        evaluate.predict(run_dir / "best.keras", [tmp_path / "nope.png"], top_k=0)


def test_grad_cam_highlights_a_map_for_a_conv_model(run_dir, dataset):
    import keras

    image = Path(dataset.root) / dataset.splits["train"][0][0]
    cam = evaluate.grad_cam(run_dir / "best.keras", image)
    if keras.backend.backend() != "tensorflow":
        assert cam is None
        return
    assert cam.ndim == 2 and cam.shape[0] > 1
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    overlay = evaluate.grad_cam_overlay(run_dir / "best.keras", image)
    assert overlay.shape == (16, 16, 3) and overlay.dtype == np.uint8


# --------------------------------------------------------------------------- forgetting


@pytest.fixture(scope="module")
def original(workspace: Path) -> dict:
    """An original model trained on task A (3 classes), and task A's and task B's data."""
    import keras

    from retrain import data
    from retrain.models.modelfile import save_model

    old = write_image_folder(workspace / "old_task", ("red", "green", "blue"), 8)
    new = write_image_folder(workspace / "new_task", ("yellow", "purple"), 8, label_offset=3)
    ds = data.ingest(old, workspace)
    cache = data.load_images(ds, "train", (16, 16), "squash")
    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="original")
    model.compile(keras.optimizers.Adam(0.02), "sparse_categorical_crossentropy")
    model.fit(np.asarray(cache.images), np.asarray(cache.labels), epochs=15, verbose=0)
    path = save_model(
        model,
        workspace / "original.keras",
        {"class_names": list(ds.class_names), "image_size": [16, 16]},
    )
    return {"path": path, "old": old, "new": new}


def _train(original: dict, workspace: Path, run_id: str, **overrides) -> Path:
    from retrain.training.config import TrainConfig
    from retrain.training.train import train

    run_dir = workspace / "runs" / run_id
    settings = {"epochs": 2, "batch_size": 8, "val_split": 0.25, "seed": 0, **overrides}
    config = TrainConfig(
        data=str(original["new"]), base=str(original["path"]), out=str(run_dir), **settings
    )
    summary = train(config, run_dir, workspace=workspace)
    assert summary["state"] == "done"
    return run_dir


def test_forgetting_is_zero_for_a_frozen_base_trained_end_to_end(original, workspace):
    # Head only: phase 2 (on by default) would fine-tune the base, and the old task with it.
    run = _train(original, workspace, "run-frozen", freeze="all", fine_tune_epochs=0)
    result = evaluate.forgetting(str(original["path"]), run, original["old"], workspace)
    assert result["before"] > 0.9
    assert result["after"] == result["before"] and result["drop"] == 0
    assert result["layers_copied"] >= 2 and result["layers_changed"] == 0
    assert "frozen" in result["note"] and "drop 0" in result["note"]
    # The run's own report works on its held-out images too.
    report = evaluate.evaluate_run(run)
    assert report["class_names"] == ["purple", "yellow"]


def test_forgetting_shows_a_drop_for_a_fully_fine_tuned_base(original, workspace):
    run = _train(original, workspace, "run-unfrozen", freeze="none", lr=0.05, epochs=6)
    result = evaluate.forgetting(str(original["path"]), run, original["old"], workspace)
    assert result["layers_changed"] > 0
    assert result["drop"] > 0 and result["after"] < result["before"]
    assert result["drop"] == pytest.approx(result["before"] - result["after"])
    assert "changed in retraining" in result["note"]


def test_forgetting_needs_the_original_tasks_classes(original, workspace, tmp_path):
    run = workspace / "runs" / "run-frozen"
    if not run.is_dir():
        run = _train(original, workspace, "run-frozen", freeze="all")
    with pytest.raises(ConfigError, match="not classes of the model"):
        evaluate.forgetting(str(original["path"]), run, original["new"], workspace)


def test_forgetting_needs_a_run_with_a_model(original, workspace, tmp_path):
    with pytest.raises(RunError, match="no saved model"):
        evaluate.forgetting(str(original["path"]), tmp_path, original["old"], workspace)


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_evaluate_prints_the_report(run_dir, workspace, capsys):
    code, out, err = _cli(
        [
            "evaluate",
            "--model",
            str(run_dir / "best.keras"),
            "--data",
            str(workspace / "data" / "run-eval"),
            "--workspace",
            str(workspace),
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    for key in ("accuracy", "loss", "class_names", "per_class", "macro", "weighted"):
        assert key in report
    assert {"confusion_matrix", "top_k", "misclassified"} <= set(report)


def test_cli_predict_prints_top_k_per_image(run_dir, dataset, capsys):
    image = str(Path(dataset.root) / dataset.splits["train"][0][0])
    code, out, err = _cli(
        ["predict", "--model", str(run_dir / "best.keras"), image, "--top-k", "2"], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert [p["path"] for p in result["predictions"]] == [image]
    assert len(result["predictions"][0]["top_k"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--model", "{tmp}/missing.keras", "--data", "{data}"], "No model file"),
        (["evaluate", "--model", "{model}", "--data", "{zoo}"], "not classes of the model"),
        (["evaluate", "--model", "{model}", "--data", "{tmp}/nothing"], "No data at"),
        (["predict", "--model", "{model}", "{tmp}/missing.png"], "No image at"),
        (["predict", "--model", "{model}", "--top-k", "0", "{tmp}/x.png"], "at least 1"),
        (
            ["forgetting", "--original", "{model}", "--run", "{tmp}", "--data", "{data}"],
            "no saved model",
        ),
        (["export", "--run", "{tmp}", "--format", "keras"], "not a run directory"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message, run_dir, workspace, tmp_path, capsys):
    zoo = write_image_folder(tmp_path / "zoo", ("cat", "zebra"), 2)
    values = {
        "tmp": tmp_path,
        "data": workspace / "data" / "run-eval",
        "model": run_dir / "best.keras",
        "zoo": zoo,
    }
    argv = [a.format(**values) for a in argv] + (
        ["--workspace", str(tmp_path)] if argv[0] in ("evaluate", "forgetting") else []
    )
    code, out, err = _cli(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "retrain", "predict", "--model", str(tmp_path / "m.keras"), "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: No model file") and "Traceback" not in proc.stderr


def test_evaluate_refuses_a_file_that_is_not_a_keras_model_in_one_line(tmp_path):
    import subprocess
    import sys

    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    out = subprocess.run(
        [sys.executable, "-m", "retrain", "evaluate", "--model", str(not_a_model),
         "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: 'notes.txt' is not a .keras model. Use a run's best.keras or model.keras, "
        "or an exported model.keras."
    )


def test_scoring_a_run_uses_its_recorded_split_not_a_recomputed_one(
    original, workspace, monkeypatch
):
    """The validation images are the ones the run recorded when it trained, even when
    `data.stratified_split` would now split differently."""
    from retrain import data
    from retrain.data import splits
    from retrain.runs import rundir

    run = _train(original, workspace, "run-split", freeze="all", epochs=1, fine_tune_epochs=0)
    recorded = rundir.read_split(run)
    assert recorded is not None and recorded["val"]
    dataset = evaluate.run_dataset(run)
    root = Path(dataset.root)

    made_by_training = splits.stratified_split

    def other_split(labels, val_fraction, seed):  # a split training never made
        return made_by_training(labels, val_fraction, seed + 1)

    monkeypatch.setattr(splits, "stratified_split", other_split)
    labels = np.asarray(data.load_images(dataset, "train", (16, 16), "squash").labels)
    now = evaluate.validation_indices(dataset, rundir.read_config(run), labels)
    cache_paths = data.load_images(dataset, "train", (16, 16), "squash").paths
    assert sorted(cache_paths[i] for i in now) != sorted(recorded["val"])  # it would differ

    report = evaluate.evaluate_run(run)
    scored = sorted(Path(p["path"]).relative_to(root).as_posix() for p in report["predictions"])
    assert scored == sorted(recorded["val"])
    assert report["num_images"] == len(recorded["val"])


def test_runs_without_a_recorded_split_fall_back_to_the_seeded_split(original, workspace):
    from retrain.runs import rundir

    run = workspace / "runs" / "run-split"
    if not run.is_dir():
        run = _train(original, workspace, "run-split", freeze="all", epochs=1, fine_tune_epochs=0)
    recorded = rundir.read_split(run)
    (run / rundir.SPLIT_FILE).unlink()  # a run written before runs recorded their split
    try:
        report = evaluate.evaluate_run(run)
        root = Path(evaluate.run_dataset(run).root)
        scored = sorted(Path(p["path"]).relative_to(root).as_posix() for p in report["predictions"])
        assert scored == sorted(recorded["val"])  # same seed, same split as training made
    finally:
        rundir.write_split(run, recorded["train"], recorded["val"])
