"""Exports of a finished run that load anywhere, each checked in a fresh process.

Formats (written under ``RUN_DIR/export/``):

=============  ===========================================================================
keras          ``model.keras``: raw RGB uint8 images in, class probabilities out; resizing
               and preprocessing inside; class names in its ``retrain.json`` metadata
savedmodel     ``saved_model/`` (``model.export``; needs TensorFlow), endpoint ``serve``
tflite         ``model.tflite``: float, uint8 image input
tflite-int8    ``model_int8.tflite``: full-integer quantization calibrated on a sample of
               the training image cache; uint8 in, uint8 out (scale in the tensor details)
onnx           ``model.onnx`` (Keras's ``model.export``, tf2onnx): uint8 ``image`` in,
               ``probabilities`` out; checked in onnxruntime
tfjs           ``tfjs/``: TF.js Layers ``model.json`` + weight shards for
               ``tf.loadLayersModel`` (float32 0-255 pixels in); checked in TF.js in Node
labels         ``labels.txt``: one class name per line, in output order
card           ``MODEL_CARD.md``: data, base, surgery, config, metrics, date, versions
=============  ===========================================================================

After writing, every model file is reloaded in a *fresh* process (Python; Node for TF.js)
and run on a few validation images; the self-test reports the largest difference to the in-memory model and
the argmax agreement (and, for int8, the accuracy drop on the validation images).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError, RunError
from retrain.evaluate.loading import (
    load_model,
    load_split,
    match_classes,
    model_channels,
    model_class_names,
    model_image_size,
    read_run_config,
    run_model_path,
)
from retrain.evaluate.metrics import class_probabilities, raw_outputs, run_dataset, run_images
from retrain.models import modelfile
from retrain.runs import jobs, rundir
from retrain.sessions.workspace import shareable
from retrain.training.train import versions as library_versions  # one record, as in config.json

FORMATS = ("keras", "savedmodel", "tflite", "tflite-int8", "onnx", "tfjs", "labels", "card")
FILE_NAMES = {
    "keras": "model.keras",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "tflite-int8": "model_int8.tflite",
    "onnx": "model.onnx",
    "tfjs": "tfjs",
    "labels": "labels.txt",
    "card": "MODEL_CARD.md",
}
NEEDS_TENSORFLOW = ("savedmodel", "tflite", "tflite-int8", "onnx")
MODEL_FORMATS = ("keras", "savedmodel", "tflite", "tflite-int8", "onnx", "tfjs")
CALIBRATION_IMAGES = 100
CHECK_IMAGES = 256
TFJS_CHECK_IMAGES = 64
# Largest tolerated |difference| of probabilities for float formats (round-off only).
FLOAT_TOLERANCE = 1e-4
ARGMAX_AGREEMENT_MIN = 0.98
# ONNX and TF.js run other kernels (other summation orders): the bar.
OTHER_RUNTIME_TOLERANCE = 1e-3
OTHER_RUNTIME_AGREEMENT_MIN = 0.99
SELF_TEST_TIMEOUT_S = 600

Progress = Callable[[str, float], None]


def parse_formats(formats: Sequence[str]) -> list[str]:
    """Expand "all" and check names; keep the canonical order.

    Raises:
        ConfigError: an unknown format name or none at all.
    """
    wanted = set()
    for name in formats:
        name = str(name).strip().lower()
        if name == "all":
            wanted.update(FORMATS)
        elif name in FORMATS:
            wanted.add(name)
        else:
            raise ConfigError(
                f"Unknown export format '{name}'. Choose from {', '.join(FORMATS)} or all."
            )
    if not wanted:
        raise ConfigError(f"No export format chosen. Choose from {', '.join(FORMATS)} or all.")
    return [f for f in FORMATS if f in wanted]


def tensorflow_available() -> bool:
    """Whether TensorFlow is installed (SavedModel and TFLite exports need it)."""
    return importlib.util.find_spec("tensorflow") is not None


def _require_tensorflow(fmt: str) -> None:
    import keras

    backend = keras.backend.backend()
    if not tensorflow_available():
        raise ConfigError(
            f"The '{fmt}' export needs TensorFlow, which this installation lacks (Keras backend "
            f"'{backend}'). Install tensorflow or export 'keras' instead."
        )
    if backend not in ("tensorflow", "jax"):
        raise ConfigError(
            f"The '{fmt}' export needs the TensorFlow or JAX backend, not '{backend}'. "
            "Export 'keras', or run with KERAS_BACKEND=tensorflow."
        )


def _check_run_done(run_dir: Path) -> None:
    state = jobs.read_status(run_dir).get("state", "unknown")  # RunError: not a run directory
    if state != "done":
        raise RunError(
            f"Run '{run_dir.name}' is {state}, not done. Export it once training has finished."
        )


def _check_images(run_dir: Path, config: dict, meta: dict, model: Any, class_names: list[str]):
    """Validation images (uint8) and labels (model indices) for the self-test; labels may be None."""
    try:
        dataset, images, labels, _ = run_images(run_dir, config, meta, model, "val")
        labels = match_classes(class_names, dataset.class_names)[labels]
    except (RunError, ConfigError):
        return None, None
    rng = np.random.default_rng(0)
    if len(images) > CHECK_IMAGES:
        keep = np.sort(rng.choice(len(images), CHECK_IMAGES, replace=False))
        images, labels = images[keep], labels[keep]
    return np.ascontiguousarray(images), labels


def _calibration_images(run_dir: Path, config: dict, meta: dict, model: Any) -> np.ndarray:
    """A sample of the training image cache for int8 calibration.

    Raises:
        RunError: the run's training images are gone.
    """
    dataset = run_dataset(run_dir, config)
    size = model_image_size(model, meta)
    mode = meta.get("resize_mode", config.get("resize_mode", "squash"))
    channels = model_channels(model)  # grayscale models calibrate on grayscale
    images, _, _ = load_split(dataset, "train", size, mode, channels)
    rng = np.random.default_rng(int(config.get("seed", 0)))
    count = min(CALIBRATION_IMAGES, len(images))
    keep = np.sort(rng.choice(len(images), count, replace=False))
    return np.ascontiguousarray(images[keep])


def _saved_model(model: Any, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.export(str(path), format="tf_saved_model", verbose=False)


def _tflite(saved_model_dir: Path, path: Path, calibration: np.ndarray | None) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if calibration is not None:

        def representative():
            for image in calibration:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    path.write_bytes(converter.convert())


#: Settings the card leaves out of its table: long, or said in another section.
CARD_SKIPPED = {"versions", "class_names", "diff", "device"}
#: What an empty setting means, where it is not "not set" (`TrainConfig`).
CARD_AUTO = {"fine_tune_lr": "auto (lr / 10)"}


def config_rows(config: dict[str, Any]) -> list[str]:
    """The model card's "Training config" table rows: each setting as chosen, and what training
    resolved where it chose (``lr`` empty = found by the range test: "auto: `0.0115`", from
    ``lr_used``); the ``*_used`` keys themselves are not rows of their own."""
    rows = []
    for key, value in config.items():
        if key in CARD_SKIPPED or isinstance(value, dict | list) and len(str(value)) > 80:
            continue
        if key.endswith("_used") and key[: -len("_used")] in config:
            continue
        used = config.get(f"{key}_used")
        if value is None and used is not None:
            shown = f"auto: `{_setting(used)}`"
        elif value is None:
            shown = CARD_AUTO.get(key, "not set")
        elif used is not None and used != value:
            shown = f"`{_setting(value)}` (used `{_setting(used)}`)"
        else:
            shown = f"`{_setting(value)}`"
        rows.append(f"| {key} | {shown} |")
    return rows


def _setting(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def model_card(
    run_dir: str | Path,
    meta: dict[str, Any],
    evaluation: dict | None = None,
    *,
    model_input: dict | None = None,
    tfjs_input: dict | None = None,
) -> str:
    """The Markdown model card of a run: data, base, surgery, config, metrics, date, versions,
    and how to load each format (Keras, ONNX, TF.js).

    ``evaluation`` (optional) holds held-out scores to show: accuracy, macro_f1, images.
    ``model_input`` is the model's input ``{"shape": [H, W, C], "dtype"}``; ``tfjs_input``
    what `export_tfjs.write_tfjs` returned (the TF.js model's input), when it was exported.
    """
    run_dir = Path(run_dir)
    config = {k: shareable(v) for k, v in read_run_config(run_dir).items()}
    meta = {k: shareable(v) for k, v in meta.items()}
    class_names = meta.get("class_names") or config.get("class_names") or []
    metrics = rundir.read_metrics(run_dir)
    best = rundir.best_val_accuracy(metrics)
    last = metrics[-1] if metrics else {}
    diff = config.get("diff") if isinstance(config.get("diff"), dict) else {}
    lines = [
        f"# Model card: {run_dir.name}",
        "",
        f"Exported {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by Retrain Studio.",
        "",
        "## What it does",
        f"Classifies {'a grayscale' if _channels(model_input) == 1 else 'an RGB'} image into one of {len(class_names)} classes: "
        + ", ".join(f"`{c}`" for c in class_names)
        + ".",
        "",
        f"Input: raw {_colour(model_input)} uint8 images of shape (H, W, {_channels(model_input)}) "
        f"{tuple(meta.get('image_size') or config.get('image_size') or ())}, resized with "
        f"'{meta.get('resize_mode', config.get('resize_mode', 'squash'))}'; the model does its "
        "own preprocessing. Output: one probability per class, in the order of `labels.txt`"
        + (
            " (binary: one sigmoid unit = P(second class))."
            if meta.get("label_encoding") == "binary"
            else "."
        ),
        "",
        "## Data",
        f"- dataset: {config.get('dataset_name') or config.get('data', '?')} "
        f"(id `{config.get('dataset_id', '?')}`), from `{config.get('data', '?')}`",
        f"- images: {config.get('num_train', '?')} for training, {config.get('num_val', '?')} "
        f"for validation ({config.get('validation') or str(config.get('val_split', '?')) + ' held out'}"
        f", seed {config.get('seed', '?')})",
        "",
        "## Base model",
        f"- base: `{config.get('base', meta.get('base', '?'))}`",
        f"- preprocessing: {config.get('preprocessing', meta.get('preprocessing', '?'))}",
        "",
        *_keep_section(run_dir, config, meta, metrics),
        "## Surgery",
        f"- cut after layer `{config.get('cut_at_used') or config.get('cut_at') or '?'}`"
        + (f"; removed: {', '.join(diff['removed'])}" if diff.get("removed") else ""),
        f"- new head: {', '.join(diff.get('added') or []) or '?'} (hidden units "
        f"{config.get('hidden_units', 0)}, dropout {config.get('dropout', '?')}, added conv "
        f"{config.get('add_conv', 0)}); loss `{config.get('loss', meta.get('loss', '?'))}`, "
        f"labels `{config.get('label_encoding', meta.get('label_encoding', '?'))}`",
        f"- frozen: `{config.get('freeze', '?')}`"
        + (
            f" ({diff['frozen']} layers, {diff.get('frozen_params', '?')} params)"
            if "frozen" in diff
            else ""
        )
        + f"; fine-tune epochs {config.get('fine_tune_epochs', 0)}",
        "",
        "## Training config",
        "| setting | value |",
        "|---|---|",
    ]
    lines += config_rows(config)
    lines += ["", "## Metrics"]
    if metrics:
        lines.append(
            f"- epochs: {len(metrics)}; best val accuracy: "
            + (f"{best:.4f}" if best is not None else "n/a")
            + " (of any epoch)"
        )
        lines += _exported_epoch_line(rundir.read_status_file(run_dir) or {}, metrics)
        lines.append(
            "- last epoch: "
            + ", ".join(
                f"{k} {last[k]:.4f}"
                for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                if isinstance(last.get(k), int | float)
            )
        )
    else:
        lines.append("- no per-epoch metrics recorded")
    if evaluation:
        lines.append(
            f"- held-out validation images ({evaluation['images']}): accuracy "
            f"{evaluation['accuracy']:.4f}, macro F1 {evaluation['macro_f1']:.4f}"
        )
    lines += ["", "## Versions"]
    versions = {
        **(config.get("versions") or {}),
        **{f"export {k}": v for k, v in library_versions().items()},
    }
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += [
        "",
        "## How to use",
        "Keras (`model.keras`):",
        "```python",
        "import keras, numpy as np",
        'model = keras.saving.load_model("model.keras")',
        f"probs = model.predict(images_uint8)  # (N, H, W, {_channels(model_input)}) uint8",
        'labels = open("labels.txt").read().splitlines()',
        "```",
        "",
        *_onnx_usage(model_input),
        *_tfjs_usage(model_input, tfjs_input),
    ]
    return "\n".join(lines)


def _exported_epoch_line(status: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    """Which epoch these files are (``best.keras``) and its logged score, so the card names the
    exported model's number (a keep run's kept epoch, corrected after its score was logged,
    need not be the epoch of the best accuracy)."""
    epoch, score = rundir.saved_score(status, metrics)
    if epoch is None:
        return []
    note = (
        ", measured before the old classes' bias correction" if status.get("bias_corrected") else ""
    )
    return [f"- exported: the model of epoch {epoch}, val accuracy {score:.4f}{note}"]


def _keep_section(
    run_dir: Path, config: dict, meta: dict, metrics: list[dict[str, Any]]
) -> list[str]:
    """The card's "Mode" section: replaced head, or old classes kept (how, and how well)."""
    if not config.get("keep_old_classes"):
        return [
            "## Mode",
            "- replace the classifier: the original classes are gone; only the new ones remain",
            "",
        ]
    old = rundir.read_old_task(run_dir) or {}
    original = meta.get("original_classes") or old.get("original_classes") or []
    added = meta.get("new_classes") or []
    lines = [
        "## Mode",
        "- add classes, keep the old ones: the original head was widened; outputs "
        f"0-{len(original) - 1} are the original classes ({', '.join(f'`{c}`' for c in original)}"
        f"; named by: {old.get('class_names_rule', '?')}), then the new ones "
        f"({', '.join(f'`{c}`' for c in added) or 'none: the new data only had old classes'})",
    ]
    if old.get("rehearsal_images"):
        lines.append(
            f"- rehearsal: {old['rehearsal_images']} old images "
            f"({config.get('rehearsal_per_class')} per class, seed {config.get('seed')}) mixed "
            f"into every epoch; {old.get('old_val_images', 0)} old images held out"
        )
    if old.get("distill_weight"):
        lines.append(
            f"- distillation (LwF): weight {old['distill_weight']:g}, temperature "
            f"{old.get('distill_temperature', '?')}"
        )
    epoch = meta.get("epoch")
    row = next((r for r in metrics if r.get("epoch") == epoch), metrics[-1] if metrics else {})
    for key, what in (
        ("old_val_accuracy", "old classes' held-out images"),
        ("new_val_accuracy", "new classes' held-out images"),
    ):
        if isinstance(row.get(key), int | float):
            lines.append(
                f"- measured (epoch {row.get('epoch')}): {row[key]:.4f} accuracy on the {what}, "
                "among all classes"
            )
    return [*lines, ""]


