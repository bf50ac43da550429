"""Keep what it knew: class naming, head extension, forgetting for any model, the keep-old mode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from retrain import models
from retrain.errors import ModelError
from retrain.training import keep

OLD = ("ant", "bee", "cat", "dog", "eel")  # sorted, as image_dataset_from_directory labels them


def save_plain_cnn(path: Path, num_classes: int = 5, size: int = 16, head: bool = True) -> Path:
    """A plain Keras CNN saved with model.save: no class names inside, no labels.txt."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if head:
        x = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, x, name="plain_cnn")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory: pytest.TempPathFactory) -> models.BaseModel:
    path = save_plain_cnn(tmp_path_factory.mktemp("plain") / "plain.keras")
    return models.load_base(str(path))


# --------------------------------------------------------------------------------------
# original_class_names


def test_names_from_sorted_folders_when_the_model_carries_none(plain_base):
    assert plain_base.class_names is None
    names, rule = models.original_class_names(plain_base, ["eel", "ant", "dog", "cat", "bee"])
    assert (names, rule) == (list(OLD), "folders")


def test_flag_names_outputs_in_given_order_and_wins(plain_base):
    names, rule = models.original_class_names(plain_base, ["a", "b"], "e, d,c,b,a")
    assert (names, rule) == (["e", "d", "c", "b", "a"], "flag")
    names, rule = models.original_class_names(plain_base, None, ["v", "w", "x", "y", "z"])
    assert (names, rule) == (["v", "w", "x", "y", "z"], "flag")


def test_names_the_model_carries(keras_cache):
    base = models.load_base("builtin:digits-cnn")
    names, rule = models.original_class_names(base, ["zzz"])
    assert rule == "model"
    assert names == [f"digit {d}" for d in range(5)]


@pytest.mark.parametrize(
    ("folders", "flag", "match"),
    [
        (None, "a,b,c", r"names 3 classes but 'plain.keras' has 5 outputs; pass 5 names"),
        (None, "a,b,,c,d", "empty or repeated names"),
        (None, "a,a,b,c,d", "empty or repeated names"),
        (["a", "b", "c"], None, r"old data has 3 class folders for its 5 outputs; pass "),
        (None, None, r"carries no class names for its 5 outputs; pass --original-classes"),
    ],
)
def test_count_mismatch_is_one_line_that_says_what_to_pass(plain_base, folders, flag, match):
    with pytest.raises(ModelError, match=match) as info:
        models.original_class_names(plain_base, folders, flag)
    assert "\n" not in str(info.value)


def test_a_model_without_a_classifier_head_has_no_original_classes(tmp_path):
    base = models.load_base(str(save_plain_cnn(tmp_path / "nohead.keras", head=False)))
    with pytest.raises(ModelError, match="has no classifier head"):
        models.original_class_names(base, list(OLD), None)


