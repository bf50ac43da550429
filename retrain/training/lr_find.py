"""Find a learning rate: the learning-rate range test (Smith 2015; fastai's ``lr_find``).

Train for a few dozen steps while the learning rate grows exponentially from ``start_lr`` to
``end_lr``, recording the (smoothed) loss after each step; stop once the loss explodes. The
curve falls, flattens, then shoots up; a good rate sits on the falling part, before the
bottom. The model's weights are restored afterwards, so the test leaves no trace.

`suggest` reads the curve with fastai's "valley" rule: the middle of the longest stretch
over which the loss keeps falling (slightly towards its start). Two other classic readings
are recorded beside it for comparison: "minimum/10" (a tenth of the rate at the lowest loss)
and "steepest" (where the loss falls fastest).

Keras 3 only (``train_on_batch``, ``keras.ops``): any backend. Keras is imported by the
caller's model; this module imports numpy only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: The sweep: from a rate too small to move anything to one that always diverges.
START_LR, END_LR = 1e-6, 1.0
#: Steps of the sweep on cached features (fastai's 100) and on images (each a full forward
#: and backward pass through the trainable base: fewer, so the test stays a small part).
STEPS_FEATURES, STEPS_IMAGES = 100, 50
#: Distinct images the test draws its batches from when it runs on images.
IMAGES = 320
#: Exponential smoothing of the loss and the "diverged" threshold (fastai's values).
SMOOTHING, DIVERGED_FACTOR = 0.98, 4.0
#: The first steps' smoothed loss is the mean of a few batches (one batch of easy images can
#: score near 0): the lowest loss counts from step `SETTLE_STEPS`, and the test stops for a
#: diverged loss only from step 2 * SETTLE_STEPS.
SETTLE_STEPS = 5
RULES = ("valley", "minimum/10", "steepest")
DEFAULT_RULE = "valley"
#: Bounds on the chosen rate: what TrainConfig accepts for --lr.
MIN_LR, MAX_LR = 1e-6, 1.0


@dataclass
class LRFinding:
    """One range test: the curve, the chosen rate and how it was chosen.

    Attributes:
        lrs: the learning rate of each recorded step.
        losses: the smoothed training loss after that step.
        lr: the chosen learning rate.
        rule: the rule that chose it (one of `RULES`).
        suggestions: every rule's reading of the curve.
        steps: steps run (fewer than planned when the loss exploded).
        seconds: how long the test took.
        images: distinct rows it trained on.
        on: "features" (cached base outputs) or "images".
    """

    lrs: list[float]
    losses: list[float]
    lr: float
    rule: str = DEFAULT_RULE
    suggestions: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    images: int = 0
    on: str = "features"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (what `rundir.write_lr_find` stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> LRFinding:
        """The inverse of `to_dict`; unknown keys are ignored."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in record.items() if k in names})


def lr_schedule(steps: int, start_lr: float = START_LR, end_lr: float = END_LR) -> np.ndarray:
    """``steps`` learning rates growing exponentially from ``start_lr`` to ``end_lr``."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(steps - 1, 1))


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Every rule's learning rate for a recorded curve (`RULES`), clipped to valid bounds."""
    lrs_a, losses_a = np.asarray(lrs, float), np.asarray(losses, float)
    n = len(lrs_a)
    if n < 3:
        value = float(lrs_a[0]) if n else 1e-3
        return dict.fromkeys(RULES, _clip(value))
    out = {"minimum/10": float(lrs_a[int(np.argmin(losses_a))] / 10)}
    # Steepest: the most negative slope of the loss against log(lr).
    slopes = np.gradient(losses_a, np.log(lrs_a))
    out["steepest"] = float(lrs_a[int(np.argmin(slopes))])
    out["valley"] = float(lrs_a[_valley(losses_a)])
    return {k: _clip(out[k]) for k in RULES}


def _valley(losses: np.ndarray) -> int:
    """fastai's valley: the longest decreasing subsequence of the losses; a point 1/2 of the
    way along it (its lower rates are safe, its end is near the bottom of the curve)."""
    n = len(losses)
    length = [1] * n
    start, end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[end] < length[i]:
            end = i
            start = end - length[end]
    sections = (end - start) / 3
    return int(min(start + int(sections) + int(sections / 2), n - 1))


def _clip(lr: float) -> float:
    return float(min(max(lr, MIN_LR), MAX_LR))


def range_test(
    model: Any,
    batch: Callable[[int], tuple],
    *,
    optimizer: Any,
    loss: Any,
    steps: int = STEPS_FEATURES,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    rule: str = DEFAULT_RULE,
    jit_compile: bool | str = "auto",
) -> LRFinding:
    """Run the range test on ``model`` and choose a learning rate; the weights are restored.

    Args:
        model: a Keras model (compiled here with ``optimizer`` and ``loss``; compile it again
            before training).
        batch: step index -> ``(x, y)`` or ``(x, y, sample_weight)``: the step's batch.
        optimizer: a fresh Keras optimizer (its learning rate is set at every step).
        loss: the loss training will use.
        steps: planned steps (the test ends early when the loss explodes).
        start_lr, end_lr: the sweep's bounds.
        rule: which of `RULES` chooses the rate.
        jit_compile: passed to ``compile``.

    Returns:
        An `LRFinding`; ``images`` is left to the caller.
    """
    t0 = time.perf_counter()
    saved = model.get_weights()
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    schedule = lr_schedule(steps, start_lr, end_lr)
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    try:
        for step, lr in enumerate(schedule):
            optimizer.learning_rate.assign(float(lr))
            data = batch(step)
            sample_weight = data[2] if len(data) > 2 else None
            value = model.train_on_batch(data[0], data[1], sample_weight=sample_weight)
            value = float(np.ravel(np.asarray(value))[0])
            if not math.isfinite(value):
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            lrs.append(float(lr))
            losses.append(float(smoothed))
            if step >= SETTLE_STEPS:
                best = min(best, smoothed)
            if step >= 2 * SETTLE_STEPS and smoothed > DIVERGED_FACTOR * best:
                break
    finally:
        model.set_weights(saved)
    suggestions = suggest(lrs, losses)
    return LRFinding(
        lrs=lrs,
        losses=losses,
        lr=suggestions[rule],
        rule=rule,
        suggestions=suggestions,
        steps=len(lrs),
        seconds=round(time.perf_counter() - t0, 3),
    )
