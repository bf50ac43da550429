"""Head replacement and freezing on Sequential, Functional and nested models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrain import models
from retrain.errors import ConfigError, ModelError
from retrain.models.surgery import (
    FreezeSpec,
    HeadSpec,
    apply_freeze,
    kept_layers,
    replace_head,
    summary,
)
from tests.conftest import needs_tm_model

CLASSES = ["cat", "dog", "owl"]


def as_base(model, preprocessing: str = "unit", input_size=(16, 16)) -> models.BaseModel:
    cut, has_head = models.suggest_cut(model)
    return models.BaseModel(
        model=model,
        spec="test",
        name=model.name,
        input_size=input_size,
        preprocessing=preprocessing,
        class_names=None,
        suggested_cut=cut,
        has_original_head=has_head,
    )


def sequential_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="r1"),
            keras.layers.Conv2D(6, 3, name="c2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(8, activation="relu", name="fc"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name="seq",
    )


def functional_model():
    """A residual branch, BatchNorm with non-trivial statistics, a classifier tail."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 3), name="pixels")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    bn = keras.layers.BatchNormalization(name="stem_bn")
    x = bn(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="branch")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    out = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="func")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma * 2, beta + 0.5, mean + 0.3, var * 3])
    return model


def nested_model():
    """Teachable Machine's shape: Sequential(Sequential(Functional, GAP), Sequential(Dense, Dense))."""
    import keras

    keras.utils.set_random_seed(2)
    inp = keras.Input((16, 16, 3), name="backbone_in")
    x = keras.layers.Conv2D(8, 3, name="b_conv1")(inp)
    x = keras.layers.BatchNormalization(name="b_bn1")(x)
    x = keras.layers.Conv2D(12, 3, name="b_conv2")(x)
    backbone = keras.Model(inp, x, name="backbone")
    features = keras.Sequential(
        [keras.Input((16, 16, 3)), backbone, keras.layers.GlobalAveragePooling2D(name="gap")],
        name="features_seq",
    )
    head = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(10, activation="relu", name="old_hidden"),
            keras.layers.Dense(2, activation="softmax", name="old_out"),
        ],
        name="head_seq",
    )
    return keras.Sequential([keras.Input((16, 16, 3)), features, head], name="tm_like")


def images(n: int = 4, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("uint8")


def layer_output(model, name: str, x: np.ndarray) -> np.ndarray:
    """``model``'s output at its leaf layer ``name`` (pass the nested model that holds it)."""
    import keras

    probe = keras.Model(model.inputs, _find(model, name).output)
    return np.asarray(probe(x, training=False))


def _find(model, name):
    for _, layer in models.iter_layers(model):
        if layer.name == name:
            return layer
    raise KeyError(name)


# --- FreezeSpec -----------------------------------------------------------------------------


def test_freeze_spec_parse():
    assert FreezeSpec.parse("all") == FreezeSpec("all")
    assert FreezeSpec.parse(" none ") == FreezeSpec("none")
    assert FreezeSpec.parse("top:5") == FreezeSpec("top", k=5)
    assert FreezeSpec.parse("names:a, b") == FreezeSpec("names", names=("a", "b"))
    assert str(FreezeSpec.parse("top:7")) == "top:7"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("top:0", "K >= 1"),
        ("top:x", "K >= 1"),
        ("names:", "names no layers"),
        ("some", "Unknown freeze 'some'"),
    ],
)
def test_freeze_spec_parse_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        FreezeSpec.parse(text)


# --- Weight preservation on each model kind ------------------------------------------------------


def test_sequential_cut_keeps_weights_and_outputs():
    model = sequential_model()
    base = as_base(model)
    assert base.suggested_cut == "flat"  # Dense(8) + Dense(3) form the old head
    s = replace_head(base, CLASSES)
    x = images()
    expected = layer_output(model, "flat", x.astype("float32") / 255.0)
    np.testing.assert_allclose(np.asarray(s.features(x)), expected, rtol=1e-6, atol=1e-6)
    assert s.diff["removed"] == ["fc", "out"]
    assert s.diff["added"] == ["retrain_scale", "head_dropout", "head_output"]
    assert s.diff["params_before"] == model.count_params()
    probs = np.asarray(s.model(x))
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert s.model.outputs[0].dtype == "float32"
    assert s.model.inputs[0].dtype == "uint8"


