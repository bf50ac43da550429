"""GPU benchmark: the project's training path against plain ``model.fit``, one run, one table.

Usage (the backend is chosen by ``KERAS_BACKEND``; ``--backend`` is only a label)::

    KERAS_BACKEND=jax python bench/gpu.py --out bench-gpu.json          # on a GPU host
    KERAS_BACKEND=jax python bench/gpu.py --dry-run --out /tmp/dry.json # anywhere, < 2 min

Model: MobileNetV2 (``weights=None``: speed does not depend on the weights), 224x224, 10
classes, random uint8 images generated in memory (nothing is downloaded or read from disk).
Every variant builds its model afresh under its dtype policy, warms up (the first steps
compile), then times whole epochs over an in-memory pool of images.

(a) Full fine-tune, images/s, from the naive script to the project's defaults:
    1. plain: float32 input preprocessed on the host ([-1, 1]), batch 64, float32, Keras's
       default ``jit_compile="auto"``;
    2. uint8 input, rescaling inside the model (on the device), batch 64;
    3. uint8, batch 256;
    4. uint8, batch 256, ``mixed_bfloat16``;
    5. the project's defaults from ``retrain.training.devices.gpu_defaults()`` (batch,
       precision, jit, multi-device distribution), fed by numpy like the rows above;
    6. the same defaults fed through the project's own data path
       (``retrain.training.callbacks.ArrayDataset``, a ``keras.utils.PyDataset`` reading the
       uint8 cache on worker threads).
(b) Frozen-base head training for 20 epochs: plain ``fit`` of the full model with the base
    frozen (float32 input, batch 64; ``--frozen-epochs`` epochs run, the 20-epoch time is the
    first epoch + 19 x the mean later epoch) against the project's feature cache
    (``retrain.training.features.cached_features``: one batched ``predict`` of the base into a
    memory-mapped .npy, then 20 epochs of the head on the features), wall time including
    compilation.
(c) Feature extraction, images/s: ``predict`` of the base, plain (float32, batch 64) and with
    the project's defaults (uint8, default batch and precision).

It imports only numpy, Keras and TensorFlow-free ``retrain`` modules, so it runs on a host with
JAX or PyTorch and no TensorFlow. Output: a markdown table on stdout, JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrain.training import devices  # noqa: E402  (after the path tweak; imports no framework)

NUM_CLASSES = 10
HEAD_EPOCHS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", help="label for the report (KERAS_BACKEND chooses)")
    parser.add_argument("--steps", type=int, help="timed training steps per variant (100)")
    parser.add_argument("--image-size", type=int, help="input size (224; 32 with --dry-run)")
    parser.add_argument("--pool", type=int, help="images generated in memory (2048)")
    parser.add_argument("--frozen-epochs", type=int, help="plain frozen-base epochs run (3)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: proves it works")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (3 if dry else 100)
    args.image_size = args.image_size or (32 if dry else 224)
    args.pool = args.pool or (64 if dry else 2048)
    args.frozen_epochs = args.frozen_epochs or (2 if dry else 3)
    # The ladder's small and large batches; a dry run keeps them small so it stays quick.
    args.small_batch, args.large_batch = (8, 32) if dry else (64, 256)
    return args


# ----------------------------------------------------------------------------------------
# Models: the same network the project builds (retrain.models.surgery's contract): uint8 input ->
# preprocessing on the device -> base(training=False) -> pooled head -> float32 softmax.


def build_base(size: int) -> Any:
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights=None
    )


def build_head(feature_shape: tuple[int, ...]) -> Any:
    import keras

    inputs = keras.Input(feature_shape)
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dropout(0.2)(x)
    # float32 output: softmax and the loss stay exact under mixed precision.
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="head")


def build_model(size: int, uint8_input: bool, frozen: bool = False) -> tuple[Any, Any]:
    """Return (full model, features model); preprocessing is inside for uint8 input."""
    import keras

    base = build_base(size)
    base.trainable = not frozen
    if uint8_input:
        inputs = keras.Input((size, size, 3), dtype="uint8")
        x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)  # MobileNetV2's [-1, 1]
    else:
        inputs = keras.Input((size, size, 3))
        x = inputs
    features = base(x, training=False)
    features_model = keras.Model(inputs, features, name="features")
    head = build_head(tuple(features.shape[1:]))
    return keras.Model(inputs, head(features)), features_model


def compile_model(model: Any, jit: bool | str, lr: float = 1e-3) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit,
    )


@contextlib.contextmanager
def policy(name: str):
    """Apply a dtype policy ("off" | "mixed_float16" | "mixed_bfloat16") for one variant."""
    import keras

    keras.backend.clear_session()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed precision on a CPU warns; a dry run wants it
        applied = devices.set_precision(name)
    try:
        yield applied
    finally:
        keras.mixed_precision.set_global_policy("float32")
        if keras.backend.backend() == "jax":
            # devices.distribution() sets a global DataParallel; the next variant starts plain.
            keras.distribution.set_distribution(None)


# ----------------------------------------------------------------------------------------
# Data and timing.


def make_pool(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=(n,)).astype(np.int32)
    return images, labels


def to_float(images: np.ndarray) -> np.ndarray:
    """What a naive script does: preprocess on the host and feed float32."""
    return images.astype(np.float32) / 127.5 - 1.0


def whole_batches(x: np.ndarray, y: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Trim (or tile) to a multiple of ``batch``: a partial last batch would recompile."""
    n = max(1, len(x) // batch) * batch
    if n > len(x):
        reps = math.ceil(n / len(x))
        x, y = np.concatenate([x] * reps), np.concatenate([y] * reps)
    return x[:n], y[:n]


def epochs_for(steps: int, n: int, batch: int) -> int:
    return max(1, math.ceil(steps / max(1, n // batch)))


def timed_fit(model: Any, x: Any, y: Any, batch: int, epochs: int) -> float:
    """Warm up (compiles), then time ``epochs`` epochs; return seconds."""
    model.fit(x[: 2 * batch], y[: 2 * batch], batch_size=batch, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return time.perf_counter() - start


def timed_predict(model: Any, x: np.ndarray, batch: int) -> float:
    model.predict(x[:batch], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.predict(x, batch_size=batch, verbose=0)
    return time.perf_counter() - start


def epoch_timer() -> Any:
    """A Keras callback that records the seconds of each epoch in ``.seconds``."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


# ----------------------------------------------------------------------------------------
# The three measurements.


def full_finetune(args: argparse.Namespace, pool: np.ndarray, labels: np.ndarray) -> list[dict]:
    defaults = devices.gpu_defaults()
    small, large = args.small_batch, args.large_batch
    ladder = [
        (f"plain: float32 input, batch {small}", False, small, "off", "auto", None),
        (f"uint8 input, preprocessing inside, batch {small}", True, small, "off", "auto", None),
        (f"uint8, batch {large}", True, large, "off", "auto", None),
        (f"uint8, batch {large}, mixed_bfloat16", True, large, "mixed_bfloat16", "auto", None),
    ]
    batch, precision, jit = defaults["batch_size"], defaults["precision"], defaults["jit_compile"]
    label = f"project defaults: uint8, batch {batch}, {precision}, jit={jit}"
    ladder += [
        (label, True, batch, precision, jit, "numpy"),
        (label + ", fed by ArrayDataset", True, batch, precision, jit, "ArrayDataset"),
    ]
    rows = [fit_variant(args, pool, labels, *variant) for variant in ladder]
    base = rows[0]["images_per_second"]
    for row in rows:
        row["vs_plain"] = round(row["images_per_second"] / base, 2) if base else None
    return rows


def fit_variant(
    args: argparse.Namespace,
    pool: np.ndarray,
    labels: np.ndarray,
    label: str,
    uint8: bool,
    batch: int,
    precision: str,
    jit: bool | str,
    project_feed: str | None,
) -> dict:
    """One full fine-tune variant; ``project_feed`` None = plain, else "numpy"/"ArrayDataset"."""
    with policy(precision) as applied:
        scope, global_batch = (
            devices.distribution(batch) if project_feed else (contextlib.nullcontext(), batch)
        )
        x, y = whole_batches(pool, labels, global_batch)
        x = x if uint8 else to_float(x)
        epochs = epochs_for(args.steps, len(x), global_batch)
        with scope:
            model, _ = build_model(args.image_size, uint8)
            compile_model(model, jit)
            if project_feed == "ArrayDataset":
                seconds = timed_pydataset_fit(model, x, y, global_batch, epochs)
            else:
                seconds = timed_fit(model, x, y, global_batch, epochs)
        row = {
            "variant": label,
            "batch": global_batch,
            "policy": applied,
            "jit_compile": bool(model.jit_compile),
            "images": len(x) * epochs,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(x) * epochs / seconds, 1),
        }
    _say(f"  {label}: {row['images_per_second']} images/s")
    return row


def timed_pydataset_fit(model: Any, x: np.ndarray, y: np.ndarray, batch: int, epochs: int) -> float:
    """The project's feed: ``retrain.training.callbacks.ArrayDataset`` over the uint8 array,
    2 workers."""
    from retrain.training.callbacks import ArrayDataset

    indices = np.arange(len(x))
    warm = ArrayDataset(x, y, indices[: 2 * batch], batch, workers=2)
    model.fit(warm, epochs=1, verbose=0)
    data = ArrayDataset(x, y, indices, batch, shuffle=True, seed=0, workers=2)
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0)
    return time.perf_counter() - start


def frozen_head(args: argparse.Namespace, pool: np.ndarray, labels: np.ndarray) -> dict:
    from retrain.training.features import cached_features

    small = args.small_batch
    # Plain: the full model, base frozen, float32 input, every epoch runs the base again.
    with policy("off"):
        x, y = whole_batches(pool, labels, small)
        model, _ = build_model(args.image_size, uint8_input=False, frozen=True)
        compile_model(model, "auto")
        timer = epoch_timer()
        start = time.perf_counter()
        model.fit(to_float(x), y, batch_size=small, epochs=args.frozen_epochs, verbose=0,
                  callbacks=[timer])  # fmt: skip
        plain_run = time.perf_counter() - start
    later = timer.seconds[1:] or timer.seconds
    plain_20 = timer.seconds[0] + (HEAD_EPOCHS - 1) * float(np.mean(later))
    plain_ips = len(x) / float(np.mean(later))

    # Project: predict the base once into the feature cache, then train the head on features.
    defaults = devices.gpu_defaults()
    with policy(defaults["precision"]), tempfile.TemporaryDirectory() as tmp:
        batch = defaults["batch_size"]
        start = time.perf_counter()
        _, features_model = build_model(args.image_size, uint8_input=True, frozen=True)
        features = cached_features(features_model, x, Path(tmp) / "features.npy", batch)
        extract = time.perf_counter() - start
        head = build_head(tuple(features.shape[1:]))
        compile_model(head, devices.jit_compile_default())
        head.fit(features, y, batch_size=batch, epochs=HEAD_EPOCHS, verbose=0)
        project_total = time.perf_counter() - start
    result = {
        "images": len(x),
        "plain_epochs_run": args.frozen_epochs,
        "plain_epoch_seconds": [round(s, 3) for s in timer.seconds],
        "plain_run_seconds": round(plain_run, 3),
        "plain_images_per_second": round(plain_ips, 1),
        "plain_20_epochs_seconds": round(plain_20, 3),
        "project_feature_seconds": round(extract, 3),
        "project_20_epochs_seconds": round(project_total, 3),
        "speedup": round(plain_20 / project_total, 2),
    }
    _say(f"  frozen base, 20 epochs: plain {plain_20:.1f} s, feature cache {project_total:.1f} s")
    return result


def feature_extraction(args: argparse.Namespace, pool: np.ndarray) -> list[dict]:
    defaults = devices.gpu_defaults()
    rows = []
    variants = [
        (f"plain: float32 input, batch {args.small_batch}", False, args.small_batch, "off"),
        (
            f"project defaults: uint8, batch {defaults['batch_size']}, {defaults['precision']}",
            True,
            defaults["batch_size"],
            defaults["precision"],
        ),
    ]
    for label, uint8, batch, precision in variants:
        with policy(precision) as applied:
            x, _ = whole_batches(pool, np.zeros(len(pool)), batch)
            _, features_model = build_model(args.image_size, uint8, frozen=True)
            seconds = timed_predict(features_model, x if uint8 else to_float(x), batch)
        rows.append(
            {
                "variant": label,
                "batch": batch,
                "policy": applied,
                "images": len(x),
                "seconds": round(seconds, 3),
                "images_per_second": round(len(x) / seconds, 1),
            }
        )
        _say(f"  predict {label}: {rows[-1]['images_per_second']} images/s")
    return rows


# ----------------------------------------------------------------------------------------
# Report.


def versions() -> dict[str, str]:
    import keras

    found = {"python": platform.python_version(), "keras": keras.__version__}
    for name in ("jax", "jaxlib", "torch", "tensorflow", "numpy"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            found[name] = module.__version__
    return found


def markdown(result: dict) -> str:
    dev = result["device"]
    lines = [
        f"Device: {dev['device']} x{dev['devices']} ({result['backend']} backend, "
        f"Keras {result['versions']['keras']}), image size {result['image_size']}"
        + (" - DRY RUN (tiny sizes; not a performance figure)" if result["dry_run"] else ""),
        "",
        "| (a) full fine-tune | batch | policy | jit | images/s | vs plain |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for row in result["full_finetune"]:
        lines.append(
            f"| {row['variant']} | {row['batch']} | {row['policy']} | {row['jit_compile']} | "
            f"{row['images_per_second']:,.0f} | {row['vs_plain']}x |"
        )
    fh = result["frozen_head"]
    lines += [
        "",
        f"| (b) frozen base, head only, {HEAD_EPOCHS} epochs on {fh['images']} images | seconds |",
        "| --- | ---: |",
        f"| plain fit, base frozen (first epoch + 19 x later epochs; "
        f"{fh['plain_images_per_second']:,.0f} images/s) | {fh['plain_20_epochs_seconds']} |",
        f"| project feature cache (predict once {fh['project_feature_seconds']} s + head) | "
        f"{fh['project_20_epochs_seconds']} |",
        f"| speedup | {fh['speedup']}x |",
        "",
        "| (c) feature extraction (base predict) | batch | policy | images/s |",
        "| --- | ---: | --- | ---: |",
    ]
    for row in result["feature_extraction"]:
        lines.append(
            f"| {row['variant']} | {row['batch']} | {row['policy']} | "
            f"{row['images_per_second']:,.0f} |"
        )
    return "\n".join(lines)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    backend = devices.backend()
    if args.backend and args.backend != backend:
        _say(f"note: --backend {args.backend} is a label; KERAS_BACKEND gives {backend}")
    device = devices.describe_device()
    _say(f"{device['device']} x{device['devices']} on {backend}; defaults {devices.gpu_defaults()}")
    pool, labels = make_pool(args.pool, args.image_size)
    started = time.perf_counter()
    _say("(a) full fine-tune")
    full = full_finetune(args, pool, labels)
    _say("(b) frozen base, head training")
    frozen = frozen_head(args, pool, labels)
    _say("(c) feature extraction")
    extraction = feature_extraction(args, pool)
    project = next(r for r in full if r["variant"].startswith("project defaults"))
    result = {
        "backend": backend,
        "backend_label": args.backend or backend,
        "device": device,
        "defaults": devices.gpu_defaults(),
        "versions": versions(),
        "dry_run": args.dry_run,
        "image_size": args.image_size,
        "pool": args.pool,
        "steps": args.steps,
        "full_finetune": full,
        "frozen_head": frozen,
        "feature_extraction": extraction,
        "targets": {
            "full_finetune_ge_10000_images_per_second": project["images_per_second"] >= 10_000,
            "full_finetune_ge_2x_plain": (project["vs_plain"] or 0) >= 2.0,
            "head_cache_ge_5x_plain": frozen["speedup"] >= 5.0,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = markdown(result)
    result["markdown"] = table
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
