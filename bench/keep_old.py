"""Benchmark: add classes to a trained model, with and without keeping the old ones.

    python bench/keep_old.py                          # lr 0.01, 30 epochs: 3-6 min on 2 CPU cores
    python bench/keep_old.py --lr 0.001 --epochs 20   # the Train page's lr, the demo's epochs

The task is built from data every checkout has: the built-in starter model (``builtin:digits-cnn``)
was trained on the sample's digits 0-4; it now learns digits 5-9. The starter's own held-out
0-4 images (the 20% it never trained on, same permutation as `models._train_digits_cnn`) are
the old task's test images; its training images are the old data a user still has. Digits 5-9
are split 80/20 (per class, seeded) into the new data's train and val folders.

Compared, all with the base frozen and the same epochs, batch size and learning rate:

- **replace**: today's head replacement (new classes only);
- **keep + rehearsal**: ``--keep-old-classes --old-data`` (N remembered images per old class);
- **keep + distillation**: ``--keep-old-classes`` without old data (LwF).

Reported per mode: old-task accuracy (the old held-out images, the model naming their old class
among all its classes), new-task accuracy (the new val images, among all classes), accuracy on
all classes (both sets together), the forgetting drop (`evaluate.forgetting`: its ``method``
says what ``after`` is) and training time. Writes a markdown table to stdout and JSON to
bench/results/keep_old.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # `python bench/keep_old.py` from anywhere imports this checkout


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")


def build_task(folder: Path) -> dict[str, Path]:
    """Old data (train = the starter's training images, val = its held-out ones), new data."""
    from retrain.data import stratified_split
    from retrain.sample import ORIGINAL_TASK, digit_images

    images, labels, names = digit_images(ORIGINAL_TASK)
    order = np.random.default_rng(0).permutation(len(labels))  # as _train_digits_cnn
    images, labels = images[order], labels[order]
    n_val = len(labels) // 5
    write_folder(folder / "old" / "train", images[n_val:], labels[n_val:], names)
    write_folder(folder / "old" / "val", images[:n_val], labels[:n_val], names)
    write_folder(folder / "old_test", images[:n_val], labels[:n_val], names)
    images, labels, names = digit_images("5-9")
    train, val = stratified_split(labels, 0.2, 0)
    write_folder(folder / "new" / "train", images[train], labels[train], names)
    write_folder(folder / "new" / "val", images[val], labels[val], names)
    write_folder(folder / "new_test", images[val], labels[val], names)
    return {k: folder / k for k in ("old", "old_test", "new", "new_test")}


def measure(mode: str, task: dict[str, Path], workspace: Path, args: argparse.Namespace) -> dict:
    from retrain import evaluate
    from retrain.config import TrainConfig
    from retrain.train import train

    settings = {
        "epochs": args.epochs,
        "batch_size": 32,
        "lr": args.lr,
        "seed": 0,
        "fine_tune_epochs": args.fine_tune_epochs,
    }
    if mode == "keep + rehearsal":
        settings.update(
            keep_old_classes=True,
            old_data=str(task["old"]),
            rehearsal_per_class=args.per_class,
        )
    elif mode == "keep + distillation":
        settings.update(keep_old_classes=True)
    run_dir = workspace / "runs" / mode.replace(" ", "").replace("+", "-")
    config = TrainConfig(
        data=str(task["new"]), base="builtin:digits-cnn", out=str(run_dir), **settings
    )
    start = time.perf_counter()
    summary = train(config, run_dir, workspace=workspace)
    seconds = time.perf_counter() - start
    model = run_dir / "best.keras"
    new = evaluate.evaluate_model(model, str(task["new_test"]), "all", workspace=workspace)
    forgot = evaluate.forgetting("builtin:digits-cnn", run_dir, str(task["old_test"]), workspace)
    n_new = new["num_images"]
    if mode == "replace":
        old_acc, n_old = None, forgot["num_images"]  # it has no old class to name
        all_acc = new["accuracy"] * n_new / (n_new + n_old)
    else:
        old = evaluate.evaluate_model(model, str(task["old_test"]), "all", workspace=workspace)
        old_acc, n_old = old["accuracy"], old["num_images"]
        all_acc = (old_acc * n_old + new["accuracy"] * n_new) / (n_old + n_new)
    return {
        "mode": mode,
        "old_task_accuracy": old_acc,
        "new_task_accuracy": new["accuracy"],
        "all_classes_accuracy": all_acc,
        "forgetting_before": forgot["before"],
        "forgetting_after": forgot["after"],
        "forgetting_drop": forgot["drop"],
        "forgetting_method": forgot["method"],
        "train_seconds": round(seconds, 1),
        "epochs": summary["epochs_done"],
        "num_old_test": n_old,
        "num_new_test": n_new,
        "last_epoch": summary["final"],
    }


def table(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    lines = [
        "| mode | old task (0-4) | new task (5-9) | all 10 classes | forgetting drop (method) "
        "| training time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {pct(r['old_task_accuracy'])} | {pct(r['new_task_accuracy'])} "
            f"| {pct(r['all_classes_accuracy'])} | {r['forgetting_drop']:+.1%} "
            f"({r['forgetting_method']}) | {r['train_seconds']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--fine-tune-epochs", type=int, default=0, help="phase 2 epochs")
    parser.add_argument("--per-class", type=int, default=20, help="rehearsal memory per class")
    parser.add_argument(
        "--modes", default="replace,keep + rehearsal,keep + distillation", help="comma-separated"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keep_old_") as tmp:
        import os

        os.environ["RETRAIN_HOME"] = tmp
        workspace = Path(tmp)
        task = build_task(workspace / "task")
        rows = []
        for mode in args.modes.split(","):
            rows.append(measure(mode.strip(), task, workspace, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "keep_old.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
