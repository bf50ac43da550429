"""Benchmark: head-only retraining on flowers12, the project's CLI against plain Keras.

    python bench/train.py                  # 1 interleaved round (about 6-8 min on 2 cores)
    python bench/train.py --repeats 2      # more rounds, medians reported

Whole processes are timed, start-up included, interleaved (project, plain, project, plain,
...), so both see the same machine load:

- project, cold: ``python -m retrain train --data flowers12 --base <TM keras_model.h5>
  --epochs 30`` with an empty RETRAIN_HOME (it ingests, caches images, computes the frozen
  base's features once, trains the head on them);
- project, warm: the same again on the same home (image and feature caches reused);
- plain: bench/plain_keras_train.py, ``image_dataset_from_directory`` + ``model.fit`` of a
  frozen MobileNetV2 alpha 0.35 (the TM base's network with its weights, copied into a
  ``.weights.h5`` here first) with a Dropout + Dense head, 30 epochs.

Both hold out 20% of train/ for validation (seed 42) and are scored on flowers12/test.
Also: a 15-epoch project run (target: test accuracy >= 94%), and full fine-tuning images/s of
the project (``--freeze none``) against plain ``fit`` with the base unfrozen (``--ft-epochs``
epochs each, the last epoch's rate). Peak RSS is polled (psutil) over each process tree.

Targets (issue 4): project <= 0.2x the plain script's time at equal accuracy (+-1 point),
test accuracy >= 94% after 15 head epochs, fine-tune images/s >= 0.95x plain, worker peak
RSS < 2.5 GB. Writes a markdown table to stdout and JSON to bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLOWERS = SHARED / "data" / "flowers12"
TM_BASE = SHARED / "models" / "teachable_machine_water" / "keras_model.h5"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # `python bench/train.py` from anywhere imports this checkout


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (MB, whole process tree), stdout, rc."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                parent = psutil.Process(proc.pid)
                rss = parent.memory_info().rss + sum(
                    c.memory_info().rss for c in parent.children(recursive=True)
                )
                peak = max(peak, rss)
            except psutil.Error:
                pass
            done.wait(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak / 2**20),
        "stdout": out,
        "stderr": err[-3000:],
        "rc": proc.returncode,
    }


def export_base_weights(path: Path) -> float:
    """Copy the TM base's MobileNetV2 weights into a keras.applications model's weights file.

    Returns the max abs difference of the two networks' features on random images (the
    copy is checked, not assumed).
    """
    import keras
    import numpy as np

    from retrain import models
    from retrain.models import surgery

    with tempfile.TemporaryDirectory() as home:
        base = models.load_base(str(TM_BASE), workspace=Path(home))
        features = surgery.replace_head(base, ["a", "b"]).features
    app = keras.applications.MobileNetV2(
        alpha=0.35, include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
    )
    source = [w for layer in features.layers for w in layer.weights]
    if [tuple(w.shape) for w in source] != [tuple(w.shape) for w in app.weights]:
        raise SystemExit("The TM base is not a MobileNetV2 alpha 0.35; cannot build the baseline.")
    app.set_weights([np.asarray(w.numpy()) for w in source])
    path.parent.mkdir(parents=True, exist_ok=True)
    app.save_weights(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    ours = features.predict(images, verbose=0)
    plain = app.predict(images.astype("float32") / 127.5 - 1, verbose=0)
    return float(np.max(np.abs(ours - plain)))


def project_run(home: Path, run_dir: Path, *flags: str) -> dict:
    env = dict(os.environ, RETRAIN_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "retrain", "train", "--data", str(FLOWERS), "--base"]
    cmd += [str(TM_BASE), "--out", str(run_dir), *flags]
    result = run_measured(cmd, env)
    if result["rc"] != 0:
        raise SystemExit(f"project run failed: {result['stderr']}")
    result["summary"] = json.loads(result.pop("stdout"))
    evaluation = subprocess.run(
        [sys.executable, "-m", "retrain", "evaluate", "--model", str(run_dir / "model.keras")]
        + ["--data", str(FLOWERS), "--split", "test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result["test_accuracy"] = json.loads(evaluation.stdout)["accuracy"]
    from retrain.runs import rundir

    metrics = rundir.read_metrics(run_dir)
    result["images_per_second"] = [m["images_per_second"] for m in metrics]
    return result


def plain_run(weights: Path, *flags: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, str(ROOT / "bench" / "plain_keras_train.py")]
    cmd += ["--train", str(FLOWERS / "train"), "--test", str(FLOWERS / "test")]
    cmd += ["--weights", str(weights), *flags]
    result = run_measured(cmd, env)
    if result["rc"] != 0:
        raise SystemExit(f"plain run failed: {result['stderr']}")
    report = json.loads(result.pop("stdout").strip().splitlines()[-1])
    result.update(report)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--epochs", type=int, default=30, help="head epochs of the timed runs")
    parser.add_argument("--ft-epochs", type=int, default=2, help="fine-tune epochs (0 = skip)")
    args = parser.parse_args()
    if not FLOWERS.is_dir() or not TM_BASE.is_file():
        raise SystemExit(f"Needs {FLOWERS} and {TM_BASE}.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    weights = RESULTS / "mobilenetv2_035_tm.weights.h5"
    diff = export_base_weights(weights)
    print(f"baseline weights copied from the TM base (max feature diff {diff:.2e})", flush=True)

    rows: dict[str, list[dict]] = {"project cold": [], "project warm": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            home = tmp / f"home{r}"
            epochs = ["--epochs", str(args.epochs)]
            rows["project cold"].append(project_run(home, tmp / f"cold{r}", *epochs))
            print("project cold", rows["project cold"][-1]["seconds"], flush=True)
            rows["plain"].append(plain_run(weights, *epochs))
            print("plain", rows["plain"][-1]["seconds"], flush=True)
            rows["project warm"].append(project_run(home, tmp / f"warm{r}", *epochs))
            print("project warm", rows["project warm"][-1]["seconds"], flush=True)
        head15 = project_run(tmp / "home0", tmp / "head15", "--epochs", "15")
        fine_tune = {}
        if args.ft_epochs:
            ft = ["--epochs", str(args.ft_epochs), "--lr", "1e-4"]
            fine_tune["project"] = project_run(tmp / "home0", tmp / "ft", *ft, "--freeze", "none")
            fine_tune["plain"] = plain_run(weights, *ft, "--fine-tune")

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    plain_s = med("plain", "seconds")
    table = [
        "| run | wall s (whole process) | x plain | test accuracy | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name in rows:
        table.append(
            f"| {name}, {args.epochs} head epochs | {med(name, 'seconds'):.1f} | "
            f"{med(name, 'seconds') / plain_s:.2f} | {med(name, 'test_accuracy'):.1%} | "
            f"{med(name, 'peak_rss_mb'):.0f} |"
        )
    table.append(
        f"| project, 15 head epochs (warm) | {head15['seconds']:.1f} | "
        f"{head15['seconds'] / plain_s:.2f} | {head15['test_accuracy']:.1%} | "
        f"{head15['peak_rss_mb']} |"
    )
    if fine_tune:
        p, q = fine_tune["project"], fine_tune["plain"]
        p_rate, q_rate = p["images_per_second"][-1], q["images_per_second"][-1]
        table.append(
            f"| full fine-tune images/s (last of {args.ft_epochs} epochs) | project "
            f"{p_rate:.1f} vs plain {q_rate:.1f} | {p_rate / q_rate:.2f} | "
            f"{p['test_accuracy']:.1%} vs {q['test_accuracy']:.1%} | "
            f"{p['peak_rss_mb']} vs {q['peak_rss_mb']} |"
        )
    print("\n".join(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "rows": rows,
        "head15": head15,
        "fine_tune": fine_tune,
        "baseline_feature_diff": diff,
        "table": table,
        "cpu_count": os.cpu_count(),
    }
    (RESULTS / "train.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
