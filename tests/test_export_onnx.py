"""ONNX export: Keras's model.export through tf2onnx, uint8 input kept, run in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrain.errors import ConfigError
from retrain.export import export, export_onnx


def nested_model(channels: int, size: tuple[int, int], seed: int = 0, classes: int = 4):
    """uint8 images -> nested base (Rescaling, Conv2D, BatchNorm, ReLU6, DepthwiseConv2D, Add)
    -> nested head (pooling, Dropout, softmax), like surgery builds; weights=None."""
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(seed)
    base_in = keras.Input((*size, channels), dtype="uint8")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(base_in)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    y = layers.DepthwiseConv2D(3, padding="same")(x)
    x = layers.Add()([x, layers.BatchNormalization()(y)])
    base = keras.Model(base_in, x, name="base")
    head_in = keras.Input(base.output.shape[1:])
    h = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(head_in))
    head = keras.Model(head_in, layers.Dense(classes, activation="softmax")(h), name="head")
    image = keras.Input((*size, channels), dtype="uint8", name="image")
    model = keras.Model(image, head(base(image, training=False)))
    rng = np.random.default_rng(seed)
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in layer.get_weights()])
    return model


@pytest.mark.parametrize(("channels", "size"), [(3, (20, 24)), (1, (28, 28))])
def test_onnx_takes_raw_uint8_images_and_agrees_in_onnxruntime(tmp_path, channels, size):
    import onnxruntime as ort

    model = nested_model(channels, size)
    export_onnx.write_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    [inp], [out] = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)", ["batch", *size, channels])
    assert (out.name, out.shape) == ("probabilities", ["batch", 4])
    images = np.random.default_rng(1).integers(0, 256, (33, *size, channels), dtype=np.uint8)
    got = session.run(["probabilities"], {"image": images})[0]
    np.testing.assert_allclose(got, model.predict(images, verbose=0), atol=1e-5)


def test_onnx_needs_the_tensorflow_backend_and_its_converter(monkeypatch):
    monkeypatch.setattr(export_onnx, "onnx_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs tf2onnx.*pip install -r requirements.txt"):
        export_onnx.check_can_export()
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ConfigError, match="not the 'jax' backend.*KERAS_BACKEND=tensorflow"):
        export_onnx.check_can_export()


def test_export_run_writes_onnx_and_self_tests_it_in_onnxruntime(make_run, tmp_path):
    run_dir = make_run(tmp_path, classes=("cat", "dog", "owl"), epochs=4, run_id="run-onnx")
    result = export.export_run(run_dir, ["onnx", "card"])
    assert [p.split("/")[-1] for p in result["files"]] == ["model.onnx", "MODEL_CARD.md"]
    entry = result["self_test"]["onnx"]
    assert entry["ok"] and entry["argmax_agreement"] == 1.0 and entry["max_abs_diff"] < 1e-5
    assert entry["images"] > 0
    card = (run_dir / "export" / "MODEL_CARD.md").read_text()
    assert 'session.run(["probabilities"], {"image": images_uint8})' in card
    saved = json.loads((run_dir / "export" / "export.json").read_text())
    assert saved["self_test"]["onnx"]["ok"]


def test_a_grayscale_28x28_run_exports_to_onnx_and_tfjs(make_run, tmp_path):
    """An MNIST-style 1-channel model: every model format keeps (28, 28, 1) and agrees."""
    import shutil

    import keras

    from retrain.models import modelfile
    from retrain.runs import rundir

    run_dir = make_run(tmp_path, classes=("cat", "dog", "owl"), epochs=1, run_id="run-gray")
    model = nested_model(1, (28, 28), seed=3, classes=3)
    meta = {**modelfile.read_metadata(rundir.best_model_path(run_dir)), "image_size": [28, 28]}
    modelfile.save_model(model, rundir.best_model_path(run_dir), meta)
    formats = ["onnx", "tflite", "tfjs", "card"]
    result = export.export_run(run_dir, formats)
    report = result["self_test"]
    assert report["onnx"]["ok"] and report["onnx"]["max_abs_diff"] < 1e-5, report["onnx"]
    assert report["tflite"]["ok"], report["tflite"]
    if shutil.which("node"):
        assert report["tfjs"]["ok"] and report["tfjs"]["max_abs_diff"] < 1e-5, report["tfjs"]
    doc = json.loads((run_dir / "export" / "tfjs" / "model.json").read_text())
    assert doc["userDefinedMetadata"]["input"]["shape"] == [28, 28, 1]
    card = (run_dir / "export" / "MODEL_CARD.md").read_text()
    assert "Classifies a grayscale image" in card and "(N, H, W, 1) uint8" in card
    assert ".mul([0.299, 0.587, 0.114]).sum(-1, true)" in card  # RGB -> L in the JS snippet
    assert keras.saving.load_model(rundir.best_model_path(run_dir)).inputs[0].shape[-1] == 1
