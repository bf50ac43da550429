"""The preprocessing registry: what each key computes, and that evaluation uses the same layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrain import models
from retrain.errors import ModelError
from retrain.models import preprocessing

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("inside", "tf", "torch", "unit", "raw", "caffe")


def _pixels(n: int = 4, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 RGB images covering 0 and 255, channels deliberately different."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    x[0, 0, 0] = (0, 128, 255)
    x[0, 0, 1] = (255, 0, 7)
    return x


def _expected(x: np.ndarray, key: str) -> np.ndarray:
    """Each key's definition written out (Keras's preprocess_input where Keras has one)."""
    from keras.applications import imagenet_utils

    f = x.astype(np.float64)
    if key in ("inside", "raw"):
        return f
    if key == "unit":
        return f / 255.0
    if key == "tf":
        return imagenet_utils.preprocess_input(x.astype("float32"), mode="tf")
    if key == "torch":
        return imagenet_utils.preprocess_input(x.astype("float32"), mode="torch")
    if key == "caffe":
        return imagenet_utils.preprocess_input(x.astype("float32"), mode="caffe")
    raise AssertionError(key)


def test_registry_has_one_entry_per_key_with_a_description():
    assert tuple(preprocessing.REGISTRY) == KEYS
    assert {
        key: entry.description for key, entry in preprocessing.REGISTRY.items()
    } == preprocessing.PREPROCESSING
    assert all(len(text) > 10 for text in preprocessing.PREPROCESSING.values())
    assert "BGR" in preprocessing.describe("caffe")
    with pytest.raises(ModelError, match="Unknown preprocessing 'yolo'. Use one of: inside"):
        preprocessing.front_layers("yolo")


@pytest.mark.parametrize("key", KEYS)
def test_each_key_computes_its_definition(key: str):
    x = _pixels()
    got = preprocessing.preprocess(x, key)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, _expected(x, key), rtol=1e-5, atol=1e-4)


def test_caffe_matches_keras_preprocess_input_exactly_enough():
    from keras.applications import imagenet_utils

    x = _pixels(8, 24, seed=3)
    got = preprocessing.preprocess(x, "caffe")
    want = imagenet_utils.preprocess_input(x.astype("float32"), mode="caffe")
    assert np.max(np.abs(got - want)) < 1e-4
    # BGR order: the first output channel is the blue input channel minus its mean.
    np.testing.assert_allclose(got[0, 0, 0], [255 - 103.939, 128 - 116.779, 0 - 123.68], atol=1e-4)


def test_front_layers_resize_first_and_name_every_layer():
    layers = preprocessing.front_layers("tf", resize_to=(8, 10))
    assert [type(layer).__name__ for layer in layers] == ["Resizing", "Rescaling"]
    assert [layer.name for layer in layers] == ["retrain_resize", "retrain_scale"]
    only_cast = preprocessing.front_layers("inside")
    assert [(type(layer).__name__, layer.name) for layer in only_cast] == [
        ("Rescaling", "retrain_to_float")
    ]
    assert preprocessing.front_layers("raw", resize_to=(8, 8))[0].name == "retrain_resize"
    named = preprocessing.front_layers("torch", name=lambda stem: f"x_{stem}")
    assert [layer.name for layer in named] == ["x_normalize"]


def _base(key: str):
    """A float-input classifier whose recorded preprocessing is ``key``."""
    import keras

    keras.utils.set_random_seed(7)
    inp = keras.Input((16, 16, 3), name="pixels")
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(4, activation="softmax", name="out")(x)
    model = keras.Model(inp, out, name=f"base_{key}")
    return models.BaseModel(
        model=model,
        spec="test",
        name=model.name,
        input_size=(16, 16),
        preprocessing=key,
        class_names=None,
        suggested_cut="pool",
        has_original_head=True,
    )


@pytest.mark.parametrize("key", KEYS)
def test_evaluation_path_equals_what_the_retrained_model_computes_inside(key: str):
    """evaluate.forgetting scores the original model through `with_preprocessing`; a retrained
    model carries its preprocessing inside (surgery's front). Both give the same numbers."""
    from retrain.models.surgery import replace_head

    base = _base(key)
    x = _pixels(6)
    # Cut at the very last layer: `features` is the whole base behind surgery's front.
    surgery = replace_head(base, ["a", "b"], cut_at="out")
    inside = surgery.features.predict(x, verbose=0)
    outside = preprocessing.with_preprocessing(base.model, key).predict(x, verbose=0)
    np.testing.assert_allclose(outside, inside, rtol=1e-5, atol=1e-6)
    # And both equal the original model fed with the key's definition.
    direct = base.model.predict(_expected(x, key).astype("float32"), verbose=0)
    np.testing.assert_allclose(inside, direct, rtol=1e-4, atol=1e-5)


def test_caffe_front_saves_loads_safely_and_never_trains(tmp_path: Path):
    import keras

    from retrain.models.surgery import FreezeSpec, replace_head

    surgery = replace_head(_base("caffe"), ["a", "b"], freeze=FreezeSpec("none"))
    front = surgery.features.get_layer("retrain_bgr_mean")
    assert front.trainable is False and not front.trainable_weights
    assert surgery.diff["added"][0] == "retrain_bgr_mean"
    path = tmp_path / "caffe.keras"
    surgery.model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _pixels(3)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), surgery.model.predict(x, verbose=0))
    # Loaded back as a base, its preprocessing is found inside.
    assert models.detect_preprocessing(loaded)[0] == "inside"


def test_import_is_cheap_and_imports_run_downhill():
    code = (
        "import sys, retrain.models.preprocessing\n"
        "print(','.join(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
    tree = ast.parse((ROOT / "retrain" / "models" / "preprocessing.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {m for m in imported if m.startswith("retrain")} - {
        "retrain.errors",
        "retrain.errors.ModelError",
    }


def test_grayscale_images_take_the_channel_free_keys_only():
    gray = _pixels()[..., :1]
    np.testing.assert_allclose(preprocessing.preprocess(gray, "tf"), gray / 127.5 - 1, atol=1e-5)
    for key in ("torch", "caffe"):
        with pytest.raises(ModelError, match=f"Preprocessing '{key}' works on RGB images"):
            preprocessing.front_layers(key, channels=1)
