"""Base models: files (.keras, Keras 3 and Keras 2 .h5, Teachable Machine), zoo, built-in, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from retrain import models
from retrain.errors import ModelError
from retrain.models import load, preprocessing
from tests.conftest import needs_tm_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_functional(name: str = "tiny", size: int = 32):
    import keras

    inp = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="scale")(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name=name)


# --- built-in ----------------------------------------------------------------------------


def test_builtin_model_is_trained_once_and_cached(keras_cache: Path):
    path = models.builtin_path("digits-cnn")
    assert path.is_file() and path.parent == keras_cache / "builtin"
    mtime = path.stat().st_mtime
    base = models.load_base("builtin:digits-cnn")
    assert path.stat().st_mtime == mtime  # loaded from the cache, not retrained
    assert base.class_names == [f"digit {d}" for d in range(5)]
    assert base.input_size == (32, 32)
    assert base.preprocessing == "inside"
    assert base.suggested_cut == "features" and base.has_original_head
    assert base.model.inputs[0].dtype == "uint8"
    assert base.origin["holdout_accuracy"] >= 0.9
    assert models.spec_label("builtin:digits-cnn") == base.name  # the name, without loading

    from retrain.data.sample import digit_images

    images, labels, _ = digit_images("0-4")
    pred = base.model.predict(images[:200], verbose=0).argmax(axis=1)
    assert (pred == labels[:200]).mean() > 0.9


def test_unknown_builtin_is_refused():
    with pytest.raises(ModelError, match="Unknown built-in model 'nope'.*builtin:digits-cnn"):
        models.load_base("builtin:nope")


# --- zoo ---------------------------------------------------------------------------------


def test_zoo_registry_has_the_families():
    import keras

    wanted = {
        "MobileNetV2",
        "MobileNetV3Small",
        "MobileNetV3Large",
        "EfficientNetB0",
        "EfficientNetV2B0",
        "ResNet50V2",
        "ConvNeXtTiny",
    }
    assert wanted <= set(models.ZOO)
    for entry in models.ZOO.values():
        assert entry.preprocessing in preprocessing.REGISTRY
        assert callable(getattr(keras.applications, entry.name))
        assert entry.input_size == (224, 224)


@pytest.mark.parametrize(
    ("name", "cut", "prep", "cut_shape"),
    [
        ("MobileNetV2", "global_average_pooling2d", "tf", [None, 1280]),
        ("MobileNetV3Small", "activation_18", "inside", [None, 1, 1, 1024]),
    ],
)
def test_zoo_without_weights_builds_with_a_stable_cut(name, cut, prep, cut_shape):
    import keras

    # Unnamed layers created first would shift Keras's per-process numbering.
    keras.layers.Activation("relu")
    keras.layers.GlobalAveragePooling2D()
    base = models.load_base(f"applications:{name}:none")
    assert base.suggested_cut == cut
    assert base.preprocessing == prep
    assert base.input_size == (224, 224)
    assert base.has_original_head
    info = models.describe(base)
    row = next(r for r in info["layers"] if r["name"] == cut)
    assert row["output_shape"] == cut_shape
    assert info["output_shape"] == [None, 1000]


def test_zoo_spec_errors():
    with pytest.raises(ModelError, match="Unknown model 'ResNet9000'.*MobileNetV2"):
        models.load_base("applications:ResNet9000:none")
    with pytest.raises(ModelError, match="Weights file 'missing.h5' not found"):
        models.load_base("applications:MobileNetV2:missing.h5")


def test_zoo_imagenet_offline_is_one_actionable_line(monkeypatch: pytest.MonkeyPatch):
    import urllib.error

    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(ModelError) as info:
        models.load_base("applications:MobileNetV3Small:imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "no network" in message
    assert "applications:MobileNetV3Small:none" in message and "builtin:digits-cnn" in message
    assert info.value.__cause__ is None


def test_zoo_weights_from_a_local_file(tmp_path: Path):
    base = models.load_base("applications:MobileNetV3Small:none")
    weights = tmp_path / "small.weights.h5"
    base.model.save_weights(weights)
    again = models.load_base(f"applications:MobileNetV3Small:{weights}")
    # What the sidebar shows for a spec, without loading it, is the loaded model's name.
    for spec, loaded in (("applications:MobileNetV3Small:none", base), (again.spec, again)):
        assert models.spec_label(spec) == loaded.name
    assert loaded.name == "MobileNetV3Small (small.weights.h5)"
    assert models.spec_label("applications:MobileNetV3Small") == "MobileNetV3Small (ImageNet)"
    assert models.spec_label(str(tmp_path / "mine.keras")) == "mine.keras"
    a, b = base.model.get_layer("conv_2").get_weights()[0], again.model.get_layer("conv_2")
    np.testing.assert_array_equal(a, b.get_weights()[0])
    wrong = tmp_path / "tiny.weights.h5"
    tiny_functional().save_weights(wrong)
    with pytest.raises(ModelError, match="does not fit MobileNetV3Small"):
        models.load_base(f"applications:MobileNetV3Small:{wrong}")


# --- .keras and Keras 3 .h5 files ----------------------------------------------------------


def test_keras_file_with_teachable_machine_style_labels(tmp_path: Path):
    path = tmp_path / "m.keras"
    tiny_functional().save(path)
    (tmp_path / "labels.txt").write_text("0 cat\n1 dog\n2 owl\n")
    base = models.load_base(str(path))
    assert base.class_names == ["cat", "dog", "owl"]
    assert base.suggested_cut == "gap" and base.has_original_head
    assert base.preprocessing == "inside"  # the Rescaling layer
    info = models.describe(base)
    assert info["input_shape"] == [None, 32, 32, 3]
    assert info["head_layers"] == ["predictions"]
    assert [r["name"] for r in info["layers"]] == ["scale", "conv", "gap", "predictions"]
    assert info["total_params"] == 4 * 27 + 4 + 4 * 3 + 3


def test_labels_that_do_not_fit_the_head_are_ignored(tmp_path: Path):
    path = tmp_path / "m.keras"
    tiny_functional().save(path)
    (tmp_path / "labels.txt").write_text("a\nb\n")
    base = models.load_base(str(path))
    assert base.class_names is None
    assert "labels_ignored" in base.origin


def test_keras_file_with_raw_ops_and_keras_internal_layers_loads(tmp_path: Path):
    """ConvNeXt-style graphs hold stateless ops (``x + y``) and unexported Keras layers."""
    import keras
    from keras.src.applications.convnext import LayerScale

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = LayerScale(0.5, 4, name="scale")(x) + x
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    path = tmp_path / "ops.keras"
    keras.Model(inp, keras.layers.Dense(2, name="out")(x)).save(path)
    base = models.load_base(str(path))
    assert base.suggested_cut == "gap"
    assert [r["name"] for r in models.describe(base)["layers"]] == ["conv", "scale", "gap", "out"]


def test_keras3_h5_loads_with_the_keras3_loader(tmp_path: Path):
    path = tmp_path / "m.h5"
    model = tiny_functional()
    model.save(path)
    base = models.load_base(str(path))
    assert "converted" not in base.origin
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(base.model.predict(x, verbose=0), model.predict(x, verbose=0))


def test_lambda_layer_is_refused_without_running_it(tmp_path: Path):
    import keras

    inp = keras.Input((8, 8, 3))
    out = keras.layers.Lambda(lambda t: t * 2, name="double_it")(inp)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(ModelError, match=r"Lambda layer \('double_it'\).*arbitrary"):
        models.load_base(str(path))


def test_lambda_layer_in_h5_is_refused(tmp_path: Path):
    import keras

    inp = keras.Input((8, 8, 3))
    out = keras.layers.Lambda(lambda t: t * 2, name="sneaky")(inp)
    path = tmp_path / "lambda.h5"
    keras.Model(inp, out).save(path)
    with pytest.raises(ModelError, match=r"Lambda layer \('sneaky'\)"):
        models.load_base(str(path))


def test_unknown_custom_class_is_refused(tmp_path: Path):
    import keras

    @keras.saving.register_keras_serializable(package="test")
    class Doubler(keras.layers.Layer):
        def call(self, t):
            return t * 2

    inp = keras.Input((8, 8, 3))
    path = tmp_path / "custom.keras"
    keras.Model(inp, Doubler(name="dbl")(inp)).save(path)
    with pytest.raises(
        ModelError, match=r"layer class Doubler \(layer 'dbl'\) is not part of Keras"
    ):
        models.load_base(str(path))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("notes.txt", b"hello", "not a model file"),
        ("broken.keras", b"not a zip at all", "not a readable .keras file"),
        ("empty.keras", None, "no config.json"),
    ],
)
def test_files_that_are_not_models(tmp_path: Path, name, content, match):
    path = tmp_path / name
    if content is None:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("other.txt", "x")
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        models.load_base(str(path))


def test_missing_file():
    with pytest.raises(ModelError, match="No model file at"):
        models.load_base("/nowhere/model.keras")


def test_truncated_h5_is_refused(tmp_path: Path):
    good = tmp_path / "good.h5"
    tiny_functional().save(good)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        models.load_base(str(bad))


def test_weights_only_h5_is_refused(tmp_path: Path):
    path = tmp_path / "only.weights.h5"
    tiny_functional().save_weights(path)
    with pytest.raises(ModelError, match="holds only weights"):
        models.load_base(str(path))


def test_model_without_image_input_is_refused(tmp_path: Path):
    import keras

    inp = keras.Input((10,))
    path = tmp_path / "tabular.keras"
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(path)
    with pytest.raises(ModelError, match=r"takes vectors of shape \(None, 10\); Retrain Studio"):
        models.load_base(str(path))


# --- Keras 2 / Teachable Machine -------------------------------------------------------------


def keras2_nested_h5(path: Path) -> tuple[object, np.ndarray, np.ndarray]:
    """A Keras 2 file shaped like a Teachable Machine export, written with tf_keras."""
    import tf_keras

    tf_keras.utils.set_random_seed(1)
    layers = tf_keras.layers
    inp = layers.Input((32, 32, 3), name="input_1")
    x = layers.Conv2D(8, 3, padding="same", name="Conv1")(inp)
    x = layers.BatchNormalization(name="bn_Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="block_1_depthwise")(x)
    y = layers.BatchNormalization(name="block_1_depthwise_BN")(y)
    x = layers.Add(name="block_1_add")([x, y])
    x = layers.Conv2D(16, 1, name="Conv_1")(x)
    backbone = tf_keras.Model(inp, x, name="model1")
    # Non-trivial BatchNorm statistics, so a wrong copy shows.
    for bn in ("bn_Conv1", "block_1_depthwise_BN"):
        layer = backbone.get_layer(bn)
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([gamma * 1.5, beta + 0.1, mean + 0.2, var * 2.0])
    features = tf_keras.Sequential(
        [backbone, layers.GlobalAveragePooling2D(name="global_average_pooling2d_1")],
        name="sequential_1",
    )
    head = tf_keras.Sequential(
        [
            layers.Dense(10, activation="relu", input_shape=(16,), name="dense_Dense1"),
            layers.Dense(2, activation="softmax", use_bias=False, name="dense_Dense2"),
        ],
        name="sequential_3",
    )
    model = tf_keras.Sequential([layers.Input((32, 32, 3)), features, head])
    model.save(path, save_format="h5")
    x = np.random.default_rng(3).uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    return model, np.asarray(model(x, training=False)), x


def test_keras2_nested_h5_is_converted_faithfully(tmp_path: Path):
    path = tmp_path / "keras_model.h5"
    _legacy, expected, x = keras2_nested_h5(path)
    (tmp_path / "labels.txt").write_text("0 Class A\n1 Class B\n")
    base = models.load_base(str(path))
    got = base.model.predict(x, verbose=0)
    assert float(np.max(np.abs(got - expected))) <= 1e-4
    assert base.origin["conversion_max_abs_diff"] <= 1e-4
    assert base.origin["converted"].startswith("Keras 2 file rebuilt")
    assert base.class_names == ["Class A", "Class B"]
    assert base.suggested_cut == "global_average_pooling2d_1"
    names = [layer.name for _, layer in models.iter_layers(base.model)]
    assert len(names) == len(set(names))
    assert {"block_1_depthwise", "block_1_add", "dense_Dense1"} <= set(names)
    # Each variable holds the file's value exactly (made from it, not random then overwritten).
    import h5py

    with h5py.File(path) as f:
        stored = load.keras2._h5_weights(f["model_weights"])
    layers = {layer.name: layer for _, layer in models.iter_layers(base.model)}
    assert sum(len(values) for values in stored.values()) == len(base.model.weights)
    for name, values in stored.items():
        for variable, value in zip(layers[name].weights, values, strict=True):
            np.testing.assert_array_equal(np.asarray(variable), value)
    info = models.describe(base)
    parents = {r["name"]: r["parent"] for r in info["layers"]}
    assert parents["Conv1"] == "sequential_1/model1"
    assert parents["dense_Dense2"] == "sequential_3"
    assert info["head_layers"] == ["dense_Dense1", "dense_Dense2"]


def test_a_converted_keras2_file_is_kept_and_reused_by_content(tmp_path: Path, monkeypatch):
    path = tmp_path / "a" / "keras_model.h5"
    path.parent.mkdir()
    _legacy, expected, x = keras2_nested_h5(path)
    first = models.load_base(str(path))
    copy = tmp_path / "b" / "keras_model.h5"  # the same bytes uploaded by another session
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    for step in ("rebuild_keras2_h5", "check_conversion", "convert_keras2_h5"):
        monkeypatch.setattr(load.keras2, step, no_second_conversion)
    second = models.load_base(str(copy))
    assert second.origin["conversion_max_abs_diff"] == first.origin["conversion_max_abs_diff"]
    assert float(np.max(np.abs(second.model.predict(x, verbose=0) - expected))) <= 1e-4
    assert models.describe(second)["layers"] == models.describe(first)["layers"]


def test_a_model_worker_answers_on_a_conversion_first_and_checks_it_after(tmp_path: Path):
    path = tmp_path / "keras_model.h5"
    _legacy, expected, x = keras2_nested_h5(path)
    with load.writes_after() as later:
        base = models.load_base(str(path))
    assert base.origin["conversion_check"] == "after this answer"  # answers say it is unchecked
    assert "conversion_max_abs_diff" not in base.origin
    # Rebuilt from the file's config and weights alone: already the original's outputs.
    assert float(np.max(np.abs(base.model.predict(x, verbose=0) - expected))) <= 1e-4
    assert not list((load._converted_path(path)).parent.glob("*.keras"))
    for write in later:
        write()
    assert base.origin["conversion_max_abs_diff"] <= 1e-4  # the kept base now says so
    assert "conversion_check" not in base.origin
    assert load._converted_path(path).is_file()  # checked, so kept for every session
    with load.writes_after():
        again = models.load_base(str(path))
    assert "conversion_check" not in again.origin  # the kept, checked copy
    assert again.origin["conversion_max_abs_diff"] == base.origin["conversion_max_abs_diff"]


def test_a_conversion_that_fails_its_check_is_refused_for_good(tmp_path: Path, monkeypatch):
    path = tmp_path / "keras_model.h5"
    keras2_nested_h5(path)
    real_rebuild = load.keras2.rebuild_keras2_h5

    def off_by_one(p):  # a rebuild that gets one weight wrong
        model = real_rebuild(p)
        dense = model.get_layer("sequential_3").get_layer("dense_Dense1")
        dense.set_weights([w + 1.0 for w in dense.get_weights()])
        return model

    monkeypatch.setattr(load.keras2, "rebuild_keras2_h5", off_by_one)
    with load.writes_after() as later:
        base = models.load_base(str(path))  # answered before the check
    assert base.origin["conversion_check"] == "after this answer"
    with pytest.raises(ModelError, match=r"could not be converted faithfully \(outputs differ"):
        later[0]()
    monkeypatch.setattr(load.keras2, "rebuild_keras2_h5", real_rebuild)
    for _ in range(2):  # in a worker or not: refused at once, with the same line
        with pytest.raises(ModelError, match=r"could not be converted faithfully"):
            models.load_base(str(path))
    assert not load._converted_path(path).is_file()


def test_a_check_that_failed_for_want_of_memory_is_not_remembered(tmp_path: Path, monkeypatch):
    path = tmp_path / "keras_model.h5"
    keras2_nested_h5(path)
    real_check = load.keras2.check_conversion

    def out_of_memory(p, model):
        raise MemoryError("Unable to allocate 1.2 GiB")

    monkeypatch.setattr(load.keras2, "check_conversion", out_of_memory)
    with load.writes_after() as later:
        models.load_base(str(path))
    with pytest.raises(ModelError, match=r"Could not check 'keras_model.h5'.*try again"):
        later[0]()
    assert not load._converted_path(path).with_suffix(".refused").exists()
    monkeypatch.setattr(load.keras2, "check_conversion", real_check)
    base = models.load_base(str(path))  # checked again, and kept this time
    assert base.origin["conversion_max_abs_diff"] <= 1e-4


def test_weights_that_cannot_be_matched_by_name_are_copied_from_tf_keras(tmp_path: Path):
    import tf_keras

    layers = tf_keras.layers
    branch = [  # two nested models whose layers share names: names alone are ambiguous
        tf_keras.Sequential([layers.Dense(4, name="dense", input_shape=(n,))], name=f"s{n}")
        for n in (12, 4)
    ]
    inp = layers.Input((2, 2, 3), name="image")
    flat = layers.Flatten(name="flat")(inp)
    out = branch[1](branch[0](flat))
    path = tmp_path / "twins.h5"
    tf_keras.Model(inp, out).save(path, save_format="h5")
    assert load.keras2.rebuild_keras2_h5(path) is None
    from keras.src.backend.common import global_state  # its declared variables were all made

    assert not global_state.get_global_attribute("uninitialized_variables")
    model, diff = load.keras2.convert_keras2_h5(path)
    assert diff <= 1e-4 and model.get_layer("s4").get_layer("dense").kernel.shape == (4, 4)


@needs_tm_model
def test_teachable_machine_export_loads_and_matches_tf_keras(tm_base):
    base = tm_base
    assert base.class_names == ["5 Galoon", "500ML"]
    assert base.preprocessing == "tf"
    assert base.input_size == (224, 224)
    assert base.suggested_cut == "global_average_pooling2d_GlobalAveragePooling2D1"
    assert base.origin["teachable_machine"] is True
    info = models.describe(base)
    assert info["head_layers"] == ["dense_Dense1", "dense_Dense2"]
    cut_row = next(r for r in info["layers"] if r["name"] == base.suggested_cut)
    assert cut_row["output_shape"] == [None, 1280]

    # load_base compared the rebuilt model with tf_keras's reading on random input.
    assert base.origin["conversion_max_abs_diff"] <= 1e-4
    x = np.random.default_rng(7).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
    probs = base.model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


@pytest.fixture(scope="module")
def described(builtin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`describe` of the built-in and of MobileNetV2 (no weights), run as two CLI processes
    side by side (each pays for importing TensorFlow)."""
    workspace = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_HOME": str(builtin_home)}
    procs = {
        base: subprocess.Popen(
            [sys.executable, "-m", "retrain", "describe", base, "--workspace", str(workspace)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for base in ("builtin:digits-cnn", "applications:MobileNetV2:none")
    }
    results = {}
    for base, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[base] = (proc.returncode, out, err)
    return results


def test_cli_describe_builtin(described: dict):
    code, out, err = described["builtin:digits-cnn"]
    assert code == 0, err
    info = json.loads(out)
    for key in ("input_shape", "output_shape", "total_params", "trainable_params", "layers"):
        assert key in info
    assert info["suggested_cut"] == "features" and info["preprocessing"] == "inside"
    assert info["input_shape"] == [None, 32, 32, 3] and info["output_shape"] == [None, 5]
    row = info["layers"][0]
    assert set(row) == {"index", "name", "type", "output_shape", "params", "trainable", "parent"}


def test_cli_describe_zoo_without_weights(described: dict):
    code, out, err = described["applications:MobileNetV2:none"]
    assert code == 0, err
    info = json.loads(out)
    assert info["suggested_cut"] == "global_average_pooling2d"
    assert info["preprocessing"] == "tf"
    assert info["total_params"] == 3538984


@pytest.mark.parametrize(
    ("base", "match"),
    [
        ("applications:NoSuchNet:none", "Unknown model 'NoSuchNet'"),
        ("/no/such/model.h5", "No model file at"),
        ("README.md", "not a model file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(base, match, tmp_path: Path):
    out = run_cli("describe", base, "--workspace", str(tmp_path))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------
# the layer-stack picture's groups


def _row(name, params=0, status="frozen", part="base", parent=None):
    return {"name": name, "params": params, "status": status, "part": part, "parent": parent}


def test_group_layers_groups_consecutive_layers_of_one_block_and_kind():
    rows = [
        _row("retrain_image_scale", status="new", part="front"),
        _row("block1_conv", 10),
        _row("block1_bn", 4),
        _row("block1_relu"),
        _row("block2_conv", 20, status="trainable"),
        _row("block2_bn", 4),
        _row("pool", parent="backbone"),
        _row("predictions", 7, status="removed"),
        _row("head_output", 9, status="new", part="head"),
    ]
    groups = models.group_layers(rows)
    assert [(g["block"], g["kind"], g["status"], g["params"]) for g in groups] == [
        ("input + preprocessing", "new", "new", 0),
        ("block1", "base", "frozen", 14),
        ("block2", "base", "trainable", 24),
        ("backbone", "base", "frozen", 0),
        ("predictions", "removed", "removed", 7),
        ("new head", "new", "new", 9),
    ]
    assert groups[1]["layers"] == ["block1_conv", "block1_bn", "block1_relu"]
    assert set(groups[0]) == {"block", "kind", "params", "layers", "statuses", "status"}


def test_group_layers_merges_neighbours_down_to_the_limit():
    rows = [
        _row(f"block{i}_conv", 1, status="trainable" if i == 5 else "frozen") for i in range(20)
    ]
    groups = models.group_layers(rows, max_groups=6)
    assert len(groups) <= 6
    assert [name for g in groups for name in g["layers"]] == [r["name"] for r in rows]
    assert sum(g["params"] for g in groups) == 20
    assert groups[0]["block"].startswith("block0 … ")
    assert [g["status"] for g in groups].count("trainable") == 1  # block5's group
    # Kinds never merge: a removed tail stays its own bar.
    tail = models.group_layers([*rows, _row("predictions", 3, status="removed")], max_groups=2)
    assert tail[-1]["kind"] == "removed" and tail[-1]["layers"] == ["predictions"]


def test_layer_stack_marks_removed_layers_and_adds_front_and_head():
    base = [_row("conv", 5), _row("gap"), _row("predictions", 3)]
    new = [
        _row("retrain_to_float", status="new", part="front"),
        _row("conv", 5, status="trainable"),
        _row("gap"),
        _row("head_output", 4, status="new", part="head"),
    ]
    stack = models.layer_stack(base, new)
    assert [(r["name"], r["status"], r["part"]) for r in stack] == [
        ("retrain_to_float", "new", "front"),
        ("conv", "trainable", "base"),
        ("gap", "frozen", "base"),
        ("predictions", "removed", "base"),
        ("head_output", "new", "head"),
    ]
    assert {r["status"] for r in models.layer_stack(base)} == {"frozen"}


def test_layer_stack_lists_a_kept_widened_head_once():
    """Keep-old mode keeps the original head (same names): drawn once, at its new size."""
    base = [_row("conv", 5), _row("gap"), _row("dropout"), _row("predictions", 3)]
    new = [
        _row("conv", 5),
        _row("gap"),
        _row("dropout", status="new", part="head"),
        _row("predictions", 6, status="new", part="head"),
    ]
    stack = models.layer_stack(base, new)
    assert [(r["name"], r["params"], r["part"]) for r in stack] == [
        ("conv", 5, "base"),
        ("gap", 0, "base"),
        ("dropout", 0, "head"),
        ("predictions", 6, "head"),
    ]
    # Its bar says what it is: the original head, not a new one.
    assert [g["block"] for g in models.group_layers(stack)][-1] == "original head (widened)"
    replaced = models.layer_stack(
        base, [*new[:2], _row("head_output", 4, status="new", part="head")]
    )
    assert [g["block"] for g in models.group_layers(replaced)][-1] == "new head"
