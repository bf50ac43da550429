"""Model bombs: files that declare far more weights than they store are refused from their
headers (config.json, the HDF5 dataset headers), in well under a second, before anything is
built and without the process growing.

The bomb is the one reported in issue 17: a Dense layer of 12,288 x 200,000 (9.2 GB of
float32) whose HDF5 dataset holds only its fill value, so the file is a few KB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import psutil
import pytest

from retrain import models
from retrain.errors import ModelError
from retrain.models import modelfile, modelsize

ROOT = Path(__file__).resolve().parents[1]
TEACHABLE_MACHINE = ROOT.parent / "shared" / "models" / "teachable_machine_water" / "keras_model.h5"
IN, UNITS = 12288, 200_000  # 64 x 64 x 3 pixels -> 200,000 outputs
BOMB_BYTES = (IN * UNITS + UNITS) * 4
# The process may grow by this much at most while refusing (h5py's own import is ~20 MB).
MAX_GROWTH_BYTES = 100 * 1024 * 1024


def keras3_config(*, with_shapes: bool = True) -> dict:
    """A Keras 3 functional config: pixels -> Flatten -> Dense(200,000). Without shapes: no
    build_config and a lying shape on each edge (Keras builds from the real tensors)."""

    def edge(source: str, shape: list) -> list:
        shape = shape if with_shapes else [None, 1]
        tensor = {"shape": shape, "dtype": "float32", "keras_history": [source, 0, 0]}
        return [{"args": [{"class_name": "__keras_tensor__", "config": tensor}], "kwargs": {}}]

    def layer(cls: str, name: str, config: dict, source: str | None, shape: list | None):
        entry = {
            "module": "keras.layers",
            "class_name": cls,
            "config": {"name": name, "dtype": "float32", **config},
            "registered_name": None,
            "name": name,
            "inbound_nodes": edge(source, shape) if source else [],
        }
        if with_shapes and shape is not None:
            entry["build_config"] = {"input_shape": shape}
        return entry

    layers = [
        layer("InputLayer", "pixels", {"batch_shape": [None, 64, 64, 3]}, None, None),
        layer("Flatten", "flat", {"data_format": "channels_last"}, "pixels", [None, 64, 64, 3]),
        layer("Dense", "huge", {"units": UNITS, "activation": "softmax"}, "flat", [None, IN]),
    ]
    return {
        "module": "keras",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {
            "name": "bomb",
            "trainable": True,
            "layers": layers,
            "input_layers": [["pixels", 0, 0]],
            "output_layers": [["huge", 0, 0]],
        },
    }


def write_unfilled_weights(path: Path, prefix: str) -> None:
    """The kernel and bias declared at full size, no data written (HDF5 fill values)."""
    with h5py.File(path, "a") as f:
        group = f.require_group(prefix)
        group.create_dataset("0", shape=(IN, UNITS), dtype="float32")
        group.create_dataset("1", shape=(UNITS,), dtype="float32")


def keras_bomb(folder: Path, *, config: dict | None = None, weights: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights_file = folder / "model.weights.h5"
    h5py.File(weights_file, "w").close()
    if weights:
        write_unfilled_weights(weights_file, "layers/huge/vars")
    path = folder / "bomb.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.0"}))
        zf.writestr("config.json", json.dumps(config or keras3_config()))
        zf.write(weights_file, "model.weights.h5")
    weights_file.unlink()
    return path


def legacy_config() -> dict:
    """A Keras 2 Sequential config, as a legacy .h5 keeps it (no build_config, no edges)."""
    return {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 64, 64, 3], "name": "pixels"},
                },
                {"class_name": "Flatten", "config": {"name": "flat"}},
                {"class_name": "Dense", "config": {"name": "huge", "units": UNITS}},
            ],
        },
    }


def legacy_bomb(path: Path, *, weights: bool = True) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(legacy_config())
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.create_group("model_weights")
    if weights:
        write_unfilled_weights(path, "model_weights/huge/huge")
    return path


def refuse(load, path: Path) -> tuple[str, float, int]:
    """Call ``load(path)``, expecting the refusal; return (message, seconds, RSS growth)."""
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.monotonic()
    with pytest.raises(ModelError) as err:
        load(str(path))
    seconds = time.monotonic() - started
    return str(err.value), seconds, process.memory_info().rss - before


def assert_names_the_size(text: str, name: str) -> None:
    assert "\n" not in text
    assert text.startswith(f"'{name}' declares 9.2 GB of weights")
    assert "more than the limit of" in text and "(RETRAIN_MAX_MODEL_MB)" in text
    assert "Use a smaller model, or raise RETRAIN_MAX_MODEL_MB" in text


# --- the declared size ---------------------------------------------------------------------------


def test_keras_bomb_is_refused_in_seconds_without_growing(tmp_path: Path):
    import keras  # noqa: F401  (imported first: its import is no part of the refusal's growth)

    path = keras_bomb(tmp_path / "k")
    assert path.stat().st_size < 20_000
    for load in (models.load_base, modelfile.load_model):
        text, seconds, growth = refuse(load, path)
        assert_names_the_size(text, "bomb.keras")
        assert "Dense layer 'huge' alone: 9.2 GB" in text
        assert seconds < 5 and growth < MAX_GROWTH_BYTES, (seconds, growth)


def test_legacy_h5_bomb_is_refused_in_seconds_without_growing(tmp_path: Path):
    import keras  # noqa: F401

    path = legacy_bomb(tmp_path / "bomb.h5")
    text, seconds, growth = refuse(models.load_base, path)
    assert_names_the_size(text, "bomb.h5")
    assert seconds < 5 and growth < MAX_GROWTH_BYTES, (seconds, growth)


@pytest.mark.parametrize(
    "variant", ["config only", "weights only", "config with lying shapes", "legacy config only"]
)
def test_each_source_alone_finds_the_bomb(tmp_path: Path, variant: str):
    """The config (shapes from build_config, edges, or passed along a Sequential) and the
    HDF5 headers each find it: a file that lies in one of them is still refused."""
    if variant == "config only":
        path = keras_bomb(tmp_path, weights=False)
    elif variant == "weights only":
        small = keras3_config()
        small["config"]["layers"][2]["config"]["units"] = 2
        small["config"]["layers"][2].pop("build_config")
        path = keras_bomb(tmp_path, config=small)
    elif variant == "config with lying shapes":
        path = keras_bomb(tmp_path, config=keras3_config(with_shapes=False), weights=False)
    else:
        path = legacy_bomb(tmp_path / "bomb.h5", weights=False)
    sizes = {d.source: d.total for d in modelsize.declared_sizes(path)}
    assert max(sizes.values()) == BOMB_BYTES, sizes
    with pytest.raises(ModelError, match="declares 9.2 GB of weights"):
        modelfile.check_model_file(path)


def test_the_limit_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = keras_bomb(tmp_path)
    monkeypatch.setenv("RETRAIN_MAX_MODEL_MB", "20000")
    modelfile.check_model_file(path)  # 9.2 GB < 19.5 GB: allowed
    monkeypatch.setenv("RETRAIN_MAX_MODEL_MB", "1")
    with pytest.raises(ModelError, match=r"more than the limit of 1\.0 MB"):
        modelfile.check_model_file(path)
    monkeypatch.setenv("RETRAIN_MAX_MODEL_MB", "lots")
    with pytest.raises(ValueError, match="RETRAIN_MAX_MODEL_MB='lots' is not a number"):
        modelfile.check_model_file(path)
    monkeypatch.delenv("RETRAIN_MAX_MODEL_MB")
    default = modelsize.default_limit_mb()
    assert modelsize.DEFAULT_MIN_MB <= default <= modelsize.DEFAULT_MAX_MB
    assert modelsize.max_model_bytes() == int(default * 1024 * 1024)


def test_a_bomb_as_applications_weights_file_is_refused_before_building(tmp_path: Path):
    weights = tmp_path / "mobilenet.weights.h5"
    write_unfilled_weights(weights, "layers/huge/vars")
    with pytest.raises(ModelError, match="'mobilenet.weights.h5' declares 9.2 GB of weights"):
        models.load_base(f"applications:MobileNetV2:{weights}")


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_describe_refuses_the_bomb_with_one_line(tmp_path: Path):
    path = keras_bomb(tmp_path)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "retrain", "describe", str(path), "--workspace", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 'bomb.keras' declares 9.2 GB"), lines
    assert proc.stdout == ""
    assert time.monotonic() - started < 120  # the interpreter and imports, not 10 GB of memory


# --- what must still load ------------------------------------------------------------------------


def test_normal_models_declare_what_they_hold_and_load(tmp_path: Path, keras_cache):
    """Real files: what each source declares matches the model's own parameter count."""
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(inp)
    x = keras.layers.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    small = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(x))
    path = tmp_path / "small.keras"
    small.save(path)
    seq = keras.Sequential(
        [keras.Input((16, 16, 1)), keras.layers.Flatten(), keras.layers.Dense(4)], name="seq"
    )
    seq_path = tmp_path / "seq.keras"
    seq.save(seq_path)
    layers = keras.layers
    words = keras.Input((10,), dtype="int32")
    x = layers.Embedding(50, 8)(words)
    x = layers.Bidirectional(layers.LSTM(16, return_sequences=True))(x)
    x = layers.TimeDistributed(layers.Dense(5))(x)
    rnn = keras.Model(words, layers.GRU(7)(x))  # no image model, but sized all the same
    rnn_path = tmp_path / "rnn.keras"
    rnn.save(rnn_path)
    builtin = models.ensure_builtin()
    for file, model in ((path, small), (seq_path, seq), (rnn_path, rnn), (builtin, None)):
        model = model or models.load_base("builtin:digits-cnn").model
        declared = {d.source: d.total for d in modelsize.declared_sizes(file) if d.total}
        assert declared["config"] == model.count_params() * 4, (file.name, declared)
        modelfile.check_model_file(file)
    assert models.load_base(str(path)).model.count_params() == small.count_params()
    assert modelfile.load_model(builtin)[0].count_params() > 0


@pytest.mark.skipif(not TEACHABLE_MACHINE.is_file(), reason="../shared/models is absent")
def test_the_real_teachable_machine_export_is_not_refused():
    declared = {d.source: d.total for d in modelsize.declared_sizes(TEACHABLE_MACHINE)}
    assert declared["config"] == declared["weights"] > 1_000_000  # both read, and they agree
    modelfile.check_model_file(TEACHABLE_MACHINE)
