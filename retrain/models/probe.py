"""Which preprocessing a model was trained with, found by scoring candidates on its old data.

A model without preprocessing layers inside does not say how its pixels were scaled. When the
original task's images are at hand, each candidate (`retrain.models.preprocessing.REGISTRY`) is
tried on a seeded sample of them (`DEFAULT_PER_CLASS` per class) through the original head:

- **accuracy**: how often the original head names the right class;
- **log loss**: the mean of ``-log p(true class)``. A model is fitted by minimising exactly
  this on data preprocessed its way, so the right candidate has the lowest;
- **blend loss**: each image is blended half-and-half with one of another class (seeded), and
  scored against the half-and-half answer. A model fed pixels scaled its own way splits its
  probability on such a blend; fed them at a wrong scale (0-255 into a ReLU network trained
  on [0, 1]) it answers with full confidence. Accuracy and log loss on clean images cannot
  see this when the head gets every image right: argmax ignores a scale.

The winner has the lowest ``loss`` (log loss + blend loss) among the candidates whose
accuracy is within `ACCURACY_TIE` of the best accuracy. It is *clearly ahead* when every other
candidate is at least `CLEAR_ACCURACY` less accurate, or has at least `CLEAR_LOSS_RATIO` times
its log loss or its blend loss; otherwise the result carries a warning.

This module imports `data`, `preprocessing` and `errors` only (models calls it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError
from retrain.models import preprocessing

#: Images per class of the old data that are scored (seeded sample), and the cap on all.
DEFAULT_PER_CLASS = 20
MAX_IMAGES = 2000
#: Accuracies this close to the best count as tied; the log loss decides among them.
ACCURACY_TIE = 0.02
#: The winner is clearly ahead of a candidate that is this much less accurate ...
CLEAR_ACCURACY = 0.05
#: ... or whose log loss or blend loss is at least this many times the winner's.
CLEAR_LOSS_RATIO = 1.25
MARGIN_TEXT = (
    f"clearly ahead = every other candidate at least {CLEAR_ACCURACY:.0%} less accurate, "
    f"or with at least {CLEAR_LOSS_RATIO:g}x its log loss or blend loss"
)


@dataclass
class ProbeResult:
    """What the probe measured and chose.

    Attributes:
        accuracy: candidate key -> accuracy on the sample (the ``preprocessing_probe`` JSON).
        log_loss: candidate key -> mean ``-log p(true class)``.
        blend_loss: candidate key -> mean loss on the half-and-half blends.
        best: the winning key.
        clear: whether the winner is clearly ahead (see the module docstring).
        runner_up: the candidate closest to the winner.
        images: how many old images were scored.
        classes: the old classes that were sampled.
        per_class: the per-class sample size asked for; seed: the sampling seed.
        warning: one line when the winner is not clearly ahead (or a chosen key scores worse).
    """

    accuracy: dict[str, float]
    log_loss: dict[str, float]
    blend_loss: dict[str, float]
    best: str
    clear: bool
    runner_up: str | None
    images: int
    classes: list[str]
    per_class: int
    seed: int
    warning: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The probe's JSON (beside ``preprocessing_probe``, which is `accuracy`)."""
        return {
            "best": self.best,
            "clear": self.clear,
            "runner_up": self.runner_up,
            "log_loss": self.log_loss,
            "blend_loss": self.blend_loss,
            "images": self.images,
            "classes": self.classes,
            "per_class": self.per_class,
            "seed": self.seed,
            "margin": MARGIN_TEXT,
            "warning": self.warning,
        }

    def describe(self, key: str) -> str:
        """One phrase about ``key``'s scores, e.g. ``"unit: 98% accuracy, losses 0.04 + 1.5"``."""
        return (
            f"{key}: {self.accuracy[key]:.0%} accuracy, log loss {self.log_loss[key]:.2g}, "
            f"blend loss {self.blend_loss[key]:.2g}"
        )


def candidates(channels: int, has_layers_inside: bool, takes_uint8: bool = False) -> list[str]:
    """The keys worth trying for a model.

    ``inside`` and ``raw`` feed the same 0-255 pixels, so only one of them is tried: ``inside``
    when the model has preprocessing layers, else ``raw``. RGB-only keys are left out for
    grayscale models. A model that takes uint8 pixels can only take them as they are
    (``inside``): the probe then checks that it scores well.
    """
    if takes_uint8:
        return ["inside"]
    keys = []
    for key, entry in preprocessing.REGISTRY.items():
        if key in ("inside", "raw") and (key == "inside") != has_layers_inside:
            continue
        if entry.rgb_only and channels != 3:
            continue
        keys.append(key)
    return keys