def _channels(model_input: dict | None) -> int:
    shape = (model_input or {}).get("shape") or [None, None, 3]
    return int(shape[-1] or 3)


def _colour(model_input: dict | None) -> str:
    return "grayscale" if _channels(model_input) == 1 else "RGB"


def _onnx_usage(model_input: dict | None) -> list[str]:
    return [
        "ONNX (`model.onnx`, e.g. with onnxruntime; same input as the Keras model):",
        "```python",
        "import numpy as np, onnxruntime as ort",
        'session = ort.InferenceSession("model.onnx")',
        f"# images_uint8: (N, H, W, {_channels(model_input)}) uint8, as for the Keras model",
        'probs = session.run(["probabilities"], {"image": images_uint8})[0]',
        'labels = open("labels.txt").read().splitlines()',
        "```",
        "",
    ]


def _tfjs_usage(model_input: dict | None, tfjs_input: dict | None) -> list[str]:
    """The TF.js snippet: pixels 0-255 as float32, at the size the TF.js model takes."""
    channels = _channels(model_input)
    shape = (tfjs_input or model_input or {}).get("shape") or ["H", "W", channels]
    height, width = shape[0], shape[1]
    pixels = (
        "tf.browser.fromPixels(img).toFloat().mul([0.299, 0.587, 0.114]).sum(-1, true)"
        if channels == 1
        else "tf.browser.fromPixels(img)"
    )
    resize = (tfjs_input or {}).get("resize")
    if resize:
        size_note = (
            f": the Keras model's resize from {resize['from'][0]}x{resize['from'][1]} happens "
            f"before the model ({resize['interpolation']}, half-pixel centers)."
        )
    elif tfjs_input:
        size_note = "; resize images as for training, the model does its own preprocessing."
    else:
        size_note = (
            " unless its model.json says otherwise (`userDefinedMetadata.input`; export tfjs "
            "to get it)."
        )
    note = (
        f"The TF.js model takes float32 {_colour(model_input)} pixels in 0-255 (not uint8) of "
        f"shape [N, {height}, {width}, {channels}]{size_note}"
    )
    return [
        "TF.js (`tfjs/model.json` + its `.bin` weight files, TF.js Layers format):",
        "```js",
        "const model = await tf.loadLayersModel('tfjs/model.json');",
        f"const pixels = {pixels};  // {channels}-channel, 0-255",
        f"const x = tf.image.resizeBilinear(pixels, [{height}, {width}], false, true).expandDims(0);",
        "const probs = await model.predict(x).data();  // one per class, labels.txt order",
        "```",
        note,
        "",
    ]


