"""Benchmark: flowers12 with the Teachable Machine base, replace mode, at the defaults and on
a small lr x epochs grid.

    python bench/defaults.py                                  # defaults + grid (3 lrs x 2)
    python bench/defaults.py --grid ""                        # the defaults only

The default run passes no --lr, --epochs or early-stopping flags: the learning rate is found
by the range test, the epochs are a budget that early stopping (best epoch restored) ends.
Each grid point sets --lr and --epochs and turns early stopping off (``--early-stopping 0``:
every epoch trained, the last one kept), as a hand-tuned fixed recipe. All runs hold out 20%
of train/ for validation (seed 42) and are scored on the untouched flowers12/test (240
images). Runs share one workspace, so the image and feature caches are computed once (by the
first run; its time includes them). Needs ../shared (skips with a message without it).
Writes a markdown table to stdout and JSON to bench/results/defaults_flowers12.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLOWERS = SHARED / "data" / "flowers12"
TM_BASE = SHARED / "models" / "teachable_machine_water" / "keras_model.h5"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def run(workspace: Path, name: str, settings: dict) -> dict:
    from retrain import evaluate
    from retrain.training.config import TrainConfig
    from retrain.training.train import train

    run_dir = workspace / "runs" / name
    config = TrainConfig(data=str(FLOWERS), base=str(TM_BASE), out=str(run_dir), **settings)
    start = time.perf_counter()
    summary = train(config, run_dir, workspace=workspace)
    seconds = time.perf_counter() - start
    result = evaluate.evaluate_model(
        run_dir / "best.keras", str(FLOWERS), "test", workspace=workspace
    )
    return {
        "name": name,
        "settings": settings,
        "lr": summary["lr"],
        "test_accuracy": result["accuracy"],
        "num_test": result["num_images"],
        "epochs": summary["epochs_done"],
        "epochs_budget": summary["epochs_budget"],
        "restored_epoch": summary["restored_epoch"],
        "lr_find_seconds": summary.get("lr_find_seconds"),
        "feature_seconds": summary.get("feature_seconds"),
        "train_seconds": round(seconds, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | lr | epochs run (budget, kept) | test accuracy | LR finder | run time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        finder = "-" if r["lr_find_seconds"] is None else f"{r['lr_find_seconds']:.1f} s"
        kept = r["restored_epoch"] or r["epochs"]
        lines.append(
            f"| {r['name']} | {r['lr']:.2g} | {r['epochs']} ({r['epochs_budget']}, {kept}) "
            f"| {r['test_accuracy']:.1%} | {finder} | {r['train_seconds']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="0.001,0.003,0.01:15,30", help="lrs:epochs")
    parser.add_argument("--repeat-default", type=int, default=2, help="default runs (warm)")
    args = parser.parse_args()
    if not (FLOWERS.is_dir() and TM_BASE.is_file()):
        print("../shared (flowers12 and the Teachable Machine model) is not present; skipped.")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="defaults_") as tmp:
        import os

        os.environ["RETRAIN_HOME"] = tmp
        workspace = Path(tmp)
        for i in range(args.repeat_default):
            rows.append(run(workspace, f"defaults-{i + 1}", {}))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.grid:
            lrs, epochs = args.grid.split(":")
            for lr in lrs.split(","):
                for e in epochs.split(","):
                    settings = {"lr": float(lr), "epochs": int(e), "early_stopping": 0}
                    rows.append(run(workspace, f"lr {lr}, {e} epochs", settings))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "defaults_flowers12.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