def test_describe_reads_original_classes(plain_base, capsys):
    import json

    from retrain.__main__ import main

    code = main(["describe", plain_base.spec, "--original-classes", "v,w,x,y,z"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["class_names"] == ["v", "w", "x", "y", "z"]
    assert out["class_names_rule"] == "flag"


# --------------------------------------------------------------------------------------
# surgery.extend_head


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_merged_classes_old_first_and_a_known_name_is_the_same_class():
    from retrain.models.surgery import merged_classes

    assert merged_classes(["b", "a"], ["c", "a", "d"]) == ["b", "a", "c", "d"]


@pytest.mark.parametrize("which", ["plain", "builtin"])
def test_extended_head_predicts_the_old_task_exactly_as_before(which, plain_base, keras_cache):
    from retrain.models import preprocessing
    from retrain.models.surgery import extend_head

    base = plain_base if which == "plain" else models.load_base("builtin:digits-cnn")
    old, _ = models.original_class_names(base, list(OLD))
    size = base.input_size[0]
    surgery = extend_head(base, old, ["fox", old[1], "gnu"])
    assert surgery.class_names == [*old, "fox", "gnu"]
    assert surgery.diff["new_classes"] == ["fox", "gnu"]
    assert surgery.model.output_shape[-1] == 7

    x = _images(64, size)
    original = base.model
    if "int" not in str(original.inputs[0].dtype):
        original = preprocessing.with_preprocessing(original, base.preprocessing)
    want = np.asarray(original.predict(x, verbose=0), dtype=np.float64)
    got = np.asarray(surgery.model.predict(x, verbose=0), dtype=np.float64)
    # The same argmax over all 7 outputs, and the old outputs' probabilities in proportion.
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    old_part = got[:, :5] / got[:, :5].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(old_part, want, atol=1e-5)
    # Old rows copied, new rows not (they start from the old rows' mean, lower bias).
    kernel, bias = surgery.head.layers[-1].get_weights()
    k0, b0 = [layer for layer in base.model.layers if layer.weights][-1].get_weights()
    np.testing.assert_array_equal(kernel[:, :5], k0)
    np.testing.assert_array_equal(bias[:5], b0)
    assert (bias[5:] < b0.mean()).all()
    # The whole new model trains only its head with the base frozen, like replace_head.
    assert surgery.head.trainable and all(
        not layer.trainable for layer in surgery.features.layers if layer.weights
    )


def test_extend_head_refuses_a_model_without_a_classifier_head(tmp_path):
    from retrain.models.surgery import extend_head

    base = models.load_base(str(save_plain_cnn(tmp_path / "nohead.keras", head=False)))
    with pytest.raises(ModelError, match="has no classifier head to keep") as info:
        extend_head(base, [], ["x", "y"])
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------
# keep: rehearsal memory, distillation


def test_rehearsal_memory_is_seeded_and_per_class():
    from retrain.training.keep import rehearsal_memory

    labels = np.repeat(np.arange(3), [50, 30, 4])
    candidates = np.arange(len(labels))[::2]  # only even positions may be remembered
    a = rehearsal_memory(labels, candidates, 10, seed=7)
    assert np.array_equal(a, rehearsal_memory(labels, candidates, 10, seed=7))
    assert not np.array_equal(a, rehearsal_memory(labels, candidates, 10, seed=8))
    assert np.bincount(labels[a]).tolist() == [10, 10, 2]  # class 2 has only 2 candidates
    assert set(a) <= set(candidates)


def _np_distillation(y_true, p, n_old, t, w):
    label, targets = y_true[:, 0].astype(int), y_true[:, 1:]
    ce = -np.log(p[np.arange(len(p)), label])
    z = np.log(p[:, :n_old]) / t
    log_s = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    kl = (targets * (np.log(targets) - log_s)).sum(axis=1)
    return ce + w * t * t * kl


def test_distillation_loss_is_ce_plus_w_t2_kl_on_the_softened_old_outputs():
    from keras import ops

    from retrain.training import keep

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    teacher = rng.dirichlet(np.ones(3), size=6)
    soft = keep.soften(teacher, 3, 2.0)
    y_true = keep.pack_targets(np.array([0, 1, 2, 3, 4, 0]), soft)
    loss = keep.distillation_loss(3, 2.0, 0.5)
    got = np.asarray(ops.convert_to_numpy(loss(y_true, p.astype("float32"))))
    np.testing.assert_allclose(got, _np_distillation(y_true, p, 3, 2.0, 0.5), rtol=1e-4)
    # A student that reproduces the teacher's old outputs pays only the cross-entropy.
    same = np.concatenate([teacher * 0.9, np.full((6, 2), 0.05)], axis=1)
    matched = keep.pack_targets(np.zeros(6), keep.soften(same, 3, 2.0))
    got = np.asarray(ops.convert_to_numpy(loss(matched, same.astype("float32"))))
    np.testing.assert_allclose(got, -np.log(same[:, 0]), rtol=1e-4)
    # soften(p) of the old columns is softmax(logits / T): the new columns do not matter.
    z = logits[:, :3] / 2.0
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(keep.soften(p, 3, 2.0), want, rtol=1e-5)
    acc = ops.convert_to_numpy(keep.packed_accuracy(y_true, p.astype("float32")))
    np.testing.assert_array_equal(acc, (p.argmax(axis=1) == y_true[:, 0]).astype("float32"))


def test_stacked_rows_read_across_parts_without_copying():
    from retrain.training.keep import StackedRows

    a = np.arange(12).reshape(6, 2)
    b = 100 + np.arange(6).reshape(3, 2)
    both = StackedRows(a, b)
    assert len(both) == 9 and both.shape == (9, 2)
    np.testing.assert_array_equal(both[np.array([0, 5, 6, 8])], np.stack([a[0], a[5], b[0], b[2]]))
    np.testing.assert_array_equal(both[4:8], np.concatenate([a, b])[4:8])


# --------------------------------------------------------------------------------------
# End to end through the CLI: a model without class names, and the starter model


#: kind -> (colour, horizontal stripes): 0-4 the old task, 5-6 new kinds.
KINDS = {
    0: ((220, 40, 40), False),
    1: ((40, 200, 60), False),
    2: ((40, 60, 220), False),
    3: ((200, 200, 40), False),
    4: ((220, 40, 40), True),
    5: ((210, 40, 210), False),
    6: ((40, 210, 210), False),
}


def _shape_image(kind: int, i: int, size: int = 16) -> np.ndarray:
    """A learnable image of one kind: its colour and stripe direction, plus noise."""
    rng = np.random.default_rng(kind * 1000 + i)
    colour, horizontal = KINDS[kind]
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = colour
    stripes = np.arange(size) % 6 < 3
    if horizontal:
        image[stripes, :, :] //= 3
    else:
        image[:, stripes, :] //= 3
    return np.clip(image + rng.integers(0, 25, image.shape), 0, 255).astype(np.uint8)


def _folder(root: Path, kinds: dict[str, int], per_class: int, start: int = 0) -> Path:
    from PIL import Image

    for name, kind in kinds.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.fromarray(_shape_image(kind, i)).save(root / name / f"{i}.png")
    return root


OLD_KINDS = {"ant": 0, "bee": 1, "cat": 2, "dog": 3, "eel": 4}
NEW_KINDS = {"fox": 5, "gnu": 6, "cat": 2}  # "cat" is an old class: its images join it


@pytest.fixture(scope="module")
def plain_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain Keras CNN trained on 5 sorted class folders (labels as
    image_dataset_from_directory gives them), saved with model.save: no class names inside."""
    import keras

    root = tmp_path_factory.mktemp("plain_task")
    old = _folder(root / "old", OLD_KINDS, 20)
    new = _folder(root / "new", NEW_KINDS, 20, start=100)
    both = _folder(_folder(root / "both", OLD_KINDS, 4, start=200), NEW_KINDS, 4, start=300)
    x = np.stack([_shape_image(k, i) for k in range(5) for i in range(20)])
    y = np.repeat(np.arange(5), 20)  # sorted folder names -> 0..4
    path = save_plain_cnn(root / "plain.keras")
    model = keras.saving.load_model(path)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x.astype("float32"), y, epochs=25, batch_size=16, verbose=0)
    model.save(path)
    return {"model": path, "old": old, "new": new, "both": both, "root": root}


def test_keep_old_classes_end_to_end_on_a_model_without_class_names(
    plain_task, tmp_path, monkeypatch
):
    from retrain.runs import rundir
    from retrain.training import callbacks

    ws, run = tmp_path / "ws", tmp_path / "ws" / "runs" / "keep-plain"
    # Stop after the first epoch (as a person pressing Stop would), then resume.
    scored = callbacks.TaskAccuracy.on_epoch_end

    def stop_after_first(self, epoch, logs=None):
        scored(self, epoch, logs)
        if epoch == 0:
            rundir.request_stop(run)

    monkeypatch.setattr(callbacks.TaskAccuracy, "on_epoch_end", stop_after_first)
    code, summary, err = run_main("train", "--data", plain_task["new"], "--base", plain_task["model"],
        "--out", run, "--keep-old-classes", "--old-data", plain_task["old"],
        "--rehearsal-per-class", 6, "--epochs", 8, "--batch-size", 8, "--lr", 0.01,
        # every epoch once, no phase 2, best.keras = an epoch as scored (defaults: elsewhere)
        "--early-stopping", 0, "--fine-tune-epochs", 0, "--bias-correction", "none",
        "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    assert summary["stopped"] and summary["epochs_done"] < 8
    merged = [*OLD_KINDS, "fox", "gnu"]  # old first in output order, "cat" not repeated
    assert summary["class_names"] == merged
    record = rundir.read_old_task(run)
    assert record["class_names_rule"] == "folders"
    assert record["original_classes"] == list(OLD_KINDS)
    assert len(record["memory"]) == 5 * 6 and record["val"]
    assert not set(record["memory"]) & set(record["val"])
    monkeypatch.setattr(callbacks.TaskAccuracy, "on_epoch_end", scored)

    code, status, err = run_main("status", run)
    assert code == 0 and status["state"] == "done" and status["stopped"]
    code, summary, err = run_main("train", "--resume", run, "--workspace", ws)
    assert code == 0, err
    rows = rundir.read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert all(0 <= r["old_val_accuracy"] <= 1 and 0 <= r["new_val_accuracy"] <= 1 for r in rows)
    assert rundir.read_old_task(run)["memory"] == record["memory"]  # the same memory
    assert rows[-1]["old_val_accuracy"] >= 0.8, rows[-1]
    assert rows[-1]["new_val_accuracy"] >= 0.8, rows[-1]

    # the run's own report: the new held-out images and the old ones, as val_accuracy was
    from retrain import evaluate

    report = evaluate.evaluate_run(run, include_predictions=False)
    assert report["old_images"] == len(record["val"])
    assert report["num_images"] == len(rundir.read_split(run)["val"]) + len(record["val"])
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert report["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)

    # evaluate on a folder holding old and new class folders: every class by name
    code, report, err = run_main("evaluate", "--model", run / "best.keras", "--data", plain_task["both"],
        "--split", "all", "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    assert report["class_names"] == merged
    assert set(report["per_class"]) == set(merged)
    assert report["accuracy"] >= 0.8

    # forgetting: the retrained model itself on the old images, named by the sorted folders
    code, forgot, err = run_main("forgetting", "--original", plain_task["model"], "--run", run,
        "--data", plain_task["old"], "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    assert forgot["method"] == "retrained-model" and forgot["class_names_rule"] == "folders"
    assert forgot["split"] == "held out by the run"
    assert forgot["num_images"] == len(record["val"])
    assert set(forgot["per_class"]) == set(OLD_KINDS)
    assert forgot["drop"] == pytest.approx(forgot["before"] - forgot["after"])
    assert forgot["before"] >= 0.8 and forgot["drop"] <= 0.2

    code, exported, err = run_main("export", "--run", run, "--format", "labels", "--format", "card")
    assert code == 0, err
    export_dir = Path(exported["files"][0]).parent
    assert (export_dir / "labels.txt").read_text().splitlines() == merged
    card = (export_dir / "MODEL_CARD.md").read_text()
    assert "add classes, keep the old ones" in card
    assert "accuracy on the old classes' held-out images" in card


def _digits_subset(root: Path, digits: str, per_class: int) -> Path:
    """``per_class`` sample digits per class as PNG class folders ("digit 5", ...)."""
    from PIL import Image

    from retrain.data.sample import digit_images

    images, labels, names = digit_images(digits)
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index]).save(root / name / f"{i:03d}.png")
    return root


def test_keep_old_classes_on_the_starter_model_rehearsal_and_distillation(keras_cache, tmp_path):
    from retrain.runs import rundir

    old = _digits_subset(tmp_path / "old", "0-4", 40)
    new = _digits_subset(tmp_path / "new", "5-9", 40)
    both = _digits_subset(_digits_subset(tmp_path / "both", "0-4", 8), "5-9", 8)
    ws = tmp_path / "ws"
    names = [f"digit {d}" for d in range(10)]
    runs = {}
    for mode, extra in (("rehearsal", ["--old-data", old]), ("distillation", [])):
        run = ws / "runs" / mode
        code, summary, err = run_main("train", "--data", new, "--base", "builtin:digits-cnn", "--out", run,
            "--keep-old-classes", *extra, "--epochs", 8, "--lr", 0.01, "--workspace", ws,
            "--fine-tune-epochs", 0,  # head only, to stay fast
        )  # fmt: skip
        assert code == 0, err
        assert summary["class_names"] == names  # the model's own names first, then the new
        runs[mode] = run
    record = rundir.read_old_task(runs["rehearsal"])
    assert record["class_names_rule"] == "model" and len(record["memory"]) == 5 * 20
    rows = rundir.read_metrics(runs["rehearsal"])
    assert rows[-1]["old_val_accuracy"] >= 0.8 and rows[-1]["new_val_accuracy"] >= 0.6, rows[-1]
    # Without old data: distillation, no old held-out images, only the new task is scored.
    record = rundir.read_old_task(runs["distillation"])
    assert record["distill_weight"] == 1.0 and "memory" not in record
    rows = rundir.read_metrics(runs["distillation"])
    assert "old_val_accuracy" not in rows[-1] and rows[-1]["new_val_accuracy"] >= 0.6

    code, report, err = run_main("evaluate", "--model", runs["rehearsal"] / "model.keras", "--data", both,
        "--split", "all", "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    assert report["class_names"] == names and set(report["per_class"]) == set(names)
    forgot = {}
    for mode, run in runs.items():
        code, forgot[mode], err = run_main("forgetting", "--original", "builtin:digits-cnn", "--run", run,
            "--data", old, "--workspace", ws,
        )  # fmt: skip
        assert code == 0, err
        assert forgot[mode]["method"] == "retrained-model"
        assert forgot[mode]["class_names_rule"] == "model"
    assert forgot["rehearsal"]["split"] == "held out by the run"
    assert forgot["distillation"]["num_images"] == 5 * 40  # not its old data: all of it
    # Rehearsal keeps the old task; distillation alone does not hold up as well.
    assert forgot["rehearsal"]["drop"] <= 0.15
    assert forgot["rehearsal"]["after"] > forgot["distillation"]["after"]

    code, exported, err = run_main("export", "--run", runs["rehearsal"], "--format", "keras", "--format", "labels",
        "--format", "card",
    )  # fmt: skip
    assert code == 0, err
    assert all(test["ok"] for test in exported["self_test"].values()), exported["self_test"]
    export_dir = Path(exported["files"][0]).parent
    assert (export_dir / "labels.txt").read_text().splitlines() == names
    card = (export_dir / "MODEL_CARD.md").read_text()
    assert "rehearsal: 100 old images (20 per class" in card


def test_keep_mode_defaults_on_a_small_case(plain_task, tmp_path):
    """No --lr, --epochs or method flags: the rate is found, rehearsal and distillation work
    together, phase 2 fine-tunes within its budget and early stopping keeps the best epoch."""
    from retrain.runs import rundir

    ws, run = tmp_path / "ws", tmp_path / "ws" / "runs" / "keep-defaults"
    code, summary, err = run_main("train", "--data", plain_task["new"], "--base", plain_task["model"],
        "--out", run, "--keep-old-classes", "--old-data", plain_task["old"],
        "--batch-size", 8, "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    found = rundir.read_lr_find(run)
    assert summary["lr"] == found["lr"] and 1e-4 <= found["lr"] <= 0.1
    record = rundir.read_old_task(run)
    # 20 per class is the memory's budget; 20% of the 20 old images per class are held out.
    assert record["distill_weight"] == 1.0 and len(record["memory"]) == 5 * 16
    assert "bias_correction" not in record and summary["bias_correction"] is None
    rows = rundir.read_metrics(run)
    budget = 30 + 15  # phase 1's 30 epochs, then the automatic phase-2 budget
    assert summary["epochs_budget"] == budget and len(rows) <= budget
    assert summary["fine_tune_lr"] == pytest.approx(summary["lr"] / 10)
    kept = summary["restored_epoch"]
    assert kept == min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert rows[kept - 1]["old_val_accuracy"] >= 0.9 and rows[kept - 1]["new_val_accuracy"] >= 0.9

    code, forgot, err = run_main("forgetting", "--original", plain_task["model"], "--run", run,
        "--data", plain_task["old"], "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    assert forgot["after"] >= 0.9 and forgot["drop"] <= 0.05, forgot
    code, report, err = run_main("evaluate", "--model", run / "best.keras", "--data", plain_task["both"],
        "--split", "all", "--workspace", ws,
    )  # fmt: skip
    assert code == 0, err
    assert report["accuracy"] >= 0.9, report["per_class"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--original-classes", "a,b,c"], r"names 3 classes but 'plain.keras' has 5 outputs"),
        (["--old-data", "{wrong}"], r"the old data has 3 class folders for its 5 outputs; pass"),
        (
            ["--old-data", "{wrong}", "--original-classes", ",".join(OLD_KINDS)],
            r"Old data class folders 'fox', 'gnu' are not",
        ),
        (["--cut-at", "conv1"], r"--cut-at does not apply with --keep-old-classes"),
    ],
)
def test_keep_old_classes_bad_input_is_one_line(plain_task, tmp_path, argv, match):
    wrong = _folder(tmp_path / "wrong", {"ant": 0, "fox": 5, "gnu": 6}, 3)
    argv = [a.replace("{wrong}", str(wrong)) for a in argv]
    code, _, err = run_main("train", "--data", plain_task["new"], "--base", plain_task["model"],
        "--out", tmp_path / "run", "--keep-old-classes", *argv, "--workspace", tmp_path / "ws",
    )  # fmt: skip
    assert code == 2
    assert re.search(match, err), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_keep_old_classes_on_a_model_without_a_classifier_head_is_one_line(plain_task, tmp_path):
    headless = save_plain_cnn(tmp_path / "features.keras", head=False)
    code, _, err = run_main("train", "--data", plain_task["new"], "--base", headless, "--out",
        tmp_path / "run", "--keep-old-classes", "--workspace", tmp_path / "ws",
    )  # fmt: skip
    assert code == 2
    assert "has no classifier head" in err and err.count("\n") == 1


def test_keep_old_classes_trains_on_jax_too(plain_task, tmp_path):
    """The distillation loss and the per-task scores use keras.ops only: the JAX backend runs
    a keep-old run (rehearsal and distillation together) end to end."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (make test-backends installs it)")
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-m", "retrain", "train", "--data", str(plain_task["new"]),
         "--base", str(plain_task["model"]), "--out", str(run), "--keep-old-classes",
         "--old-data", str(plain_task["old"]), "--distill-weight", "1", "--epochs", "2",
         "--fine-tune-epochs", "0", "--batch-size", "8", "--workspace", str(tmp_path / "ws")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["backend"] == "jax" and summary["epochs_done"] == 2
    assert "old_val_accuracy" in summary["final"] and "new_val_accuracy" in summary["final"]


# --------------------------------------------------------------------------------------
# Pages (AppTest)


def test_model_page_adds_classes_and_train_page_carries_the_choice(keras_cache, tmp_path):
    from streamlit.testing.v1 import AppTest

    from retrain.data import ingest

    root = Path(__file__).resolve().parents[1]
    new = _digits_subset(tmp_path / "new", "5-9", 6)
    ws = tmp_path / "ws"
    manifest = str(ingest(new, ws).manifest_path)
    at = AppTest.from_file(str(root / "pages" / "model.py"), default_timeout=120)
    at.session_state["dataset"] = manifest
    at.run()
    assert not at.exception, at.exception
    at.radio(key="head_mode").set_value("keep").run()
    # The built-in digits by default, where they are offered: rehearsal keeps the old task.
    assert at.radio(key="model_old_source").value == "sample"
    at.radio(key="model_old_source").set_value("sample").run()
    assert not at.exception, at.exception
    surgery = at.session_state["surgery"]
    assert surgery["keep_old_classes"] is True and surgery["cut_at"] is None
    assert surgery["old_data"].endswith("digits-0-1-2-3-4")
    outputs = next(d.value for d in at.dataframe if "after" in d.value.columns)
    assert list(outputs["class"]) == [f"digit {d}" for d in range(10)]
    assert list(outputs["after"]) == ["kept"] * 5 + ["new"] * 5
    assert any("10 units" in m.value for m in at.markdown)
    assert any("'predictions' widened from 5 to 10 units" in m.value for m in at.markdown)
    assert not any("**Removed**" in m.value for m in at.markdown)  # nothing is removed

    def page_after(name: str) -> AppTest:  # another page of the same session
        page = AppTest.from_file(str(root / "pages" / name), default_timeout=120)
        for key in ("workspace", "dataset", "base", "surgery"):
            page.session_state[key] = at.session_state[key]
        return page.run()

    train = page_after("train.py")
    assert not train.exception, train.exception
    assert train.radio(key="train_old_source").value == "sample"
    assert train.number_input(key="rehearsal_per_class").value == 20
    assert any("original head kept" in c.value for c in train.caption)

    # "None" chosen by hand is what a later visit starts from, not the built-in default.
    at.radio(key="model_old_source").set_value("none").run()
    assert at.session_state["surgery"]["old_data"] is None
    again = page_after("model.py")
    assert not again.exception, again.exception
    assert again.radio(key="head_mode").value == "keep"
    assert again.radio(key="model_old_source").value == "none"


def test_weight_aligning_scales_the_new_rows_to_the_old_rows_mean_norm():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 5)).astype(np.float32)
    kernel[:, 3:] *= 3.0  # the new outputs (last 2) grew larger
    bias = np.array([0.1, 0.2, 0.3, 1.0, 2.0], np.float32)
    aligned, new_bias, gamma = keep.weight_aligned(kernel, bias, n_old=3)
    norms = np.linalg.norm(aligned, axis=0)
    assert norms[3:].mean() == pytest.approx(norms[:3].mean(), rel=1e-5)
    assert gamma < 1 and np.allclose(aligned[:, :3], kernel[:, :3])
    assert np.allclose(new_bias, [0.1, 0.2, 0.3, gamma * 1.0, gamma * 2.0])