# The fresh process that reloads each exported file: it imports nothing from this project.
_SELF_TEST_SCRIPT = r"""
import json, sys, warnings
import numpy as np
spec = json.loads(open(sys.argv[1]).read())
images = np.load(spec["images"])


def run_keras(path):
    import keras
    model = keras.saving.load_model(path)
    return model.predict(images, batch_size=64, verbose=0)


def run_savedmodel(path):
    import tensorflow as tf
    loaded = tf.saved_model.load(path)
    return np.concatenate([np.asarray(loaded.serve(tf.constant(images[i:i + 64])))
                           for i in range(0, len(images), 64)])


def run_tflite(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    outp = interpreter.get_output_details()[0]
    rows = []
    for image in images:
        x = image[None]
        scale, zero = inp["quantization"]
        if scale:
            x = np.round(x / scale + zero)
        interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(outp["index"]).astype(np.float32)
        scale, zero = outp["quantization"]
        if scale:
            y = (y - zero) * scale
        rows.append(y[0])
    return np.stack(rows)


def run_onnx(path):
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 64]})[0]
                           for i in range(0, len(images), 64)])


RUNNERS = {"keras": run_keras, "savedmodel": run_savedmodel,
           "tflite": run_tflite, "tflite-int8": run_tflite, "onnx": run_onnx}
errors = {}
for fmt, path in spec["files"].items():
    try:
        out = np.asarray(RUNNERS[fmt](path), dtype=np.float32)
    except Exception as err:  # reported per format to the parent, which shows it
        errors[fmt] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        continue
    np.save(spec["out"] + "/" + fmt + ".npy", out)
print(json.dumps(errors))
"""