def sample_images(
    dataset: Any,
    output_names: Sequence[str],
    image_size: tuple[int, int],
    *,
    channels: int = 3,
    resize_mode: str = "squash",
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A seeded sample of the old data, decoded as the model takes it.

    Every split of ``dataset`` is pooled; each class keeps up to ``per_class`` images (fewer
    when the classes are many, so at most `MAX_IMAGES` in all).

    Returns:
        ``(images uint8 (N, H, W, channels), labels = output indices, sampled class names)``.

    Raises:
        ConfigError: a class folder of the old data is not one of the model's outputs.
    """
    from retrain.data.images import load_image_file

    index = {name: i for i, name in enumerate(output_names)}
    unknown = [name for name in dataset.class_names if name not in index]
    if unknown:
        shown = ", ".join(f"'{n}'" for n in unknown[:4])
        known = ", ".join(f"'{n}'" for n in list(output_names)[:6])
        raise ConfigError(
            f"Old data class folders {shown} are not among the model's original classes "
            f"({known}{' ...' if len(output_names) > 6 else ''}). Name the folders after them, "
            "or pass --original-classes."
        )
    by_class: dict[int, list[str]] = {}
    for split in dataset.splits.values():
        for rel, label in split:
            by_class.setdefault(label, []).append(rel)
    per_class = max(1, min(per_class, MAX_IMAGES // max(1, len(by_class))))
    rng = np.random.default_rng(seed)
    chosen: list[tuple[str, int]] = []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        for i in rng.permutation(len(paths))[:per_class]:
            chosen.append((paths[i], index[dataset.class_names[label]]))
    images = np.stack(
        [
            load_image_file(dataset.image_path(rel), image_size, resize_mode, channels)
            for rel, _ in chosen
        ]
    )
    labels = np.array([label for _, label in chosen], dtype=np.int64)
    classes = [dataset.class_names[label] for label in sorted(by_class)]
    return images, labels, classes


def blends(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each image, the index of a partner of another class (seeded; -1 when none)."""
    rng = np.random.default_rng(seed + 1)
    partner = np.full(len(labels), -1, dtype=np.int64)
    for i, label in enumerate(labels):
        others = np.flatnonzero(labels != label)
        if len(others):
            partner[i] = rng.choice(others)
    return partner


def _probabilities(wrapped: Any, images: np.ndarray) -> np.ndarray:
    probs = np.concatenate(
        [
            np.asarray(wrapped.predict_on_batch(images[i : i + 64]), dtype=np.float64)
            for i in range(0, len(images), 64)
        ]
    ).reshape(len(images), -1)
    if probs.shape[1] == 1:  # a 1-unit sigmoid head: two classes
        probs = np.concatenate([1.0 - probs, probs], axis=1)
    if probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:  # logits
        probs = np.exp(probs - probs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def score(
    model: Any, images: np.ndarray, labels: np.ndarray, keys: Sequence[str], seed: int = 0
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Accuracy, mean log loss and blend loss of ``model`` (the original head) under each key."""
    partner = blends(images, labels, seed)
    paired = np.flatnonzero(partner >= 0)
    mixed = (
        (images[paired].astype(np.uint16) + images[partner[paired]].astype(np.uint16) + 1) // 2
    ).astype(np.uint8)
    accuracy: dict[str, float] = {}
    log_loss: dict[str, float] = {}
    blend_loss: dict[str, float] = {}

    def nll(p: np.ndarray) -> np.ndarray:
        return -np.log(np.clip(p, 1e-7, 1.0))

    for key in keys:
        wrapped = preprocessing.with_preprocessing(model, key)
        probs = _probabilities(wrapped, images)
        rows = np.arange(len(labels))
        accuracy[key] = round(float(np.mean(probs.argmax(axis=1) == labels)), 4)
        log_loss[key] = round(float(np.mean(nll(probs[rows, labels]))), 4)
        if len(paired):
            q = _probabilities(wrapped, mixed)
            both = 0.5 * nll(q[np.arange(len(paired)), labels[paired]]) + 0.5 * nll(
                q[np.arange(len(paired)), labels[partner[paired]]]
            )
            blend_loss[key] = round(float(np.mean(both)), 4)
        else:
            blend_loss[key] = 0.0
    return accuracy, log_loss, blend_loss


def choose(
    accuracy: dict[str, float], log_loss: dict[str, float], blend_loss: dict[str, float]
) -> tuple[str, bool, str | None]:
    """``(winner, clearly ahead, runner-up)`` by the rule of the module docstring."""
    loss = {k: log_loss[k] + blend_loss[k] for k in accuracy}
    top = max(accuracy.values())
    tied = [k for k in accuracy if accuracy[k] >= top - ACCURACY_TIE - 1e-9]
    best = min(tied, key=lambda k: (loss[k], -accuracy[k]))
    others = [k for k in accuracy if k != best]
    if not others:
        return best, True, None

    def apart(k: str) -> bool:
        return (
            accuracy[best] - accuracy[k] >= CLEAR_ACCURACY - 1e-9
            or log_loss[k] >= CLEAR_LOSS_RATIO * log_loss[best] + 1e-9
            or blend_loss[k] >= CLEAR_LOSS_RATIO * blend_loss[best] + 1e-9
        )

    def closeness(k: str) -> tuple[bool, float, float]:
        return (apart(k), accuracy[best] - accuracy[k], loss[k] / max(loss[best], 1e-9))

    runner_up = min(others, key=closeness)
    return best, all(apart(k) for k in others), runner_up


def probe(
    model: Any,
    output_names: Sequence[str],
    old_data: Any,
    *,
    workspace: Path | None = None,
    image_size: tuple[int, int],
    channels: int = 3,
    has_layers_inside: bool = False,
    resize_mode: str = "squash",
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
) -> ProbeResult:
    """Score every candidate preprocessing on the old data and pick the best.

    Args:
        model: the original model, head included, taking float images.
        output_names: the names of its outputs, in order (`models.original_class_names`).
        old_data: the original task's images: a `data.Dataset`, zip, folder or manifest.
        workspace: where a zip is extracted (default: the home folder).
        image_size, channels, resize_mode: how images are decoded for the model.
        has_layers_inside: whether the model has preprocessing layers (``inside`` vs ``raw``).
        per_class, seed: the sample.

    Raises:
        ConfigError, DatasetError: the old data does not fit the model or cannot be read.
    """
    dataset = old_dataset(old_data, workspace)
    images, labels, classes = sample_images(
        dataset,
        output_names,
        image_size,
        channels=channels,
        resize_mode=resize_mode,
        per_class=per_class,
        seed=seed,
    )
    takes_uint8 = "int" in str(getattr(model.inputs[0], "dtype", "float32"))
    keys = candidates(channels, has_layers_inside, takes_uint8)
    accuracy, log_loss, blend_loss = score(model, images, labels, keys, seed)
    best, clear, runner_up = choose(accuracy, log_loss, blend_loss)
    result = ProbeResult(
        accuracy=accuracy,
        log_loss=log_loss,
        blend_loss=blend_loss,
        best=best,
        clear=clear,
        runner_up=runner_up,
        images=len(labels),
        classes=classes,
        per_class=per_class,
        seed=seed,
    )
    if not clear and runner_up is not None:
        result.warning = (
            f"The preprocessing probe is not sure: {result.describe(best)} is not clearly ahead "
            f"of {result.describe(runner_up)} ({MARGIN_TEXT}). Set --preprocessing if you know "
            "how the model was trained."
        )
    return result


def check_choice(result: ProbeResult, chosen: str) -> str | None:
    """A warning when a preprocessing set by hand scores clearly worse than the probe's best."""
    if chosen == result.best:
        return None
    key = chosen
    if key not in result.accuracy and key in ("inside", "raw"):  # the same pixels, tried once
        key = "raw" if key == "inside" else "inside"
    if key not in result.accuracy:
        return None
    worse = (
        result.accuracy[result.best] - result.accuracy[key] >= CLEAR_ACCURACY - 1e-9
        or result.log_loss[key] >= CLEAR_LOSS_RATIO * result.log_loss[result.best] + 1e-9
        or result.blend_loss[key] >= CLEAR_LOSS_RATIO * result.blend_loss[result.best] + 1e-9
    )
    if not worse:
        return None
    return (
        f"Preprocessing '{chosen}' was set by hand, but on the old data {result.describe(key)} "
        f"scores clearly worse than {result.describe(result.best)}; check how the model was "
        "trained."
    )


def old_dataset(source: Any, workspace: Path | None = None) -> Any:
    """The old data as a `data.Dataset` (a Dataset, manifest.json, zip or folder).

    Raises:
        DatasetError: nothing there, or not usable images.
    """
    from retrain.data.store import resolve_dataset

    return resolve_dataset(
        source,
        workspace,
        what="old data",
        hint="Pass the original task's images as a zip or a folder of class folders.",
    )
