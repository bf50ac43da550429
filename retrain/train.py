"""Training: one config object, the callbacks that write the run directory, the two-phase fit.

``TrainConfig`` is the single description of a run; the CLI flags (`add_config_arguments`) and
the Train page's widgets are both built from its fields, and ``config.json`` is its
serialisation. `train` runs in the foreground (the worker process started by
``retrain.jobs``, or a terminal) and writes the run directory described in DESIGN.md.

The recipe is the standard one for transfer learning:

1. phase 1 trains the new head with the base frozen. When nothing changes the base's output
   between epochs (frozen base, no augmentation) the base's features are computed once,
   stored in the dataset's cache folder, and the head trains on them: that is what makes
   head-only retraining fast;
2. an optional phase 2 unfreezes the top ``fine_tune_layers`` kept layers (BatchNorm stays
   frozen) at a learning rate about 10x lower, recompiles and continues the epoch count.

Data reaches ``fit`` through a ``keras.utils.PyDataset`` over the uint8 memory-mapped image
cache (no ``tf.data``), so the same code runs on the TensorFlow, JAX and PyTorch backends.

Keras is imported inside functions only: ``import retrain.train`` stays cheap because the
CLI builds its flags from `TrainConfig`. The Keras callback classes (`MetricsWriter`,
`ProgressWriter`, `StopWatcher`, `NanGuard`, `BestCheckpoint`, `EpochCheckpoint`) are created
on first access.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrain.data import RESIZE_MODES  # one list, owned by the image cache
from retrain.devices import PRECISION_CHOICES
from retrain.errors import ConfigError, RetrainError, RunError
from retrain.workspace import json_default, read_json, shareable, write_json

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
CACHE_FEATURES = ("auto", "on", "off")
PRECISIONS = PRECISION_CHOICES
_FREEZE_RE = re.compile(r"^(all|none|top:\d+|names:[^,\s]+(,[^,\s]+)*)$")
# Files of a run directory (DESIGN.md).
CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
STOP_FILE = "stop"
CHECKPOINT_FILE = "last.npz"  # weights + optimizer state + epoch counter, for --resume
PROGRESS_INTERVAL_S = 0.5


def _opt(help_text: str, default: Any = None, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the CLI flags and the page widgets come from its fields.

    Field metadata: ``help`` (one line: what it is and why the default), ``group`` ("run",
    "basic", "head", "augment", "fine-tune", "advanced"), ``choices`` for string enums,
    ``min``/``max`` for numbers.
    """

    data: str = _opt(
        "dataset: a zip, a folder of class folders, or a manifest.json", "", group="run"
    )
    base: str = _opt(
        "base model: path to .keras/.h5 | applications:<Name>[:imagenet] | builtin:<name>",
        "",
        group="run",
    )
    out: str = _opt("run directory to write (config, metrics, checkpoints, log)", "", group="run")
    epochs: int = _opt(
        "epochs of head training with the base frozen; 10 is enough for most new heads",
        10,
        group="basic",
        min=1,
        max=1000,
    )
    batch_size: int = _opt(
        "images per step; 32 fits any machine, larger is faster on a GPU",
        32,
        group="basic",
        min=1,
        max=4096,
    )
    lr: float = _opt(
        "learning rate of the new head; 1e-3 is Adam's well-tested default",
        1e-3,
        group="basic",
        min=1e-7,
        max=1.0,
    )
    optimizer: str = _opt(
        "optimizer; Adam adapts the step size per weight and rarely needs tuning",
        "adam",
        group="advanced",
        choices=OPTIMIZERS,
    )
    image_size: int | None = _opt(
        "image side in pixels; empty = the size the base model expects",
        None,
        group="advanced",
        min=8,
        max=1024,
    )
    resize_mode: str = _opt(
        "how images get the model's size: squash (stretch), pad (letterbox) or center-crop",
        "squash",
        group="advanced",
        choices=RESIZE_MODES,
    )
    val_split: float = _opt(
        "fraction of the training images held out for validation (used when the data has no "
        "val folder); 0.2 keeps enough to see overfitting",
        0.2,
        group="basic",
        min=0.0,
        max=0.9,
    )
    seed: int = _opt(
        "random seed of the split, the weights and the shuffling: same seed, same run",
        42,
        group="advanced",
        min=0,
        max=2**31 - 1,
    )
    cut_at: str | None = _opt(
        "layer name (or index) the head is attached after; empty = the base's suggestion",
        None,
        group="head",
    )
    freeze: str = _opt(
        "what stays frozen in phase 1: all (feature extraction), none, top:K or names:a,b",
        "all",
        group="head",
    )
    hidden_units: int = _opt(
        "units of a hidden Dense layer in the new head; 0 = a linear head, often best for "
        "small data",
        0,
        group="head",
        min=0,
        max=8192,
    )
    dropout: float = _opt(
        "dropout before the output layer; 0.2 curbs overfitting of a small head",
        0.2,
        group="head",
        min=0.0,
        max=0.9,
    )
    add_conv: int = _opt(
        "filters of an added Conv2D+MaxPool block before pooling; 0 = none",
        0,
        group="head",
        min=0,
        max=4096,
    )
    binary_sigmoid: bool = _opt(
        "two classes only: one sigmoid unit with binary cross-entropy instead of softmax",
        False,
        group="head",
    )
    augment: bool = _opt(
        "random flips, rotations, zoom and contrast while training: helps small datasets, "
        "but turns off the feature cache",
        False,
        group="augment",
    )
    class_weights: bool = _opt(
        "weight classes by inverse frequency, so rare classes count as much as common ones",
        False,
        group="augment",
    )
    early_stopping: int = _opt(
        "stop when validation loss has not improved for this many epochs; 0 = off",
        0,
        group="advanced",
        min=0,
        max=1000,
    )
    reduce_lr: bool = _opt(
        "lower the learning rate 5x when validation loss stalls for 2 epochs",
        False,
        group="advanced",
    )
    fine_tune_epochs: int = _opt(
        "epochs of phase 2 that unfreezes the top of the base; 0 = head only (fast, safe)",
        0,
        group="fine-tune",
        min=0,
        max=1000,
    )
    fine_tune_lr: float | None = _opt(
        "learning rate of phase 2; empty = lr/10, small enough not to wreck learned features",
        None,
        group="fine-tune",
        min=1e-8,
        max=1.0,
    )
    fine_tune_layers: int = _opt(
        "how many of the top kept base layers phase 2 unfreezes (BatchNorm stays frozen)",
        20,
        group="fine-tune",
        min=1,
        max=10000,
    )
    cache_features: str = _opt(
        "compute the frozen base's outputs once and train the head on them: auto = when the "
        "base is frozen and augmentation is off",
        "auto",
        group="advanced",
        choices=CACHE_FEATURES,
    )
    mixed_precision: str = _opt(
        "float16/bfloat16 compute with float32 weights: faster on recent GPUs; auto picks "
        "for the device",
        "off",
        group="advanced",
        choices=PRECISIONS,
    )
    workers: int = _opt(
        "threads that read batches from the image cache while the model trains",
        2,
        group="advanced",
        min=1,
        max=64,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = _flag(f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(
                    f"{flag} '{value}' is not one of: {', '.join(choices)}. "
                    f"Example: {flag} {choices[0]}"
                )
            if value is None or isinstance(value, (bool, str)):
                continue
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}.")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(
                    f"{flag} must be between {lo:g} and {hi:g}, got {value:g}. "
                    f"Default: {f.default}."
                )
        if not _FREEZE_RE.match(self.freeze):
            raise ConfigError(
                f"--freeze '{self.freeze}' is not understood. Use all, none, top:K "
                "(train only the top K layers) or names:layer_a,layer_b."
            )

    @property
    def effective_fine_tune_lr(self) -> float:
        """Phase 2's learning rate: ``fine_tune_lr`` or ``lr / 10``."""
        return self.fine_tune_lr if self.fine_tune_lr is not None else self.lr / 10

    @property
    def total_epochs(self) -> int:
        """Epochs of both phases together (the epoch count continues into phase 2)."""
        return self.epochs + self.fine_tune_epochs

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Serialise to JSON (the config part of ``config.json``)."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> TrainConfig:
        """Read a config from JSON text or a dict; keys that are not fields are ignored.

        ``config.json`` holds extra keys (dataset_id, device, ...) beside the fields.

        Raises:
            ConfigError: not JSON, or a field has an invalid value.
        """
        if isinstance(text, str):
            try:
                text = json.loads(text)
            except ValueError as err:
                raise ConfigError(f"The training config is not valid JSON ({err}).") from err
        if not isinstance(text, dict):
            raise ConfigError("The training config must be a JSON object.")
        names = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in text.items():
            if key in names:
                values[key] = _convert(names[key], value)
        return cls(**values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> type:
    """The base type of a field: bool, int, float or str (``X | None`` -> X)."""
    text = str(f.type)
    for kind in (bool, int, float, str):
        if text.startswith(kind.__name__):
            return kind
    raise TypeError(f"Unsupported TrainConfig field type {text}")


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def _convert(f: dataclasses.Field, value: Any) -> Any:
    """Convert a CLI string (or JSON value) to the field's type, with a one-line error."""
    flag = _flag(f.name)
    kind = _kind(f)
    if value is None or (isinstance(value, str) and value.strip() == "" and _optional(f)):
        if _optional(f):
            return None
        raise ConfigError(f"{flag} needs a value.")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{flag} must be true or false, got '{value}'.")
    if kind is int:
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        except ValueError:
            raise ConfigError(
                f"{flag} must be a whole number, got '{value}'. Example: {flag} {f.default}"
            ) from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            example = f.default if f.default is not None else 1e-4
            raise ConfigError(
                f"{flag} must be a number, got '{value}'. Example: {flag} {example}"
            ) from None
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `TrainConfig` field (plus ``--resume RUN_DIR``) to ``parser``.

    Values are parsed and checked by `config_from_args`, not by argparse, so a bad value
    gives one actionable line (exit 2) rather than a usage dump. Flags left out keep the
    dataclass default.
    """
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata["help"]
        if f.default not in (None, "") and _kind(f) is not bool:
            help_text += f" (default: {f.default})"
        if _kind(f) is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
        if f.name == "freeze":
            metavar = "{all,none,top:K}"
        parser.add_argument(
            _flag(f.name), dest=f.name, default=None, metavar=metavar, help=help_text
        )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue an interrupted run from its last finished epoch (other flags are ignored)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a `TrainConfig` from parsed flags; unset flags keep their defaults.

    Raises:
        ConfigError: a required flag is missing or a value is invalid.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f.name, None)
        if raw is not None:
            values[f.name] = _convert(f, raw)
    for name, what in (
        ("data", "a zip or folder of class folders"),
        ("base", "e.g. builtin:digits-cnn or model.keras"),
        ("out", "the run directory to write"),
    ):
        if not values.get(name):
            raise ConfigError(f"{_flag(name)} is required ({what}).")
    return TrainConfig(**values)


def config_to_args(config: TrainConfig) -> list[str]:
    """The CLI flags that reproduce ``config`` (the inverse of `config_from_args`)."""
    out: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if value == f.default and f.name not in ("data", "base", "out"):
            continue
        if isinstance(value, bool):
            out.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value is None:
            continue
        else:
            out += [_flag(f.name), repr(value) if isinstance(value, float) else str(value)]
    return out


# ----------------------------------------------------------------------------------------
# Run-directory files (plain JSON, written atomically so readers never see half a file).


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_status(run_dir: Path, state: str, **extra: Any) -> dict[str, Any]:
    """Update ``status.json``: ``state`` plus ``extra``, keeping the other keys; return it."""
    path = Path(run_dir) / STATUS_FILE
    status = read_json(path) or {}
    if state not in ("queued",):
        status.pop("position", None)
    status.update(extra)
    status["state"] = state
    status["updated"] = time.time()
    write_json(path, status)
    return status


def read_metrics_file(run_dir: Path) -> list[dict[str, Any]]:
    """Parse ``metrics.jsonl``; a half-written last line (a crash mid-write) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _append_line(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


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

    @property
    def halted(self) -> bool:
        """Whether training must not continue (stop requested or diverged)."""
        return self.stopped or self.diverged_epoch is not None


# ----------------------------------------------------------------------------------------
# Keras classes, built on first access so importing this module never imports Keras.

_KERAS_CLASSES = (
    "ArrayDataset",
    "MetricsWriter",
    "ProgressWriter",
    "StopWatcher",
    "NanGuard",
    "BestCheckpoint",
    "EpochCheckpoint",
)


def __getattr__(name: str) -> Any:
    if name in _KERAS_CLASSES:
        return _keras_classes()[name]
    raise AttributeError(f"module 'retrain.train' has no attribute '{name}'")


@functools.cache
def _keras_classes() -> dict[str, type]:
    import keras

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

    class MetricsWriter(keras.callbacks.Callback):
        """Append one JSON line per finished epoch to ``metrics.jsonl``.

        Keys: epoch (1-based, continuing across phases), phase, loss, accuracy, val_loss,
        val_accuracy, lr, seconds, images_per_second (training images per second).
        """

        def __init__(self, run_state: RunState, phase: int, num_images: int) -> None:
            super().__init__()
            self.state, self.phase, self.num_images = run_state, phase, num_images
            self.path = run_state.run_dir / METRICS_FILE
            self._start = self._train_end = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = self._train_end = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self._train_end = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if self.state.diverged_epoch is not None:
                return
            logs = logs or {}
            seconds = time.perf_counter() - self._start
            train_seconds = max(self._train_end - self._start, 1e-9)
            row = {
                "epoch": epoch + 1,
                "phase": self.phase,
                "loss": _finite(logs.get("loss")),
                "accuracy": _finite(logs.get("accuracy")),
                "val_loss": _finite(logs.get("val_loss")),
                "val_accuracy": _finite(logs.get("val_accuracy")),
                "lr": _current_lr(self.model),
                "seconds": round(seconds, 3),
                "images_per_second": round(self.num_images / train_seconds, 1),
                "time": time.time(),
            }
            if self.state.stopped:
                row["partial"] = True
            _append_line(self.path, row)

    class ProgressWriter(keras.callbacks.Callback):
        """Write ``progress.json`` at most every ``interval`` seconds (and at epoch ends).

        Keys: phase, epoch (1-based), epochs, batch, batches, images_per_second, eta_seconds.
        """

        def __init__(
            self,
            run_state: RunState,
            phase: int,
            batches: int,
            batch_size: int,
            interval: float = PROGRESS_INTERVAL_S,
        ) -> None:
            super().__init__()
            self.state, self.phase = run_state, phase
            self.batches, self.batch_size, self.interval = batches, batch_size, interval
            self.path = run_state.run_dir / PROGRESS_FILE
            self._epoch = 0
            self._epoch_start = 0.0
            self._last_write = 0.0
            self._epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._epoch = epoch
            self._epoch_start = time.perf_counter()
            self._write(0, force=True)

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self._write(batch + 1)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self._epoch_seconds.append(time.perf_counter() - self._epoch_start)
            self._write(self.batches, force=True, finished=True)

        def _write(self, batch: int, force: bool = False, finished: bool = False) -> None:
            now = time.perf_counter()
            if not force and now - self._last_write < self.interval:
                return
            self._last_write = now
            elapsed = now - self._epoch_start
            images_per_second = batch * self.batch_size / elapsed if elapsed > 0 and batch else 0.0
            remaining_epochs = self.state.total_epochs - self._epoch - 1
            if finished:
                per_epoch = self._epoch_seconds[-1]
                eta = per_epoch * remaining_epochs
            elif batch:
                per_batch = elapsed / batch
                eta = per_batch * (self.batches - batch) + per_batch * self.batches * max(
                    remaining_epochs, 0
                )
            else:
                eta = None
            write_json(
                self.path,
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

    class StopWatcher(keras.callbacks.Callback):
        """Honour a stop request (a ``stop`` file in the run directory) at the next batch."""

        def __init__(self, run_state: RunState) -> None:
            super().__init__()
            self.state = run_state
            self.path = run_state.run_dir / STOP_FILE

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if not self.state.stopped and self.path.exists():
                self.state.stopped = True
                self.model.stop_training = True
                write_status(self.state.run_dir, "stopping")

    class NanGuard(keras.callbacks.Callback):
        """Stop at the first batch whose loss is NaN or infinite, remembering the epoch."""

        def __init__(self, run_state: RunState) -> None:
            super().__init__()
            self.state = run_state
            self._epoch = 0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._epoch = epoch

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and _finite(loss) is None and self.state.diverged_epoch is None:
                self.state.diverged_epoch = self._epoch + 1
                self.model.stop_training = True

    class BestCheckpoint(keras.callbacks.Callback):
        """Keep ``best.keras`` (the full model) at the epoch with the best val accuracy.

        Equal accuracies (one image is a whole percent of a small validation set) are
        decided by the lower validation loss, so a later, more confident epoch wins a tie.
        Without validation data the training accuracy and loss decide. Writing a .keras file takes
        a fraction of a second while a cached-feature epoch takes less, so an improvement is
        snapshotted in memory and written at most every ``min_interval`` seconds, and always
        when the fit ends (finished, stopped or early-stopped).
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
            score = _finite(logs.get("val_accuracy", logs.get("accuracy")))
            if score is None:
                return
            loss = _finite(logs.get("val_loss", logs.get("loss")))
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
            from retrain.modelfile import save_model

            epoch, score, weights = self._pending
            current = self.changing.get_weights()
            self.changing.set_weights(weights)
            try:
                meta = dict(self.metadata, epoch=epoch, val_accuracy=score)
                save_model(self.model_to_save, self.state.run_dir / "best.keras", meta)
            finally:
                self.changing.set_weights(current)
            self._pending = None
            self._last_write = time.monotonic()

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
            save_checkpoint(
                self.state, self.model_to_save, self.model.optimizer, epoch + 1, self.scope
            )

    return {
        "ArrayDataset": ArrayDataset,
        "MetricsWriter": MetricsWriter,
        "ProgressWriter": ProgressWriter,
        "StopWatcher": StopWatcher,
        "NanGuard": NanGuard,
        "BestCheckpoint": BestCheckpoint,
        "EpochCheckpoint": EpochCheckpoint,
    }


def diverged_message(epoch: int, lr: float) -> str:
    """The one line shown when the loss became NaN: what happened and what to try."""
    return (
        f"Training diverged (loss is NaN) at epoch {epoch}; lower the learning rate, "
        f"e.g. --lr {lr / 10:g}"
    )


def _current_lr(model: Any) -> float | None:
    import keras

    try:
        return _finite(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------
# Resumable checkpoints: one .npz (written atomically) with everything --resume needs.


def _to_numpy(variable: Any) -> np.ndarray:
    import keras

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
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = run_state.run_dir / CHECKPOINT_FILE
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Any] | None:
    """Return ``(meta, npz)`` of a run's ``last.npz``, or None when there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    npz = np.load(path)
    meta = json.loads(npz["meta"].tobytes().decode())
    return meta, npz


def _restore_optimizer(optimizer: Any, variables: list, npz: Any, count: int) -> bool:
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


# ----------------------------------------------------------------------------------------
# Feature cache.


def feature_cache_path(
    dataset: Any,
    base_spec: str,
    cut_at: str,
    image_size: tuple[int, int],
    resize_mode: str,
    split: str,
    policy: str = "float32",
) -> Path:
    """Where the cached base outputs of one dataset split live.

    The key is (dataset id, base spec, cut layer, image size, resize mode, dtype policy,
    backend); a base given as a file also keys on the file's size and modification time, so
    a replaced file is never served stale features.
    """
    import keras

    spec = base_spec
    path = Path(base_spec)
    if path.is_file():
        stat = path.stat()
        spec = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = json.dumps(
        [dataset.dataset_id, spec, cut_at, list(image_size), resize_mode, policy]
        + [keras.backend.backend()]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(dataset.manifest_path).parent / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"features_{split}_{digest}.npy"


def cached_features(
    features_model: Any, images: np.ndarray, path: Path, batch_size: int = 64
) -> np.ndarray:
    """Return ``features_model``'s outputs for ``images``, computed once and kept at ``path``.

    The outputs are computed with batched ``predict`` in chunks written straight into a
    memory-mapped ``.npy`` (bounded memory), then renamed into place, so a crash never leaves
    a partial cache behind. Later calls read the file (memory-mapped).
    """
    path = Path(path)
    if path.is_file():
        cached = np.load(path, mmap_mode="r")
        if len(cached) == len(images):
            return cached
    chunk = max(batch_size, 256)
    shape = tuple(int(d) for d in features_model.outputs[0].shape[1:])
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), *shape))
    chunk = chunk // batch_size * batch_size
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        batch = np.asarray(images[start:stop])
        short = -len(batch) % batch_size
        if short:
            # Pad the last batch to full size: a new batch shape would trace the model again.
            batch = np.concatenate([batch, np.zeros((short, *batch.shape[1:]), batch.dtype)])
        out[start:stop] = features_model.predict(batch, batch_size=batch_size, verbose=0)[
            : stop - start
        ]
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------------------
# The training run.


def _make_optimizer(name: str, lr: float) -> Any:
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    return keras.optimizers.RMSprop(learning_rate=lr)


def _augmented(surgery: Any, seed: int) -> Any:
    """``Input -> random flip/rotation/zoom/contrast -> features -> head``, for training only.

    The random layers are active only while fitting; the saved model is ``surgery.model``,
    which has none.
    """
    import keras

    inp_spec = surgery.model.inputs[0]
    inputs = keras.Input(shape=tuple(inp_spec.shape[1:]), dtype=inp_spec.dtype, name="images")
    x = keras.ops.cast(inputs, "float32")
    x = keras.layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(x)
    x = keras.layers.RandomRotation(0.08, seed=seed + 1, name="augment_rotation")(x)
    x = keras.layers.RandomZoom(0.1, seed=seed + 2, name="augment_zoom")(x)
    x = keras.layers.RandomContrast(0.2, seed=seed + 3, name="augment_contrast")(x)
    x = keras.ops.cast(keras.ops.clip(keras.ops.round(x), 0, 255), inp_spec.dtype)
    outputs = surgery.head(surgery.features(x, training=False))
    return keras.Model(inputs, outputs, name="train_with_augmentation")


def _class_weight_vector(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights n / (k * count_c) (classes without images get 1)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.ones(num_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _versions() -> dict[str, str]:
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__}
    versions["numpy"] = np.__version__
    backend_module = sys.modules.get(keras.backend.backend())
    if backend_module is not None and hasattr(backend_module, "__version__"):
        versions[keras.backend.backend()] = backend_module.__version__
    return versions


def _default_workspace(run_dir: Path) -> Path:
    if run_dir.parent.name == "runs":
        return run_dir.parent.parent
    from retrain.workspace import home

    return home()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    workspace: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train in the foreground and write the run directory; return the summary.

    Args:
        config: the run's settings.
        run_dir: the run directory (created if needed).
        workspace: where datasets are ingested and cached; default: the workspace holding
            ``run_dir`` (``<workspace>/runs/<run_id>``), else ``retrain.workspace.home()``.
        resume: continue from ``last.npz`` (the last finished epoch) instead of starting over.

    Returns:
        ``{"run_dir", "state", "stopped", "epochs_done", "best_val_accuracy", "best_epoch",
        "final", "feature_cache", "seconds", "warnings", ...}``.

    Raises:
        ConfigError / DatasetError / ModelError: bad input (also written to status.json).
        RunError: training diverged or ran out of memory (also written to status.json).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    workspace = Path(workspace) if workspace is not None else _default_workspace(run_dir)
    from retrain.jobs import _own_start_time

    write_status(
        run_dir,
        "running",
        pid=os.getpid(),
        pid_started=_own_start_time(),
        started=time.time(),
        error=None,
        stopped=False,
    )
    write_json(run_dir / PROGRESS_FILE, {"phase": "preparing", "epoch": 0, "time": time.time()})
    try:
        summary = _train(config, run_dir, workspace, resume)
    except RetrainError as err:
        write_status(run_dir, "failed", error=str(err), finished=time.time())
        raise
    except Exception as err:  # the worker's last word: any failure becomes one status line
        first = (str(err).strip().splitlines() or [""])[0][:300]
        out_of_memory = isinstance(err, MemoryError) or "ResourceExhausted" in type(err).__name__
        if out_of_memory or "out of memory" in first.lower():
            message = (
                f"Out of memory while training; lower --batch-size (now {config.batch_size}) "
                "or --image-size."
            )
            write_status(run_dir, "failed", error=message, finished=time.time())
            raise RunError(message) from err
        write_status(
            run_dir, "failed", error=f"{type(err).__name__}: {first}", finished=time.time()
        )
        raise
    write_status(
        run_dir,
        "done",
        stopped=summary["stopped"],
        best_val_accuracy=summary["best_val_accuracy"],
        best_epoch=summary["best_epoch"],
        epochs_done=summary["epochs_done"],
        finished=time.time(),
    )
    return summary


def _train(config: TrainConfig, run_dir: Path, workspace: Path, resume: bool) -> dict[str, Any]:
    from retrain import data, devices, models
    from retrain import surgery as surgery_module
    from retrain.modelfile import save_model

    if not config.data or not config.base:
        raise ConfigError("A run needs --data (images) and --base (a model).")
    t_start = time.perf_counter()
    notes: list[str] = []
    dataset = data.ingest(config.data, workspace)  # first: bad data fails before Keras loads
    info = devices.describe_device()
    policy = devices.set_precision(config.mixed_precision)
    import keras

    keras.utils.set_random_seed(config.seed)

    base = models.load_base(config.base, workspace=workspace)
    if config.image_size:
        image_size = (config.image_size, config.image_size)
    else:
        image_size = tuple(base.input_size) if base.input_size else (224, 224)
    freeze = surgery_module.FreezeSpec.parse(config.freeze)
    head_spec = surgery_module.HeadSpec(
        hidden_units=config.hidden_units,
        dropout=config.dropout,
        binary_sigmoid=config.binary_sigmoid,
        add_conv=config.add_conv,
    )
    frozen_base = freeze.mode == "all"
    if config.cache_features == "on" and (config.augment or not frozen_base):
        raise ConfigError(
            "--cache-features on needs a frozen base (--freeze all) and no --augment; "
            "use --cache-features auto."
        )
    use_cache = config.cache_features != "off" and frozen_base and not config.augment

    # Images: the uint8 cache at the model's input size, and the validation split.
    write_json(run_dir / PROGRESS_FILE, {"phase": "caching images", "time": time.time()})
    train_cache = data.load_images(dataset, "train", image_size, config.resize_mode)
    if "val" in dataset.splits and dataset.splits["val"]:
        val_cache = data.load_images(dataset, "val", image_size, config.resize_mode)
        train_idx = np.arange(len(train_cache.labels))
        val_idx = np.arange(len(val_cache.labels))
        val_source = "the dataset's val folder"
    elif config.val_split > 0:
        val_cache = train_cache
        train_idx, val_idx = data.stratified_split(
            np.asarray(train_cache.labels), config.val_split, config.seed
        )
        val_source = f"{config.val_split:.0%} of the training images"
    else:
        val_cache, train_idx, val_idx = None, np.arange(len(train_cache.labels)), None
        val_source = "none"
    n_train = len(train_idx)
    if n_train == 0:
        raise ConfigError(
            "No training images are left after the validation split; lower --val-split."
        )

    batch_size = config.batch_size
    if batch_size > n_train:
        notes.append(
            f"Batch size {batch_size} is larger than the {n_train} training images; "
            f"using {n_train}."
        )
        _say("warning: " + notes[-1])
        batch_size = n_train
    scope, global_batch = devices.distribution(batch_size)
    replicas = max(1, global_batch // batch_size)

    with scope:
        surgery = surgery_module.replace_head(
            base,
            dataset.class_names,
            cut_at=config.cut_at,
            head=head_spec,
            freeze=freeze,
            image_size=image_size,
        )
    preprocessing = base.preprocessing
    del base  # the surgery keeps what it needs; the original head can go
    binary = surgery.label_encoding == "binary"

    def encode(labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        return labels.astype(np.float32)[:, None] if binary else labels.astype(np.int32)

    y_train_all = encode(train_cache.labels)
    y_val_all = encode(val_cache.labels) if val_cache is not None else None
    sample_weight = None
    if config.class_weights:
        weights = _class_weight_vector(
            np.asarray(train_cache.labels)[train_idx], len(dataset.class_names)
        )
        sample_weight = weights[np.asarray(train_cache.labels)].astype(np.float32)
    elif dataset.has_warning("imbalance"):
        notes.append("The classes are imbalanced; consider --class-weights.")

    metadata = {
        "class_names": list(dataset.class_names),
        "image_size": list(image_size),
        "resize_mode": config.resize_mode,
        # The file is shared: keep the base's name, not the server path (it names the session).
        "base": shareable(config.base),
        "loss": surgery.loss,
        "label_encoding": surgery.label_encoding,
        "preprocessing": preprocessing,
        "dataset_id": dataset.dataset_id,
        "cut_at": surgery.cut_at,
    }
    full_config = {
        **config.to_dict(),
        "out": str(run_dir),
        "run_id": run_dir.name,
        "dataset_id": dataset.dataset_id,
        "dataset_name": dataset.name,
        "manifest_path": str(dataset.manifest_path),
        "class_names": list(dataset.class_names),
        "num_train": n_train,
        "num_val": 0 if val_idx is None else len(val_idx),
        "validation": val_source,
        "image_size_used": list(image_size),
        "loss": surgery.loss,
        "label_encoding": surgery.label_encoding,
        "preprocessing": metadata["preprocessing"],
        "cut_at_used": surgery.cut_at,
        "feature_cache": use_cache,
        "batch_size_used": batch_size,
        "global_batch_size": global_batch,
        "precision": policy,
        "backend": info.get("backend"),
        "device": info,
        "versions": _versions(),
        "diff": surgery.diff,
    }
    write_json(run_dir / CONFIG_FILE, full_config)

    # Resume: restore weights and the epoch counter; keep metrics lines up to that epoch.
    state = RunState(run_dir, config.total_epochs)
    state.phase1_end = config.epochs
    start_epoch = 0
    checkpoint = load_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        notes.append("No finished epoch to resume from; starting from epoch 1.")
    if checkpoint is not None:
        meta, npz = checkpoint
        target = surgery.head if meta.get("scope") == "head" else surgery.model
        if meta["weights"] != len(target.weights):
            raise RunError(
                f"The checkpoint in '{run_dir}' does not match the model it configures; "
                "start a new run."
            )
        target.set_weights([npz[f"w{i}"] for i in range(meta["weights"])])
        start_epoch = int(meta["epoch"])
        state.phase1_end = int(meta.get("phase1_end", config.epochs))
        state.best_val_accuracy = meta.get("best_val_accuracy")
        state.best_epoch = meta.get("best_epoch")
    rows = [r for r in read_metrics_file(run_dir) if r.get("epoch", 0) <= start_epoch]
    seen: set[int] = set()
    kept = []
    for row in rows:
        if row["epoch"] not in seen:
            seen.add(row["epoch"])
            kept.append(row)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    # A stop request belongs to the previous process; this one was asked to run.
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    monitor = "val_loss" if val_idx is not None else "loss"

    def checkpoint_part(phase: int) -> tuple[Any, str]:
        """What changes while training: only the head while the base is frozen."""
        if phase == 1 and frozen_base:
            return surgery.head, "head"
        return surgery.model, "model"

    def callbacks_for(phase: int, batches: int, to_save: Any, first: int) -> list:
        cls = _keras_classes()
        cbs = [
            cls["NanGuard"](state),
            cls["StopWatcher"](state),
            cls["ProgressWriter"](state, phase, batches, global_batch),
            cls["MetricsWriter"](state, phase, n_train),
            cls["BestCheckpoint"](state, to_save, metadata, changing=checkpoint_part(phase)[0]),
            cls["EpochCheckpoint"](state, *checkpoint_part(phase)),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=first > 0),
        ]
        if keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tensorboard"):
            # TensorBoard's summary writer needs TensorFlow and the tensorboard package.
            cbs.append(
                keras.callbacks.TensorBoard(
                    log_dir=str(run_dir / "tensorboard"), write_graph=False, profile_batch=0
                )
            )
        if config.early_stopping:
            cbs.append(
                keras.callbacks.EarlyStopping(monitor=monitor, patience=config.early_stopping)
            )
        if config.reduce_lr:
            cbs.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=monitor, factor=0.2, patience=2, min_lr=1e-7
                )
            )
        return cbs

    jit = devices.jit_compile_default()
    if config.augment and jit is True:
        # Keras's RandomRotation/RandomZoom cannot be XLA-compiled; say so instead of letting
        # Keras fall back with a warning in the log.
        jit = False
        notes.append("Augmentation (rotation, zoom) runs without XLA compilation.")
    cls = _keras_classes()
    feature_seconds = 0.0

    def fit(
        model: Any, lr: float, x_train, x_val, first: int, last: int, phase: int, workers: int
    ) -> None:
        state.phase = phase
        # The optimizer's variables must be created under the same distribution as the model
        # (MirroredStrategy refuses to mix them).
        with scope:
            optimizer = _make_optimizer(config.optimizer, lr)
            if checkpoint is not None and first == start_epoch and start_epoch > 0:
                meta, npz = checkpoint
                if meta.get("phase") == phase and not _restore_optimizer(
                    optimizer, model.trainable_variables, npz, int(meta["optimizer_variables"])
                ):
                    notes.append("Optimizer state could not be restored; it restarts on resume.")
            model.compile(
                optimizer=optimizer, loss=surgery.loss, metrics=["accuracy"], jit_compile=jit
            )
        train_data = cls["ArrayDataset"](
            x_train,
            y_train_all,
            train_idx,
            global_batch,
            shuffle=True,
            seed=config.seed + first,
            sample_weight=sample_weight,
            workers=workers,
            multiple_of=replicas,
        )
        val_data = None
        if val_idx is not None:
            val_data = cls["ArrayDataset"](
                x_val, y_val_all, val_idx, global_batch, workers=workers, multiple_of=replicas
            )
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=last,
            initial_epoch=first,
            callbacks=callbacks_for(phase, len(train_data), surgery.model, first),
            verbose=0,
        )

    # Phase 1: the new head, base frozen (on cached features when possible).
    if start_epoch < state.phase1_end:
        if use_cache:
            write_json(run_dir / PROGRESS_FILE, {"phase": "caching features", "time": time.time()})
            t0 = time.perf_counter()

            def features_of(split: str, images: np.ndarray) -> np.ndarray:
                path = feature_cache_path(
                    dataset, config.base, surgery.cut_at, image_size, config.resize_mode,
                    split, policy,
                )  # fmt: skip
                return cached_features(
                    surgery.features, images, path, batch_size=max(global_batch, 64)
                )

            with scope:
                x_train = features_of("train", train_cache.images)
                x_val = x_train
                if val_cache is not None and val_cache is not train_cache:
                    x_val = features_of("val", val_cache.images)
            feature_seconds = time.perf_counter() - t0
            model = surgery.head
            # Features are small next to images: read them into memory when they fit easily.
            if x_train.nbytes < 1 << 30:
                same = x_val is x_train
                x_train = np.array(x_train)
                x_val = x_train if same else np.array(x_val)
            workers = 1  # batches are array slices: threads would only add overhead
        else:
            x_train = train_cache.images
            x_val = val_cache.images if val_cache is not None else None
            model = _augmented(surgery, config.seed) if config.augment else surgery.model
            workers = config.workers
        fit(model, config.lr, x_train, x_val, start_epoch, config.epochs, 1, workers)
        if not state.halted:
            # Early stopping may end phase 1 before config.epochs: remember where it ended,
            # so a resumed run goes on with phase 2 rather than more of phase 1.
            done = read_metrics_file(run_dir)
            state.phase1_end = max([r["epoch"] for r in done], default=start_epoch)
            part, part_name = checkpoint_part(1)
            save_checkpoint(state, part, model.optimizer, state.phase1_end, part_name)

    # Phase 2: unfreeze the top of the base at a lower learning rate, continuing the count.
    if config.fine_tune_epochs and not state.halted:
        first = max(start_epoch, state.phase1_end)
        last = state.phase1_end + config.fine_tune_epochs
        if first < last:
            surgery_module.apply_freeze(
                surgery,
                surgery_module.FreezeSpec(
                    mode="top",
                    k=min(config.fine_tune_layers, len(surgery_module.kept_layers(surgery))),
                ),
            )
            model = _augmented(surgery, config.seed) if config.augment else surgery.model
            fit(
                model,
                config.effective_fine_tune_lr,
                train_cache.images,
                val_cache.images if val_cache is not None else None,
                first,
                last,
                2,
                config.workers,
            )

    if state.diverged_epoch is not None:
        raise RunError(diverged_message(state.diverged_epoch, config.lr))
    rows = read_metrics_file(run_dir)
    final_meta = dict(metadata, epoch=rows[-1]["epoch"] if rows else 0)
    save_model(surgery.model, run_dir / "model.keras", final_meta)
    if not (run_dir / "best.keras").exists():
        save_model(surgery.model, run_dir / "best.keras", final_meta)
    write_json(
        run_dir / PROGRESS_FILE,
        {
            "phase": "done",
            "epoch": rows[-1]["epoch"] if rows else 0,
            "epochs": config.total_epochs,
            "time": time.time(),
        },
    )
    return {
        "run_dir": str(run_dir),
        "state": "done",
        "stopped": state.stopped,
        "epochs_done": len(rows),
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
        "final": rows[-1] if rows else None,
        "feature_cache": use_cache,
        "feature_seconds": round(feature_seconds, 2),
        "class_names": list(dataset.class_names),
        "device": info.get("device"),
        "backend": info.get("backend"),
        "seconds": round(time.perf_counter() - t_start, 2),
        "warnings": notes,
    }


