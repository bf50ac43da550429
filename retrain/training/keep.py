"""Keep what it knew: the old task's data, rehearsal memory and distillation for a keep-old run.

A keep-old-classes run (``--keep-old-classes``) extends the original head
(`surgery.extend_head`): old classes first, in output order, then the new ones. Two things keep
the old task alive while the new classes are learnt:

- **rehearsal** (with ``--old-data``): a fixed, seeded memory of N images per old class from
  the old data's train part is mixed into every epoch; the old data's held-out part is a
  second validation set, scored every epoch (``old_val_accuracy`` in the epoch metrics);
- **distillation** (Learning without Forgetting, Li & Hoiem 2016; used without old data):
  the original model's outputs on the new images, softened with a temperature T, are
  targets for the old outputs. They are computed once, before training, from the extended
  model, which at that point computes exactly the original model's old outputs. The loss is
  ``CE(label) + W * T^2 * KL(teacher_T || student_T)`` over the old outputs, written with
  ``keras.ops`` only so it runs on every Keras backend.

This module imports numpy only; Keras and the rest of ``retrain`` are imported inside the
functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError

#: Distillation weight without old data (LwF's lambda_o = 1). The other defaults (memory
#: size, temperature) are `retrain.training.config.TrainConfig`'s.
DEFAULT_DISTILL_WEIGHT = 1.0
#: Probabilities are clipped this low before a log. Not Keras's 1e-7: a new class starts
#: far below the old ones (`surgery.extend_head`), and a probability clipped at 1e-7 has no
#: gradient, so its output would never learn (float32 holds 1e-30 and its reciprocal).
_EPS = 1e-30


@dataclass
class OldTask:
    """What a keep-old run knows about the original task.

    Attributes:
        class_names: the original outputs' names, in output order.
        rule: how they were named (a key of `models.CLASS_NAME_RULES`).
        dataset: the old data (a `data.Dataset`), or None without ``--old-data``.
        to_output: old data label -> output index (by class name).
        memory: rehearsal images, as indices into the old data's ``train`` split.
        val_split: the old split the held-out images come from ("val" or "train").
        val: the held-out images, as indices into ``val_split``.
        val_source: where the held-out images come from, in words.
    """

    class_names: list[str]
    rule: str
    dataset: Any = None
    to_output: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    memory: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_split: str = "train"
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_source: str = "none"

    def record(self) -> dict[str, Any]:
        """The JSON the run directory keeps (`rundir.write_old_task`): paths, not indices."""
        ds = self.dataset
        out: dict[str, Any] = {"original_classes": self.class_names, "class_names_rule": self.rule}
        if ds is None:
            return out
        train_paths = [p for p, _ in ds.splits["train"]]
        val_paths = [p for p, _ in ds.splits[self.val_split]]
        out.update(
            dataset_id=ds.dataset_id,
            dataset_name=ds.name,
            manifest_path=str(ds.manifest_path),
            memory=[train_paths[i] for i in self.memory],
            val_split=self.val_split,
            val=[val_paths[i] for i in self.val],
            val_source=self.val_source,
        )
        return out


def distill_weight(configured: float | None, has_old_data: bool) -> float:
    """The distillation weight in effect: the configured one, else `DEFAULT_DISTILL_WEIGHT`,
    with or without old data (rehearsal and distillation work together, as in iCaRL)."""
    if configured is not None:
        return float(configured)
    return DEFAULT_DISTILL_WEIGHT


def rehearsal_memory(
    labels: np.ndarray, candidates: np.ndarray, per_class: int, seed: int
) -> np.ndarray:
    """Pick ``per_class`` images of every class among ``candidates`` (seeded); sorted indices.

    A class with fewer candidates keeps all of them.
    """
    labels = np.asarray(labels)
    candidates = np.asarray(candidates, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[candidates]):
        members = candidates[labels[candidates] == label]
        chosen.append(rng.permutation(members)[: max(per_class, 0)])
    if not chosen:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def old_task(
    base: Any,
    old_data: str | None,
    original_classes: str | None,
    *,
    workspace: Path,
    per_class: int,
    val_split: float,
    seed: int,
) -> OldTask:
    """Name the original outputs and, with old data, choose its memory and held-out images.

    The old data's class folders are matched to the original outputs by name (a subset is
    fine); its own ``val`` folder is the held-out part when it has one, else ``val_split``
    of its train images (at least 20%), split per class with ``seed``.

    Raises:
        ModelError: the outputs cannot be named (see `models.original_class_names`).
        ConfigError: old class folders that are not original classes.
        DatasetError: unreadable old data.
    """
    from retrain.data.splits import stratified_split
    from retrain.data.store import ingest
    from retrain.models.summary import original_class_names

    if not old_data:
        names, rule = original_class_names(base, None, original_classes)
        return OldTask(class_names=names, rule=rule)
    dataset = ingest(old_data, workspace)
    names, rule = original_class_names(base, list(dataset.class_names), original_classes)
    unknown = [c for c in dataset.class_names if c not in names]
    if unknown:
        shown = ", ".join(f"'{c}'" for c in unknown[:4])
        raise ConfigError(
            f"Old data class folders {shown} are not classes of the original model (its "
            f"outputs are {', '.join(repr(n) for n in names[:6])}"
            f"{' ...' if len(names) > 6 else ''}); name the folders after the original "
            "classes or pass --original-classes."
        )
    to_output = np.array([names.index(c) for c in dataset.class_names], dtype=np.int64)
    train_labels = np.array([label for _, label in dataset.splits["train"]], dtype=np.int64)
    if dataset.splits.get("val"):
        val_split_name, train_part = "val", np.arange(len(train_labels))
        val = np.arange(len(dataset.splits["val"]), dtype=np.int64)
        source = "the old data's val folder"
    else:
        fraction = max(float(val_split or 0.0), 0.2)
        train_part, val = stratified_split(train_labels, fraction, seed)
        val_split_name = "train"
        source = f"{fraction:.0%} of the old data's images"
    memory = rehearsal_memory(train_labels, train_part, per_class, seed)
    return OldTask(
        class_names=names,
        rule=rule,
        dataset=dataset,
        to_output=to_output,
        memory=memory,
        val_split=val_split_name,
        val=val,
        val_source=source,
    )


# --------------------------------------------------------------------------------------
# Distillation (keras.ops only: any backend)


def soften(probabilities: np.ndarray, n_old: int, temperature: float) -> np.ndarray:
    """The old outputs' softened distribution: softmax(log p_old / T), float32 (N, n_old).

    ``log p_old`` equals the old logits up to a per-row constant, which the softmax drops;
    so this is the original model's softmax(z / T) whatever the new rows output.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64)[:, :n_old], _EPS, None)
    z = np.log(p) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def pack_targets(labels: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """``[label, soft targets...]`` per row (float32): what the distillation loss reads."""
    return np.concatenate(
        [np.asarray(labels, np.float32)[:, None], np.asarray(soft, np.float32)], axis=1
    )


def distillation_loss(n_old: int, temperature: float, weight: float) -> Any:
    """A Keras loss ``(y_true packed by pack_targets, y_pred probabilities) -> per-row loss``.

    ``CE(label, p) + weight * T^2 * KL(soft targets || softmax(log p_old / T))``; the T^2
    keeps the distillation gradients' scale independent of T (Hinton et al. 2015).
    """
    t = float(temperature)
    w = float(weight)

    def distillation(y_true: Any, y_pred: Any) -> Any:
        from keras import ops

        label = ops.cast(y_true[:, 0], "int32")
        targets = y_true[:, 1:]
        p = ops.clip(ops.cast(y_pred, "float32"), _EPS, 1.0)
        ce = -ops.log(ops.take_along_axis(p, label[:, None], axis=1)[:, 0])
        student = ops.log_softmax(ops.log(p[:, :n_old]) / t, axis=-1)
        kl = ops.sum(targets * (ops.log(ops.clip(targets, _EPS, 1.0)) - student), axis=-1)
        return ce + (w * t * t) * kl

    return distillation


def packed_accuracy(y_true: Any, y_pred: Any) -> Any:
    """Accuracy of probabilities against the label column of packed targets."""
    from keras import ops

    label = ops.cast(y_true[:, 0], "int32")
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    return ops.cast(ops.equal(label, predicted), "float32")


#: Keras names a function metric after the function: keep the logs' key "accuracy".
packed_accuracy.__name__ = "accuracy"


def split_accuracies(
    probabilities: np.ndarray, labels: np.ndarray, n_old: int
) -> dict[str, float | None]:
    """``old_val_accuracy`` and ``new_val_accuracy`` of held-out predictions (all classes)."""
    labels = np.asarray(labels)
    right = np.asarray(probabilities).argmax(axis=1) == labels
    old = labels < n_old
    return {
        "old_val_accuracy": float(right[old].mean()) if old.any() else None,
        "new_val_accuracy": float(right[~old].mean()) if (~old).any() else None,
    }


class StackedRows:
    """Several arrays with the same row shape read as one, without copying them.

    ``x[rows]`` (an int array or a slice) gathers rows across the parts: the new data's
    memory-mapped image cache followed by the old data's remembered images, for example.
    """

    def __init__(self, *parts: np.ndarray) -> None:
        self.parts = [p for p in parts if len(p)] or [parts[0]]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        first = self.parts[0]
        self.dtype = first.dtype
        self.shape = (int(self.starts[-1]), *first.shape[1:])
        self.nbytes = sum(int(p.nbytes) for p in self.parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for part, lo, hi in zip(self.parts, self.starts[:-1], self.starts[1:], strict=True):
            inside = (rows >= lo) & (rows < hi)
            if inside.any():
                out[inside] = part[rows[inside] - lo]
        return out


# --------------------------------------------------------------------------------------
# Bias correction: the widened head leans toward the new classes (they had most images)


def output_layer(head: Any) -> Any:
    """The head's output layer: its last layer with a kernel (the widened softmax Dense)."""
    for layer in reversed(head.layers):
        if hasattr(layer, "kernel") and getattr(layer, "units", None):
            return layer
    raise ValueError(f"'{head.name}' has no Dense output layer to correct.")


def weight_aligned(kernel: np.ndarray, bias: np.ndarray | None, n_old: int) -> tuple:
    """Weight aligning (Zhao et al., CVPR 2020): scale the new outputs' weight vectors so
    their mean norm equals the old ones'; the new biases scale with them (the new logits are
    ``gamma * (w x + b)``). Returns ``(kernel, bias, gamma)``."""
    kernel = np.array(kernel, dtype=np.float32)
    norms = np.linalg.norm(kernel, axis=0)
    old, new = norms[:n_old], norms[n_old:]
    if not len(new) or not len(old) or new.mean() <= 0:
        return kernel, bias, 1.0
    gamma = float(old.mean() / new.mean())
    kernel[:, n_old:] *= gamma
    if bias is not None:
        bias = np.array(bias, dtype=np.float32)
        bias[n_old:] *= gamma
    return kernel, bias, gamma


def fit_bias_layer(logits: np.ndarray, labels: np.ndarray, n_old: int) -> tuple[float, float]:
    """BiC's bias layer (Wu et al., CVPR 2019): ``alpha, beta`` for the new outputs' logits
    (``alpha * z + beta``) with the lowest cross-entropy on balanced held-out images. Two
    numbers: a grid search (alpha 0.2-1.5, beta -8..+2 logits) is exact enough and cannot
    diverge."""
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    best = (np.inf, 1.0, 0.0)
    for alpha in np.linspace(0.2, 1.5, 27):
        for beta in np.linspace(-8.0, 2.0, 41):
            zz = z.copy()
            zz[:, n_old:] = alpha * z[:, n_old:] + beta
            zz -= zz.max(axis=1, keepdims=True)
            log_p = zz - np.log(np.exp(zz).sum(axis=1, keepdims=True))
            loss = -float(log_p[np.arange(len(z)), labels].mean())
            if loss < best[0] - 1e-9:
                best = (loss, float(alpha), float(beta))
    return best[1], best[2]


def bias_layer_applied(
    kernel: np.ndarray, bias: np.ndarray, n_old: int, alpha: float, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BiC's ``alpha * z + beta`` of the new outputs into the Dense's weights."""
    kernel = np.array(kernel, dtype=np.float32)
    bias = np.array(bias, dtype=np.float32)
    kernel[:, n_old:] *= alpha
    bias[n_old:] = alpha * bias[n_old:] + beta
    return kernel, bias


def balanced_rows(labels: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """``rows`` cut to the same number of images per class (the rarest class's count)."""
    labels = np.asarray(labels)
    rows = np.asarray(rows, dtype=np.int64)
    present = np.unique(labels[rows])
    if not len(present):
        return rows
    n = min(int((labels[rows] == c).sum()) for c in present)
    return rehearsal_memory(labels, rows, n, seed)
