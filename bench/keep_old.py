"""Benchmark: add classes to a trained model, with and without keeping the old ones.

    python bench/keep_old.py                                  # every method at the defaults
    python bench/keep_old.py --task user-cnn                  # the harder split
    python bench/keep_old.py --lr 0.01 --epochs 30 --methods keep   # one grid point

Two tasks, both "a model trained on digits 0-4 learns digits 5-9":

- ``starter``: the built-in starter model (``builtin:digits-cnn``, RGB 32x32, class names
  inside). The starter's own held-out 0-4 images (the 20% it never trained on, same
  permutation as `models.builtin._train_digits_cnn`) are the old task's test images; its
  training images are the old data a user still has (the run holds 20% of them out as its own
  old validation images).
- ``user-cnn`` (harder): an MNIST-style CNN a user trained (28x28 grayscale white-on-black
  digits scaled x / 255, no class names and no preprocessing inside: the run names its
  outputs from the old data's folders and probes the scaling). Old data and old test images
  as for the starter (its own held-out 20% is the old test).

Digits 5-9 are split 80/20 (per class, seeded): the 80% is the new data (the run holds 20%
of it out for validation), the 20% the new task's test images, never seen by the run.

Methods (all at the same --lr/--epochs, default: the TrainConfig defaults):

- ``replace``: head replacement (new classes only);
- ``rehearsal``: ``--keep-old-classes --old-data``, no distillation, no bias correction;
- ``rehearsal+distill``: rehearsal and distillation together, no bias correction;
- ``keep``: the keep-mode defaults (rehearsal + distillation + the default bias correction);
- ``keep+wa`` / ``keep+bic`` / ``keep+none``: the defaults with each bias correction;
- ``distill``: ``--keep-old-classes`` without old data (LwF).

Reported per method: old-task accuracy (old test images, the model naming their old class
among all its classes), new-task accuracy (new test images, among all classes), accuracy on
all classes, the forgetting drop (`evaluate.forgetting`: its ``method`` says what ``after``
is), the learning rate used, epochs run (and where early stopping ended), the LR finder's
seconds and the whole run's seconds. Writes a markdown table to stdout and JSON to
bench/results/keep_old_<task>.json.
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


def build_task(folder: Path, task: str) -> dict[str, Path | str]:
    """Old data, old test, new data, new test (class folders), and the base model's spec."""
    from retrain.data import stratified_split
    from retrain.data.sample import NEW_TASK, ORIGINAL_TASK, digit_images

    if task == "starter":
        images, labels, names = digit_images(ORIGINAL_TASK)
        order = np.random.default_rng(0).permutation(len(labels))  # as _train_digits_cnn
        images, labels = images[order], labels[order]
        n_val = len(labels) // 5
        base = "builtin:digits-cnn"
        new_images, new_labels, new_names = digit_images(NEW_TASK)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from done_when_models import coloured_digits, mnist_digits

        digits = mnist_digits if task == "user-cnn" else coloured_digits
        images, labels, names = digits(ORIGINAL_TASK)
        order = np.random.default_rng(0).permutation(len(labels))
        images, labels = images[order], labels[order]
        n_val = len(labels) // 5
        build = user_cnn if task == "user-cnn" else rgb_cnn
        base = str(build(folder, images[n_val:], labels[n_val:], len(names)))
        new_images, new_labels, new_names = digits(NEW_TASK)
    write_folder(folder / "old", images[n_val:], labels[n_val:], names)
    write_folder(folder / "old_test", images[:n_val], labels[:n_val], names)
    train, test = stratified_split(new_labels, 0.2, 0)
    write_folder(folder / "new", new_images[train], new_labels[train], new_names)
    write_folder(folder / "new_test", new_images[test], new_labels[test], new_names)
    return {"base": base, **{k: folder / k for k in ("old", "old_test", "new", "new_test")}}


