"""Models Retrain Studio refuses, each with one line that names the fix.

Every file is built here (no downloads). The refusals happen before Keras deserializes
anything: the tests check that no code from the file ran.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from retrain import models
from retrain.errors import ModelError
from retrain.models import modelfile

ROOT = Path(__file__).resolve().parents[1]
LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 9837041\n"
)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --- a non-image model -------------------------------------------------------------------------


def test_keras2_lstm_h5_is_not_an_image_model(tmp_path: Path):
    """Keras 3 cannot even build this file (LSTM's time_major); the config says what it is."""
    import tf_keras

    layers = tf_keras.layers
    legacy = tf_keras.Sequential(
        [layers.Input((60, 1)), layers.LSTM(8), layers.Dense(3, activation="softmax")]
    )
    path = tmp_path / "lstm.h5"
    legacy.save(path, save_format="h5")
    with pytest.raises(ModelError) as err:
        models.load_base(str(path))
    text = one_line(err)
    assert text.startswith(
        "'lstm.h5' takes sequences of shape (None, 60, 1); Retrain Studio retrains image "
        "classifiers"
    )
    assert "time_major" not in text and "Upload an image classifier" in text


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((10,), "vectors of shape (None, 10)"),
        ((3, 32, 32), "channels-first images of shape (None, 3, 32, 32)"),
        ((32, 32, 4), "images with 4 channels, shape (None, 32, 32, 4)"),
        ((8, 16, 16, 3), "videos or volumes of shape (None, 8, 16, 16, 3)"),
    ],
)
def test_other_non_image_inputs_are_named(tmp_path: Path, shape, words):
    import keras

    inp = keras.Input(shape)
    path = tmp_path / "other.keras"
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(path)
    with pytest.raises(ModelError) as err:
        models.load_base(str(path))
    assert f"'other.keras' takes {words}; Retrain Studio retrains image classifiers" in one_line(
        err
    )


# --- a Git LFS pointer ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.keras", "keras_model.h5"])
def test_git_lfs_pointer_says_git_lfs_pull(tmp_path: Path, name):
    path = tmp_path / name
    path.write_text(LFS_POINTER)
    assert 120 < path.stat().st_size < 140  # what a clone without `git lfs pull` leaves
    with pytest.raises(ModelError) as err:
        models.load_base(str(path))
    text = one_line(err)
    assert (
        "this is a Git LFS pointer, not the model: run `git lfs pull` and upload the real file"
        in (text)
    )
    assert "zip" not in text and "HDF5" not in text
    # The same refusal where a trained model is read (evaluate, predict, export).
    if name.endswith(".keras"):
        with pytest.raises(ModelError, match="Git LFS pointer"):
            modelfile.load_model(path)


# --- pickled weights ---------------------------------------------------------------------------


class _Trap:
    """Unpickling this touches ``marker``: the test's proof that no pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def small_model():
    import keras

    inp = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.Flatten(name="flat")(inp)
    return keras.Model(inp, keras.layers.Dense(2, name="out")(x))


def with_weights_store(good: Path, bad: Path, name: str, payload: bytes) -> Path:
    """Copy a .keras archive, replacing its weights store by ``name`` holding ``payload``."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for entry in src.namelist():
            if not entry.startswith("model.weights"):
                dst.writestr(entry, src.read(entry))
        dst.writestr(name, payload)
    return bad


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def pickled_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.keras"
    small_model().save(good)
    marker = tmp_path / "code-ran"
    trap = np.array([_Trap(marker)], dtype=object)
    return {
        # An npz whose arrays are object arrays (pickles), under Keras's own npz store name.
        "npz": with_weights_store(
            good,
            tmp_path / "npz.keras",
            "model.weights.npz",
            npz_bytes(**{"layers/out/vars": trap, "layers/flat/vars": np.zeros(2)}),
        ),
        # A bare pickle posing as the weights store (np.load would hand it to pickle).
        "bare": with_weights_store(
            good, tmp_path / "bare.keras", "model.weights.npz", pickle.dumps(_Trap(marker))
        ),
    }


