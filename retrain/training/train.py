"""Training: the two-phase recipe, run in the foreground on one run directory.

`train` reads like the recipe it runs (fastai's ``fine_tune``): prepare the data, build the
model, restore a checkpoint, fit the new head, fine-tune the top of the base. Each step is a
method of `_Run`, which holds the run's state; nothing else is shared.

1. phase 1 trains the new head with the base frozen. When nothing changes the base's output
   between epochs (frozen base, no augmentation) the base's features are computed once,
   stored in the dataset's cache folder, and the head trains on them: that is what makes
   head-only retraining fast;
2. an optional phase 2 unfreezes the top ``fine_tune_layers`` kept layers (BatchNorm stays
   frozen) at a learning rate about 10x lower, recompiles and continues the epoch count.

Data reaches ``fit`` through a ``keras.utils.PyDataset`` over the uint8 memory-mapped image
cache (no ``tf.data``), so the same code runs on the TensorFlow, JAX and PyTorch backends.

Where things live: the settings are `retrain.training.config.TrainConfig`; the feature cache
is `retrain.training.features`; the run directory's files are `retrain.runs.rundir`'s; the
Keras callbacks and the batch feed are `retrain.training.callbacks` (imported by
`_keras_parts`, the one place that loads them); taking a training slot before training is
`retrain.runs.worker`'s. ``import retrain.training.train`` imports no Keras.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from retrain.errors import ConfigError, RetrainError, RunError
from retrain.runs import rundir
from retrain.runs.procs import own_start_time
from retrain.sessions.workspace import shareable
from retrain.training.config import FreezeSpec, TrainConfig
from retrain.training.features import cached_features, feature_cache_path, frozen_split

#: Phase 2 trains on the frozen lower layers' outputs only while they take at most this much
#: disk (they are kept with the dataset's image cache, inside the session's quota).
PHASE2_CACHE_MAX_BYTES = 512 << 20


def _keras_parts() -> ModuleType:
    """`retrain.training.callbacks` (imports Keras): loaded here only, when a run trains."""
    from retrain.training import callbacks

    return callbacks


def diverged_message(epoch: int, lr: float) -> str:
    """The one line shown when the loss became NaN: what happened and what to try."""
    return (
        f"Training diverged (loss is NaN) at epoch {epoch}; lower the learning rate, "
        f"e.g. --lr {lr / 10:g}"
    )


def versions() -> dict[str, str]:
    """Versions of what computed a model: python, keras, the backend and its version, numpy
    (and tensorflow when loaded). Recorded in config.json and in exported model cards."""
    import keras

    backend = keras.backend.backend()
    out = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": backend,
        "numpy": np.__version__,
    }
    for name in (backend, "tensorflow"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


# ----------------------------------------------------------------------------------------
# Pieces of the recipe.


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


def _default_workspace(run_dir: Path) -> Path:
    if run_dir.parent.name == "runs":
        return run_dir.parent.parent
    from retrain.sessions.workspace import home

    return home()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# The training run.


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
            ``run_dir`` (``<workspace>/runs/<run_id>``), else ``retrain.sessions.workspace.home()``.
        resume: continue from ``last.npz`` (the last finished epoch) instead of starting over.

    Returns:
        ``{"run_dir", "state", "stopped", "epochs_done", "best_val_accuracy", "best_epoch",
        "saved_epoch", "final", "feature_cache", "seconds", "warnings", ...}``; ``saved_epoch``
        is the epoch whose model is ``best.keras`` (what evaluate and export use).

    Raises:
        ConfigError / DatasetError / ModelError: bad input (also written to the run's status).
        RunError: training diverged or ran out of memory (also written to the run's status).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    workspace = Path(workspace) if workspace is not None else _default_workspace(run_dir)
    # A stop request left from a previous worker is forgotten now, before the slow part
    # (data, caches, model): one made while this worker prepares is for this run and stays.
    rundir.clear_stop(run_dir)
    rundir.write_status(
        run_dir,
        "running",
        pid=os.getpid(),
        pid_started=own_start_time(),
        started=time.time(),
        error=None,
        stopped=False,
    )
    rundir.write_progress(run_dir, {"phase": "preparing", "epoch": 0})
    try:
        summary = _train(config, run_dir, workspace, resume)
    except RetrainError as err:
        rundir.write_status(run_dir, "failed", error=str(err), finished=time.time())
        raise
    except Exception as err:  # the worker's last word: any failure becomes one status line
        first = (str(err).strip().splitlines() or [""])[0][:300]
        out_of_memory = isinstance(err, MemoryError) or "ResourceExhausted" in type(err).__name__
        if out_of_memory or "out of memory" in first.lower():
            message = (
                f"Out of memory while training; lower --batch-size (now {config.batch_size}) "
                "or --image-size."
            )
            rundir.write_status(run_dir, "failed", error=message, finished=time.time())
            raise RunError(message) from err
        rundir.write_status(
            run_dir, "failed", error=f"{type(err).__name__}: {first}", finished=time.time()
        )
        raise
    rundir.write_status(
        run_dir,
        "done",
        stopped=summary["stopped"],
        best_val_accuracy=summary["best_val_accuracy"],
        best_epoch=summary["best_epoch"],
        epochs_done=summary["epochs_done"],
        early_stopped_epoch=summary["early_stopped_epoch"],
        restored_epoch=summary["restored_epoch"],
        saved_epoch=summary["saved_epoch"],
        bias_corrected=summary["bias_correction"] is not None,
        epochs_budget=summary["epochs_budget"],
        lr=summary["lr"],
        finished=time.time(),
    )
    return summary


def _train(config: TrainConfig, run_dir: Path, workspace: Path, resume: bool) -> dict[str, Any]:
    """The recipe: prepare, build, restore, fit the head, fine-tune, save."""
    if not config.data or not config.base:
        raise ConfigError("A run needs --data (images) and --base (a model).")
    run = _Run(config, run_dir, workspace)
    run.load_inputs()
    run.prepare_data(resume)
    run.build()
    run.find_lr(resume)
    run.record_config()
    run.restore(resume)
    run.fit_head()
    run.fine_tune()
    run.correct_bias()
    return run.finish()


class _Run:
    """One training run's state, filled step by step by the recipe in `_train`."""

    def __init__(self, config: TrainConfig, run_dir: Path, workspace: Path) -> None:
        self.config, self.run_dir, self.workspace = config, run_dir, workspace
        self.t_start = time.perf_counter()
        self.notes: list[str] = []  # warnings for the summary
        self.feature_seconds = 0.0
        self.phase2_cache: str | None = None  # the layer whose outputs phase 2 trained on
        self.checkpoint: tuple[dict[str, Any], Any] | None = None
        self.start_epoch = 0
        self.lr = config.lr  # phase 1's rate: set, or found by `find_lr`
        self.lr_finding: dict[str, Any] | None = None
        self._phase1: tuple | None = None  # phase 1's (x_train, x_val, model, workers)
        self.bias_correction: dict[str, Any] | None = None
        self.fine_tune_lr: float | None = None  # phase 2's rate, when it ran

    def _note(self, message: str, say: bool = False) -> None:
        self.notes.append(message)
        if say:
            _say("warning: " + message)

    # -- 1. inputs: the data (first: bad data fails before Keras loads), device, base model

    def load_inputs(self) -> None:
        from retrain.data.store import ingest
        from retrain.models.load import load_base
        from retrain.training import devices

        config = self.config
        self.dataset = ingest(config.data, self.workspace)
        self.device_info = devices.describe_device()
        self.policy = devices.set_precision(config.mixed_precision)
        import keras

        keras.utils.set_random_seed(config.seed)
        self.base = load_base(config.base, workspace=self.workspace)
        if config.image_size:
            self.image_size = (config.image_size, config.image_size)
        else:
            size = self.base.input_size
            self.image_size = tuple(size) if size else (224, 224)
        self._find_preprocessing()
        self._name_old_task()
        self.freeze = config.freeze_spec
        self.frozen_base = self.freeze.mode == "all"
        if config.cache_features == "on" and (config.augment or not self.frozen_base):
            raise ConfigError(
                "--cache-features on needs a frozen base (--freeze all) and no --augment; "
                "use --cache-features auto."
            )
        self.use_cache = config.cache_features != "off" and self.frozen_base and not config.augment

    def _find_preprocessing(self) -> None:
        """Set the base's preprocessing by --preprocessing, or probe it on --old-data."""
        from retrain.models.keras_helpers import preprocessing_warning
        from retrain.models.summary import resolve_preprocessing

        config = self.config
        old_data = config.old_data or None
        if config.preprocessing == "auto" and not old_data:
            warning = preprocessing_warning(self.base)
            if warning:
                self._note(warning, say=True)
            return
        self.base = resolve_preprocessing(
            self.base,
            config.preprocessing,
            old_data,
            workspace=self.workspace,
            original_classes=config.original_classes or None,
            image_size=self.image_size,
            resize_mode=config.resize_mode,  # the probe's sample is seeded on its own, so the
        )  # Model page, describe and training score the same images
        origin = self.base.origin
        _say(f"preprocessing: {self.base.preprocessing} ({origin['preprocessing_source']})")
        warning = (origin.get("preprocessing_probe_info") or {}).get("warning")
        if warning:
            self._note(warning, say=True)

    # -- 2. data: the uint8 image cache at the model's size, and the recorded split

    def prepare_data(self, resume: bool) -> None:
        from retrain.data.cache import load_images
        from retrain.training import devices

        config, dataset = self.config, self.dataset
        rundir.write_progress(self.run_dir, {"phase": "caching images"})
        channels = self.base.channels  # a grayscale base gets grayscale images
        self.train_cache = load_images(
            dataset, "train", self.image_size, config.resize_mode, channels=channels
        )
        self.val_cache = None
        if dataset.splits.get("val"):
            self.val_cache = load_images(
                dataset, "val", self.image_size, config.resize_mode, channels=channels
            )
            self.val_source = "the dataset's val folder"
        elif config.val_split > 0:
            self.val_cache = self.train_cache
            self.val_source = f"{config.val_split:.0%} of the training images"
        else:
            self.val_source = "none"
        recorded = rundir.read_split(self.run_dir) if resume else None
        if recorded is not None:
            self._use_split(recorded)
        else:
            self._make_split()
        self._training_rows(resume)
        self.n_train = len(self.train_idx)
        if self.n_train == 0:
            raise ConfigError(
                "No training images are left after the validation split; lower --val-split."
            )
        self.batch_size = config.batch_size
        if self.batch_size > self.n_train:
            self._note(
                f"Batch size {self.batch_size} is larger than the {self.n_train} training "
                f"images; using {self.n_train}.",
                say=True,
            )
            self.batch_size = self.n_train
        self.scope, self.global_batch = devices.distribution(self.batch_size)
        self.replicas = max(1, self.global_batch // self.batch_size)

    def _make_split(self) -> None:
        """Split as configured and record the split (paths relative to the data root)."""
        from retrain.data.splits import stratified_split

        train_paths = self.train_cache.paths
        if self.val_cache is None:
            self.train_idx, self.val_idx = np.arange(len(train_paths)), None
            val_paths: list[str] = []
        elif self.val_cache is not self.train_cache:  # the data's own val folder
            self.train_idx = np.arange(len(train_paths))
            self.val_idx = np.arange(len(self.val_cache.paths))
            val_paths = list(self.val_cache.paths)
        else:
            labels = np.asarray(self.train_cache.labels)
            self.train_idx, self.val_idx = stratified_split(
                labels, self.config.val_split, self.config.seed
            )
            val_paths = [train_paths[i] for i in self.val_idx]
        rundir.write_split(self.run_dir, [train_paths[i] for i in self.train_idx], val_paths)

    def _use_split(self, recorded: dict[str, list[str]]) -> None:
        """A resumed run trains and validates on the images it started with."""
        self.train_idx = rundir.indices_of(self.train_cache.paths, recorded["train"])
        if self.val_cache is None:
            self.val_idx = None
        else:
            self.val_idx = rundir.indices_of(self.val_cache.paths, recorded["val"])

    # -- keep the old classes (retrain.training.keep): the old task's rows and distillation targets

    def _name_old_task(self) -> None:
        """A keep-old-classes run: name the original outputs; with old data, choose its
        rehearsal memory and held-out images. Other runs: nothing (``self.old`` is None)."""
        from retrain.training import keep

        config = self.config
        self.old, self.distill_weight = None, 0.0
        self._targets: dict[str, np.ndarray] = {}  # distillation targets, per side
        if not config.keep_old_classes:
            return
        for flag, value in (
            ("--cut-at", config.cut_at),
            ("--hidden-units", config.hidden_units),
            ("--add-conv", config.add_conv),
            ("--binary-sigmoid", config.binary_sigmoid),
        ):
            if value:
                raise ConfigError(
                    f"{flag} does not apply with --keep-old-classes: the original head is kept "
                    f"(cut just before it) and widened for the new classes; leave {flag} out."
                )
        self.old = keep.old_task(
            self.base,
            config.old_data,
            config.original_classes,
            workspace=self.workspace,
            per_class=config.rehearsal_per_class,
            val_split=config.val_split,
            seed=config.seed,
        )
        self.distill_weight = keep.distill_weight(config.distill_weight, bool(config.old_data))
        if self.old.dataset is None:
            self._note(
                "Without --old-data only distillation keeps the old classes, and it keeps "
                "little of them: the new classes tend to take over old images (docs/benchmarks."
                "md). Give a few old images per class (--old-data) if you have any."
                if self.distill_weight > 0
                else "Nothing keeps the old classes alive: no --old-data and --distill-weight 0.",
                say=True,
            )

    def _training_rows(self, resume: bool) -> None:
        """What fit reads: images, labels (output indices) and the rows to use, per side.

        A keep-old-classes run appends the old data's rows after the new data's: the
        rehearsal memory to the training images, the old held-out images to validation; new
        labels become output indices of the widened head (old classes first).
        """
        from retrain.data.cache import load_images
        from retrain.models.surgery import merged_classes
        from retrain.training import keep

        train, val = self.train_cache, self.val_cache
        self.class_names = list(self.dataset.class_names)
        self.train_images, self.train_labels = train.images, np.asarray(train.labels)
        self.val_images = val.images if val is not None else None
        self.val_labels = np.asarray(val.labels) if val is not None else None
        old = self.old
        if old is None:
            return
        self.class_names = merged_classes(old.class_names, self.class_names)
        to_output = np.array([self.class_names.index(c) for c in self.dataset.class_names])
        self.train_labels = to_output[self.train_labels]
        if self.val_labels is not None:
            self.val_labels = to_output[self.val_labels]
        if old.dataset is None:
            return
        recorded = rundir.read_old_task(self.run_dir) if resume else None
        size, mode, channels = self.image_size, self.config.resize_mode, self.base.channels
        caches = {
            split: load_images(old.dataset, split, size, mode, channels=channels)
            for split in ("train", old.val_split)
        }
        self.old_caches = caches
        if recorded and recorded.get("dataset_id") == old.dataset.dataset_id:
            old.memory = rundir.indices_of(caches["train"].paths, recorded.get("memory", []))
            old.val = rundir.indices_of(caches[old.val_split].paths, recorded.get("val", []))
        memory_images = np.asarray(caches["train"].images[old.memory])
        old_val_images = np.asarray(caches[old.val_split].images[old.val])
        memory_labels = old.to_output[np.asarray(caches["train"].labels)[old.memory]]
        old_val_labels = old.to_output[np.asarray(caches[old.val_split].labels)[old.val]]

        n_train = len(self.train_labels)
        self.train_images = keep.StackedRows(self.train_images, memory_images)
        self.train_labels = np.concatenate([self.train_labels, memory_labels])
        self.train_idx = np.concatenate([self.train_idx, n_train + np.arange(len(old.memory))])
        if self.val_images is None:  # no new held-out images: only the old ones
            self.val_images, self.val_labels = old_val_images, old_val_labels
            self.val_idx = np.arange(len(old.val))
        else:
            n_val = len(self.val_labels)
            self.val_images = keep.StackedRows(self.val_images, old_val_images)
            self.val_labels = np.concatenate([self.val_labels, old_val_labels])
            self.val_idx = np.concatenate([self.val_idx, n_val + np.arange(len(old.val))])
        self.val_source += f" + {len(old.val)} old images ({old.val_source})"

    def _with_old_features(self, x_train: Any, x_val: Any) -> tuple[np.ndarray, np.ndarray]:
        """The old rows' features appended as `_training_rows` appended their images."""
        old = self.old
        if old is None or old.dataset is None:
            return x_train, x_val
        shape = tuple(x_train.shape[1:])
        feats = {
            split: self._features_of(split, cache.images, old.dataset)
            for split, cache in self.old_caches.items()
        }
        x_train = np.concatenate([np.asarray(x_train), np.asarray(feats["train"])[old.memory]])
        new_val = np.zeros((0, *shape), np.float32) if self.val_cache is None else x_val
        x_val = np.concatenate([np.asarray(new_val), np.asarray(feats[old.val_split])[old.val]])
        return x_train, x_val

    def _distillation(self, model: Any, x_train: Any, x_val: Any) -> tuple:
        """Learning without Forgetting: ``(y_train, y_val, loss, metrics, model to fit)``.

        The targets are the step-0 model's softened old outputs on every row, computed once
        (the head alone on cached features). ``model`` is fitted through a wrapper so the
        saved model keeps a standard compile config (no custom loss to deserialize).
        """
        import keras

        from retrain.training import keep

        on_features = model is self.surgery.head
        teacher = self.surgery.head if on_features else self.surgery.model
        targets = self._targets
        n_old, t = len(self.old.class_names), self.config.distill_temperature

        def packed(part: str, y: np.ndarray, x: Any) -> np.ndarray:
            if part not in targets:
                now = teacher.get_weights()
                teacher.set_weights(self._step0["head" if on_features else "model"])
                try:
                    probs = np.concatenate(
                        [
                            np.asarray(teacher.predict_on_batch(np.asarray(x[i : i + 256])))
                            for i in range(0, len(y), 256)
                        ]
                    )
                finally:
                    teacher.set_weights(now)
                targets[part] = keep.soften(probs, n_old, t)
            return keep.pack_targets(y, targets[part])

        y_train = packed("train", self.y_train, x_train)
        y_val = packed("val", self.y_val, x_val) if self.y_val is not None else None
        loss = keep.distillation_loss(n_old, t, self.distill_weight)
        fitted = keras.Model(model.inputs, model.outputs, name=f"{model.name}_distilled")
        return y_train, y_val, loss, [keep.packed_accuracy], fitted

    def _task_accuracy(self) -> list:
        """`callbacks.TaskAccuracy` for a keep-old-classes run with held-out images."""
        if self.old is None or self.val_idx is None:
            return []
        labels = np.asarray(self.val_labels)[np.sort(self.val_idx)]
        return [_keras_parts().TaskAccuracy(self._val_data, labels, len(self.old.class_names))]

    # -- 3. the model: the new head on the cut base, labels encoded for its loss

    def build(self) -> None:
        from retrain.models import surgery as surgery_module

        config, dataset = self.config, self.dataset
        head_spec = surgery_module.HeadSpec(
            hidden_units=config.hidden_units,
            dropout=config.dropout,
            binary_sigmoid=config.binary_sigmoid,
            add_conv=config.add_conv,
        )
        with self.scope:
            if self.old is not None:  # keep the old classes: widen the original head
                self.surgery = surgery_module.extend_head(
                    self.base,
                    self.old.class_names,
                    dataset.class_names,
                    freeze=self.freeze,
                    image_size=self.image_size,
                )
            else:
                self.surgery = surgery_module.replace_head(
                    self.base,
                    dataset.class_names,
                    cut_at=config.cut_at,
                    head=head_spec,
                    freeze=self.freeze,
                    image_size=self.image_size,
                )
        if self.distill_weight > 0:  # the teacher: the model before any step (step 0)
            self._step0 = {
                "head": self.surgery.head.get_weights(),
                "model": self.surgery.model.get_weights(),
            }
        self.preprocessing = self.base.preprocessing
        self.preprocessing_origin = self.base.origin
        del self.base  # the surgery keeps what it needs; the original head can go
        self.y_train = self._encode(self.train_labels)
        self.y_val = self._encode(self.val_labels) if self.val_labels is not None else None
        self.sample_weight = None
        labels = np.asarray(self.train_labels)
        rehearsal = self.old is not None and len(self.old.memory) > 0
        if config.class_weights or rehearsal:
            # With rehearsal the memory holds a few images per old class: weighting classes
            # equally keeps the many new images from drowning the old classes out.
            weights = _class_weight_vector(labels[self.train_idx], len(self.class_names))
            self.sample_weight = weights[labels].astype(np.float32)
        elif dataset.has_warning("imbalance"):
            self._note("The classes are imbalanced; consider --class-weights.")
        self.metadata = {
            "class_names": list(self.class_names),
            "image_size": list(self.image_size),
            "resize_mode": config.resize_mode,
            # The file is shared: keep the base's name, not the server path (it names the session).
            "base": shareable(config.base),
            "loss": self.surgery.loss,
            "label_encoding": self.surgery.label_encoding,
            "preprocessing": self.preprocessing,
            "dataset_id": dataset.dataset_id,
            "cut_at": self.surgery.cut_at,
        }
        if self.old is not None:
            self.metadata.update(
                mode="keep",
                original_classes=list(self.old.class_names),
                new_classes=list(self.surgery.diff["new_classes"]),
            )

    # -- 3b. the learning rate: set, found by a range test, or the one a resumed run found

    def find_lr(self, resume: bool) -> None:
        """Phase 1's learning rate: ``--lr`` when set; else a range test
        (`retrain.training.lr_find`) on what phase 1 trains on: the cached features (seconds) or
        a few hundred images."""

        config = self.config
        recorded = rundir.read_lr_find(self.run_dir) if resume else None
        if not resume:
            rundir.clear_lr_find(self.run_dir)
        if not config.lr_is_auto:
            return
        if recorded is not None:  # a resumed run trains on at the rate it found
            self.lr, self.lr_finding = float(recorded["lr"]), recorded
            return
        x_train, x_val, model, _ = self._phase1_inputs()
        finding = self._range_test(model, x_train, x_val, on_features=self.use_cache)
        self.lr, self.lr_finding = finding["lr"], finding
        rundir.write_lr_find(self.run_dir, finding)

    def _range_test(self, model: Any, x_train: Any, x_val: Any, on_features: bool) -> dict:
        """`lr_find.range_test` of ``model`` on what it trains on; the finding as JSON."""
        from retrain.training import lr_find

        rundir.write_progress(self.run_dir, {"phase": "finding the learning rate"})
        model, y_train, _, loss, _ = self._objective(model, x_train, x_val)
        pool = np.asarray(self.train_idx)
        rng = np.random.default_rng(self.config.seed)
        steps = lr_find.STEPS_FEATURES if on_features else lr_find.STEPS_IMAGES
        if not on_features:  # each step is a pass through the base: a few hundred images
            pool = rng.permutation(pool)[: lr_find.IMAGES]
        batch_size = min(self.global_batch, len(pool))

        def batch(step: int) -> tuple:
            rows = np.sort(rng.choice(pool, batch_size, replace=False))
            x, y = np.asarray(x_train[rows]), y_train[rows]
            if self.sample_weight is None:
                return x, y
            return x, y, self.sample_weight[rows]

        with self.scope:
            finding = lr_find.range_test(
                model,
                batch,
                optimizer=_make_optimizer(self.config.optimizer, lr_find.START_LR),
                loss=loss,
                steps=steps,
                jit_compile=self._jit(),
            )
        finding.images, finding.on = int(len(pool)), "features" if on_features else "images"
        _say(
            f"learning rate: {finding.lr:.2g}, found by a range test ({finding.steps} steps on "
            f"{finding.images} {finding.on}, {finding.seconds:.1f} s)"
        )
        return finding.to_dict()

    def _encode(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        if self.surgery.label_encoding == "binary":
            return labels.astype(np.float32)[:, None]
        return labels.astype(np.int32)

    def record_config(self) -> None:
        """Write config.json: the settings and everything training resolved."""
        dataset, surgery = self.dataset, self.surgery
        settings = {**self.config.to_dict(), "out": str(self.run_dir)}
        rundir.write_config(
            self.run_dir,
            rundir.RunConfig(
                settings=settings,
                run_id=self.run_dir.name,
                dataset_id=dataset.dataset_id,
                dataset_name=dataset.name,
                manifest_path=str(dataset.manifest_path),
                class_names=list(self.class_names),
                num_train=self.n_train,
                num_val=0 if self.val_idx is None else len(self.val_idx),
                validation=self.val_source,
                image_size_used=list(self.image_size),
                loss=surgery.loss,
                label_encoding=surgery.label_encoding,
                preprocessing=self.preprocessing,
                preprocessing_source=self.preprocessing_origin.get("preprocessing_source"),
                preprocessing_probe=self.preprocessing_origin.get("preprocessing_probe"),
                preprocessing_probe_info=self.preprocessing_origin.get("preprocessing_probe_info"),
                cut_at_used=surgery.cut_at,
                feature_cache=self.use_cache,
                batch_size_used=self.batch_size,
                global_batch_size=self.global_batch,
                precision=self.policy,
                backend=self.device_info.get("backend"),
                device=self.device_info,
                versions=versions(),
                diff=surgery.diff,
                lr_used=self.lr,
            ),
        )
        if self.old is not None:
            rundir.write_old_task(
                self.run_dir,
                {
                    **self.old.record(),
                    "rehearsal_images": int(len(self.old.memory)),
                    "old_val_images": int(len(self.old.val)),
                    "distill_weight": self.distill_weight,
                    "distill_temperature": self.config.distill_temperature,
                },
            )

    # -- 4. restore: weights and the epoch counter of last.npz; metrics up to that epoch

    def restore(self, resume: bool) -> None:
        config = self.config
        self.state = _keras_parts().RunState(self.run_dir, config.total_epochs)
        self.state.phase1_end = config.epochs
        self.checkpoint = rundir.load_checkpoint(self.run_dir) if resume else None
        if resume and self.checkpoint is None:
            self._note("No finished epoch to resume from; starting from epoch 1.")
        if self.checkpoint is not None:
            meta, npz = self.checkpoint
            target = self.surgery.head if meta.get("scope") == "head" else self.surgery.model
            if meta["weights"] != len(target.weights):
                raise RunError(
                    f"The checkpoint in '{self.run_dir}' does not match the model it "
                    "configures; start a new run."
                )
            target.set_weights([npz[f"w{i}"] for i in range(meta["weights"])])
            self.start_epoch = int(meta["epoch"])
            self.state.phase1_end = int(meta.get("phase1_end", config.epochs))
            self.state.best_val_accuracy = meta.get("best_val_accuracy")
            self.state.best_epoch = meta.get("best_epoch")
        rundir.truncate_metrics(self.run_dir, self.start_epoch)

    # -- 5. phase 1: the new head, base frozen (on cached features when possible)

    def fit_head(self) -> None:
        config, state = self.config, self.state
        if self.start_epoch >= state.phase1_end:
            return
        x_train, x_val, model, workers = self._phase1_inputs()
        model = self._fit(
            model, self.lr, x_train, x_val, self.start_epoch, config.epochs, 1, workers
        )
        if not state.halted:
            # Early stopping may end phase 1 before config.epochs: remember where it ended,
            # so a resumed run goes on with phase 2 rather than more of phase 1.
            done = rundir.read_metrics(self.run_dir)
            state.phase1_end = max([r["epoch"] for r in done], default=self.start_epoch)
            part, part_name = self._changing_part(1)
            _keras_parts().save_checkpoint(
                state, part, model.optimizer, state.phase1_end, part_name
            )

    def _phase1_inputs(self) -> tuple[Any, Any, Any, int]:
        """Phase 1's ``(x_train, x_val, model, workers)``: the head on cached features when the
        base is frozen, else the model on images (computed once: `find_lr` uses them too)."""
        if self._phase1 is None:
            if self.use_cache:
                x_train, x_val = self._features()
                # batches are array slices: no threads
                self._phase1 = (x_train, x_val, self.surgery.head, 1)
            else:
                model = self._trainable_model()
                self._phase1 = (self.train_images, self.val_images, model, self.config.workers)
        return self._phase1

    def _features(self, model: Any = None, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``model``'s outputs (the frozen base's by default, with the old task's rows in a
        keep run) for the train and val images, computed once and cached under ``key``."""
        rundir.write_progress(self.run_dir, {"phase": "caching features"})
        t0 = time.perf_counter()
        with self.scope:
            x_train = self._features_of("train", self.train_cache.images, model=model, key=key)
            x_val = x_train
            if self._separate_val():
                x_val = self._features_of("val", self.val_cache.images, model=model, key=key)
            if self.old is not None and model is None:
                x_train, x_val = self._with_old_features(x_train, x_val)
        self.feature_seconds += time.perf_counter() - t0
        # Features are small next to images: read them into memory when they fit easily.
        if x_train.nbytes < 1 << 30:
            same = x_val is x_train
            x_train = np.array(x_train)
            x_val = x_train if same else np.array(x_val)
        return x_train, x_val

    def _separate_val(self) -> bool:
        """Whether the validation images are a cache of their own (a val folder), not rows of
        the training cache."""
        return self.val_cache is not None and self.val_cache is not self.train_cache

    def _features_of(
        self,
        split: str,
        images: np.ndarray,
        dataset: Any = None,
        *,
        model: Any = None,
        key: str | None = None,
    ) -> np.ndarray:
        """``model``'s outputs (the frozen base's by default) for one split, cached on disk
        under ``key`` (the cut layer by default)."""
        path = feature_cache_path(
            dataset or self.dataset, self.config.base, key or self.surgery.cut_at,
            self.image_size, self.config.resize_mode, split, self.policy, self.preprocessing,
        )  # fmt: skip
        return cached_features(
            model or self.surgery.features, images, path, batch_size=max(self.global_batch, 64)
        )

    # -- 6. phase 2: unfreeze the top of the base at a lower learning rate, continuing the count

    def fine_tune(self) -> None:
        from retrain.models import surgery as surgery_module

        config, state = self.config, self.state
        if not config.fine_tune_epochs or state.halted:
            return
        first = max(self.start_epoch, state.phase1_end)
        last = state.phase1_end + config.fine_tune_epochs
        if first >= last:
            return
        kept = len(surgery_module.kept_layers(self.surgery))
        surgery_module.apply_freeze(
            self.surgery, FreezeSpec(mode="top", k=min(config.fine_tune_layers, kept))
        )
        self.fine_tune_lr = config.fine_tune_lr_for(self.lr)  # lr / 10 unless set
        model, x_train, x_val, workers = self._phase2_inputs()
        self._fit(model, self.fine_tune_lr, x_train, x_val, first, last, 2, workers)

    def _phase2_inputs(self) -> tuple[Any, Any, Any, int]:
        """Phase 2's ``(model, x_train, x_val, workers)``. Where phase 1 trained on cached
        features (no augmentation), the layers below the unfrozen top stay frozen too: their
        outputs are computed once (`features.frozen_split`) and the top of the base with the
        head trains on them, the same weights as the whole model's. Measured on a CPU that is
        most of a phase 2 epoch for an ImageNet backbone (bench/phase2_cost.py). Else (and in
        keep-old-classes runs, on several devices) the whole model trains on images."""
        import keras

        whole = (self._trainable_model(), self.train_images, self.val_images, self.config.workers)
        if not self.use_cache or self.old is not None or self.replicas > 1:
            return whole
        split = frozen_split(self.surgery.features)
        if split is None:
            return whole
        bottom, top, boundary = split
        images = len(self.train_cache.images) + (
            len(self.val_cache.images) if self._separate_val() else 0
        )
        if images * 4 * math.prod(bottom.outputs[0].shape[1:]) > PHASE2_CACHE_MAX_BYTES:
            return whole  # it would fill the session's disk: the images go through instead
        x_train, x_val = self._features(bottom, key=f"{self.surgery.cut_at}@{boundary}")
        with self.scope:
            model = keras.Model(top.inputs, self.surgery.head(top.outputs[0]), name="phase2")
        self.phase2_cache = boundary
        _say(f"phase 2: the layers up to '{boundary}' stay frozen; their outputs are cached")
        return model, x_train, x_val, 1  # batches are array slices: no threads

    # -- 7. keep-old-classes: correct the widened head's lean toward the new classes

    def correct_bias(self) -> None:
        """Weight aligning or BiC's bias layer (`TrainConfig.bias_correction`) on the kept
        epoch's output layer: the new classes had most of the images, so their outputs grew
        larger than the old ones'. Both edit the output Dense's weights in place, so the
        saved model stays a plain Keras model."""
        from retrain.training import keep

        method = self.config.bias_correction
        if self.old is None or method == "none" or self.state.halted:
            return
        layer = keep.output_layer(self.surgery.head)
        weights = layer.get_weights()
        if len(weights) != 2:
            return
        kernel, bias = weights
        n_old = len(self.old.class_names)
        held = self._balanced_heldout(layer) if method == "bic" else None
        if method == "bic" and held is None:
            self._note(
                "BiC needs held-out images of the old and the new classes (--old-data and a "
                "validation split); weight aligning corrected the new classes' bias instead.",
                say=True,
            )
            method = "weight-aligning"
        if method == "bic":
            penultimate, labels = held
            alpha, beta = keep.fit_bias_layer(penultimate @ kernel + bias, labels, n_old)
            kernel, bias = keep.bias_layer_applied(kernel, bias, n_old, alpha, beta)
            record = {"method": method, "alpha": alpha, "beta": beta, "images": len(labels)}
        else:
            kernel, bias, gamma = keep.weight_aligned(kernel, bias, n_old)
            record = {"method": method, "gamma": gamma}
        layer.set_weights([kernel, bias])
        self.bias_correction = record
        rundir.write_old_task(
            self.run_dir, {**(rundir.read_old_task(self.run_dir) or {}), "bias_correction": record}
        )
        _say(
            "bias correction: "
            + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
            )
        )

    def _balanced_heldout(self, layer: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """The output layer's inputs and labels for as many held-out images per class as
        the rarest class has (old and new classes); None without both."""
        import keras

        from retrain.training import keep

        if self.val_idx is None:
            return None
        labels = np.asarray(self.val_labels)
        rows = keep.balanced_rows(labels, np.asarray(self.val_idx), self.config.seed)
        n_old = len(self.old.class_names)
        if not ((labels[rows] < n_old).any() and (labels[rows] >= n_old).any()):
            return None
        head = self.surgery.head
        penultimate = keras.Model(head.inputs, layer.input)
        if self._phase1 is not None and self.use_cache:
            x = np.asarray(self._phase1[1][rows])
        else:
            x = self.surgery.features.predict(np.asarray(self.val_images[rows]), verbose=0)
        return np.asarray(penultimate.predict(x, verbose=0)), labels[rows]

    # -- 8. the end: model.keras (and best.keras if no epoch scored), the summary

    def finish(self) -> dict[str, Any]:
        from retrain.models.modelfile import save_model

        config, state, run_dir = self.config, self.state, self.run_dir
        if state.diverged_epoch is not None:
            raise RunError(diverged_message(state.diverged_epoch, self.lr))
        rows = rundir.read_metrics(run_dir)
        last_epoch = rows[-1]["epoch"] if rows else 0
        final_meta = dict(self.metadata, epoch=state.restored_epoch or last_epoch)
        if self.bias_correction is not None:
            final_meta["bias_correction"] = self.bias_correction
        save_model(self.surgery.model, rundir.final_model_path(run_dir), final_meta)
        # best.keras is what Evaluate, Export and a share use: the epoch with the best
        # validation accuracy (BestCheckpoint), or the kept epoch's model written here.
        saved_epoch = state.best_epoch
        if self.bias_correction is not None:
            # best.keras was saved during training, before the correction: the corrected
            # model of the kept epoch is the run's best.
            save_model(self.surgery.model, rundir.best_model_path(run_dir), final_meta)
            saved_epoch = final_meta["epoch"]
        elif not rundir.best_model_path(run_dir).exists():
            save_model(self.surgery.model, rundir.best_model_path(run_dir), final_meta)
            saved_epoch = final_meta["epoch"]
        rundir.write_progress(
            run_dir, {"phase": "done", "epoch": last_epoch, "epochs": config.total_epochs}
        )
        return {
            "run_dir": str(run_dir),
            "state": "done",
            "stopped": state.stopped,
            "epochs_done": len(rows),
            "best_val_accuracy": state.best_val_accuracy,
            "best_epoch": state.best_epoch,
            "early_stopped_epoch": state.early_stopped_epoch,
            "restored_epoch": state.restored_epoch,
            "saved_epoch": saved_epoch or None,
            "epochs_budget": config.total_epochs,
            "lr": self.lr,
            "fine_tune_lr": self.fine_tune_lr,
            "lr_find_seconds": (self.lr_finding or {}).get("seconds"),
            "bias_correction": self.bias_correction,
            "final": rows[-1] if rows else None,
            "feature_cache": self.use_cache,
            "phase2_cache": self.phase2_cache,
            "feature_seconds": round(self.feature_seconds, 2),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
            **(
                {"preprocessing_probe": self.preprocessing_origin["preprocessing_probe"]}
                if self.preprocessing_origin.get("preprocessing_probe")
                else {}
            ),
            "device": self.device_info.get("device"),
            "backend": self.device_info.get("backend"),
            "seconds": round(time.perf_counter() - self.t_start, 2),
            "warnings": self.notes,
        }

    # -- shared by both phases

    def _trainable_model(self) -> Any:
        """The model ``fit`` trains on images: with augmentation layers in front if asked."""
        if self.config.augment:
            return _augmented(self.surgery, self.config.seed)
        return self.surgery.model

    def _changing_part(self, phase: int) -> tuple[Any, str]:
        """What changes while training: only the head while the base is frozen."""
        if phase == 1 and self.frozen_base:
            return self.surgery.head, "head"
        return self.surgery.model, "model"

    def _jit(self) -> bool | str:
        from retrain.training import devices

        jit = devices.jit_compile_default()
        if self.config.augment and jit is True:
            # Keras's RandomRotation/RandomZoom cannot be XLA-compiled; say so instead of
            # letting Keras fall back with a warning in the log.
            jit = False
            note = "Augmentation (rotation, zoom) runs without XLA compilation."
            if note not in self.notes:
                self._note(note)
        return jit

    def _fit(
        self,
        model: Any,
        lr: float,
        x_train: np.ndarray,
        x_val: np.ndarray | None,
        first: int,
        last: int,
        phase: int,
        workers: int,
    ) -> Any:
        """Compile and fit ``model`` for epochs ``first..last``; return the model that was
        fitted (a wrapper of ``model`` when distilling: see `_distillation`)."""
        parts = _keras_parts()
        self.state.phase = phase
        jit = self._jit()
        model, y_train, y_val, loss, metrics = self._objective(model, x_train, x_val)
        # The optimizer's variables must be created under the same distribution as the model
        # (MirroredStrategy refuses to mix them).
        with self.scope:
            optimizer = _make_optimizer(self.config.optimizer, lr)
            if self.checkpoint is not None and first == self.start_epoch > 0:
                meta, npz = self.checkpoint
                if meta.get("phase") == phase and not parts.restore_optimizer(
                    optimizer, model.trainable_variables, npz, int(meta["optimizer_variables"])
                ):
                    self._note("Optimizer state could not be restored; it restarts on resume.")
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit)
        train_data = parts.ArrayDataset(
            x_train,
            y_train,
            self.train_idx,
            self.global_batch,
            shuffle=True,
            seed=self.config.seed + first,
            sample_weight=self.sample_weight,
            workers=workers,
            multiple_of=self.replicas,
        )
        val_data = None
        if self.val_idx is not None:
            val_data = parts.ArrayDataset(
                x_val,
                y_val,
                self.val_idx,
                self.global_batch,
                workers=workers,
                multiple_of=self.replicas,
            )
        self._val_data = val_data
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=last,
            initial_epoch=first,
            callbacks=self._callbacks(phase, len(train_data), first),
            verbose=0,
        )
        return model

    def _objective(self, model: Any, x_train: Any, x_val: Any) -> tuple:
        """What training minimises: ``(model to fit, y_train, y_val, loss, metrics)``; with
        distillation a wrapper of ``model`` and packed targets (see `_distillation`)."""
        if self.distill_weight > 0:
            y_train, y_val, loss, metrics, model = self._distillation(model, x_train, x_val)
            return model, y_train, y_val, loss, metrics
        return model, self.y_train, self.y_val, self.surgery.loss, ["accuracy"]

    def _callbacks(self, phase: int, batches: int, first: int) -> list:
        import keras

        parts, state, config = _keras_parts(), self.state, self.config
        changing, scope_name = self._changing_part(phase)
        monitor = "val_loss" if self.val_idx is not None else "loss"
        cbs = [
            # First: it marks a diverged epoch before the others record it.
            parts.RunMonitor(state, phase, batches, self.global_batch),
            *self._task_accuracy(),  # before MetricsWriter, which writes what it adds
            parts.MetricsWriter(state, phase, self.n_train),
            parts.BestCheckpoint(state, self.surgery.model, self.metadata, changing=changing),
            parts.EpochCheckpoint(state, changing, scope_name),
            keras.callbacks.CSVLogger(str(rundir.history_path(self.run_dir)), append=first > 0),
        ]
        if keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tensorboard"):
            # TensorBoard's summary writer needs TensorFlow and the tensorboard package.
            cbs.append(
                keras.callbacks.TensorBoard(
                    log_dir=str(rundir.tensorboard_dir(self.run_dir)),
                    write_graph=False,
                    profile_batch=0,
                )
            )
        if config.early_stopping:
            # Phase 2 must beat phase 1's kept epoch (whose weights the model holds now).
            baseline = None
            if phase == 2 and state.lowest_val_loss is not None and state.restored_epoch:
                baseline = (state.lowest_val_loss, state.restored_epoch)
            cbs.append(
                parts.EarlyStopping(
                    state, changing, config.early_stopping, monitor=monitor, baseline=baseline
                )
            )
        if config.reduce_lr:
            cbs.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=monitor, factor=0.2, patience=2, min_lr=1e-7
                )
            )
        return cbs