def test_bias_layer_undoes_a_known_lean_toward_the_new_classes():
    rng = np.random.default_rng(0)
    n, n_old, classes = 400, 3, 5
    labels = rng.integers(0, classes, size=n)
    fair = rng.normal(0, 1, size=(n, classes))
    fair[np.arange(n), labels] += 3.0  # a fair classifier's logits
    leaning = fair.copy()
    leaning[:, n_old:] = 1.5 * fair[:, n_old:] + 2.0  # the new outputs lean up
    alpha, beta = keep.fit_bias_layer(leaning, labels, n_old)
    corrected = leaning.copy()
    corrected[:, n_old:] = alpha * leaning[:, n_old:] + beta
    old = labels < n_old
    before = (leaning.argmax(1) == labels)[old].mean()
    after = (corrected.argmax(1) == labels)[old].mean()
    assert after > before + 0.2 and after >= (fair.argmax(1) == labels)[old].mean() - 0.05
    kernel, bias = keep.bias_layer_applied(np.eye(classes), np.zeros(classes), n_old, alpha, beta)
    assert np.allclose(np.diag(kernel), [1, 1, 1, alpha, alpha]) and bias[3] == beta
    rows = keep.balanced_rows(np.array([0, 0, 0, 1, 1, 2]), np.arange(6), seed=0)
    assert np.bincount(np.array([0, 0, 0, 1, 1, 2])[rows]).tolist() == [1, 1, 1]