def test_functional_cut_keeps_branches_and_batchnorm_statistics():
    model = functional_model()
    base = as_base(model, preprocessing="tf")
    assert base.suggested_cut == "pool"  # Dropout belongs to the old head
    s = replace_head(base, CLASSES, cut_at="add")
    x = images()
    expected = layer_output(model, "add", x.astype("float32") / 127.5 - 1.0)
    np.testing.assert_allclose(np.asarray(s.features(x)), expected, rtol=1e-5, atol=1e-5)
    kept = {layer.name for layer in kept_layers(s)}
    assert kept == {"stem", "stem_bn", "branch", "add"}
    assert s.diff["removed"] == ["pool", "drop", "predictions"]
    assert "head_pool" in s.diff["added"]  # auto pooling on a 4-D cut


def test_nested_model_cut_by_name_index_and_nested_model_name():
    model = nested_model()
    base = as_base(model, preprocessing="tf")
    assert base.suggested_cut == "gap"
    x = images()
    prepared = x.astype("float32") / 127.5 - 1.0
    s = replace_head(base, ["a", "b"])
    assert s.cut_at == "gap"
    np.testing.assert_allclose(
        np.asarray(s.features(x)),
        layer_output(model.layers[0], "gap", prepared),
        rtol=1e-5,
        atol=1e-5,
    )
    assert s.diff["removed"] == ["old_hidden", "old_out"]
    # Layer names survive, flattened into one graph.
    assert [layer.name for layer in kept_layers(s)] == ["b_conv1", "b_bn1", "b_conv2", "gap"]

    by_index = replace_head(base, ["a", "b"], cut_at=1)
    assert by_index.cut_at == "b_bn1"
    assert replace_head(base, ["a", "b"], cut_at="2").cut_at == "b_conv2"
    assert replace_head(base, ["a", "b"], cut_at=-3).cut_at == "gap"
    # A nested model's name means its last layer.
    s2 = replace_head(base, ["a", "b"], cut_at="backbone")
    assert s2.cut_at == "b_conv2"
    np.testing.assert_allclose(
        np.asarray(s2.features(x)),
        layer_output(model.layers[0].layers[0], "b_conv2", prepared),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        ("nope", "No layer named 'nope'"),
        (99, "Cut point 99 is out of range: the model has 6 layers"),
        ("-7", "out of range"),
    ],
)
def test_invalid_cut_points(cut, match):
    with pytest.raises(ModelError, match=match):
        replace_head(as_base(nested_model()), ["a", "b"], cut_at=cut)


def test_a_kept_layer_whose_weights_do_not_fit_the_image_size_is_one_line():
    """A base of any input size whose Dense sits after a Flatten: at another image size its
    kernel would need another shape. One line says so, and no variable is left unmade."""
    from keras.src.backend.common import global_state

    base = as_base(sequential_model(), input_size=None)
    with pytest.raises(ModelError) as info:
        replace_head(base, CLASSES, cut_at="fc", image_size=(20, 20))
    message = str(info.value)
    assert "\n" not in message and "'fc' cannot run at this image size" in message
    assert "shaped (1536, 8), the base's are (864, 8)" in message  # 16*16*6 and 12*12*6 inputs
    assert not global_state.get_global_attribute("uninitialized_variables")
    s = replace_head(base, CLASSES, cut_at="fc", image_size=(16, 16))  # its own size works
    assert np.asarray(s.model(images())).shape == (4, 3)


