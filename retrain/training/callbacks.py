"""The Keras pieces of a training run: the batch feed and the callbacks that write the run
directory (through `retrain.runs.rundir`).

``retrain.training.train`` imports this module lazily, from one place, when a run starts;
importing it imports Keras.

Per-batch work is kept off the training loop's critical path: `RunMonitor` is the one
callback with batch hooks, it does its work on a timer (progress, stop requests, the NaN
check) and declares ``async_safe``, so Keras keeps dispatching steps asynchronously instead of
waiting for every step's loss. All other callbacks here work once per epoch.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from retrain.runs import rundir
from retrain.training.keep import split_accuracies

PROGRESS_INTERVAL_S = 0.5


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def current_lr(model: Any) -> float | None:
    """The optimizer's current learning rate (None when it has none)."""
    try:
        return finite(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return None


class RunState:
    """What the callbacks of one run share: stop requests, divergence, the best epoch so far."""

    def __init__(self, run_dir: Path, total_epochs: int) -> None:
        self.run_dir = Path(run_dir)
        self.total_epochs = total_epochs
        self.stopped = False
        self.diverged_epoch: int | None = None
        self.best_val_accuracy: float | None = None
        self.best_epoch: int | None = None
        self.best_loss: float | None = None  # breaks ties of accuracy (small val sets tie often)
        self.phase = 1
        self.phase1_end = total_epochs
        self.early_stopped_epoch: int | None = None  # the epoch early stopping ended a phase at
        self.restored_epoch: int | None = None  # the epoch whose weights were restored
        self.lowest_val_loss: float | None = None  # early stopping's best so far (all phases)

    @property
    def halted(self) -> bool:
        """Whether training must not continue (stop requested or diverged)."""
        return self.stopped or self.diverged_epoch is not None


class ArrayDataset(keras.utils.PyDataset):
    """Batches of ``x[indices]`` (a uint8 memmap or feature array) with labels.

    Shuffles the order every epoch (seeded), reads each batch's rows in ascending order
    (sequential reads of the memory map) and loads batches on worker threads while the
    model trains. Yields ``(x, y)`` or ``(x, y, sample_weight)``.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        sample_weight: np.ndarray | None = None,
        workers: int = 1,
        multiple_of: int = 1,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=8)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)
        # Data-parallel training splits every batch evenly over the devices, so each
        # epoch uses a multiple of the device count (a shuffled epoch drops < devices).
        self._n = max(len(self.indices) - len(self.indices) % multiple_of, multiple_of)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = self.indices.copy()
        if shuffle:
            self._rng.shuffle(self._order)

    def __len__(self) -> int:
        return max(1, math.ceil(self._n / self.batch_size))

    def __getitem__(self, index: int):
        stop = min((index + 1) * self.batch_size, self._n)
        rows = np.sort(self._order[index * self.batch_size : stop])
        x, y = np.asarray(self.x[rows]), self.y[rows]
        if self.sample_weight is not None:
            return x, y, self.sample_weight[rows]
        return x, y

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._rng.shuffle(self._order)


class RunMonitor(keras.callbacks.TerminateOnNaN):
    """The run's one per-batch callback: progress, stop requests and divergence, on a timer.

    At most every ``interval`` seconds (and on the first batch of an epoch) it writes
    the run's progress (`rundir.write_progress`), honours a stop request (``model.stop_training``, status "stopping") and
    checks the loss like `keras.callbacks.TerminateOnNaN` (a graceful stop), remembering the
    diverged epoch. The loss in the logs is the epoch's running mean, so a NaN stays visible
    until the epoch ends, where it is checked once more. Between ticks a batch costs nothing,
    and ``async_safe`` lets Keras dispatch steps without waiting for each step's loss.

    Progress keys: phase, epoch (1-based), epochs, batch, batches, images_per_second,
    eta_seconds, time.
    """

    # Async dispatch lets Keras run ahead without waiting for each step's loss. Not on JAX:
    # there, a stop mid-epoch (stop_training set from the async callback thread) ends fit with
    # "Buffer has been deleted or donated" in Keras 3.15, so JAX keeps the synchronous loop.
    async_safe = keras.backend.backend() != "jax"

    def __init__(
        self,
        run_state: RunState,
        phase: int = 1,
        batches: int = 0,
        batch_size: int = 0,
        interval: float = PROGRESS_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.state, self.phase = run_state, phase
        self.batches, self.batch_size, self.interval = batches, batch_size, interval
        self._epoch = 0
        self._epoch_start = 0.0
        self._last_tick = -math.inf
        self._epoch_seconds: list[float] = []
        self._lock = threading.Lock()  # async dispatch may run two batch ends at once

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._epoch_start = time.perf_counter()
        self._last_tick = -math.inf
        self._write_progress(0, finished=False)

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if time.perf_counter() - self._last_tick < self.interval:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._last_tick = time.perf_counter()
            self._check_stop()
            self._check_loss(batch, logs)
            self._write_progress(batch + 1, finished=False)
        finally:
            self._lock.release()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._check_loss(max(self.batches - 1, 0), logs)
        self._check_stop()
        self._epoch_seconds.append(time.perf_counter() - self._epoch_start)
        self._write_progress(self.batches, finished=True)

    def _check_stop(self) -> None:
        if not self.state.stopped and rundir.stop_requested(self.state.run_dir):
            self.state.stopped = True
            self.model.stop_training = True
            rundir.write_status(self.state.run_dir, "stopping")

    def _check_loss(self, batch: int, logs: dict | None) -> None:
        loss = (logs or {}).get("loss")
        if loss is None or self.state.diverged_epoch is not None or finite(loss) is not None:
            return
        self.state.diverged_epoch = self._epoch + 1
        super().on_batch_end(batch, {"loss": float("nan")})  # TerminateOnNaN's graceful stop

    def _write_progress(self, batch: int, finished: bool) -> None:
        now = time.perf_counter()
        elapsed = now - self._epoch_start
        images_per_second = batch * self.batch_size / elapsed if elapsed > 0 and batch else 0.0
        remaining_epochs = self.state.total_epochs - self._epoch - 1
        if finished:
            eta = self._epoch_seconds[-1] * remaining_epochs
        elif batch:
            per_batch = elapsed / batch
            eta = per_batch * (self.batches - batch) + per_batch * self.batches * max(
                remaining_epochs, 0
            )
        else:
            eta = None
        rundir.write_progress(
            self.state.run_dir,
            {
                "phase": self.phase,
                "epoch": self._epoch + 1,
                "epochs": self.state.total_epochs,
                "batch": batch,
                "batches": self.batches,
                "images_per_second": round(images_per_second, 1),
                "eta_seconds": None if eta is None else round(eta, 1),
                "time": time.time(),
            },
        )


class MetricsWriter(keras.callbacks.Callback):
    """Append one row per finished epoch to the run's metrics (`rundir.append_metrics`).

    Keys: epoch (1-based, continuing across phases), phase, loss, accuracy, val_loss,
    val_accuracy, lr, seconds, images_per_second (training images per second: the time until
    validation starts), time; ``partial`` when a stop cut the epoch short; `TASK_KEYS` when
    `TaskAccuracy` put them in the logs.
    """

    def __init__(self, run_state: RunState, phase: int, num_images: int) -> None:
        super().__init__()
        self.state, self.phase, self.num_images = run_state, phase, num_images
        self._start = 0.0
        self._train_end: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._train_end = None

    def on_test_begin(self, logs: dict | None = None) -> None:
        # fit() validates after the epoch's last training step: training ends here.
        if self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.state.diverged_epoch is not None:
            return
        logs = logs or {}
        now = time.perf_counter()
        train_seconds = max((self._train_end or now) - self._start, 1e-9)
        row = {
            "epoch": epoch + 1,
            "phase": self.phase,
            "loss": finite(logs.get("loss")),
            "accuracy": finite(logs.get("accuracy")),
            "val_loss": finite(logs.get("val_loss")),
            "val_accuracy": finite(logs.get("val_accuracy")),
            "lr": current_lr(self.model),
            "seconds": round(now - self._start, 3),
            "images_per_second": round(self.num_images / train_seconds, 1),
            "time": time.time(),
        }
        for key in TASK_KEYS:  # keep-old-classes runs: each task's held-out accuracy
            if key in logs:
                row[key] = finite(logs[key])
        if self.state.stopped:
            row["partial"] = True
        rundir.append_metrics(self.state.run_dir, row)


#: Per-task accuracies `TaskAccuracy` adds to an epoch's logs (and MetricsWriter writes).
TASK_KEYS = ("old_val_accuracy", "new_val_accuracy")


class TaskAccuracy(keras.callbacks.Callback):
    """Score the held-out images of each task after every epoch (a keep-old-classes run).

    Adds ``old_val_accuracy`` (images of the original classes) and ``new_val_accuracy`` (of
    the new classes) to the epoch's logs, each among *all* the model's classes; placed before
    `MetricsWriter`, which writes them. ``labels`` are the output indices of ``val_data``'s
    rows in the order it yields them; outputs below ``n_old`` are the original classes.
    """

    def __init__(self, val_data: Any, labels: np.ndarray, n_old: int) -> None:
        super().__init__()
        self.val_data, self.labels, self.n_old = val_data, np.asarray(labels), n_old

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        probs = np.asarray(self.model.predict(self.val_data, verbose=0))
        scores = split_accuracies(probs, self.labels[: len(probs)], self.n_old)
        # A task without held-out images has no score (other callbacks log numbers only).
        logs.update({k: v for k, v in scores.items() if v is not None})


class BestCheckpoint(keras.callbacks.Callback):
    """Keep ``best.keras`` (the full model) at the epoch with the best val accuracy.

    Equal accuracies (one image is a whole percent of a small validation set) are decided by
    the lower validation loss, so a later, more confident epoch wins a tie. Without validation
    data the training accuracy and loss decide. Writing a .keras file takes a fraction of a
    second while a cached-feature epoch takes less, so an improvement is snapshotted in memory
    and written at most every ``min_interval`` seconds, and always when the fit ends
    (finished, stopped or early-stopped). (Keras's ModelCheckpoint has no tie-break and no
    metadata entry, hence this class.)
    """

    def __init__(
        self,
        run_state: RunState,
        model_to_save: Any,
        metadata: dict,
        min_interval: float = 10.0,
        changing: Any = None,
    ) -> None:
        super().__init__()
        self.state, self.model_to_save, self.metadata = run_state, model_to_save, metadata
        self.min_interval = min_interval
        # Only the weights that train are snapshotted: the head alone while the base is
        # frozen, not a copy of the whole base at every improving epoch.
        self.changing = changing if changing is not None else model_to_save
        self._pending: tuple[int, float, list] | None = None
        self._last_write = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.state.diverged_epoch is not None:
            return
        logs = logs or {}
        score = finite(logs.get("val_accuracy", logs.get("accuracy")))
        if score is None:
            return
        loss = finite(logs.get("val_loss", logs.get("loss")))
        best, best_loss = self.state.best_val_accuracy, self.state.best_loss
        tie_won = score == best and loss is not None and (best_loss is None or loss < best_loss)
        if best is None or score > best or tie_won:
            self.state.best_val_accuracy, self.state.best_epoch = score, epoch + 1
            self.state.best_loss = loss
            self._pending = (epoch + 1, score, self.changing.get_weights())
            if time.monotonic() - self._last_write >= self.min_interval:
                self.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        """Write the pending best epoch's model to ``best.keras``."""
        if self._pending is None:
            return
        from retrain.models.modelfile import save_model

        epoch, score, weights = self._pending
        current = self.changing.get_weights()
        self.changing.set_weights(weights)
        try:
            meta = dict(self.metadata, epoch=epoch, val_accuracy=score)
            save_model(self.model_to_save, rundir.best_model_path(self.state.run_dir), meta)
        finally:
            self.changing.set_weights(current)
        self._pending = None
        self._last_write = time.monotonic()


class EarlyStopping(keras.callbacks.Callback):
    """Stop when ``monitor`` (validation loss) has not improved for ``patience`` epochs, and
    at the end of the fit (stopped, early-stopped or out of epochs) restore the weights of the
    epoch where it was lowest: the epochs are a budget, the best epoch is what is kept.

    Only ``changing`` (the part that trains: the head alone while the base is frozen) is
    snapshotted. Records ``early_stopped_epoch`` and ``restored_epoch`` (1-based) on the run
    state. Keras's EarlyStopping restores only when it stopped the fit itself; this one
    always does, and says which epoch it kept.

    With ``baseline`` (phase 2: the lowest loss of phase 1, whose weights ``changing`` holds
    when the fit starts) an epoch must beat phase 1 to be kept: fine-tuning that does not
    help ends with phase 1's weights restored.
    """

    def __init__(
        self,
        run_state: RunState,
        changing: Any,
        patience: int,
        monitor: str = "val_loss",
        min_delta: float = 1e-4,
        baseline: tuple[float, int] | None = None,
    ) -> None:
        super().__init__()
        self.state, self.changing = run_state, changing
        self.patience, self.monitor, self.min_delta = patience, monitor, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: list | None = None
        if baseline is not None:
            self.best, self.best_epoch = baseline
            self.best_weights = changing.get_weights()
        self.wait = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.state.diverged_epoch is not None:
            return
        value = finite((logs or {}).get(self.monitor))
        if value is None:
            return
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch + 1, 0
            self.best_weights = self.changing.get_weights()
            self.state.lowest_val_loss = value
            return
        self.wait += 1
        if self.wait >= self.patience and not self.state.stopped:
            self.state.early_stopped_epoch = epoch + 1
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is None or self.state.diverged_epoch is not None:
            return
        self.changing.set_weights(self.best_weights)
        self.state.restored_epoch = self.best_epoch


class EpochCheckpoint(keras.callbacks.Callback):
    """Save weights, optimizer state and the epoch counter after every epoch (``--resume``).

    ``scope`` names what ``model_to_save`` is ("model" or "head": with a frozen base only
    the head changes, and saving just the head keeps this cheap).
    """

    def __init__(self, run_state: RunState, model_to_save: Any, scope: str = "model") -> None:
        super().__init__()
        self.state, self.model_to_save, self.scope = run_state, model_to_save, scope

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.state.diverged_epoch is not None:
            return
        save_checkpoint(self.state, self.model_to_save, self.model.optimizer, epoch + 1, self.scope)


# ----------------------------------------------------------------------------------------
# Resumable checkpoints: one last.npz with everything --resume needs.


def _to_numpy(variable: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def save_checkpoint(
    run_state: RunState, model: Any, optimizer: Any, epoch: int, scope: str = "model"
) -> Path:
    """Write ``last.npz``: ``model``'s weights, the optimizer's variables, the epoch counter.

    ``scope`` ("model" | "head") records which part of the surgery ``model`` is.
    """
    arrays = {f"w{i}": _to_numpy(v) for i, v in enumerate(model.weights)}
    opt_vars = list(getattr(optimizer, "variables", []) or [])
    arrays.update({f"o{i}": _to_numpy(v) for i, v in enumerate(opt_vars)})
    meta = {
        "epoch": epoch,
        "phase": run_state.phase,
        "phase1_end": run_state.phase1_end,
        "weights": len(model.weights),
        "scope": scope,
        "optimizer_variables": len(opt_vars),
        "best_val_accuracy": run_state.best_val_accuracy,
        "best_epoch": run_state.best_epoch,
    }
    return rundir.save_checkpoint(run_state.run_dir, arrays, meta)


def restore_optimizer(optimizer: Any, variables: list, npz: Any, count: int) -> bool:
    """Build ``optimizer`` for ``variables`` and load saved state; False when it does not fit."""
    if count == 0:
        return False
    optimizer.build(variables)
    current = list(optimizer.variables)
    if len(current) != count:
        return False
    saved = [npz[f"o{i}"] for i in range(count)]
    if any(tuple(v.shape) != s.shape for v, s in zip(current, saved, strict=True)):
        return False
    for v, s in zip(current, saved, strict=True):
        v.assign(s)
    return True