@pytest.mark.parametrize("method", ["bic", "weight-aligning"])
def test_bias_correction_edits_the_saved_model_and_is_recorded(plain_task, tmp_path, method):
    from retrain.models import modelfile
    from retrain.runs import rundir
    from retrain.training.config import TrainConfig
    from retrain.training.train import train

    run = tmp_path / "run"
    config = TrainConfig(
        data=str(plain_task["new"]), base=str(plain_task["model"]), out=str(run),
        keep_old_classes=True, old_data=str(plain_task["old"]), epochs=2, lr=0.01,
        batch_size=8, fine_tune_epochs=0, bias_correction=method,
    )  # fmt: skip
    summary = train(config, run, workspace=tmp_path / "ws")
    record = rundir.read_old_task(run)["bias_correction"]
    assert summary["bias_correction"] == record and record["method"] == method
    assert ("alpha" in record) if method == "bic" else ("gamma" in record)
    best, _ = modelfile.load_model(run / "best.keras")
    final, _ = modelfile.load_model(run / "model.keras")
    for a, b in zip(best.get_weights(), final.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # best.keras is the corrected model too
    assert modelfile.read_metadata(run / "model.keras")["bias_correction"] == record
    status = rundir.read_status_file(run)  # the page says whose epoch the corrected model is
    assert status["bias_corrected"] is True
    assert status["saved_epoch"] == modelfile.read_metadata(run / "best.keras")["epoch"]
    from retrain.export.export import model_card

    card = model_card(run, modelfile.read_metadata(run / "best.keras"))
    assert f"- exported: the model of epoch {status['saved_epoch']}, val accuracy " in card
    assert "measured before the old classes' bias correction" in card
