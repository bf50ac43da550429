"""The device a run trains on, and the settings that make it fast there.

Keras 3 runs on TensorFlow (the default), JAX or PyTorch; this module hides the few places
where they differ: what hardware is visible, which mixed-precision policy suits it, whether to
ask for XLA compilation, how to spread a batch over several GPUs, and how many CPU threads a
training worker may use. Every framework is imported inside the function that needs it, and
only the framework of the active backend, so ``import retrain.training.devices`` costs nothing and
describing a JAX device never imports TensorFlow (GPU hosts often have no TensorFlow).

Typical use in a training worker::

    devices.limit_threads()                    # before Keras is imported
    info = devices.describe_device()           # recorded in config.json, shown on the page
    policy = devices.set_precision(config.mixed_precision)
    scope, global_batch = devices.distribution(config.batch_size)
    with scope:
        model = build_model()                  # variables are placed by the scope
        model.compile(..., jit_compile=devices.jit_compile_default())
        model.fit(x, y, batch_size=global_batch)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from retrain.errors import ConfigError

BACKENDS = ("tensorflow", "jax", "torch")
PRECISION_CHOICES = ("off", "auto", "mixed_float16", "mixed_bfloat16")

# Keras policy names behind the user-facing choices ("off" is plain float32).
_KERAS_POLICY = {
    "off": "float32",
    "mixed_float16": "mixed_float16",
    "mixed_bfloat16": "mixed_bfloat16",
}


@dataclass(frozen=True)
class _Hardware:
    """What the active backend sees: the accelerator (if any) and how many devices."""

    backend: str
    platform: str  # "cpu" | "gpu" | "tpu" | "mps"
    name: str  # "CPU" or the accelerator's name, e.g. "NVIDIA H100 80GB HBM3"
    count: int  # devices of that platform the backend will train on
    memory_gb: float | None  # per device; host RAM for the CPU
    compute_capability: tuple[int, int] | None  # CUDA (major, minor), None elsewhere


def backend() -> str:
    """Return the Keras backend in use: "tensorflow", "jax" or "torch".

    When Keras is already imported its answer is returned. Otherwise the backend is resolved
    the way Keras will resolve it, without importing anything: ``$KERAS_BACKEND``, then the
    ``backend`` key of ``$KERAS_HOME/keras.json`` (``~/.keras/keras.json``), then
    "tensorflow". That keeps this cheap for the dashboard, which must not import a framework.
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return str(keras.backend.backend())
    name = os.environ.get("KERAS_BACKEND", "")
    if not name:
        name = _backend_from_keras_json()
    return name or "tensorflow"