def user_cnn(folder: Path, images: np.ndarray, labels: np.ndarray, n_classes: int) -> Path:
    """An MNIST-style CNN trained on ``x / 255`` (no names, no preprocessing inside)."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(name="flatten"),
            layers.Dropout(0.5),
            layers.Dense(n_classes, activation="softmax"),
        ],
        name="user_cnn",
    )
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(images[..., None] / 255.0, labels, epochs=8, batch_size=32, verbose=0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "user_cnn.keras"
    model.save(path)
    return path


def rgb_cnn(folder: Path, images: np.ndarray, labels: np.ndarray, n_classes: int) -> Path:
    """An RGB CNN (ReLU6, global average pooling, as tests/done_when_models.rgb_cnn) trained
    on ``x / 127.5 - 1`` (no names, no preprocessing inside): 64 pooled features only."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((32, 32, 3), name="image")
    x = inp
    for i, filters in enumerate((16, 32, 64), start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.ReLU(6.0, name=f"relu{i}")(x)
        if i < 3:
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(n_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="rgb_cnn")
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(images / 127.5 - 1.0, labels, epochs=20, batch_size=32, verbose=0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rgb_cnn.keras"
    model.save(path)
    return path


METHODS = {
    "replace": {},
    "rehearsal": {"old": True, "distill_weight": 0.0, "bias_correction": "none"},
    "rehearsal+distill": {"old": True, "bias_correction": "none"},
    "keep": {"old": True},
    "keep+wa": {"old": True, "bias_correction": "weight-aligning"},
    "keep+bic": {"old": True, "bias_correction": "bic"},
    "keep+none": {"old": True, "bias_correction": "none"},
    "distill": {"old": False},
}


def measure(method: str, task: dict, workspace: Path, args: argparse.Namespace) -> dict:
    from retrain import evaluate
    from retrain.training.config import TrainConfig
    from retrain.training.train import train

    settings: dict = {"seed": 0}
    if args.lr != "auto":
        settings["lr"] = float(args.lr)
    if args.epochs:
        settings["epochs"] = args.epochs
    if args.early_stopping is not None:
        settings["early_stopping"] = args.early_stopping
    if args.freeze:
        settings["freeze"] = args.freeze
    if args.fine_tune_epochs is not None:
        settings["fine_tune_epochs"] = args.fine_tune_epochs
    for item in args.set:  # any other TrainConfig field, e.g. --set fine_tune_lr=0.001
        key, _, value = item.partition("=")
        settings[key] = json.loads(value) if value[:1].isdigit() or value[:1] == "-" else value
    spec = dict(METHODS[method])
    old = spec.pop("old", None)
    if old is not None:
        settings["keep_old_classes"] = True
        if old:
            settings["old_data"] = str(task["old"])
        elif not task["base"].startswith("builtin:"):  # no names inside, no old folders
            names = sorted(p.name for p in Path(task["old"]).iterdir() if p.is_dir())
            settings["original_classes"] = ",".join(names)
    settings.update(spec)
    tag = f"{method}-{args.lr}-{args.epochs}".replace("+", "_")
    run_dir = workspace / "runs" / tag
    config = TrainConfig(data=str(task["new"]), base=task["base"], out=str(run_dir), **settings)
    start = time.perf_counter()
    summary = train(config, run_dir, workspace=workspace)
    seconds = time.perf_counter() - start
    model = run_dir / "best.keras"
    new = evaluate.evaluate_model(model, str(task["new_test"]), "all", workspace=workspace)
    forgot = evaluate.forgetting(task["base"], run_dir, str(task["old_test"]), workspace)
    n_new = new["num_images"]
    if method == "replace":
        old_acc, n_old = None, forgot["num_images"]  # it has no old class to name
        all_acc = new["accuracy"] * n_new / (n_new + n_old)
    else:
        old_res = evaluate.evaluate_model(model, str(task["old_test"]), "all", workspace=workspace)
        old_acc, n_old = old_res["accuracy"], old_res["num_images"]
        all_acc = (old_acc * n_old + new["accuracy"] * n_new) / (n_old + n_new)
    return {
        "method": method,
        "lr_setting": args.lr,
        "epochs_setting": args.epochs,
        "lr": summary["lr"],
        "old_task_accuracy": old_acc,
        "new_task_accuracy": new["accuracy"],
        "all_classes_accuracy": all_acc,
        "forgetting_before": forgot["before"],
        "forgetting_after": forgot["after"],
        "forgetting_drop": forgot["drop"],
        "forgetting_method": forgot["method"],
        "train_seconds": round(seconds, 1),
        "lr_find_seconds": summary.get("lr_find_seconds"),
        "epochs": summary["epochs_done"],
        "epochs_budget": summary["epochs_budget"],
        "early_stopped_epoch": summary["early_stopped_epoch"],
        "restored_epoch": summary["restored_epoch"],
        "bias_correction": summary.get("bias_correction"),
        "num_old_test": n_old,
        "num_new_test": n_new,
    }


def table(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    lines = [
        "| method | lr | epochs run (budget, kept) | old task (0-4) | new task (5-9) "
        "| all 10 classes | drop (method) | LR finder | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lr = f"{r['lr']:.2g}" + (" (found)" if r["lr_setting"] == "auto" else "")
        finder = "-" if r["lr_find_seconds"] is None else f"{r['lr_find_seconds']:.1f} s"
        lines.append(
            f"| {r['method']} | {lr} | {r['epochs']} ({r['epochs_budget']}, "
            f"{r['restored_epoch'] or r['epochs']}) | {pct(r['old_task_accuracy'])} "
            f"| {pct(r['new_task_accuracy'])} | {pct(r['all_classes_accuracy'])} "
            f"| {r['forgetting_drop']:+.1%} ({r['forgetting_method']}) | {finder} "
            f"| {r['train_seconds']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="starter", choices=("starter", "user-cnn", "rgb-cnn"))
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--lr", default="auto", help="a number, or auto (the default)")
    parser.add_argument("--early-stopping", type=int, default=None)
    parser.add_argument("--freeze", default=None)
    parser.add_argument("--fine-tune-epochs", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE (repeatable)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument(
        "--grid", default="", help="lrs:epochs, e.g. 0.001,0.01:15,30 (early stopping off)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keep_old_") as tmp:
        import os

        os.environ["RETRAIN_HOME"] = tmp
        workspace = Path(tmp)
        task = build_task(workspace / "task", args.task)
        rows = []
        points = [(args.lr, args.epochs, args.early_stopping)]
        if args.grid:  # each grid point: a fixed recipe, every epoch trained, the last kept
            lrs, epochs = args.grid.split(":")
            points += [(lr, int(e), 0) for lr in lrs.split(",") for e in epochs.split(",")]
        for lr, epochs, early_stopping in points:
            args.lr, args.epochs, args.early_stopping = lr, epochs, early_stopping
            for method in args.methods.split(","):
                rows.append(measure(method.strip(), task, workspace, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"keep_old_{args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
