"""retrain.training.lr_find (the learning-rate range test) and early stopping with best-epoch
restore, as units and inside a run with the defaults (``--lr auto``, early stopping on).

No ``tf.*`` here: the file also runs with ``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrain.runs import rundir
from retrain.training import callbacks, lr_find
from retrain.training import train as train_module
from retrain.training.config import TrainConfig


def _blobs(n: int = 512, dims: int = 32, classes: int = 4, seed: int = 0):
    """Gaussian blobs: a linear softmax head on them trains well with Adam at 1e-3..1e-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, size=(classes, dims))
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + rng.normal(0, 1.0, size=(n, dims))
    return x.astype(np.float32), labels.astype(np.int32)


def _linear_head(dims: int, classes: int):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((dims,))
    outputs = keras.layers.Dense(classes, activation="softmax")(inputs)
    return keras.Model(inputs, outputs)


def test_range_test_picks_a_rate_in_the_known_good_range_and_leaves_no_trace():
    import keras

    x, y = _blobs()
    model = _linear_head(x.shape[1], 4)
    before = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(0)

    def batch(step: int):
        rows = rng.choice(len(x), 32, replace=False)
        return x[rows], y[rows]

    finding = lr_find.range_test(
        model,
        batch,
        optimizer=keras.optimizers.Adam(1e-6),
        loss="sparse_categorical_crossentropy",
        steps=100,
    )
    # Known good range for Adam on a linear softmax head: 1e-3 .. 1e-1 (checked below).
    assert 1e-3 <= finding.lr <= 1e-1, finding.suggestions
    assert finding.rule == "valley" and set(finding.suggestions) == set(lr_find.RULES)
    assert len(finding.lrs) == len(finding.losses) == finding.steps > 20
    assert finding.lrs == sorted(finding.lrs)  # the sweep grows
    assert min(finding.losses) < finding.losses[0]  # the curve falls before it explodes
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # the weights are restored

    # The chosen rate trains well; 100x below it barely moves in the same steps.
    def accuracy_after(lr: float) -> float:
        head = _linear_head(x.shape[1], 4)
        head.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
        head.fit(x[:384], y[:384], batch_size=32, epochs=3, verbose=0)
        return float(np.mean(head.predict(x[384:], verbose=0).argmax(-1) == y[384:]))

    assert accuracy_after(finding.lr) >= 0.9
    assert accuracy_after(finding.lr) > accuracy_after(finding.lr / 100) + 0.1


def test_suggest_reads_a_falling_then_exploding_curve():
    lrs = list(lr_find.lr_schedule(60))
    logs = np.log10(lrs)
    # Flat at 2.0 up to 1e-4, falling to 0.5 at 1e-2, exploding after 1e-1.
    losses = np.where(logs < -4, 2.0, 2.0 - 1.5 * np.clip((logs + 4) / 2, 0, 1))
    losses = losses + np.where(logs > -1, 10 ** (logs + 1) * 5 - 5, 0) + 1e-3 * np.arange(60)[::-1]
    s = lr_find.suggest(lrs, list(losses))
    assert 1e-4 <= s["valley"] <= 1e-2, s
    assert s["minimum/10"] == pytest.approx(lrs[int(np.argmin(losses))] / 10)
    assert lr_find.suggest([1e-3], [1.0])["valley"] == pytest.approx(1e-3)
    finding = lr_find.LRFinding(lrs=lrs[:3], losses=[1.0, 0.9, 0.8], lr=1e-5, suggestions=s)
    assert lr_find.LRFinding.from_dict({**finding.to_dict(), "extra": 1}) == finding


# ---------------------------------------------------------------------------- early stopping


class _Weights:
    """Stands in for the trained part: one weight array, set per epoch by the test."""

    def __init__(self) -> None:
        self.value = np.zeros(2, np.float32)

    def get_weights(self) -> list:
        return [self.value.copy()]

    def set_weights(self, weights: list) -> None:
        self.value = weights[0].copy()


class _Model:
    stop_training = False


