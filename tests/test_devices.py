"""retrain.training.devices: backend and device detection, precision, jit, data parallelism,
threads.

Most tests run in this process on the CPU (TensorFlow backend in CI). What depends on hardware
that CI lacks (an H100, several GPUs) is tested through a faked `_hardware()`; several devices
are real in subprocesses that split the CPU into virtual devices (JAX and TensorFlow).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from retrain.errors import ConfigError
from retrain.runs import rundir
from retrain.training import devices
from retrain.training.devices import _Hardware

ROOT = Path(__file__).resolve().parents[1]

H100_JAX = _Hardware("jax", "gpu", "NVIDIA H100 80GB HBM3", 1, 79.6, (9, 0))
H200_TF = _Hardware("tensorflow", "gpu", "NVIDIA H200", 1, 140.4, (9, 0))
T4_TORCH = _Hardware("torch", "gpu", "Tesla T4", 1, 15.0, (7, 5))
A10_JAX = _Hardware("jax", "gpu", "NVIDIA A10G", 1, 22.0, (8, 6))
TWO_GPUS_TF = _Hardware("tensorflow", "gpu", "NVIDIA A100-SXM4-80GB", 2, 80.0, (8, 0))
TWO_GPUS_TORCH = _Hardware("torch", "gpu", "NVIDIA A100-SXM4-80GB", 2, 80.0, (8, 0))
CPU_JAX = _Hardware("jax", "cpu", "CPU", 1, 16.0, None)


def _run(code: str, env: dict[str, str] | None = None, timeout: int = 120) -> dict:
    """Run ``code`` in a fresh interpreter at the repo root; it prints one JSON line last."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def fake_hardware(monkeypatch: pytest.MonkeyPatch):
    """Pretend the active backend sees the given hardware."""

    def use(hw: _Hardware) -> None:
        monkeypatch.setattr(devices, "_hardware", lambda: hw)

    return use


@pytest.fixture
def restore_policy():
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")


# --- import cost and backend resolution -------------------------------------------------------

# A test that pins TensorFlow in its own process checks the same thing whatever this session's
# backend is: the TensorFlow suite runs it, and the JAX pass (`make test-backends`) skips it.
tensorflow_suite_only = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "jax",
    reason="pins TensorFlow in its own process: the TensorFlow suite runs this same check",
)


def test_import_is_cheap_and_backend_needs_no_framework(tmp_path: Path):
    code = """
        import json, sys
        import retrain.training.devices as d
        print(json.dumps({"backend": d.backend(),
                          "heavy": [m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules]}))
    """
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    torch_env = _run(code, {**env, "KERAS_BACKEND": "torch"})
    assert torch_env == {"backend": "torch", "heavy": []}

    # Without KERAS_BACKEND, Keras's own config file decides, read without importing Keras.
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    clean = {k: v for k, v in env.items() if k != "KERAS_HOME"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), "KERAS_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == {"backend": "jax", "heavy": []}


@tensorflow_suite_only
def test_describe_device_on_tensorflow_imports_no_other_framework():
    # TensorFlow 2.21 itself imports jax when it is installed (tensorflow.lite.python.util), so
    # what counts is what describe_device adds beyond `import tensorflow`.
    info = _run(
        """
        import json, sys
        import tensorflow
        frameworks = ("keras", "jax", "torch")
        before = {m for m in frameworks if m in sys.modules}
        from retrain.training import devices
        info = devices.describe_device()
        info["added"] = [m for m in frameworks if m in sys.modules and m not in before]
        print(json.dumps(info))
        """,
        {"KERAS_BACKEND": "tensorflow"},
    )
    assert info["backend"] == "tensorflow"
    assert info["added"] == []
    assert set(info) == {"backend", "device", "devices", "memory_gb", "accelerator", "added"}


# --- this machine (CPU in CI) -------------------------------------------------------------------


def test_describe_device_here():
    info = devices.describe_device()
    assert set(info) == {"backend", "device", "devices", "memory_gb", "accelerator"}
    assert info["backend"] == devices.backend()
    assert info["devices"] >= 1
    if not info["accelerator"]:
        assert info["device"] == "CPU"
        assert info["memory_gb"] is not None and info["memory_gb"] > 0.1