def _backend_from_keras_json() -> str:
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        keras_dir = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(keras_dir, "keras.json")) as f:
            return str(json.load(f).get("backend", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def describe_device() -> dict[str, Any]:
    """Describe the hardware the active backend trains on.

    Only the active backend's framework is imported (TensorFlow, JAX or PyTorch), so this works
    on a JAX-only GPU host. The result is recorded in a run's ``config.json`` and shown on the
    Train page.

    Returns:
        ``{"backend", "device", "devices", "memory_gb", "accelerator"}``: ``device`` is "CPU" or
        the accelerator's name (e.g. "NVIDIA H200"), ``devices`` how many of them the backend
        will use, ``memory_gb`` the memory of one accelerator (host RAM on CPU; None when it
        cannot be read), ``accelerator`` whether training runs on a GPU/TPU.
    """
    hw = _hardware()
    return {
        "backend": hw.backend,
        "device": hw.name,
        "devices": hw.count,
        "memory_gb": hw.memory_gb,
        "accelerator": hw.platform != "cpu",
    }


def _hardware() -> _Hardware:
    return _probe(backend())


@functools.lru_cache(maxsize=4)
def _probe(name: str) -> _Hardware:
    """Ask the backend's framework once per process; devices do not change during a run."""
    if name == "jax":
        return _probe_jax()
    if name == "torch":
        return _probe_torch()
    if name == "tensorflow":
        return _probe_tensorflow()
    raise ConfigError(
        f"Unknown Keras backend '{name}'. Set KERAS_BACKEND to one of: {', '.join(BACKENDS)}."
    )


def _probe_jax() -> _Hardware:
    import jax

    devices = jax.devices()  # the default platform: GPU/TPU when present, else CPU
    first = devices[0]
    platform = "gpu" if first.platform in ("gpu", "cuda", "rocm") else first.platform
    if platform == "cpu":
        return _Hardware("jax", "cpu", "CPU", len(devices), _host_memory_gb(), None)
    memory = _nvidia_smi_memory_gb(0) if platform == "gpu" else None
    if memory is None:
        with contextlib.suppress(Exception):  # memory_stats is optional per platform
            stats = first.memory_stats() or {}
            if stats.get("bytes_limit"):
                memory = round(stats["bytes_limit"] / 2**30, 1)
    capability = _parse_capability(getattr(first, "compute_capability", None))
    name = str(getattr(first, "device_kind", "") or platform.upper())
    return _Hardware("jax", platform, name, len(devices), memory, capability)


def _probe_torch() -> _Hardware:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return _Hardware(
            "torch",
            "gpu",
            str(props.name),
            torch.cuda.device_count(),
            round(props.total_memory / 2**30, 1),
            (int(props.major), int(props.minor)),
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return _Hardware("torch", "mps", "Apple MPS", 1, None, None)
    return _Hardware("torch", "cpu", "CPU", 1, _host_memory_gb(), None)


def _probe_tensorflow() -> _Hardware:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        # Logical CPUs: 1 unless the process split the CPU into virtual devices (tests do).
        count = len(tf.config.list_logical_devices("CPU"))
        return _Hardware("tensorflow", "cpu", "CPU", max(count, 1), _host_memory_gb(), None)
    details: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # details are best effort on exotic builds
        details = tf.config.experimental.get_device_details(gpus[0])
    name = str(details.get("device_name") or "GPU")
    capability = _parse_capability(details.get("compute_capability"))
    return _Hardware("tensorflow", "gpu", name, len(gpus), _nvidia_smi_memory_gb(0), capability)


def _parse_capability(value: Any) -> tuple[int, int] | None:
    """Read a CUDA compute capability given as (8, 0), "8.0" or "9.0a"."""
    if value is None:
        return None
    try:
        if isinstance(value, (tuple, list)):
            return int(value[0]), int(value[1])
        major, _, minor = str(value).partition(".")
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except (ValueError, IndexError):
        return None


def _nvidia_smi_memory_gb(index: int) -> float | None:
    """Total memory of visible GPU ``index`` from nvidia-smi (TF and JAX expose no total).

    nvidia-smi numbers GPUs physically and ignores ``CUDA_VISIBLE_DEVICES``, so the visible
    index is mapped through that variable when it lists numbers.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if index < len(visible) and visible[index].isdigit():
        index = int(visible[index])
    try:
        out = subprocess.run(
            [exe, f"--id={index}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return round(float(out.stdout.strip().splitlines()[0]) / 1024, 1)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _host_memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def resolve_precision(policy: str) -> str:
    """Return the Keras dtype policy that ``policy`` means on this device, without applying it.

    "auto" picks what is fastest and safe here:

    - no accelerator -> "float32" (CPUs gain nothing from float16/bfloat16 in Keras fits);
    - TensorFlow on CUDA -> "mixed_float16" (Tensor Cores since Volta; Keras adds loss scaling);
    - JAX or PyTorch on an Ampere or newer GPU (A100, RTX 30xx, L4, H100, H200: compute
      capability >= 8.0), or a TPU -> "mixed_bfloat16": same Tensor Core speed as float16 but
      float32's range, so no loss scaling and no overflow;
    - JAX or PyTorch on an older GPU -> "mixed_float16"; Apple MPS -> "float32".

    Args:
        policy: "off" | "auto" | "mixed_float16" | "mixed_bfloat16".

    Returns:
        "float32", "mixed_float16" or "mixed_bfloat16".

    Raises:
        ConfigError: ``policy`` is not one of the choices.
    """
    if policy not in PRECISION_CHOICES:
        raise ConfigError(
            f"Unknown mixed precision '{policy}'. Choose one of: {', '.join(PRECISION_CHOICES)}."
        )
    if policy != "auto":
        return _KERAS_POLICY[policy]
    hw = _hardware()
    if hw.platform == "tpu":
        return "mixed_bfloat16"
    if hw.platform != "gpu":
        return "float32"
    if hw.backend == "tensorflow":
        return "mixed_float16"
    if hw.compute_capability is not None and hw.compute_capability >= (8, 0):
        return "mixed_bfloat16"
    return "mixed_float16"


def set_precision(policy: str) -> str:
    """Apply a mixed-precision choice as Keras's global dtype policy.

    Call it before the model is built: layers take the global policy when they are created.
    Under a mixed policy layers compute in float16/bfloat16 and keep float32 weights; the
    model's output layer must stay float32 (``retrain.models.surgery`` builds it with
    ``dtype="float32"``), and Keras wraps the optimizer in loss scaling for float16 itself.
    An explicit "mixed_float16"/"mixed_bfloat16" is applied as asked, even on a CPU (where it
    is slower; a warning says so).

    Args:
        policy: "off" | "auto" | "mixed_float16" | "mixed_bfloat16" (see `resolve_precision`).

    Returns:
        The Keras policy name applied: "float32", "mixed_float16" or "mixed_bfloat16".

    Raises:
        ConfigError: ``policy`` is not one of the choices.
    """
    name = resolve_precision(policy)
    if policy != "auto" and name != "float32" and _hardware().platform == "cpu":
        warnings.warn(
            f"Mixed precision '{name}' on a CPU is usually slower than float32; "
            "use 'auto' or 'off' unless you are testing.",
            stacklevel=2,
        )
    import keras

    keras.mixed_precision.set_global_policy(name)
    return name


def jit_compile_default() -> bool | str:
    """What to pass as ``jit_compile`` to ``model.compile`` on this backend and device.

    Keras 3's own default, "auto", turns XLA on for JAX (always) and for TensorFlow when a GPU
    is visible and no ``tf.distribute`` strategy is active, and keeps PyTorch eager.

    - JAX, any device -> True: every JAX step is XLA-compiled anyway; asking for it explicitly
      documents it and fails loudly instead of silently falling back.
    - TensorFlow with one GPU -> True: XLA fuses the elementwise work around convolutions
      (issue 7's H200 reference figures for MobileNetV2 fine-tuning on JAX: about 3,000
      images/s without explicit jit, 4,800 with it).
    - TensorFlow on CPU or with several GPUs (MirroredStrategy) -> "auto": XLA on CPU is rarely
      faster and compiles slowly, and Keras disables XLA under ``tf.distribute``.
    - PyTorch -> "auto" (eager): True would mean ``torch.compile``, which costs minutes of
      compilation per model and is often slower for the short runs this dashboard does.
    """
    hw = _hardware()
    if hw.backend == "jax":
        return True
    if hw.backend == "tensorflow" and hw.platform == "gpu" and hw.count == 1:
        return True
    return "auto"


def distribution(batch_size: int) -> tuple[contextlib.AbstractContextManager, int]:
    """Data-parallel training over every visible device, chosen automatically.

    - Several devices, JAX: a ``keras.distribution.DataParallel`` over all of them is set as
      Keras's global distribution (so a ``fit`` outside the context is distributed too), and
      the returned context is its scope: variables created inside are replicated on every
      device, each batch is split along its first axis.
    - Several devices, TensorFlow: a ``tf.distribute.MirroredStrategy`` over the GPUs (or the
      logical CPUs when a process split its CPU into several); the returned context is its
      ``scope()``, and the model must be built and compiled inside it.
    - One device, or PyTorch (Keras's ``fit`` has no multi-GPU path there): a null context.

    Build (or load) the model, compile it and fit it inside the returned context; it may be
    entered as often as needed (build, then compile and fit for each phase). Keep
    ``batch_size`` per device: each device sees that many images per step, the same memory
    and BatchNorm statistics as a single-device run, and the step processes
    ``batch_size * devices`` images. Scale the learning rate yourself if you want the same
    per-image update size.

    Args:
        batch_size: images per device per step (>= 1).

    Returns:
        (context manager, global batch size = batch_size x number of devices).

    Raises:
        ConfigError: ``batch_size`` is not a positive integer.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"Batch size must be a positive integer, got {batch_size!r}.")
    hw = _hardware()
    if hw.count <= 1 or hw.backend == "torch":
        return contextlib.nullcontext(), batch_size
    if hw.backend == "jax":
        import keras

        data_parallel = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
        keras.distribution.set_distribution(data_parallel)
        return _ReusableScope(data_parallel.scope), batch_size * hw.count
    import tensorflow as tf

    kind = "GPU" if hw.platform == "gpu" else "CPU"
    names = [d.name for d in tf.config.list_logical_devices(kind)]
    strategy = tf.distribute.MirroredStrategy(devices=names)
    return _ReusableScope(strategy.scope), batch_size * strategy.num_replicas_in_sync


class _ReusableScope(contextlib.AbstractContextManager):
    """A context that can be entered again and again (build, compile and fit each enter it).

    Keras's ``Distribution.scope()`` is a one-shot generator context; this makes a fresh one
    for every ``with``.
    """

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._active: list[contextlib.AbstractContextManager] = []

    def __enter__(self) -> Any:
        context = self._factory()
        value = context.__enter__()
        self._active.append(context)
        return value

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self._active.pop().__exit__(*exc_info)


def worker_threads() -> int:
    """CPU threads for a training worker: all allowed cores but one (kept for the dashboard)."""
    return max(1, len(_allowed_cpus()) - 1)


def limit_threads(n: int | None = None, *, pin: bool = True) -> int:
    """Cap the CPU threads a training process uses, so the dashboard beside it stays responsive.

    Safe to call before any framework is imported (the usual case: first thing in the worker).
    It sets the environment the frameworks read at start-up (``TF_NUM_INTRAOP_THREADS``,
    ``TF_NUM_INTEROP_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``) and, on Linux, pins the process to ``n`` of its CPUs. The pinning
    is what caps JAX: XLA's CPU backend sizes its thread pools from the schedulable CPUs and has
    no thread-count flag (``--xla_cpu_multi_thread_eigen=false`` no longer limits its matmuls;
    measured here with jaxlib 0.10.2). When TensorFlow or PyTorch are already imported their
    thread settings are applied too, where the runtime still allows it (TensorFlow fixes its
    pools when it first runs an op).

    Args:
        n: threads for the process; None = all cores but one (at least 1), which leaves a core
            for the Streamlit server.
        pin: also pin the process to ``n`` CPUs (training workers). Model workers cap their
            threads only: pinned, two of them and a training run would share one core while
            the other sat idle.

    Returns:
        The thread count applied.

    Raises:
        ConfigError: ``n`` is not a positive integer.
    """
    allowed = _allowed_cpus()
    if n is None:
        n = worker_threads()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"Thread count must be a positive integer, got {n!r}.")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(n)
    # Inter-op runs independent ops side by side; two are plenty for a feed-forward CNN.
    os.environ["TF_NUM_INTEROP_THREADS"] = str(min(n, 2))
    if pin and hasattr(os, "sched_setaffinity") and n < len(allowed):
        # The highest-numbered CPUs: the server and the shell usually start on CPU 0.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(allowed[-n:]))
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "config"):
        with contextlib.suppress(RuntimeError):  # the runtime is already initialised
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    return n


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def gpu_defaults() -> dict[str, Any]:
    """Suggested batch size, precision and jit for the current device.

    The choices, for a MobileNet/EfficientNet-sized model at 224x224 fed uint8 images with the
    preprocessing inside the model (``input_dtype`` is always "uint8": a quarter of the
    host-to-device bytes of float32, and rescaling on the device is free):

    - CPU: batch 32 and float32 - larger batches only add memory on a CPU, and mixed
      precision is slower there.
    - GPU with >= 40 GB (A100, H100, H200 class): batch 256 per device with "auto" precision
      (mixed_bfloat16 on JAX/PyTorch, mixed_float16 on TensorFlow). The issue's H200 reference
      figures: float32 batch 64 about 4,800 images/s; uint8 batch 256 7,400; + mixed_bfloat16
      10,250.
    - GPU with >= 16 GB: batch 128; smaller or unknown GPU memory: batch 64; "auto" precision.

    Returns:
        ``{"batch_size", "precision", "jit_compile", "input_dtype", "device", "reason"}``;
        ``batch_size`` is per device (see `distribution`), ``precision`` a value for
        `set_precision` ("off" on CPU, else the resolved "mixed_float16"/"mixed_bfloat16"),
        ``reason`` one line for the page.
    """
    hw = _hardware()
    jit = jit_compile_default()
    if hw.platform == "cpu":
        return {
            "batch_size": 32,
            "precision": "off",
            "jit_compile": jit,
            "input_dtype": "uint8",
            "device": hw.name,
            "reason": "CPU: batch 32 in float32; mixed precision only pays off on a GPU.",
        }
    memory = hw.memory_gb or 0.0
    batch = 256 if memory >= 40 else 128 if memory >= 16 else 64
    precision = resolve_precision("auto")
    if precision == "float32":
        precision = "off"
    return {
        "batch_size": batch,
        "precision": precision,
        "jit_compile": jit,
        "input_dtype": "uint8",
        "device": hw.name,
        "reason": (
            f"{hw.name}: batch {batch} per device with {precision}, uint8 input preprocessed "
            "on the device, XLA on: keeps the accelerator busy."
        ),
    }