def cli_train(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain train ...``: train in the foreground; return the summary JSON.

    ``--resume RUN_DIR`` reads the run's ``config.json`` and continues after its last
    finished epoch. A worker started by ``retrain.jobs`` first waits for a training slot.

    Raises:
        ConfigError: bad flags. RunError: nothing to resume, divergence, out of memory.
    """
    from retrain import jobs

    threads = os.environ.get("RETRAIN_WORKER_THREADS")
    if threads:
        from retrain import devices

        devices.limit_threads(int(threads))
    resume = bool(getattr(args, "resume", None))
    if resume:
        run_dir = Path(args.resume)
        saved = read_json(run_dir / CONFIG_FILE)
        if not isinstance(saved, dict):
            raise RunError(f"No config.json in '{run_dir}'; --resume needs a run directory.")
        config = dataclasses.replace(TrainConfig.from_json(saved), out=str(run_dir))
    else:
        config = config_from_args(args)
        run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    workspace = getattr(args, "workspace", None)
    with jobs.training_slot(run_dir) as granted:
        if not granted:  # stopped while waiting in the queue
            write_status(run_dir, "done", stopped=True, finished=time.time())
            return {"run_dir": str(run_dir), "state": "done", "stopped": True, "epochs_done": 0}
        return train(config, run_dir, workspace=workspace, resume=resume)