def _fit(stopper: callbacks.EarlyStopping, part: _Weights, losses: list[float]) -> int:
    """Drive the callback like fit does; return the epochs run."""
    stopper.set_model(_Model())
    epochs = 0
    for epoch, loss in enumerate(losses):
        part.value = np.full(2, epoch + 1, np.float32)  # "the weights after epoch N" = N
        stopper.on_epoch_end(epoch, {"val_loss": loss})
        epochs += 1
        if stopper.model.stop_training:
            break
    stopper.on_train_end()
    return epochs


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(tmp_path):
    state = callbacks.RunState(tmp_path, total_epochs=10)
    part = _Weights()
    stopper = callbacks.EarlyStopping(state, part, patience=2)
    ran = _fit(stopper, part, [1.0, 0.6, 0.4, 0.5, 0.45, 0.3, 0.2])
    assert ran == 5  # epochs 4 and 5 did not beat epoch 3
    assert state.early_stopped_epoch == 5 and state.restored_epoch == 3
    np.testing.assert_array_equal(part.value, np.full(2, 3))  # epoch 3's weights are back
    assert state.lowest_val_loss == pytest.approx(0.4)

    # Out of epochs without stopping: the best epoch is still the one kept.
    state = callbacks.RunState(tmp_path, total_epochs=4)
    stopper = callbacks.EarlyStopping(state, part, patience=5)
    assert _fit(stopper, part, [0.9, 0.5, 0.7, 0.8]) == 4
    assert state.early_stopped_epoch is None and state.restored_epoch == 2
    np.testing.assert_array_equal(part.value, np.full(2, 2))


def test_early_stopping_in_phase_two_must_beat_phase_one(tmp_path):
    state = callbacks.RunState(tmp_path, total_epochs=10)
    part = _Weights()
    part.value = np.full(2, -1.0, np.float32)  # phase 1's kept weights
    stopper = callbacks.EarlyStopping(state, part, patience=2, baseline=(0.3, 4))
    _fit(stopper, part, [0.5, 0.4, 0.35])  # fine-tuning never beats phase 1's 0.3
    assert state.restored_epoch == 4
    np.testing.assert_array_equal(part.value, np.full(2, -1.0))


# ---------------------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    path = tmp_path_factory.mktemp("base") / "tiny.keras"
    keras.Model(inputs, outputs, name="tiny").save(path)
    return path


def test_a_default_run_finds_its_rate_stops_itself_and_a_resume_reuses_the_rate(
    tmp_path, tiny_base
):
    from PIL import Image

    # Noise: nothing to learn, so the validation loss soon stops falling.
    folder = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    run = tmp_path / "run"
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), batch_size=8, epochs=40, fine_tune_epochs=0
    )  # phase 1 alone: its rate and its early stop (phase 2: test_train.py)
    summary = train_module.train(config, run, workspace=tmp_path / "ws")
    found = rundir.read_lr_find(run)
    assert found["on"] == "features" and found["steps"] > 20
    assert summary["lr"] == found["lr"] == rundir.load_config(run).lr_used
    rows = rundir.read_metrics(run)
    assert all(r["lr"] == pytest.approx(found["lr"]) for r in rows)
    # Early stopping (patience 5) ended the 40-epoch budget and kept the lowest val loss.
    assert summary["early_stopped_epoch"] == len(rows) < 40
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary["restored_epoch"] == best["epoch"] <= len(rows) - 5
    status = rundir.read_status_file(run)
    assert (status["early_stopped_epoch"], status["restored_epoch"], status["epochs_budget"]) == (
        len(rows),
        best["epoch"],
        40,
    )
    # The saved model is the kept epoch's: it scores that epoch's val accuracy.
    from retrain import evaluate

    report = evaluate.evaluate_model(run / "model.keras", str(folder), "train")
    assert report["num_images"] == 36

    # A resume trains on at the rate the run found (no second range test).
    found["lr"] = 0.0123
    rundir.write_lr_find(run, found)
    again = train_module.train(config, run, workspace=tmp_path / "ws", resume=True)
    assert again["lr"] == 0.0123

    # --early-stopping 0: every epoch, the last kept; a set --lr: no range test recorded.
    fixed = TrainConfig(
        data=str(folder), base=str(tiny_base), batch_size=8, epochs=3, lr=0.01, early_stopping=0,
        fine_tune_epochs=0,
    )  # fmt: skip
    summary = train_module.train(fixed, tmp_path / "fixed", workspace=tmp_path / "ws")
    assert summary["epochs_done"] == 3 and summary["restored_epoch"] is None
    assert rundir.read_lr_find(tmp_path / "fixed") is None and summary["lr"] == 0.01


def test_without_the_feature_cache_the_range_test_runs_on_a_few_hundred_images(
    make_image_folder, tmp_path, tiny_base
):
    folder = make_image_folder(classes=("red", "green"), per_class=10, size=32)
    config = TrainConfig(
        data=str(folder), base=str(tiny_base), batch_size=4, epochs=1, freeze="none", workers=1
    )
    summary = train_module.train(config, tmp_path / "run", workspace=tmp_path / "ws")
    found = rundir.read_lr_find(tmp_path / "run")
    assert found["on"] == "images" and found["images"] == 16  # all 16 training images (< 320)
    assert found["steps"] <= lr_find.STEPS_IMAGES and summary["feature_cache"] is False
    assert lr_find.MIN_LR <= summary["lr"] == found["lr"] <= lr_find.MAX_LR
