"""Shared fixtures: tiny synthetic image datasets made with PIL, an isolated RETRAIN_HOME."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser_helpers import SHARED_BUILTIN_ENV, link_builtin

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLOWERS = SHARED / "data" / "flowers12"
TM_WATER = SHARED / "models" / "teachable_machine_water" / "keras_model.h5"

needs_flowers = pytest.mark.skipif(
    not FLOWERS.is_dir(), reason="../shared/data/flowers12 is not present on this machine"
)
needs_tm_model = pytest.mark.skipif(
    not TM_WATER.is_file(), reason="../shared/models/teachable_machine_water is not present"
)


def run_main(*argv: object) -> tuple[int, dict | None, str]:
    """``python -m retrain ARGV`` run in this process (its ``main``): ``(exit code, its JSON or
    None, stderr)``. In-process because a fresh interpreter spends 6-10 s importing TensorFlow
    on the CI host; `test_train` runs the command as a real subprocess."""
    import contextlib
    import io
    import json

    from retrain.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    text = out.getvalue()
    return code, (json.loads(text) if code == 0 and text.strip() else None), err.getvalue()


@pytest.fixture(scope="session", autouse=True)
def _shared_builtin_folder(tmp_path_factory: pytest.TempPathFactory):
    """One folder for the built-in starter model for the whole run (every xdist worker): see
    `tests.browser_helpers.link_builtin`."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "builtin_models"
    folder.mkdir(exist_ok=True)
    os.environ[SHARED_BUILTIN_ENV] = str(folder)
    yield folder
    os.environ.pop(SHARED_BUILTIN_ENV, None)


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    _shared_builtin_folder: Path,
):
    """Every test gets its own RETRAIN_HOME so nothing touches ./workspace (its built-in model
    folder is the run's shared one: `link_builtin`)."""
    home = tmp_path_factory.mktemp("retrain_home")
    link_builtin(home / "keras")
    monkeypatch.setenv("RETRAIN_HOME", str(home))
    # Page tests (AppTest) answer model requests in the test process (the embedded mode);
    # tests of the worker pool, and every real server (browser_helpers.start_app), use workers.
    monkeypatch.setenv("RETRAIN_MODEL_WORKERS", "0")
    return home