def test_base_model_is_not_modified():
    model = functional_model()
    before = [w.copy() for w in model.get_weights()]
    flags = [layer.trainable for layer in model.layers]
    s = replace_head(as_base(model), CLASSES, freeze=FreezeSpec("none"))
    s.model.compile("adam", s.loss)
    s.model.fit(images(8), np.arange(8) % 3, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [layer.trainable for layer in model.layers] == flags


# --- Freezing -----------------------------------------------------------------------------------


def test_freeze_all_trains_only_the_head():
    model = sequential_model()
    s = replace_head(as_base(model), CLASSES)
    before = [w.copy() for w in s.features.get_weights()]
    head_before = [w.copy() for w in s.head.get_weights()]
    s.model.compile("adam", s.loss)
    s.model.fit(images(8), np.arange(8) % 3, epochs=2, verbose=0)
    for a, b in zip(before, s.features.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b in zip(head_before, s.head.get_weights(), strict=True)
    )
    assert s.diff["trainable"] == 0 and s.diff["frozen"] == 3  # c1, bn1, c2


def test_top_k_none_and_names_and_batchnorm_always_frozen():
    s = replace_head(as_base(functional_model()), CLASSES, cut_at="add")
    trainable = lambda: {layer.name for layer in kept_layers(s) if layer.trainable}  # noqa: E731
    apply_freeze(s, FreezeSpec("none"))
    assert trainable() == {"stem", "branch", "add"}  # not stem_bn
    apply_freeze(s, FreezeSpec("top", k=2))
    assert trainable() == {"branch", "add"}
    apply_freeze(s, FreezeSpec("top", k=3))
    assert trainable() == {"branch", "add"}  # the third from the top is BatchNorm
    assert s.diff["batchnorm_frozen"] == 1
    apply_freeze(s, FreezeSpec("names", names=("stem",)))
    assert trainable() == {"stem"}
    apply_freeze(s, FreezeSpec("all"))
    assert trainable() == set()
    assert s.diff["freeze"] == "all"


def test_batchnorm_statistics_do_not_move_while_fine_tuning():
    s = replace_head(as_base(functional_model()), CLASSES, freeze=FreezeSpec("none"))
    bn = s.features.get_layer("stem_bn")
    stats = [w.copy() for w in bn.get_weights()]
    stem = s.features.get_layer("stem").get_weights()[0].copy()
    s.model.compile("adam", s.loss)
    s.model.fit(images(8), np.arange(8) % 3, epochs=2, verbose=0)
    for a, b in zip(stats, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(stem, s.features.get_layer("stem").get_weights()[0])


@pytest.mark.parametrize(
    ("freeze", "match"),
    [
        (FreezeSpec("top", k=5), r"top:5 is out of range: the kept base has 4 layers"),
        (FreezeSpec("names", names=("predictions",)), "'predictions': not a kept layer"),
    ],
)
def test_freeze_errors(freeze, match):
    with pytest.raises(ModelError, match=match):
        replace_head(as_base(functional_model()), CLASSES, cut_at="add", freeze=freeze)


# --- Head, loss and labels -------------------------------------------------------------------------


def test_softmax_sigmoid_and_loss_are_chosen_together():
    base = as_base(sequential_model())
    soft = replace_head(base, ["a", "b"])
    assert (soft.loss, soft.label_encoding) == ("sparse_categorical_crossentropy", "index")
    assert soft.model.outputs[0].shape[-1] == 2
    sig = replace_head(base, ["a", "b"], head=HeadSpec(binary_sigmoid=True))
    assert (sig.loss, sig.label_encoding) == ("binary_crossentropy", "binary")
    out = sig.head.get_layer("head_output")
    assert out.units == 1 and out.get_config()["activation"] == "sigmoid"
    with pytest.raises(ConfigError, match="exactly 2 classes"):
        replace_head(base, CLASSES, head=HeadSpec(binary_sigmoid=True))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        replace_head(base, ["only"])


def test_hidden_dense_and_added_conv_block():
    base = as_base(functional_model())
    s = replace_head(base, CLASSES, cut_at="add", head=HeadSpec(hidden_units=7, add_conv=4))
    names = [layer.name for layer in s.head.layers]
    assert names == [
        "head_input",
        "head_conv",
        "head_conv_pool",
        "head_pool",
        "head_hidden",
        "head_dropout",
        "head_output",
    ]
    assert s.head.get_layer("head_hidden").units == 7
    assert np.asarray(s.model(images())).shape == (4, 3)
    with pytest.raises(ModelError, match="needs a 4-D cut output"):
        replace_head(base, CLASSES, cut_at="pool", head=HeadSpec(add_conv=4))
    with pytest.raises(ConfigError, match="Dropout 1.5 is out of range"):
        replace_head(base, CLASSES, head=HeadSpec(dropout=1.5))


def test_front_resizes_and_applies_each_preprocessing():
    import keras

    for prep, kind in (("tf", "Rescaling"), ("torch", "Normalization"), ("unit", "Rescaling")):
        s = replace_head(
            as_base(functional_model(), preprocessing=prep), CLASSES, image_size=(24, 20)
        )
        front = [layer for layer in s.features.layers if layer.name.startswith("retrain_")]
        assert [type(layer).__name__ for layer in front] == ["InputLayer", "Resizing", kind]
        assert s.model.inputs[0].shape == (None, 24, 20, 3)
        assert np.asarray(s.model(images(2, 24)[:, :, :20])).shape == (2, 3)
    s = replace_head(as_base(functional_model(), preprocessing="torch"), CLASSES)
    norm = s.features.get_layer("retrain_normalize")
    x = np.full((1, 16, 16, 3), 128, dtype="uint8")
    got = np.asarray(norm(keras.ops.convert_to_tensor(x.astype("float32"))))[0, 0, 0]
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_saved_model_loads_without_custom_objects(tmp_path: Path):
    import keras

    s = replace_head(
        as_base(nested_model(), preprocessing="tf"),
        ["a", "b"],
        head=HeadSpec(hidden_units=4, binary_sigmoid=True),
        freeze=FreezeSpec("top", k=2),
        image_size=(20, 20),
    )
    path = tmp_path / "new.keras"
    s.model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = images(3, 20)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(s.model(x)), atol=1e-6)
    rows = summary(s)
    assert {r["status"] for r in rows} == {"new", "frozen", "trainable"}
    assert rows[-1]["name"] == "head_output" and rows[-1]["part"] == "head"


def test_stateless_ops_in_the_graph_are_kept():
    import keras

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.ops.relu(x) + x  # raw ops, as ConvNeXt's graph has them
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(x))
    s = replace_head(as_base(model), ["a", "b"])
    x = images()
    expected = layer_output(model, "gap", x.astype("float32") / 255.0)
    np.testing.assert_allclose(np.asarray(s.features(x)), expected, rtol=1e-5, atol=1e-6)


