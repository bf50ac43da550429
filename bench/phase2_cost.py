"""Benchmark: what phase 2 (on by default after a frozen-base head) costs per epoch on a CPU,
for the ImageNet backbones people pick, against a phase 1 epoch on the cached features.

    python bench/phase2_cost.py                                  # MobileNetV2, EfficientNetB0, ResNet50V2
    python bench/phase2_cost.py --bases MobileNetV2 --data DIR   # one backbone, other data

Phase 2 trains the top 20 layers on the frozen lower layers' outputs, computed once
(`features.frozen_split`). Each backbone trains ``--head-epochs`` head epochs then
``--fine-tune-epochs`` phase 2 epochs
through the CLI (``--early-stopping 0``, so every epoch runs), with random weights: nothing is
downloaded, and the time of an epoch does not depend on the weights' values. Reported per
backbone: the whole run, the frozen base's features (computed once, before phase 1), a phase 1
epoch, a phase 2 epoch, and what phase 2's default budget (15 epochs; early stopping ends it
after 5 when it does not help) would add. Needs ../shared/data/flowers12 unless ``--data``.
Writes a markdown table to stdout and JSON to bench/results/phase2_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"
RESULTS = ROOT / "bench" / "results"
DEFAULT_BUDGET, PATIENCE = 15, 5  # config.DEFAULT_FINE_TUNE_EPOCHS, the early-stopping patience


def run(base: str, data: Path, work: Path, head_epochs: int, fine_tune_epochs: int) -> dict:
    run_dir = work / "runs" / base
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "retrain", "train", "--data", str(data),
         "--base", f"applications:{base}:none", "--out", str(run_dir),
         "--epochs", str(head_epochs), "--fine-tune-epochs", str(fine_tune_epochs),
         "--early-stopping", "0", "--lr", "0.001", "--workspace", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=7200,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{base}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phase1 = [r["seconds"] for r in rows if r.get("phase") == 1]
    phase2 = [r["seconds"] for r in rows if r.get("phase") == 2]
    # The frozen base's features are computed before phase 1's first epoch: they count in
    # what the run spent outside its epochs (with start-up, reading the images and saving).
    return {
        "base": base,
        "run_s": round(wall, 1),
        "outside_epochs_s": round(wall - sum(phase1) - sum(phase2), 1),
        "phase1_epoch_s": round(statistics.median(phase1), 2),
        "phase2_epoch_s": round(statistics.median(phase2), 1),
        "phase2_default_s": [
            round(statistics.median(phase2) * n) for n in (PATIENCE, DEFAULT_BUDGET)
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bases", nargs="+", default=["MobileNetV2", "EfficientNetB0", "ResNet50V2"]
    )
    parser.add_argument("--data", type=Path, default=FLOWERS)
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--fine-tune-epochs", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data} (../shared/data/flowers12, or pass --data)")
        return 1
    results = []
    with tempfile.TemporaryDirectory(prefix="phase2-cost-") as tmp:
        for base in args.bases:
            results.append(run(base, args.data, Path(tmp), args.head_epochs, args.fine_tune_epochs))
            print(json.dumps(results[-1]), flush=True)
    print(
        "\n| backbone | run | outside the epochs (start-up, images, features once) | phase 1 epoch | phase 2 epoch | "
        f"phase 2 at the default: {PATIENCE} epochs (stopped) / {DEFAULT_BUDGET} (all) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        low, high = r["phase2_default_s"]
        print(
            f"| {r['base']} | {r['run_s']} s | {r['outside_epochs_s']} s | {r['phase1_epoch_s']} s | "
            f"{r['phase2_epoch_s']} s | {low / 60:.1f} / {high / 60:.1f} min |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "phase2_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