def _class_image(label: int, index: int, size: int, mode: str = "RGB") -> Image.Image:
    """A learnable image: the class sets the dominant colour and stripe direction."""
    rng = np.random.default_rng(label * 1000 + index)
    base = np.zeros((size, size, 3), dtype=np.uint8)
    colour = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (160, 40, 200)][
        label % 5
    ]
    base[:] = colour
    stripes = np.arange(size) % 8 < 4
    if label % 2:
        base[stripes, :, :] //= 2
    else:
        base[:, stripes, :] //= 2
    noise = rng.integers(0, 30, size=base.shape, dtype=np.uint8)
    img = Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image_folder(classes=("cat","dog"), per_class=6, size=32, splits=None)``.

    Writes ``root/<class>/<i>.png`` (or ``root/<split>/<class>/...`` when ``splits`` is given)
    and returns ``root``.
    """

    def make(
        classes: tuple[str, ...] = ("cat", "dog"),
        per_class: int | dict[str, int] = 6,
        size: int = 32,
        splits: tuple[str, ...] | None = None,
        fmt: str = "png",
        name: str = "images",
    ) -> Path:
        root = tmp_path / name
        for split in splits or (None,):
            for label, cls in enumerate(classes):
                n = per_class[cls] if isinstance(per_class, dict) else per_class
                folder = root / split / cls if split else root / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    seed = i + (1000 if split in ("val", "validation", "test") else 0)
                    _class_image(label, seed, size).save(folder / f"{i}.{fmt}")
        return root

    return make


@pytest.fixture
def make_zip(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_zip(folder, arc_prefix="")`` zips a folder and returns the zip path."""

    def make(folder: Path, arc_prefix: str = "", name: str | None = None) -> Path:
        path = tmp_path / (name or f"{folder.name}.zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    zf.write(file, arc_prefix + file.relative_to(folder).as_posix())
        return path

    return make


# --- Tiny trained models and fabricated run directories (evaluate / export / page tests) ---


def write_image_folder(
    root: Path,
    classes: tuple[str, ...],
    per_class: int = 8,
    size: int = 16,
    splits: tuple[str, ...] | None = None,
    label_offset: int = 0,
) -> Path:
    """Write ``root/[split/]<class>/<i>.png`` learnable images (module-scope friendly)."""
    for split in splits or (None,):
        for label, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed = i + (1000 if split in ("val", "test") else 0)
                _class_image(label + label_offset, seed, size).save(folder / f"{i}.png")
    return root


def build_tiny_classifier(num_classes: int, size: int = 16, seed: int = 0, binary: bool = False):
    """uint8 (size, size, 3) -> nested "features" model -> Dense head, like surgery builds."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    features = keras.Model(inp, x, name="features")
    outer = keras.Input((size, size, 3), dtype="uint8", name="image")
    h = features(outer, training=False)
    if binary:
        out = keras.layers.Dense(1, activation="sigmoid", name="predictions")(h)
    else:
        out = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(h)
    return keras.Model(outer, out, name="tiny")


def wait_for_run(run_dir: Path, timeout_s: float = 300.0, poll_s: float = 1.0) -> dict:
    """Poll ``run_dir``'s status until the run is no longer active; return that status.

    Fails the test, with the run log's tail, when it is still active after ``timeout_s``.
    """
    import time

    from retrain.runs import jobs

    deadline = time.time() + timeout_s
    while (status := jobs.read_status(run_dir))["state"] in jobs.ACTIVE_STATES:
        assert time.time() < deadline, (
            f"the run did not finish in {timeout_s:.0f} s:\n{jobs.read_log_tail(run_dir)}"
        )
        time.sleep(poll_s)
    return status


def write_run_dir(
    run_dir: Path,
    config: dict | None = None,
    *,
    status: dict | None = None,
    metrics: list[dict] | None = None,
    split: tuple[list[str], list[str]] | None = None,
    progress: dict | None = None,
) -> Path:
    """Write a run directory through `retrain.runs.rundir`, as training and jobs write it.

    ``config`` is the flat config.json object (TrainConfig fields and resolved keys),
    ``status`` the status keys (``state`` required), ``metrics`` one row per epoch,
    ``split`` (train paths, val paths), ``progress`` the progress object.
    """
    from retrain.runs import rundir

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        rundir.write_config(run_dir, rundir.RunConfig.from_dict(config))
    if status is not None:
        status = dict(status)
        rundir.write_status(run_dir, status.pop("state"), **status)
    for row in metrics or []:
        rundir.append_metrics(run_dir, row)
    if split is not None:
        rundir.write_split(run_dir, *split)
    if progress is not None:
        rundir.write_progress(run_dir, progress)
    return run_dir


@pytest.fixture
def run_dir_factory() -> Callable[..., Path]:
    """`write_run_dir` as a fixture: ``run_dir_factory(run_dir, config, status=..., metrics=...)``."""
    return write_run_dir


@pytest.fixture(scope="session")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a run directory as `training.train` writes it, with a briefly trained tiny model.

    ``make_run(workspace, classes=("cat","dog","owl"), per_class=8, binary=False,
    state="done", epochs=8, base="")`` writes ``workspace/runs/<run_id>/`` (config, status,
    metrics, split, best.keras: `write_run_dir`) over a folder dataset under ``workspace/data``.
    """
    import time

    from retrain.runs import rundir

    def make(
        workspace: Path,
        classes: tuple[str, ...] = ("cat", "dog", "owl"),
        per_class: int = 8,
        binary: bool = False,
        state: str = "done",
        epochs: int = 8,
        run_id: str = "run-test",
        size: int = 16,
        splits: tuple[str, ...] | None = None,
        base: str = "",
    ) -> Path:
        import keras

        from retrain import data
        from retrain.models.modelfile import save_model

        folder = write_image_folder(
            Path(workspace) / "data" / run_id, classes, per_class, size, splits=splits
        )
        dataset = data.ingest(folder, Path(workspace))
        cache = data.load_images(dataset, "train", (size, size), "squash")
        labels = np.asarray(cache.labels)
        train_idx, val_idx = data.stratified_split(labels, 0.25, 0)
        model = build_tiny_classifier(len(classes), size, binary=binary)
        model.compile(
            optimizer=keras.optimizers.Adam(0.02),
            loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        y = labels.astype("float32")[:, None] if binary else labels
        history = model.fit(
            np.asarray(cache.images)[train_idx], y[train_idx], epochs=epochs, verbose=0
        )
        run_dir = Path(workspace) / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "class_names": list(dataset.class_names),
            "image_size": [size, size],
            "resize_mode": "squash",
            "base": base,
            "loss": "binary_crossentropy" if binary else "sparse_categorical_crossentropy",
            "label_encoding": "binary" if binary else "index",
        }
        config = {
            "data": str(folder),
            "base": base,
            "out": str(run_dir),
            "epochs": epochs,
            "lr": 0.02,
            "val_split": 0.25,
            "seed": 0,
            "resize_mode": "squash",
            "freeze": "all",
            "run_id": run_id,
            "dataset_id": dataset.dataset_id,
            "dataset_name": dataset.name,
            "class_names": list(dataset.class_names),
            "image_size_used": [size, size],
            **{k: meta[k] for k in ("loss", "label_encoding")},
        }
        rows = [
            {
                "epoch": e + 1,
                "phase": 1,
                "loss": float(history.history["loss"][e]),
                "accuracy": float(history.history["accuracy"][e]),
                "val_loss": float(history.history["loss"][e]) * 1.1,
                "val_accuracy": float(history.history["accuracy"][e]) * 0.95,
                "seconds": 0.5,
            }
            for e in range(epochs)
        ]
        if dataset.splits.get("val"):  # training validates on the data's own val folder
            val_paths = data.load_images(dataset, "val", (size, size), "squash").paths
            split = (list(cache.paths), list(val_paths))
        else:
            split = ([cache.paths[i] for i in train_idx], [cache.paths[i] for i in val_idx])
        now = time.time()
        write_run_dir(
            run_dir,
            config,
            # best.keras below is the last epoch's model
            status={"state": state, "started": now - 30, "finished": now, "pid": None}
            | ({"saved_epoch": epochs} if state == "done" else {}),
            metrics=rows,
            split=split,
        )
        save_model(model, rundir.best_model_path(run_dir), meta)
        return run_dir

    return make


# --- The built-in starter model, trained once per test session (model / surgery / page tests) ---


@pytest.fixture(scope="session")
def builtin_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Keras home holding the built-in digits model (trained once per run, `link_builtin`)."""
    from retrain import models

    home = tmp_path_factory.mktemp("keras_home")
    link_builtin(home)
    old = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(home)
    try:
        models.ensure_builtin("digits-cnn")
    finally:
        if old is None:
            os.environ.pop("KERAS_HOME", None)
        else:
            os.environ["KERAS_HOME"] = old
    return home


@pytest.fixture
def keras_cache(builtin_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point keras_home() at the session's Keras home (the built-in model is already there)."""
    monkeypatch.setenv("KERAS_HOME", str(builtin_home))
    return builtin_home


@pytest.fixture(scope="session")
def tm_base():
    """The Teachable Machine export, loaded (and converted) once per session."""
    if not TM_WATER.is_file():
        pytest.skip("../shared/models/teachable_machine_water is not present")
    from retrain import models

    return models.load_base(str(TM_WATER))


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``ray`` marker (tests/test_ray.py; they skip when Ray is not installed)."""
    config.addinivalue_line(
        "markers", "ray: starts a real local Ray head (needs requirements-ray.txt)"
    )