@pytest.mark.parametrize("kind", ["npz", "bare"])
def test_pickled_weights_are_refused_without_unpickling(tmp_path: Path, kind):
    path = pickled_files(tmp_path)[kind]
    marker = tmp_path / "code-ran"
    for load in (models.load_base, modelfile.load_model):
        with pytest.raises(ModelError) as err:
            load(str(path))
        text = one_line(err)
        assert text == (
            f"'{path.name}' refused: the weights file holds pickled Python objects, which can run "
            "code when loaded; export the model again with model.save('model.keras')."
        )
        assert "allow_pickle" not in text and "unsafe" not in text
    assert not marker.exists()


def test_keras_npz_weights_format_is_refused_and_h5_weights_are_not(tmp_path: Path):
    """Keras's own npz weights store pickles a dict per layer: refused the same way."""
    from keras.src.saving import saving_lib

    model = small_model()
    npz = tmp_path / "npz_format.keras"
    saving_lib.save_model(model, npz, weights_format="npz")
    with zipfile.ZipFile(npz) as zf:
        assert "model.weights.npz" in zf.namelist()
        assert modelfile.holds_pickles(zf)
    with pytest.raises(ModelError, match="refused: the weights file holds pickled Python objects"):
        models.load_base(str(npz))
    h5 = tmp_path / "h5_format.keras"
    model.save(h5)
    with zipfile.ZipFile(h5) as zf:
        assert not modelfile.holds_pickles(zf)
    modelfile.check_model_file(h5)  # a normal file passes


def test_npz_of_plain_arrays_holds_no_pickles(tmp_path: Path):
    good = tmp_path / "good.keras"
    small_model().save(good)
    path = with_weights_store(
        good, tmp_path / "plain.keras", "model.weights.npz", npz_bytes(a=np.ones((2, 3)))
    )
    with zipfile.ZipFile(path) as zf:
        assert not modelfile.holds_pickles(zf)


# --- a custom layer ----------------------------------------------------------------------------


def test_custom_layer_is_named_and_never_built(tmp_path: Path):
    import keras

    built = []

    @keras.saving.register_keras_serializable(package="refusal_test")
    class Doubler(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            built.append(self)

        def call(self, t):
            return t * 2

    inp = keras.Input((8, 8, 3))
    path = tmp_path / "custom.keras"
    keras.Model(inp, Doubler(name="dbl")(inp)).save(path)
    built.clear()
    with pytest.raises(ModelError) as err:
        models.load_base(str(path))
    text = one_line(err)
    assert "layer class Doubler (layer 'dbl') is not part of Keras" in text
    assert "Rebuild the model with built-in Keras layers" in text
    assert built == []  # the class registered in this process was still not instantiated


def test_lambda_layer_is_refused_and_its_code_never_runs(tmp_path: Path):
    import keras

    marker = tmp_path / "lambda-ran"

    def touch_and_double(t):
        marker.touch()
        return t * 2

    inp = keras.Input((8, 8, 3))
    path = tmp_path / "lambda.keras"
    keras.Model(inp, keras.layers.Lambda(touch_and_double, name="sneaky")(inp)).save(path)
    marker.unlink()  # building the model called it once
    with pytest.raises(ModelError) as err:
        models.load_base(str(path))
    text = one_line(err)
    assert "Lambda layer ('sneaky')" in text and "Rebuild the model with standard Keras" in text
    assert not marker.exists()


# --- the CLI and the Model page ------------------------------------------------------------------


def test_cli_refusals_exit_2_with_one_line(tmp_path: Path):
    lfs = tmp_path / "model.keras"
    lfs.write_text(LFS_POINTER)
    pickled = pickled_files(tmp_path)["npz"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {
        path: subprocess.Popen(
            [sys.executable, "-m", "retrain", "describe", str(path), "--workspace", str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for path in (lfs, pickled)
    }
    expected = {lfs: "run `git lfs pull`", pickled: "export the model again with model.save"}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert expected[path] in lines[0] and out == ""
    assert not (tmp_path / "code-ran").exists()


def test_model_page_shows_the_refusal():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "model.py"), default_timeout=120).run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    at.file_uploader(key="model_upload").set_value(
        ("keras_model.h5", LFS_POINTER.encode(), "application/octet-stream")
    ).run()
    assert not at.exception, at.exception
    errors = [element.value for element in at.error]
    assert len(errors) == 1 and "Git LFS pointer, not the model: run `git lfs pull`" in errors[0]