def test_mixed_precision_policy_reaches_kept_layers():
    import keras

    keras.config.set_dtype_policy("mixed_float16")
    try:
        s = replace_head(as_base(functional_model()), CLASSES)
        assert s.features.get_layer("stem").compute_dtype == "float16"
        assert s.head.get_layer("head_output").compute_dtype == "float32"
        assert np.asarray(s.model(images())).dtype == np.float32
    finally:
        keras.config.set_dtype_policy("float32")


def test_duplicate_names_across_nested_models_are_made_unique():
    import keras

    def block(name):
        inp = keras.Input((16, 16, 3))
        return keras.Model(
            inp, keras.layers.Conv2D(3, 3, padding="same", name="conv")(inp), name=name
        )

    model = keras.Sequential(
        [keras.Input((16, 16, 3)), block("first"), block("second"), keras.layers.Flatten(name="f")]
    )
    s = replace_head(as_base(model), ["a", "b"], cut_at="f")
    names = [layer.name for layer in kept_layers(s)]
    assert len(names) == len(set(names)) == 3
    assert s.diff["renamed"]


def test_builtin_surgery_for_the_new_digits(keras_cache: Path):
    base = models.load_base("builtin:digits-cnn")
    s = replace_head(base, [f"digit {d}" for d in range(5, 10)])
    assert s.cut_at == "features"
    assert s.diff["removed"] == ["dropout", "predictions"]
    assert s.diff["added"][0] == "retrain_to_float"  # preprocessing is inside the model
    x = images(3, 32)
    np.testing.assert_allclose(
        np.asarray(s.features(x)), layer_output(base.model, "features", x), atol=1e-6
    )


@needs_tm_model
def test_teachable_machine_surgery_keeps_the_1280_features(tm_base):
    base = tm_base
    s = replace_head(base, ["small", "large"], image_size=(64, 64))
    assert s.cut_at == "global_average_pooling2d_GlobalAveragePooling2D1"
    assert s.diff["cut_output_shape"] == [None, 1280]
    assert s.diff["removed"] == ["dense_Dense1", "dense_Dense2"]
    assert s.diff["added"][:2] == ["retrain_resize", "retrain_scale"]
    x = images(2, 224)
    direct = replace_head(base, ["small", "large"])
    inner = base.model.layers[0]  # the Sequential holding MobileNetV2 + pooling
    expected = layer_output(inner, s.cut_at, x.astype("float32") / 127.5 - 1.0)
    np.testing.assert_allclose(np.asarray(direct.features(x)), expected, atol=1e-4)
    assert np.asarray(s.model(images(2, 64))).shape == (2, 2)