def test_cpu_defaults_and_single_device_distribution():
    if devices.describe_device()["accelerator"]:
        pytest.skip("this machine has an accelerator; the CPU defaults do not apply")
    defaults = devices.gpu_defaults()
    assert defaults["batch_size"] == 32
    assert defaults["precision"] == "off"
    assert defaults["input_dtype"] == "uint8"
    assert defaults["jit_compile"] == devices.jit_compile_default()
    scope, global_batch = devices.distribution(16)
    assert global_batch == 16
    with scope:
        pass


def test_set_precision_applies_keras_policy(restore_policy):
    import keras

    on_cpu = not devices.describe_device()["accelerator"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert devices.set_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert any("slower than float32" in str(w.message) for w in caught) == on_cpu
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert devices.set_precision("off") == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"


def test_set_precision_auto_is_float32_on_cpu(restore_policy):
    if devices.describe_device()["accelerator"]:
        pytest.skip("this machine has an accelerator")
    assert devices.set_precision("auto") == "float32"


def test_bad_precision_and_batch_and_threads_are_config_errors():
    with pytest.raises(ConfigError, match="Unknown mixed precision 'fp8'.*mixed_bfloat16"):
        devices.set_precision("fp8")
    with pytest.raises(ConfigError, match="Batch size must be a positive integer, got 0"):
        devices.distribution(0)
    with pytest.raises(ConfigError, match="Thread count must be a positive integer, got 0"):
        devices.limit_threads(0)


def test_unknown_backend_is_a_config_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(devices, "backend", lambda: "mxnet")
    with pytest.raises(ConfigError, match="Unknown Keras backend 'mxnet'"):
        devices.describe_device()


# --- hardware CI does not have (faked) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "precision", "batch", "jit"),
    [
        (H100_JAX, "mixed_bfloat16", 256, True),
        (H200_TF, "mixed_float16", 256, True),
        (A10_JAX, "mixed_bfloat16", 128, True),
        (T4_TORCH, "mixed_float16", 64, "auto"),
        (TWO_GPUS_TF, "mixed_float16", 256, "auto"),
        (CPU_JAX, "off", 32, True),
    ],
    ids=["h100-jax", "h200-tf", "a10-jax", "t4-torch", "2xa100-tf", "cpu-jax"],
)
def test_gpu_defaults_per_device(fake_hardware, hw, precision, batch, jit):
    fake_hardware(hw)
    defaults = devices.gpu_defaults()
    assert defaults["precision"] == precision
    assert defaults["batch_size"] == batch
    assert defaults["jit_compile"] == jit
    assert defaults["device"] == hw.name
    assert defaults["input_dtype"] == "uint8"
    expected_auto = "float32" if precision == "off" else precision
    assert devices.resolve_precision("auto") == expected_auto


def test_explicit_precision_is_kept_on_any_device(fake_hardware):
    fake_hardware(H100_JAX)
    assert devices.resolve_precision("mixed_float16") == "mixed_float16"
    assert devices.resolve_precision("off") == "float32"


def test_torch_with_several_gpus_trains_on_one(fake_hardware):
    fake_hardware(TWO_GPUS_TORCH)
    scope, global_batch = devices.distribution(32)
    assert global_batch == 32
    with scope:
        pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [((8, 0), (8, 0)), ("9.0", (9, 0)), ("12.0a", (12, 0)), (None, None), ("gpu", None)],
)
def test_compute_capability_forms(value, expected):
    assert devices._parse_capability(value) == expected


