"""Shared fixtures: tiny synthetic image datasets made with PIL, an isolated RETRAIN_HOME."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own RETRAIN_HOME so nothing touches ./workspace."""
    home = tmp_path_factory.mktemp("retrain_home")
    monkeypatch.setenv("RETRAIN_HOME", str(home))
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