def _self_test(
    files: dict[str, Path],
    images: np.ndarray,
    expected: np.ndarray,
    labels: np.ndarray | None,
    label_encoding: str | None,
    work: Path,
    tfjs_input: dict | None = None,
) -> dict[str, dict[str, Any]]:
    """Reload ``files`` in a fresh process, run ``images``, compare to ``expected``.

    Python formats share one fresh Python process; TF.js runs in Node (``tfjs_input`` is the
    input spec `export_tfjs.write_tfjs` returned).
    """
    files = dict(files)
    node_outputs: dict[str, Any] = {}
    if "tfjs" in files:
        # TF.js's pure-JS CPU backend is slow on a full-size base: check fewer images.
        subset = images[:TFJS_CHECK_IMAGES]
        node_outputs["tfjs"] = _run_tfjs(files.pop("tfjs"), subset, tfjs_input or {})
    if not files and not node_outputs:
        return {}
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "images.npy", images)
    spec = {
        "images": str(work / "images.npy"),
        "out": str(work),
        "files": {fmt: str(path) for fmt, path in files.items()},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    errors: dict[str, str] = {}
    seconds = 0.0
    if files:
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", _SELF_TEST_SCRIPT, str(work / "spec.json")],
            capture_output=True,
            text=True,
            timeout=SELF_TEST_TIMEOUT_S,
        )
        seconds = round(time.time() - started, 2)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            errors = dict.fromkeys(files, last)
        else:
            try:
                errors = json.loads(proc.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                errors = {}
    ref = class_probabilities(expected, label_encoding)
    report: dict[str, dict[str, Any]] = {}
    for fmt in [*files, *node_outputs]:
        if fmt in node_outputs:
            outputs, runtime, run_seconds = node_outputs[fmt]
            if isinstance(outputs, str):
                report[fmt] = {"ok": False, "error": outputs}
                continue
        elif fmt in errors or not (work / f"{fmt}.npy").is_file():
            reason = errors.get(fmt, "no output")
            report[fmt] = {"ok": False, "error": f"reload in a fresh process failed: {reason}"}
            continue
        else:
            outputs, runtime, run_seconds = np.load(work / f"{fmt}.npy"), "python", seconds
        got = class_probabilities(outputs, label_encoding)
        want = ref[: len(got)]
        agreement = float(np.mean(got.argmax(axis=1) == want.argmax(axis=1)))
        entry: dict[str, Any] = {
            "images": len(got),
            "max_abs_diff": float(np.max(np.abs(got - want))),
            "argmax_agreement": agreement,
            "fresh_process_seconds": run_seconds,
        }
        if runtime != "python":
            entry["runtime"] = runtime
        if fmt == "tflite-int8":
            entry["ok"] = agreement >= 0.9
            if labels is not None:
                keras_acc = float(np.mean(ref.argmax(axis=1) == labels))
                int8_acc = float(np.mean(got.argmax(axis=1) == labels))
                entry.update(
                    accuracy_keras=keras_acc,
                    accuracy_int8=int8_acc,
                    accuracy_drop=keras_acc - int8_acc,
                )
        elif fmt == "tflite":
            entry["ok"] = agreement >= ARGMAX_AGREEMENT_MIN and entry["max_abs_diff"] < 1e-3
        elif fmt in ("onnx", "tfjs"):
            entry["ok"] = (
                agreement >= OTHER_RUNTIME_AGREEMENT_MIN
                and entry["max_abs_diff"] <= OTHER_RUNTIME_TOLERANCE
            )
        else:
            entry["ok"] = entry["max_abs_diff"] < FLOAT_TOLERANCE
        report[fmt] = entry
    shutil.rmtree(work, ignore_errors=True)
    return report


def _run_tfjs(folder: Path, images: np.ndarray, tfjs_input: dict) -> tuple[Any, str, float]:
    """``(outputs or an error line, runtime, seconds)`` of the TF.js model run in Node."""
    from retrain.export import export_tfjs

    started = time.time()
    try:
        result = export_tfjs.run_in_tfjs(folder, export_tfjs.resize_for_tfjs(images, tfjs_input))
    except ConfigError as err:
        return f"not checked in TF.js: {err}", "", 0.0
    except subprocess.TimeoutExpired:
        return "TF.js did not finish in time", "", 0.0
    runtime = f"TF.js {result['version']} (Node, {result['backend']} backend)"
    return result["outputs"], runtime, round(time.time() - started, 2)


def _evaluation(outputs: np.ndarray, labels: np.ndarray | None, meta: dict) -> dict | None:
    if labels is None or len(labels) == 0:
        return None
    from sklearn.metrics import accuracy_score, f1_score

    pred = class_probabilities(outputs, meta.get("label_encoding")).argmax(axis=1)
    return {
        "images": len(labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }


def export_run(
    run_dir: str | Path, formats: Sequence[str], progress: Progress | None = None
) -> dict[str, Any]:
    """Write the chosen exports of a finished run under ``RUN_DIR/export/`` and self-test them.

    Args:
        run_dir: a run directory whose status is "done".
        formats: names from `FORMATS`, or "all".
        progress: called as ``progress(message, fraction_done)`` between steps.

    Returns:
        ``{"files": [paths], "self_test": {format: {...}}}``; the self-test of a model
        format has images, max_abs_diff, argmax_agreement and ok (int8 also accuracy_keras,
        accuracy_int8, accuracy_drop on the validation images); labels/card have ok.

    Raises:
        RunError: the run is not done, has no model, or (int8) its training images are gone.
        ConfigError: an unknown format, or a TensorFlow format without TensorFlow.
    """
    run_dir = Path(run_dir)
    chosen = parse_formats(formats)
    _check_run_done(run_dir)
    for fmt in chosen:
        if fmt in NEEDS_TENSORFLOW:
            _require_tensorflow(fmt)
    if "onnx" in chosen:
        from retrain.export.export_onnx import check_can_export

        check_can_export()
    step_total = len(chosen) + 1
    steps = iter(range(step_total + 1))

    def tick(message: str) -> None:
        done = next(steps)
        if progress is not None:
            progress(message, done / step_total)

    config = read_run_config(run_dir)
    model_path = run_model_path(run_dir)
    model, meta = load_model(model_path)
    class_names = model_class_names(model, meta, model_path)
    out = rundir.export_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = _check_images(run_dir, config, meta, model, class_names)
    if images is None or len(images) == 0:
        # No held-out images left (data gone): a fixed random sample still tests the files.
        size = model_image_size(model, meta)
        channels = model_channels(model)
        images = np.random.default_rng(0).integers(0, 256, (8, *size, channels), dtype=np.uint8)
        labels = None
    expected = raw_outputs(model, images)

    files: list[Path] = []
    model_files: dict[str, Path] = {}
    self_test: dict[str, dict[str, Any]] = {}
    tmp_saved: Path | None = None
    tfjs_input: dict | None = None
    export_meta = {
        **meta,
        "class_names": class_names,
        "exported_from": run_dir.name,
        "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    for fmt in chosen:
        tick(f"Writing {FILE_NAMES[fmt]}")
        path = out / FILE_NAMES[fmt]
        if fmt == "keras":
            modelfile.save_model(model, path, export_meta)
        elif fmt == "savedmodel":
            _saved_model(model, path)
        elif fmt in ("tflite", "tflite-int8"):
            source = out / FILE_NAMES["savedmodel"]
            if "savedmodel" not in chosen:
                if tmp_saved is None:
                    tmp_saved = out / ".saved_model_tmp"
                    _saved_model(model, tmp_saved)
                source = tmp_saved
            calibration = None
            if fmt == "tflite-int8":
                calibration = _calibration_images(run_dir, config, meta, model)
            _tflite(source, path, calibration)
        elif fmt == "onnx":
            from retrain.export.export_onnx import write_onnx

            write_onnx(model, path)
        elif fmt == "tfjs":
            from retrain.export.export_tfjs import write_tfjs

            tfjs_input = write_tfjs(model, path, _tfjs_metadata(export_meta))
        elif fmt == "labels":
            path.write_text("\n".join(class_names) + "\n")
            self_test[fmt] = {"ok": path.read_text().splitlines() == class_names}
        elif fmt == "card":
            evaluation = _evaluation(expected, labels, meta)
            card = model_card(run_dir, export_meta, evaluation, model_input=_model_input(model))
            path.write_text(card)
            self_test[fmt] = {"ok": path.read_text().startswith("# Model card")}
        files.append(path)
        if fmt in MODEL_FORMATS:
            model_files[fmt] = path
    if tmp_saved is not None:
        shutil.rmtree(tmp_saved, ignore_errors=True)
    tick("Reloading each file in a fresh process")
    self_test.update(
        _self_test(
            model_files,
            images,
            expected,
            labels,
            meta.get("label_encoding"),
            out / ".selftest",
            tfjs_input=tfjs_input,
        )
    )
    result = {
        "files": [str(p) for p in files],
        "self_test": {fmt: self_test[fmt] for fmt in chosen if fmt in self_test},
    }
    (out / "export.json").write_text(json.dumps(result, indent=2))
    tick("Done")
    return result


def _model_input(model: Any) -> dict[str, Any]:
    """Shape and dtype of the model's image input, for the model card."""
    shape = [int(d) if d is not None else None for d in model.inputs[0].shape[1:]]
    return {"shape": shape, "dtype": str(model.inputs[0].dtype)}


def _tfjs_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What a web app needs beside the TF.js model: class names and the label encoding."""
    keys = ("class_names", "label_encoding", "image_size", "resize_mode", "exported_from")
    return {k: shareable(meta[k]) for k in keys if k in meta}


def zip_exports(run_dir: str | Path, files: Sequence[str | Path], name: str | None = None) -> Path:
    """Zip exported files (folders included) into ``RUN_DIR/export/<name or run_id-export>.zip``."""
    import zipfile

    run_dir = Path(run_dir)
    out = rundir.export_dir(run_dir)
    target = out / f"{name or run_dir.name + '-export'}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in map(Path, files):
            if file.is_dir():
                for part in sorted(file.rglob("*")):
                    if part.is_file():
                        zf.write(part, part.relative_to(out).as_posix())
            elif file.is_file():
                zf.write(file, file.relative_to(out).as_posix())
    return target


def cli_export(args: Any) -> dict[str, Any]:
    """`python -m retrain export --run RUN_DIR --format F [--format F ...]`."""
    return export_run(args.run, args.format)