def test_gpu_memory_without_nvidia_smi_is_unknown(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert devices._nvidia_smi_memory_gb(0) is None


# --- threads (in a subprocess: pinning would slow down the test process) -----------------------


def test_limit_threads_sets_environment_and_pins_cpus():
    result = _run(
        """
        import json, os, sys
        from retrain.training import devices
        before = len(os.sched_getaffinity(0))
        n = devices.limit_threads(1)
        print(json.dumps({"n": n, "before": before, "after": len(os.sched_getaffinity(0)),
                          "omp": os.environ["OMP_NUM_THREADS"],
                          "intra": os.environ["TF_NUM_INTRAOP_THREADS"],
                          "default": devices.limit_threads(),
                          "heavy": [m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules]}))
        """
    )
    assert result["n"] == 1
    assert result["omp"] == result["intra"] == "1"
    assert result["after"] == 1
    assert result["default"] == 1  # all allowed CPUs but one, at least 1
    assert result["heavy"] == []


# --- several devices, for real: the CPU split into virtual devices --------------------------------

TINY_FIT = """
    import json, sys
    import numpy as np
    {setup}
    from retrain.training import devices
    info = devices.describe_device()
    scope, global_batch = devices.distribution(4)
    import keras
    with scope:
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      jit_compile=devices.jit_compile_default())
        x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
        y = (x[:, 0] > 0).astype("int64")
    with scope:  # entered again, as retrain.training.train does for each phase
        history = model.fit(x, y, batch_size=global_batch, epochs=2, verbose=0)
    print(json.dumps({{"info": info, "global_batch": global_batch, "extra": {extra},
                      "loss": history.history["loss"]}}))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed (pip install -r requirements-jax.txt to run this test)",
)
def test_jax_data_parallel_over_two_virtual_cpus():
    code = TINY_FIT.format(
        setup="",
        extra=(
            '{"distribution": type(keras.distribution.distribution()).__name__,'
            ' "kernel_devices": len(model.layers[0].kernel.value.sharding.device_set)}'
        ),
    )
    result = _run(
        code,
        {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert result["info"]["backend"] == "jax"
    assert result["info"]["devices"] == 2
    assert result["global_batch"] == 8
    assert result["extra"] == {"distribution": "DataParallel", "kernel_devices": 2}
    assert len(result["loss"]) == 2 and all(math.isfinite(v) for v in result["loss"])


@tensorflow_suite_only
def test_tensorflow_mirrored_strategy_over_two_logical_cpus():
    setup = (
        "import tensorflow as tf; cpu = tf.config.list_physical_devices('CPU')[0]; "
        "tf.config.set_logical_device_configuration("
        "cpu, [tf.config.LogicalDeviceConfiguration()] * 2)"
    )
    code = TINY_FIT.format(
        setup=setup,
        extra=(
            '{"strategy": type(model.distribute_strategy).__name__,'
            ' "replicas": model.distribute_strategy.num_replicas_in_sync}'
        ),
    )
    result = _run(code, {"KERAS_BACKEND": "tensorflow"})
    assert result["info"]["devices"] == 2
    assert result["global_batch"] == 8
    assert result["extra"] == {"strategy": "MirroredStrategy", "replicas": 2}
    assert len(result["loss"]) == 2 and all(math.isfinite(v) for v in result["loss"])


# --- the real training path on two devices ----------------------------------------------------

TRAIN_TWO_DEVICES = """
    import json
    {setup}
    import keras
    from retrain.models.modelfile import save_model
    from retrain.training.config import TrainConfig
    from retrain.training.train import train
    inp = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(3, activation="softmax", name="old_head")(x)
    save_model(keras.Model(inp, out), {base!r}, {{}})
    config = TrainConfig(data={data!r}, base={base!r}, out={out!r}, epochs=2, batch_size=4,
                         fine_tune_epochs=1, fine_tune_layers=2, cache_features="off")
    import pathlib
    summary = train(config, pathlib.Path({out!r}))
    print(json.dumps({{"state": summary.get("state"), "devices": summary.get("global_batch_size")}}))
"""


@pytest.mark.parametrize(
    "backend", [pytest.param("tensorflow", marks=tensorflow_suite_only), "jax"]
)
def test_two_phase_training_runs_data_parallel_on_two_devices(backend, make_image_folder, tmp_path):
    """An odd number of images and a fine-tune phase on two devices (uneven last batches,
    optimizer created under the distribution) train to the end."""
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install -r requirements-jax.txt)")
    data = make_image_folder(classes=("a", "b"), per_class={"a": 7, "b": 6})
    setup, env = "", {"KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    else:
        setup = (
            "import tensorflow as tf; cpu = tf.config.list_physical_devices('CPU')[0]; "
            "tf.config.set_logical_device_configuration("
            "cpu, [tf.config.LogicalDeviceConfiguration()] * 2)"
        )
    code = TRAIN_TWO_DEVICES.format(
        setup=setup, data=str(data), base=str(tmp_path / "base.keras"), out=str(tmp_path / "run")
    )
    env["RETRAIN_HOME"] = str(tmp_path / "home")
    result = _run(code, env, timeout=300)
    assert result["state"] == "done"
    metrics = rundir.read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["phase"] for m in metrics] == [1, 1, 2]
