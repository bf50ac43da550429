"""retrain.training.train: the config, the callbacks, the feature cache, and real runs through
the CLI.

No ``tf.*`` here: the file also runs with ``KERAS_BACKEND=jax`` (``make test-backends``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrain.errors import ConfigError
from retrain.runs import rundir
from retrain.training import callbacks
from retrain.training import train as train_module
from retrain.training.config import TrainConfig, config_from_args, config_to_args

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN for 32x32 images saved as .keras: rescaling inside, a 3-class head."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    path = tmp_path_factory.mktemp("base") / "tiny.keras"
    keras.Model(inputs, outputs, name="tiny").save(path)
    return path


# ---------------------------------------------------------------------------- config


def test_config_round_trips_through_json_and_cli_flags():
    from retrain.__main__ import build_parser

    config = TrainConfig(
        data="d.zip",
        base="builtin:digits-cnn",
        out="runs/r1",
        epochs=3,
        lr=5e-4,
        image_size=96,
        augment=True,
        freeze="top:4",
        fine_tune_epochs=2,
        fine_tune_lr=1e-5,
        cache_features="off",
        mixed_precision="auto",
        cut_at="conv2",
    )
    assert TrainConfig.from_json(config.to_json()) == config
    # config.json holds extra keys beside the fields; they are ignored.
    assert TrainConfig.from_json({**config.to_dict(), "dataset_id": "abc"}) == config
    args = build_parser().parse_args(["train", *config_to_args(config)])
    assert config_from_args(args) == config
    assert config.effective_fine_tune_lr == 1e-5
    assert TrainConfig(data="d", base="b", lr=1e-3).effective_fine_tune_lr == pytest.approx(1e-4)
    # --lr auto (the default): phase 2 derives from the rate the range test finds.
    auto = TrainConfig(data="d", base="b")
    assert auto.lr is None and auto.lr_is_auto and auto.effective_fine_tune_lr is None
    assert auto.fine_tune_lr_for(0.02) == pytest.approx(0.002)
    args = build_parser().parse_args(["train", "--data", "d", "--base", "b", "--out", "o"])
    args.lr = "AUTO"
    assert config_from_args(args).lr is None
    args.lr = "0.01"
    assert config_from_args(args).lr == 0.01
    args.lr = "fast"
    with pytest.raises(ConfigError, match="--lr must be a number or auto, got 'fast'"):
        config_from_args(args)


def test_config_defaults_are_the_documented_ones():
    c = TrainConfig()
    # The epochs are a budget: early stopping (patience 5, best epoch restored) ends most runs.
    assert (c.epochs, c.batch_size, c.lr, c.optimizer) == (30, 32, None, "adam")
    # Phase 2 (kept only where it beats phase 1) follows a frozen-base head by default.
    assert (c.early_stopping, c.fine_tune_epochs) == (5, 15)
    assert TrainConfig(freeze="none").fine_tune_epochs == 0  # phase 1 already trains the base
    assert TrainConfig(freeze="top:3").fine_tune_epochs == 0
    assert TrainConfig(fine_tune_epochs=0).fine_tune_epochs == 0  # a 0 that was asked for
    # Keep mode with old data: rehearsal + distillation, a phase-2 budget.
    keep = TrainConfig(keep_old_classes=True, old_data="old.zip")
    assert (keep.fine_tune_epochs, keep.distill_weight, keep.bias_correction) == (
        15,
        None,  # = keep.DEFAULT_DISTILL_WEIGHT (1), with or without old data
        "none",  # measured: class-balanced rehearsal needs no post-hoc correction
    )
    assert TrainConfig(keep_old_classes=True).fine_tune_epochs == 0  # distillation only
    assert (c.freeze, c.cache_features, c.mixed_precision, c.val_split) == (
        "all",
        "auto",
        "off",
        0.2,
    )
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f"{f.name} has no help text"


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"epochs": 0}, "--epochs must be between 1"),
        ({"optimizer": "adagrad"}, "--optimizer 'adagrad' is not one of"),
        ({"cache_features": "maybe"}, "--cache-features 'maybe'"),
        ({"freeze": "half"}, "--freeze 'half' is not understood"),
        ({"val_split": 0.95}, "--val-split must be between 0 and 0.9"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
    ],
)
def test_config_rejects_bad_values_with_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig(data="d", base="b", **values)
    assert "\n" not in str(err.value)


def test_config_from_args_requires_data_base_out():
    from retrain.__main__ import build_parser

    args = build_parser().parse_args(["train", "--base", "b", "--out", "o"])
    with pytest.raises(ConfigError, match="--data is required"):
        config_from_args(args)
    args = build_parser().parse_args(["train", "--data", "d", "--base", "b", "--out", "o"])
    args.epochs = "ten"
    with pytest.raises(ConfigError, match="--epochs must be a whole number, got 'ten'"):
        config_from_args(args)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    out = _cli("train", "--data", "x", "--base", "y", "--out", str(tmp_path), "--epochs", "-3")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --epochs must be between 1")
    out = _cli("train", "--data", "x", "--base", "y", "--out", str(tmp_path), "--lr", "fast")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --lr must be a number or auto, got 'fast'. Example: --lr 0.001 or --lr auto"
    ]


def test_importing_train_and_jobs_does_not_import_keras():
    code = (
        "import sys, retrain.training.train, retrain.runs.jobs\n"
        "print(','.join(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", ["train.py", "features.py"])
def test_train_source_uses_no_tensorflow_api(name):
    import ast

    tree = ast.parse((ROOT / "retrain" / "training" / name).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "tensorflow" not in imported and "tf" not in names


# ---------------------------------------------------------------------------- callbacks


def _toy(n: int = 40, features: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = (rng.normal(size=(n, features)) + y[:, None] * 2).astype(np.float32)
    return x, y.astype(np.int32)


def _toy_model(lr: float = 1e-2):
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(
        keras.optimizers.SGD(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


class _BatchCounter:
    def __new__(cls):
        import keras

        class Counter(keras.callbacks.Callback):
            batches = 0

            def on_train_batch_end(self, batch, logs=None):
                Counter.batches += 1

        return Counter()


def test_metrics_and_progress_writers_write_one_line_per_epoch(tmp_path):
    x, y = _toy()
    state = callbacks.RunState(tmp_path, total_epochs=3)
    data = callbacks.ArrayDataset(x, y, np.arange(32), 8, shuffle=True, seed=3)
    val = callbacks.ArrayDataset(x, y, np.arange(32, 40), 8)
    model = _toy_model()
    model.fit(
        data,
        validation_data=val,
        epochs=3,
        verbose=0,
        callbacks=[
            callbacks.RunMonitor(state, 1, len(data), 8, interval=0.0),
            callbacks.MetricsWriter(state, 1, 32),
        ],
    )
    rows = rundir.read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    keys = {"epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    for row in rows:
        assert keys | {"images_per_second"} <= row.keys()
        assert row["phase"] == 1 and row["lr"] == pytest.approx(1e-2)
        assert 0 <= row["val_accuracy"] <= 1 and row["images_per_second"] > 0
    progress = rundir.read_progress(tmp_path)
    assert progress["epoch"] == 3 and progress["epochs"] == 3
    assert progress["batch"] == progress["batches"] == 4
    assert progress["eta_seconds"] == 0


def test_progress_is_written_mid_epoch_with_an_eta(tmp_path):
    import keras

    x, y = _toy(80)
    state = callbacks.RunState(tmp_path, total_epochs=2)
    seen: list[dict] = []

    class Peek(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(rundir.read_progress(tmp_path))

    data = callbacks.ArrayDataset(x, y, np.arange(80), 8)
    _toy_model().fit(
        data,
        epochs=1,
        verbose=0,
        callbacks=[callbacks.RunMonitor(state, 1, len(data), 8, interval=0.0), Peek()],
    )
    assert [p["batch"] for p in seen] == list(range(1, 11))
    assert seen[4]["eta_seconds"] > 0 and seen[4]["batches"] == 10 and seen[4]["epochs"] == 2


def test_stop_request_is_honoured_at_the_next_batch(tmp_path):
    x, y = _toy(80)
    rundir.write_status(tmp_path, "running")
    rundir.request_stop(tmp_path)
    state = callbacks.RunState(tmp_path, total_epochs=5)
    counter = _BatchCounter()
    data = callbacks.ArrayDataset(x, y, np.arange(80), 8)
    _toy_model().fit(
        data,
        epochs=5,
        verbose=0,
        callbacks=[
            callbacks.RunMonitor(state),
            counter,
            callbacks.MetricsWriter(state, 1, 80),
        ],
    )
    assert state.stopped and type(counter).batches == 1  # 1 of 50 batches ran
    status = rundir.read_status_file(tmp_path)
    assert status["state"] == "stopping"
    rows = rundir.read_metrics(tmp_path)
    assert len(rows) == 1 and rows[0]["partial"] is True


def test_nan_guard_stops_and_records_the_epoch(tmp_path):
    x, y = _toy()
    x[5] = np.inf  # any step that sees this row produces a NaN loss
    state = callbacks.RunState(tmp_path, total_epochs=4)
    counter = _BatchCounter()
    data = callbacks.ArrayDataset(x, y, np.arange(40), 40)
    _toy_model().fit(
        data,
        epochs=4,
        verbose=0,
        callbacks=[callbacks.RunMonitor(state), callbacks.MetricsWriter(state, 1, 40), counter],
    )
    assert state.diverged_epoch == 1 and type(counter).batches == 1
    assert rundir.read_metrics(tmp_path) == []  # a diverged epoch is not a result
    message = train_module.diverged_message(state.diverged_epoch, 1e-3)
    assert message == (
        "Training diverged (loss is NaN) at epoch 1; lower the learning rate, e.g. --lr 0.0001"
    )


def test_array_dataset_shuffles_per_epoch_and_weights_samples():
    x = np.arange(20, dtype=np.uint8)[:, None]
    y = np.arange(20)
    weights = np.linspace(0, 1, 20).astype(np.float32)
    data = callbacks.ArrayDataset(
        x, y, np.arange(20), 5, shuffle=True, seed=0, sample_weight=weights
    )
    first = np.concatenate([data[i][0][:, 0] for i in range(len(data))])
    data.on_epoch_end()
    second = np.concatenate([data[i][0][:, 0] for i in range(len(data))])
    assert sorted(first) == sorted(second) == list(range(20)) and list(first) != list(second)
    bx, by, bw = data[0]
    assert np.array_equal(bx[:, 0], by) and np.allclose(bw, weights[by])


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    x, y = _toy()
    model = _toy_model()
    model.compile(train_module._make_optimizer("adam", 1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, verbose=0)
    state = callbacks.RunState(tmp_path, total_epochs=5)
    state.best_val_accuracy = 0.75
    callbacks.save_checkpoint(state, model, model.optimizer, epoch=2)
    meta, npz = rundir.load_checkpoint(tmp_path)
    assert meta["epoch"] == 2 and meta["best_val_accuracy"] == 0.75
    fresh = _toy_model()
    fresh.set_weights([npz[f"w{i}"] for i in range(meta["weights"])])
    optimizer = train_module._make_optimizer("adam", 1e-2)
    assert callbacks.restore_optimizer(
        optimizer, fresh.trainable_variables, npz, meta["optimizer_variables"]
    )
    assert int(np.asarray(optimizer.iterations.numpy())) == int(
        np.asarray(model.optimizer.iterations.numpy())
    )
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- feature cache


def test_cached_features_equal_the_base_outputs(tmp_path, tiny_base):
    import keras

    base = keras.saving.load_model(tiny_base)
    features = keras.Model(base.inputs, base.get_layer("features").output)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "features.npy"
    cached = train_module.cached_features(features, images, path, batch_size=8)
    direct = features.predict(images, verbose=0)
    assert cached.shape == direct.shape == (37, 8)
    assert float(np.max(np.abs(np.asarray(cached) - direct))) <= 1e-5
    mtime = path.stat().st_mtime_ns
    again = train_module.cached_features(features, images, path, batch_size=8)
    assert path.stat().st_mtime_ns == mtime  # served from the file, not recomputed
    np.testing.assert_array_equal(again, cached)


def test_cached_and_uncached_runs_reach_the_same_accuracy(make_image_folder, tmp_path, tiny_base):
    folder = make_image_folder(classes=("red", "green", "blue"), per_class=12, size=32)
    results = {}
    for mode in ("on", "off"):
        config = TrainConfig(
            data=str(folder),
            base=str(tiny_base),
            out=str(tmp_path / mode),
            epochs=6,
            batch_size=8,
            lr=3e-2,
            cache_features=mode,
            workers=1,
            early_stopping=0,  # both train every epoch: the same final epoch is compared
            fine_tune_epochs=0,  # the cache serves phase 1 (the head on a frozen base)
        )
        summary = train_module.train(config, tmp_path / mode, workspace=tmp_path / "ws")
        assert summary["feature_cache"] is (mode == "on")
        results[mode] = summary["final"]["val_accuracy"]
    assert abs(results["on"] - results["off"]) <= 0.02, results
    cache_files = list((tmp_path / "ws").rglob("features_train_*.npy"))
    assert len(cache_files) == 1  # keyed by dataset/base/cut/size: one file for both runs


def test_two_phases_with_augmentation_and_class_weights(make_image_folder, tmp_path, tiny_base):
    """Phase 2 continues the epoch count at lr/10; every option of the fit path is exercised."""
    folder = make_image_folder(classes=("red", "green"), per_class={"red": 12, "green": 4})
    config = TrainConfig(
        data=str(folder),
        base=str(tiny_base),
        epochs=2,
        fine_tune_epochs=2,
        fine_tune_layers=2,
        batch_size=4,
        lr=1e-2,
        augment=True,
        class_weights=True,
        early_stopping=5,
        reduce_lr=True,
        workers=1,
    )
    summary = train_module.train(config, tmp_path / "run", workspace=tmp_path / "ws")
    assert summary["feature_cache"] is False  # augmentation changes the base's input
    rows = rundir.read_metrics(tmp_path / "run")
    assert [(r["epoch"], r["phase"]) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert rows[0]["lr"] == pytest.approx(1e-2) and rows[2]["lr"] == pytest.approx(1e-3)
    saved = rundir.read_config(tmp_path / "run")
    assert saved["feature_cache"] is False and saved["label_encoding"] == "index"
    from retrain.models.modelfile import load_model

    model, meta = load_model(tmp_path / "run" / "best.keras")
    assert not any(layer.name.startswith("augment") for layer in model.layers)
    assert meta["class_names"] == ["green", "red"]


def test_cache_on_with_augmentation_is_a_config_error(make_image_folder, tmp_path, tiny_base):
    folder = make_image_folder()
    config = TrainConfig(data=str(folder), base=str(tiny_base), augment=True, cache_features="on")
    with pytest.raises(ConfigError, match="--cache-features on needs a frozen base"):
        train_module.train(config, tmp_path / "run", workspace=tmp_path / "ws")
    status = rundir.read_status_file(tmp_path / "run")
    assert status["state"] == "failed" and status["error"].startswith("--cache-features on")


# ---------------------------------------------------------------------------- whole runs


def test_cli_trains_two_epochs_end_to_end(make_image_folder, tmp_path, tiny_base):
    folder = make_image_folder(classes=("red", "green", "blue"), per_class=8, size=32)
    run_dir = tmp_path / "run"
    out = _cli(
        "train",
        "--data",
        str(folder),
        "--base",
        str(tiny_base),
        "--out",
        str(run_dir),
        "--epochs",
        "2",
        "--fine-tune-epochs",
        "0",
        "--batch-size",
        "64",
        "--workspace",
        str(tmp_path / "ws"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["state"] == "done" and summary["epochs_done"] == 2
    assert any("Batch size 64 is larger" in w for w in summary["warnings"])
    assert rundir.read_config(run_dir) and rundir.read_progress(run_dir)
    assert rundir.best_model_path(run_dir).is_file()
    rows = rundir.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2] and {r["phase"] for r in rows} == {1}
    status = rundir.read_status_file(run_dir)
    assert status["state"] == "done" and status["stopped"] is False
    # saved_epoch names the epoch of best.keras, the model evaluate and export use.
    from retrain.models.modelfile import read_metadata

    assert status["saved_epoch"] == summary["saved_epoch"] == summary["best_epoch"]
    assert read_metadata(rundir.best_model_path(run_dir))["epoch"] == status["saved_epoch"]
    assert status["bias_corrected"] is False
    config = rundir.read_config(run_dir)
    assert config["class_names"] == ["blue", "green", "red"]
    import keras

    assert config["backend"] == keras.backend.backend()  # the worker ran on this backend
    assert config["device"]["device"] and config["versions"]["keras"]
    if config["backend"] == "tensorflow":
        assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert config["dataset_id"] and config["seed"] == 42
    assert (run_dir / "history.csv").read_text().count("\n") == 3
    from retrain.models.modelfile import load_model

    model, meta = load_model(run_dir / "model.keras")
    assert meta["class_names"] == ["blue", "green", "red"] and meta["image_size"] == [32, 32]
    assert meta["loss"] == "sparse_categorical_crossentropy" and meta["label_encoding"] == "index"
    # The file gets shared: the base is named, its server path (the session's folder) is not.
    assert meta["base"] == Path(tiny_base).name
    probs = np.asarray(model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_a_default_run_fine_tunes_after_its_frozen_base_head(
    make_image_folder, tmp_path, tiny_base
):
    # No --fine-tune-epochs: phase 2 follows phase 1 at a tenth of its rate, within its budget.
    folder = make_image_folder(classes=("red", "green"), per_class=8, size=32)
    config = TrainConfig(data=str(folder), base=str(tiny_base), epochs=2, batch_size=4, lr=1e-2)
    summary = train_module.train(config, tmp_path / "run", workspace=tmp_path / "ws")
    rows = rundir.read_metrics(tmp_path / "run")
    assert [r["phase"] for r in rows[:2]] == [1, 1] and rows[0]["lr"] == pytest.approx(1e-2)
    phase2 = rows[2:]
    assert phase2 and {r["phase"] for r in phase2} == {2}
    assert all(r["lr"] == pytest.approx(1e-3) for r in phase2)
    assert summary["epochs_budget"] == 2 + 15 and len(rows) <= 17
    assert summary["fine_tune_lr"] == pytest.approx(1e-3)


def test_phase_2_trains_the_top_on_the_frozen_layers_cached_outputs_as_on_images(
    make_image_folder, tmp_path, tiny_base, monkeypatch
):
    """With 2 layers unfrozen, phase 2 trains conv2 and the head on pool1's outputs computed
    once; the same run with phase 2 on images (the split turned off) logs the same epochs and
    ends with the same weights."""
    from retrain.models import modelfile

    folder = make_image_folder(classes=("red", "green", "blue"), per_class=8, size=32)
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), epochs=2, batch_size=4, lr=1e-2, dropout=0.0,
        fine_tune_epochs=3, fine_tune_layers=2, early_stopping=0,
        workers=1,  # on JAX, phase 2 on images with loader threads batches in another order
    )  # fmt: skip
    cached = train_module.train(config, tmp_path / "cached", workspace=tmp_path / "ws")
    assert cached["phase2_cache"] == "pool1"
    monkeypatch.setattr(train_module, "frozen_split", lambda features: None)
    whole = train_module.train(config, tmp_path / "whole", workspace=tmp_path / "ws")
    assert whole["phase2_cache"] is None

    rows = {name: rundir.read_metrics(tmp_path / name) for name in ("cached", "whole")}
    assert [r["phase"] for r in rows["cached"]] == [1, 1, 2, 2, 2]
    for a, b in zip(rows["cached"], rows["whole"], strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (a["epoch"], key)

    def kernel(model, name: str) -> np.ndarray:
        """The kernel of the layer ``name``, in ``model`` or a model nested in it."""
        for layer in model.layers:
            if layer.name == name:
                return layer.get_weights()[0]
            if hasattr(layer, "layers") and name in [x.name for x in layer.layers]:
                return kernel(layer, name)
        raise KeyError(name)

    saved = {name: modelfile.load_model(tmp_path / name / "model.keras")[0] for name in rows}
    base, _ = modelfile.load_model(tiny_base)
    for layer in ("conv1", "conv2"):
        got = kernel(saved["cached"], layer)
        np.testing.assert_allclose(got, kernel(saved["whole"], layer), atol=1e-4)
        frozen = np.allclose(got, kernel(base, layer))
        assert frozen == (layer == "conv1")  # conv1 stayed frozen, conv2 trained in phase 2


def test_a_run_killed_in_a_cached_phase_2_resumes_on_the_cache_each_epoch_once(
    make_image_folder, tmp_path, tiny_base
):
    from retrain.runs import jobs

    folder = make_image_folder(classes=("red", "green", "blue"), per_class=40, size=32)
    workspace = tmp_path / "ws"
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), epochs=2, batch_size=4, lr=1e-2,
        fine_tune_epochs=30, fine_tune_layers=2, early_stopping=0, workers=1,
    )  # fmt: skip
    run_dir = jobs.start_run(config, workspace)
    deadline = time.time() + 120
    while sum(r["phase"] == 2 for r in rundir.read_metrics(run_dir)) < 2:
        assert time.time() < deadline, jobs.read_log_tail(run_dir)
        time.sleep(0.05)
    os.killpg(int((run_dir / "pid").read_text()), signal.SIGKILL)
    time.sleep(0.3)
    assert jobs.read_status(run_dir)["state"] == "interrupted"
    out = _cli("train", "--resume", str(run_dir), "--workspace", str(workspace))
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["phase2_cache"] == "pool1" and summary["state"] == "done"
    assert summary["warnings"] == []  # the optimizer's state came back too
    assert [r["epoch"] for r in rundir.read_metrics(run_dir)] == list(range(1, 33))


def test_the_frozen_split_moves_below_a_shortcut_and_needs_weights_below_it():
    import keras

    from retrain.training.features import frozen_split

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    layers = {}
    for name in "abcd":
        layers[name] = x = keras.layers.Conv2D(4, 3, padding="same", name=name)(x)
    added = keras.layers.Add(name="add")([layers["b"], layers["d"]])  # a shortcut over c, d
    out = keras.layers.GlobalAveragePooling2D(name="gap")(added)
    model = keras.Model(inputs, out)
    for layer in model.layers:
        layer.trainable = layer.name in ("d", "add", "gap")
    bottom, top, boundary = frozen_split(model)
    # Not at c: c's output and the shortcut (b's) would both cross, so the split goes to b.
    assert boundary == "b"
    assert [x.name for x in top.layers if x.weights] == ["c", "d"]
    image = np.random.default_rng(0).random((2, 8, 8, 3)).astype("float32") * 255
    np.testing.assert_allclose(np.asarray(top(bottom(image))), np.asarray(model(image)), atol=1e-5)
    for layer in model.layers:  # everything trains: only the rescaling is below, no weights
        layer.trainable = True
    assert frozen_split(model) is None


def test_kill_9_then_resume_then_stop_then_resume_runs_each_epoch_once(
    make_image_folder, tmp_path, tiny_base
):
    from retrain.runs import jobs

    folder = make_image_folder(classes=("red", "green"), per_class=8, size=32)
    workspace = tmp_path / "ws"
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), epochs=40, batch_size=4, lr=1e-2, workers=1,
        fine_tune_epochs=0,
    )  # fmt: skip

    def wait_for(predicate, what: str) -> None:
        deadline = time.time() + 120
        while not predicate():
            assert time.time() < deadline, f"{what}: " + jobs.read_log_tail(run_dir)
            time.sleep(0.05)

    def epochs_done() -> int:
        return len(rundir.read_metrics(run_dir))

    run_dir = jobs.start_run(config, workspace)
    wait_for(lambda: epochs_done() >= 2, "first epochs")
    os.killpg(int((run_dir / "pid").read_text()), signal.SIGKILL)
    time.sleep(0.3)
    status = json.loads(_cli("status", str(run_dir)).stdout)
    assert status["state"] == "interrupted" and status["resumable"], status
    killed_at = epochs_done()
    assert killed_at < 40

    # Resume as a worker, then stop it: it ends "done" with stopped=true.
    jobs.resume_run(run_dir, workspace)
    wait_for(lambda: epochs_done() >= killed_at + 2, "resumed epochs")
    jobs.request_stop(run_dir)
    wait_for(lambda: jobs.read_status(run_dir)["state"] not in jobs.ACTIVE_STATES, "stop")
    status = jobs.read_status(run_dir)
    assert status["state"] == "done" and status["stopped"] is True, status
    assert epochs_done() < 40

    # Resume in the foreground to the end: every epoch exactly once, in order.
    out = _cli("train", "--resume", str(run_dir), "--workspace", str(workspace))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = rundir.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    status = json.loads(_cli("status", str(run_dir)).stdout)
    assert status["state"] == "done" and status["stopped"] is False


def test_a_model_trained_on_this_backend_scores_the_same_on_the_other(
    make_image_folder, tmp_path, tiny_base
):
    """Saved models are plain Keras 3: trained on TensorFlow they evaluate on JAX, and back."""
    import importlib.util

    import keras

    from retrain import evaluate

    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    if importlib.util.find_spec(other) is None:
        pytest.skip(f"{other} is not installed (make test-backends installs jax)")
    folder = make_image_folder(classes=("red", "green", "blue"), per_class=8, size=32)
    run_dir = tmp_path / "run"
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), epochs=2, batch_size=8, fine_tune_epochs=0
    )
    train_module.train(config, run_dir, workspace=tmp_path / "ws")
    here = evaluate.evaluate_model(run_dir / "model.keras", str(folder), "all")
    env_backend = {"KERAS_BACKEND": other}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run(
        [sys.executable, "-m", "retrain", "evaluate", "--model", str(run_dir / "model.keras"),
         "--data", str(folder), "--split", "all", "--workspace", str(tmp_path / "ws2")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3", **env_backend),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout)
    assert there["accuracy"] == pytest.approx(here["accuracy"])
    assert there["loss"] == pytest.approx(here["loss"], abs=1e-4)
    assert there["confusion_matrix"] == here["confusion_matrix"]


def test_best_checkpoint_takes_the_best_accuracy_and_breaks_ties_by_loss(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    state = callbacks.RunState(tmp_path, total_epochs=4)
    best = callbacks.BestCheckpoint(state, model, {"class_names": ["a", "b"]}, 1e9)
    logs = [(0.90, 0.50), (0.90, 0.30), (0.90, 0.40), (0.95, 0.60)]
    picked = []
    for epoch, (acc, loss) in enumerate(logs):
        best.on_epoch_end(epoch, {"val_accuracy": acc, "val_loss": loss})
        picked.append(state.best_epoch)
    # a tie with a lower loss wins (epoch 2); a tie with a higher loss does not (epoch 3)
    assert picked == [1, 2, 2, 4]
    best.on_train_end()
    assert (tmp_path / "best.keras").is_file()


def test_best_checkpoint_snapshots_only_the_head_yet_saves_the_whole_model(tmp_path):
    import keras

    from retrain.models.modelfile import load_model

    inp = keras.Input((2,))
    base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="base_dense")])
    head = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head_dense")])
    model = keras.Model(inp, head(base(inp)))
    state = callbacks.RunState(tmp_path, total_epochs=2)
    best = callbacks.BestCheckpoint(state, model, {}, 1e9, changing=head)
    best_head = [w.copy() for w in head.get_weights()]
    best.on_epoch_end(0, {"val_accuracy": 0.9, "val_loss": 0.1})
    head.set_weights([w + 1 for w in best_head])  # a worse later epoch
    best.on_epoch_end(1, {"val_accuracy": 0.5, "val_loss": 0.9})
    best.on_train_end()
    saved, _ = load_model(tmp_path / "best.keras")
    x = np.ones((1, 2), np.float32)
    expected = best_head[0].T @ base.predict(x, verbose=0).T  # head_dense kernel, no bias yet
    got = np.asarray(saved.predict(x, verbose=0)) - best_head[1]
    assert np.allclose(got.ravel(), expected.ravel(), atol=1e-5)
    assert np.allclose(head.get_weights()[0], best_head[0] + 1)  # training weights restored


# ---------------------------------------------------------------------------- recorded split


def _split_images(folder: Path, workspace: Path) -> set[str]:
    from retrain import data

    dataset = data.ingest(folder, workspace)
    return {p for p, _ in dataset.splits["train"]}


@pytest.mark.parametrize("val_split", [0.25, 0.0])
def test_a_run_records_its_split_and_a_resume_reads_it_back(
    make_image_folder, tmp_path, tiny_base, monkeypatch, val_split
):
    from retrain.data import splits

    folder = make_image_folder(classes=("red", "green"), per_class=6, size=32)
    run_dir = tmp_path / "run"
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), out=str(run_dir), epochs=1, batch_size=4,
        val_split=val_split, workers=1, fine_tune_epochs=0,
    )  # fmt: skip
    train_module.train(config, run_dir, workspace=tmp_path / "ws")
    split = rundir.read_split(run_dir)
    train_set, val_set = set(split["train"]), set(split["val"])
    assert not train_set & val_set
    assert train_set | val_set == _split_images(folder, tmp_path / "ws")
    assert bool(val_set) == bool(val_split)
    assert rundir.read_config(run_dir)["num_val"] == len(val_set)

    # A resumed run trains on the same images, whatever the split function says now.
    made_by_training = splits.stratified_split
    monkeypatch.setattr(
        splits, "stratified_split", lambda labels, f, seed: made_by_training(labels, f, seed + 7)
    )
    longer = dataclasses.replace(config, fine_tune_epochs=1)
    summary = train_module.train(longer, run_dir, workspace=tmp_path / "ws", resume=True)
    assert summary["epochs_done"] == 2
    assert rundir.read_split(run_dir) == split


def test_data_with_a_val_folder_records_that_folder_as_val(make_image_folder, tmp_path, tiny_base):
    folder = make_image_folder(
        classes=("red", "green"), per_class=6, size=32, splits=("train", "val")
    )
    run_dir = tmp_path / "run"
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), out=str(run_dir), epochs=1, batch_size=4, workers=1,
        fine_tune_epochs=0,
    )  # fmt: skip
    train_module.train(config, run_dir, workspace=tmp_path / "ws")
    split = rundir.read_split(run_dir)
    assert split["val"] and all(p.startswith("val/") for p in split["val"])
    assert split["train"] and all(p.startswith("train/") for p in split["train"])


def test_the_run_monitor_keeps_keras_async_dispatch(tmp_path, monkeypatch):
    """Every per-batch hook of a run is async-safe, so Keras need not wait for each step.

    (Keras dispatches asynchronously on thread-safe backends, JAX and PyTorch; the check is
    made to run on any backend.)
    """
    import keras
    from keras.src import backend
    from keras.src.callbacks.callback_list import CallbackList

    monkeypatch.setattr(backend, "IS_THREAD_SAFE", True)
    state = callbacks.RunState(tmp_path, total_epochs=1)
    model = _toy_model()
    ours = [
        callbacks.RunMonitor(state, 1, 4, 8),
        callbacks.MetricsWriter(state, 1, 32),
        callbacks.BestCheckpoint(state, model, {}),
        callbacks.EpochCheckpoint(state, model),
        keras.callbacks.CSVLogger(str(tmp_path / "h.csv")),
    ]
    # On JAX the run monitor stays synchronous: a stop mid-epoch under async dispatch ends
    # fit with a donated-buffer error in Keras 3.15 (see RunMonitor.async_safe).
    assert CallbackList(ours, model=model)._async_train is (keras.backend.backend() != "jax")
    assert CallbackList([*ours, _BatchCounter()], model=model)._async_train is False


def test_a_stop_requested_while_the_worker_starts_up_is_honoured(
    make_image_folder, tmp_path, tiny_base, monkeypatch
):
    """A click on Stop while the worker loads data and builds the model is not lost; a request
    left from an earlier worker is forgotten as the worker starts."""
    from retrain.data import store

    folder = make_image_folder(classes=("red", "green"), per_class=8, size=32)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_status(run_dir, "queued")
    rundir.request_stop(run_dir)  # an earlier worker's: forgotten
    ingest = store.ingest

    def ingest_then_click_stop(*args, **kwargs):
        assert not rundir.stop_requested(run_dir)
        dataset = ingest(*args, **kwargs)
        rundir.request_stop(run_dir)  # the person clicks Stop while the worker prepares
        return dataset

    monkeypatch.setattr(store, "ingest", ingest_then_click_stop)
    config = TrainConfig(data=str(folder), base=str(tiny_base), epochs=30, batch_size=4, workers=1)
    summary = train_module.train(config, run_dir, workspace=tmp_path / "ws")
    assert summary["stopped"] is True and summary["epochs_done"] <= 1, summary
