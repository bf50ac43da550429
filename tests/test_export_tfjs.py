"""TF.js export: model.json + weight shards, loaded by tf.loadLayersModel in real TF.js (Node).

The TF.js checks install ``@tensorflow/tfjs`` (pinned) once into a cache folder
(`export_tfjs.tfjs_cache_dir`); they skip only where Node.js is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FLOWERS, TM_WATER, needs_flowers, needs_tm_model

from retrain.errors import ConfigError
from retrain.export import export, export_tfjs


@pytest.fixture(scope="module")
def tfjs_dir() -> Path:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: TF.js runs in Node (.ci/run installs nodejs npm)")
    return export_tfjs.ensure_tfjs()


def nested_model(channels: int = 3, size: tuple[int, int] = (20, 24), seed: int = 0):
    """uint8 images -> nested base (Resizing, Rescaling, Normalization, Conv2D, BatchNorm,
    ReLU6, ZeroPadding2D, DepthwiseConv2D, Add, a scalar op) -> nested head, like surgery
    builds; weights=None, BatchNorm statistics randomised so they matter."""
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(seed)
    base_in = keras.Input((*size, channels), dtype="uint8", name="base_image")
    x = layers.Resizing(16, 16, name="resize")(base_in)
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(x)
    x = layers.Normalization(mean=[0.1] * channels, variance=[0.5] * channels, name="norm")(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv")(x)
    x = layers.BatchNormalization(name="conv_bn")(x)
    x = layers.ReLU(6.0, name="conv_relu")(x)
    x = layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.BatchNormalization(name="dw_bn")(y)
    x = layers.Add(name="add")([x, y])
    x = x * 0.5
    base = keras.Model(base_in, x, name="base")
    head_in = keras.Input(base.output.shape[1:], name="head_input")
    h = layers.GlobalAveragePooling2D(name="pool")(head_in)
    h = layers.Dense(6, activation="relu", name="hidden")(h)
    h = layers.Dropout(0.2, name="dropout")(h)
    h = layers.Dense(3, activation="softmax", name="output")(h)
    head = keras.Model(head_in, h, name="head")
    image = keras.Input((*size, channels), dtype="uint8", name="image")
    model = keras.Model(image, head(base(image, training=False)), name="nested")
    rng = np.random.default_rng(seed)
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in layer.get_weights()])
    return model


def _agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    return float(np.mean(got.argmax(1) == want.argmax(1))), float(np.max(np.abs(got - want)))


@pytest.mark.parametrize("channels", [3, 1])
def test_nested_model_with_batchnorm_and_depthwise_runs_in_tfjs(tmp_path, tfjs_dir, channels):
    model = nested_model(channels)
    spec = export_tfjs.write_tfjs(model, tmp_path / "tfjs", {"class_names": ["a", "b", "c"]})
    # The Resizing after the input moved out of the model (TF.js takes resized images).
    assert spec == {
        "shape": [16, 16, channels],
        "dtype": "float32",
        "range": [0, 255],
        "resize": {"from": [20, 24], "to": [16, 16], "interpolation": "bilinear"},
    }
    images = np.random.default_rng(1).integers(0, 256, (40, 20, 24, channels), dtype=np.uint8)
    result = export_tfjs.run_in_tfjs(
        tmp_path / "tfjs", export_tfjs.resize_for_tfjs(images, spec), tfjs_dir
    )
    assert result["version"] == export_tfjs.TFJS_VERSION and result["backend"] == "cpu"
    agreement, max_diff = _agreement(result["outputs"], model.predict(images, verbose=0))
    assert agreement == 1.0 and max_diff < 1e-5, (agreement, max_diff)


@pytest.mark.parametrize("key", ["inside", "raw", "unit", "tf", "torch", "caffe"])
def test_every_preprocessing_front_runs_in_tfjs(tmp_path, tfjs_dir, key):
    """The fronts `retrain.models.preprocessing` builds (Rescaling, Normalization, caffe's BGR
    map)."""
    import keras

    from retrain.models import preprocessing

    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((20, 24, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model = preprocessing.with_preprocessing(inner, key)
    spec = export_tfjs.write_tfjs(model, tmp_path / "tfjs")
    images = np.random.default_rng(2).integers(0, 256, (16, 20, 24, 3), dtype=np.uint8)
    got = export_tfjs.run_in_tfjs(tmp_path / "tfjs", export_tfjs.resize_for_tfjs(images, spec))
    np.testing.assert_allclose(got["outputs"], model.predict(images, verbose=0), atol=1e-5)


def test_model_json_is_the_tfjs_layers_format(tmp_path):
    model = nested_model()
    export_tfjs.write_tfjs(model, tmp_path / "tfjs", {"class_names": ["a", "b", "c"]})
    doc = json.loads((tmp_path / "tfjs" / "model.json").read_text())
    assert doc["format"] == "layers-model"
    topology = doc["modelTopology"]
    assert {"keras_version", "backend", "model_config"} <= set(topology)
    config = topology["model_config"]["config"]
    classes = [layer["class_name"] for layer in config["layers"]]
    assert classes[0] == "InputLayer"
    assert config["layers"][0]["config"]["dtype"] == "float32"  # the uint8 input, rewritten
    for kind in ("BatchNormalization", "DepthwiseConv2D", "Rescaling", "Dense", "Dropout"):
        assert kind in classes
    assert "Cast" not in classes and "Normalization" not in classes and "Resizing" not in classes
    for layer in config["layers"][1:]:
        assert set(layer) == {"class_name", "config", "name", "inbound_nodes"}
        assert all(len(ref) == 4 for ref in layer["inbound_nodes"][0])
    [group] = doc["weightsManifest"]
    names = [w["name"] for w in group["weights"]]
    assert "conv_bn/moving_variance" in names and "dw/depthwise_kernel" in names
    assert {w["dtype"] for w in group["weights"]} == {"float32"}
    size = sum(4 * int(np.prod(w["shape"])) for w in group["weights"])
    assert sum((tmp_path / "tfjs" / p).stat().st_size for p in group["paths"]) == size
    assert doc["userDefinedMetadata"]["class_names"] == ["a", "b", "c"]


def test_large_weights_are_split_into_4mb_shards_that_tfjs_reassembles(tmp_path, tfjs_dir):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inp))
    # 192 x 6000 floats: 4.6 MB; a name TF.js would reject as it is
    x = keras.layers.Dense(6000, activation="relu", name="_wide_dense")(x)
    out = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inp, out)
    spec = export_tfjs.write_tfjs(model, tmp_path / "tfjs")
    doc = json.loads((tmp_path / "tfjs" / "model.json").read_text())
    assert "l_wide_dense/kernel" in [w["name"] for w in doc["weightsManifest"][0]["weights"]]
    shards = sorted((tmp_path / "tfjs").glob("*.bin"))
    assert [p.name for p in shards] == ["group1-shard1of2.bin", "group1-shard2of2.bin"]
    assert shards[0].stat().st_size == export_tfjs.SHARD_BYTES
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    got = export_tfjs.run_in_tfjs(tmp_path / "tfjs", export_tfjs.resize_for_tfjs(images, spec))
    np.testing.assert_allclose(got["outputs"], model.predict(images, verbose=0), atol=1e-5)


def test_a_layer_without_a_tfjs_twin_is_a_one_line_error(tmp_path):
    import keras

    inp = keras.Input((8, 8, 4), dtype="uint8")
    x = keras.layers.Conv2D(4, 3, groups=2)(keras.layers.Rescaling(1 / 255)(inp))
    model = keras.Model(inp, keras.layers.Activation("hard_silu")(x))
    with pytest.raises(ConfigError, match=r"\(Conv2D with groups=2\) has no TF.js Layers equiv"):
        export_tfjs.write_tfjs(model, tmp_path / "tfjs")
    model = keras.Model(inp, keras.layers.Activation("hard_silu")(keras.layers.Rescaling(2.0)(inp)))
    with pytest.raises(ConfigError, match="activation 'hard_silu'.*export onnx or tflite"):
        export_tfjs.write_tfjs(model, tmp_path / "tfjs")


def test_ensure_tfjs_without_node_says_what_to_install(monkeypatch):
    monkeypatch.setattr(export_tfjs.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs Node.js.*apt-get install nodejs npm"):
        export_tfjs.ensure_tfjs()


def test_cli_exports_tfjs_and_the_self_test_ran_in_tfjs(make_run, tmp_path, tfjs_dir):
    run_dir = make_run(tmp_path, classes=("cat", "dog"), epochs=3, run_id="run-tfjs")
    proc = subprocess.run(
        [sys.executable, "-m", "retrain", "export", "--run", str(run_dir), "--format", "tfjs"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["files"] == [str(run_dir / "export" / "tfjs")]
    entry = result["self_test"]["tfjs"]
    assert entry["ok"] and entry["argmax_agreement"] == 1.0 and entry["max_abs_diff"] < 1e-5
    assert entry["runtime"] == f"TF.js {export_tfjs.TFJS_VERSION} (Node, cpu backend)"


# --- Done when: a Teachable-Machine-based model agrees in onnxruntime and in TF.js ----------


@pytest.fixture(scope="module")
def tm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short head-only run on flowers12 with the Teachable Machine base, through the CLI."""
    if not FLOWERS.is_dir() or not TM_WATER.is_file():
        pytest.skip("../shared (flowers12 and the Teachable Machine model) is not present")
    work = tmp_path_factory.mktemp("tm_export")
    run_dir = work / "runs" / "tm-flowers"
    proc = subprocess.run(
        [sys.executable, "-m", "retrain", "train", "--data", str(FLOWERS),
         "--base", str(TM_WATER), "--out", str(run_dir), "--epochs", "3", "--fine-tune-epochs", "0",
         "--workspace", str(work)],
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@needs_flowers
@needs_tm_model
def test_teachable_machine_model_agrees_in_onnxruntime_and_tfjs(tm_run, tfjs_dir, monkeypatch):
    import keras

    from retrain import data, evaluate

    # The export's own TF.js self-test runs on 8 validation images here, not 64 (0.45 s each in
    # TF.js's pure-JS backend): this test checks 48 held-out test images in TF.js below.
    monkeypatch.setattr(export, "TFJS_CHECK_IMAGES", 8)
    result = export.export_run(tm_run, ["keras", "onnx", "tfjs"])
    for fmt in ("onnx", "tfjs"):
        assert result["self_test"][fmt]["ok"], result["self_test"][fmt]
    out = tm_run / "export"
    model = keras.saving.load_model(out / "model.keras")
    dataset = data.ingest(FLOWERS, tm_run.parents[1])
    size = evaluate.model_image_size(model, {})
    images = np.asarray(data.load_images(dataset, "test", size, "squash").images)
    want = model.predict(images, batch_size=32, verbose=0)

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate(
        [
            session.run(["probabilities"], {"image": images[i : i + 32]})[0]
            for i in range(0, len(images), 32)
        ]
    )
    spec = json.loads((out / "tfjs" / "model.json").read_text())["userDefinedMetadata"]["input"]
    # TF.js's pure-JS backend takes ~1 s per 224x224 image on 2 cores: the default suite checks
    # every 5th held-out image (48); RETRAIN_FULL_CHECKS=1 checks all 240 (docs/benchmarks.md).
    every = 1 if os.environ.get("RETRAIN_FULL_CHECKS") else 5
    tfjs_images = images[::every]
    tfjs_out = export_tfjs.run_in_tfjs(out / "tfjs", export_tfjs.resize_for_tfjs(tfjs_images, spec))
    measured = {
        "images": len(images),
        "tfjs_images": len(tfjs_images),
        "onnx": _agreement(onnx_out, want),
        "tfjs": _agreement(tfjs_out["outputs"], want[::every]),
    }
    print("held-out agreement (top-1, max |diff|):", json.dumps(measured))
    for fmt in ("onnx", "tfjs"):
        agreement, max_diff = measured[fmt]
        assert agreement >= 0.99 and max_diff <= 1e-3, (fmt, measured)
