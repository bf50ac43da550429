"""TF.js Layers export: ``model.json`` + binary weight shards that ``tf.loadLayersModel`` reads.

The ``tensorflowjs`` pip package cannot be installed beside TensorFlow 2.21, so the format is
written here from the Keras 3 model: a Keras-2-style topology (``class_name``/``config``/
``inbound_nodes``, as tfjs-layers deserialises it) and a weights manifest (float32
little-endian, shards of at most 4 MB).

The Keras graph is flattened into one functional graph (nested models inlined, layer names
kept where unique). Where a Keras 3 piece has no TF.js Layers twin it is rewritten with the
same numeric effect:

- the uint8 image input becomes a float32 input holding the same 0-255 pixel values;
  casts and ``Rescaling(1.0)`` (uint8 -> float) disappear;
- a ``Resizing`` right after the input moves out of the model (tfjs's Resizing layer uses
  corner-aligned sampling, unlike Keras): the TF.js model takes images at the resized size,
  recorded in ``userDefinedMetadata.input``;
- ``Normalization`` becomes a 1x1 ``DepthwiseConv2D`` (x / std - mean / std per channel);
- ``x * c``, ``x + c``, ``x - c``, ``x / c`` with a number ``c`` become ``Rescaling``;
- random augmentation layers (identity at inference) disappear.

Anything else without a TF.js equivalent raises `ConfigError` naming the layer.

The check runs the files in real TF.js: `run_in_tfjs` loads ``model.json`` over HTTP with
``tf.loadLayersModel`` in Node (``@tensorflow/tfjs`` pinned to `TFJS_VERSION`, pure JS CPU
backend), installed once by `ensure_tfjs` into a cache folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import ConfigError

TFJS_VERSION = "4.22.0"
SHARD_BYTES = 4 * 1024 * 1024
MODEL_FILE = "model.json"
NPM_TIMEOUT_S = 600
RUN_TIMEOUT_S = 600

# Keras 3 activation names -> tfjs-layers names (only those with the same formula).
_ACTIVATIONS = {
    "linear": "linear",
    "relu": "relu",
    "relu6": "relu6",
    "sigmoid": "sigmoid",
    "softmax": "softmax",
    "tanh": "tanh",
    "elu": "elu",
    "selu": "selu",
    "softplus": "softplus",
    "softsign": "softsign",
    "swish": "swish",
    "silu": "swish",
    "mish": "mish",
}
# Layers that compute nothing at inference time.
_IDENTITY_LAYERS = {
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomContrast",
    "RandomTranslation",
    "RandomBrightness",
    "RandomCrop",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
}
_MERGES = {
    "Add": "Add",
    "Multiply": "Multiply",
    "Subtract": "Subtract",
    "Average": "Average",
    "Maximum": "Maximum",
    "Minimum": "Minimum",
}


def tfjs_name(name: str) -> str:
    """``name`` as TF.js accepts layer and weight names: ``[A-Za-z0-9][-A-Za-z0-9._]*``."""
    name = re.sub(r"[^-A-Za-z0-9._]", "_", str(name)) or "layer"
    return name if name[0].isalnum() else "l" + name


def _np(value: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float32)


def _unsupported(layer: Any, why: str = "") -> ConfigError:
    return ConfigError(
        f"Layer '{getattr(layer, 'name', layer)}' ({type(layer).__name__}{why}) has no TF.js "
        "Layers equivalent; export onnx or tflite for this model instead."
    )


class _Flattener:
    """Walk a Keras 3 model (nested models inlined) and emit TF.js layer entries and weights."""

    def __init__(self) -> None:
        self.layers: list[dict] = []
        self.weights: list[tuple[str, np.ndarray]] = []
        self.names: set[str] = set()
        self.refs: dict[int, list] = {}  # id(KerasTensor) -> [tfjs layer name, node, tensor]
        self.input_entry: dict | None = None
        self.input_ref: list | None = None
        self.resize: dict | None = None

    # -- bookkeeping ------------------------------------------------------------------
    def unique(self, name: str) -> str:
        name = tfjs_name(name)
        new, i = name, 1
        while new in self.names:
            new = f"{name}_{i}"
            i += 1
        self.names.add(new)
        return new

    def emit(
        self,
        class_name: str,
        name: str,
        config: dict,
        inbound: list[list],
        weights: dict[str, np.ndarray] | None = None,
    ) -> list:
        name = self.unique(name)
        entry = {
            "class_name": class_name,
            "config": {"name": name, "trainable": False, "dtype": "float32", **config},
            "name": name,
            "inbound_nodes": [[[ref[0], ref[1], ref[2], {}] for ref in inbound]],
        }
        self.layers.append(entry)
        for weight_name, value in (weights or {}).items():
            self.weights.append((f"{name}/{weight_name}", np.asarray(value, np.float32)))
        return [name, 0, 0]

    def add_input(self, tensor: Any) -> None:
        shape = [None, *[int(d) if d is not None else None for d in tensor.shape[1:]]]
        name = self.unique(getattr(tensor, "name", None) or "image")
        self.input_entry = {
            "class_name": "InputLayer",
            "config": {
                "batch_input_shape": shape,
                "dtype": "float32",
                "sparse": False,
                "name": name,
            },
            "name": name,
            "inbound_nodes": [],
        }
        self.layers.append(self.input_entry)
        self.input_ref = [name, 0, 0]
        self.refs[id(tensor)] = self.input_ref

    # -- graph walk -------------------------------------------------------------------
    def run(self, model: Any, inputs: list[list]) -> list[list]:
        """Inline ``model`` with its inputs bound to ``inputs`` (refs); return output refs."""
        import keras

        if isinstance(model, keras.Sequential):
            ref = inputs
            for layer in model.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                ref = self.call(layer, ref, [], {})
            return ref
        for tensor, ref in zip(model.inputs, inputs, strict=True):
            self.refs[id(tensor)] = ref
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(t) not in self.refs for t in node.input_tensors):
                    continue
                ins = [self.refs[id(t)] for t in node.input_tensors]
                outs = self.call(node.operation, ins, node.arguments.args, node.arguments.kwargs)
                for tensor, ref in zip(node.outputs, outs, strict=True):
                    self.refs[id(tensor)] = ref
        return [self.refs[id(t)] for t in model.outputs]

    def call(self, op: Any, ins: list[list], args: tuple, kwargs: dict) -> list[list]:
        from retrain.models.keras_helpers import is_model

        if is_model(op):
            return self.run(op, ins)
        return [self.convert(op, ins, args)]

    def convert(self, op: Any, ins: list[list], args: tuple) -> list:  # noqa: C901, PLR0911, PLR0912
        """Emit the TF.js layer(s) for one Keras layer or op call; return the output ref."""
        import keras

        kind = type(op).__name__
        name = getattr(op, "name", kind.lower())
        if not isinstance(op, keras.layers.Layer):
            return self.convert_op(op, kind, ins, args)
        cfg = op.get_config()
        x = ins[0] if ins else None
        w = {v.name: _np(v) for v in op.weights}
        if (cfg.get("data_format") or "channels_last") != "channels_last":
            raise _unsupported(op, ", channels_first")
        if kind in _IDENTITY_LAYERS or kind == "Dropout" and not cfg.get("rate"):
            return x
        if kind == "Rescaling":
            scale, offset = cfg.get("scale", 1.0), cfg.get("offset", 0.0)
            if not np.isscalar(scale) or not np.isscalar(offset):
                raise _unsupported(op, " with per-channel scale")
            if float(scale) == 1.0 and float(offset) == 0.0:
                return x  # uint8 -> float only: the TF.js input is float already
            return self.emit("Rescaling", name, {"scale": scale, "offset": offset}, [x])
        if kind == "Resizing":
            return self.lift_resize(op, cfg, x)
        if kind == "Normalization":
            return self.normalization(op, cfg, x)
        if kind == "Conv2D":
            if cfg.get("groups", 1) != 1:
                raise _unsupported(op, f" with groups={cfg['groups']}")
            config = {
                "filters": cfg["filters"],
                **self.conv_config(op, cfg),
            }
            return self.emit("Conv2D", name, config, [x], self.bias(w, {"kernel": w["kernel"]}))
        if kind == "DepthwiseConv2D":
            config = {"depth_multiplier": cfg["depth_multiplier"], **self.conv_config(op, cfg)}
            weights = self.bias(w, {"depthwise_kernel": w["kernel"]})
            return self.emit("DepthwiseConv2D", name, config, [x], weights)
        if kind == "SeparableConv2D":
            config = {
                "filters": cfg["filters"],
                "depth_multiplier": cfg["depth_multiplier"],
                **self.conv_config(op, cfg),
            }
            weights = self.bias(
                w,
                {
                    "depthwise_kernel": w["depthwise_kernel"],
                    "pointwise_kernel": w["pointwise_kernel"],
                },
            )
            return self.emit("SeparableConv2D", name, config, [x], weights)
        if kind == "Dense":
            config = {
                "units": cfg["units"],
                "activation": self.activation(op, cfg.get("activation")),
                "use_bias": cfg["use_bias"],
            }
            return self.emit("Dense", name, config, [x], self.bias(w, {"kernel": w["kernel"]}))
        if kind == "BatchNormalization":
            if cfg.get("renorm"):
                raise _unsupported(op, " with renorm")
            axis = cfg.get("axis", -1)
            axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
            config = {
                "axis": axis,
                "momentum": cfg.get("momentum", 0.99),
                "epsilon": cfg.get("epsilon", 1e-3),
                "center": cfg.get("center", True),
                "scale": cfg.get("scale", True),
            }
            weights = {
                k: w[k] for k in ("gamma", "beta", "moving_mean", "moving_variance") if k in w
            }
            return self.emit("BatchNormalization", name, config, [x], weights)
        if kind == "LayerNormalization":
            if cfg.get("rms_scaling"):
                raise _unsupported(op, " with rms_scaling")
            config = {
                "axis": cfg.get("axis", -1),
                "epsilon": cfg.get("epsilon", 1e-3),
                "center": cfg.get("center", True),
                "scale": cfg.get("scale", True),
            }
            weights = {k: w[k] for k in ("gamma", "beta") if k in w}
            return self.emit("LayerNormalization", name, config, [x], weights)
        if kind == "ReLU":
            max_value, slope = cfg.get("max_value"), cfg.get("negative_slope") or 0.0
            if cfg.get("threshold"):
                raise _unsupported(op, " with a threshold")
            if slope and max_value is not None:
                raise _unsupported(op, " with both max_value and negative_slope")
            if slope:
                return self.emit("LeakyReLU", name, {"alpha": slope}, [x])
            return self.emit("ReLU", name, {"max_value": max_value}, [x])
        if kind == "LeakyReLU":
            slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
            return self.emit("LeakyReLU", name, {"alpha": slope}, [x])
        if kind == "ELU":
            return self.emit("ELU", name, {"alpha": cfg.get("alpha", 1.0)}, [x])
        if kind == "Softmax":
            axis = cfg.get("axis", -1)
            return self.emit("Softmax", name, {"axis": axis}, [x])
        if kind == "Activation":
            activation = self.activation(op, cfg.get("activation"))
            return self.emit("Activation", name, {"activation": activation}, [x])
        if kind in _MERGES:
            return self.emit(_MERGES[kind], name, {}, ins)
        if kind == "Concatenate":
            return self.emit("Concatenate", name, {"axis": cfg.get("axis", -1)}, ins)
        if kind == "ZeroPadding2D":
            return self.emit("ZeroPadding2D", name, {"padding": cfg["padding"]}, [x])
        if kind == "Cropping2D":
            return self.emit("Cropping2D", name, {"cropping": cfg["cropping"]}, [x])
        if kind in ("MaxPooling2D", "AveragePooling2D"):
            config = {
                "pool_size": cfg["pool_size"],
                "strides": cfg.get("strides") or cfg["pool_size"],
                "padding": cfg.get("padding", "valid"),
                "data_format": "channels_last",
            }
            return self.emit(kind, name, config, [x])
        if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            out = self.emit(kind, name, {"data_format": "channels_last"}, [x])
            if cfg.get("keepdims"):
                channels = int(op.output.shape[-1])
                out = self.emit(
                    "Reshape", f"{name}_keepdims", {"target_shape": [1, 1, channels]}, [out]
                )
            return out
        if kind in ("GlobalAveragePooling1D", "GlobalMaxPooling1D") and not cfg.get("keepdims"):
            return self.emit(kind, name, {}, [x])
        if kind == "Flatten":
            return self.emit("Flatten", name, {}, [x])
        if kind == "Reshape":
            return self.emit("Reshape", name, {"target_shape": list(cfg["target_shape"])}, [x])
        if kind == "Dropout":
            return self.emit("Dropout", name, {"rate": cfg["rate"]}, [x])
        if kind == "UpSampling2D" and cfg.get("interpolation", "nearest") == "nearest":
            return self.emit("UpSampling2D", name, {"size": cfg["size"]}, [x])
        raise _unsupported(op)

    def conv_config(self, op: Any, cfg: dict) -> dict:
        return {
            "kernel_size": cfg["kernel_size"],
            "strides": cfg["strides"],
            "padding": cfg["padding"],
            "data_format": "channels_last",
            "dilation_rate": cfg.get("dilation_rate", [1, 1]),
            "activation": self.activation(op, cfg.get("activation")),
            "use_bias": cfg["use_bias"],
        }

    @staticmethod
    def bias(weights: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict:
        if "bias" in weights:
            out["bias"] = weights["bias"]
        return out

    @staticmethod
    def activation(op: Any, activation: Any) -> str:
        if activation is None:
            return "linear"
        if isinstance(activation, dict):
            activation = activation.get("config", {}).get("name", activation.get("class_name"))
        if activation not in _ACTIVATIONS:
            raise _unsupported(op, f", activation '{activation}'")
        return _ACTIVATIONS[activation]

    def lift_resize(self, op: Any, cfg: dict, x: list) -> list:
        """A Resizing right after the input moves out: the TF.js model takes resized images."""
        plain = not cfg.get("crop_to_aspect_ratio") and not cfg.get("pad_to_aspect_ratio")
        interpolation = cfg.get("interpolation", "bilinear")
        if x != self.input_ref or self.resize is not None or not plain:
            raise _unsupported(op, " not directly after the input")
        if interpolation not in ("bilinear", "nearest") or cfg.get("antialias"):
            raise _unsupported(op, f", interpolation '{interpolation}'")
        height, width = int(cfg["height"]), int(cfg["width"])
        shape = self.input_entry["config"]["batch_input_shape"]
        self.resize = {
            "from": [shape[1], shape[2]],
            "to": [height, width],
            "interpolation": interpolation,
        }
        self.input_entry["config"]["batch_input_shape"] = [None, height, width, shape[3]]
        return x

    def normalization(self, op: Any, cfg: dict, x: list) -> list:
        """(x - mean) / max(std, eps) per channel, as a 1x1 DepthwiseConv2D."""
        import keras

        axis = cfg.get("axis", -1)
        axis = list(axis) if isinstance(axis, list | tuple) else [axis]
        if cfg.get("invert") or axis not in ([-1], [3]) or len(op.input.shape) != 4:
            raise _unsupported(op, " other than per-channel on images")
        channels = int(op.input.shape[-1])
        mean = np.broadcast_to(_np(op.mean).reshape(-1), (channels,)).astype(np.float64)
        var = np.broadcast_to(_np(op.variance).reshape(-1), (channels,)).astype(np.float64)
        std = np.maximum(np.sqrt(var), keras.config.epsilon())
        config = {
            "kernel_size": [1, 1],
            "strides": [1, 1],
            "padding": "valid",
            "depth_multiplier": 1,
            "data_format": "channels_last",
            "dilation_rate": [1, 1],
            "activation": "linear",
            "use_bias": True,
        }
        weights = {
            "depthwise_kernel": (1.0 / std).reshape(1, 1, channels, 1),
            "bias": -mean / std,
        }
        return self.emit("DepthwiseConv2D", op.name, config, [x], weights)

    def convert_op(self, op: Any, kind: str, ins: list[list], args: tuple) -> list:
        """A Keras op in the graph (``x * 2.0``, ``ops.cast``): map what TF.js can express."""
        name = getattr(op, "name", None) or kind.lower()
        if kind == "Cast":
            if "float" not in str(getattr(op, "dtype", "")):
                raise _unsupported(op, f" to {getattr(op, 'dtype', '?')}")
            return ins[0]
        if kind in ("Add", "Subtract", "Multiply", "Divide", "TrueDivide") and len(args) == 2:
            numbers = [a for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
            if len(ins) == 2 and not numbers and kind in _MERGES:
                return self.emit(_MERGES[kind], name, {}, ins)
            if len(ins) == 1 and len(numbers) == 1:
                c = float(numbers[0])
                first = isinstance(args[0], int | float)
                if kind == "Add":
                    scale, offset = 1.0, c
                elif kind == "Multiply":
                    scale, offset = c, 0.0
                elif kind == "Subtract":
                    scale, offset = (-1.0, c) if first else (1.0, -c)
                elif not first and c != 0:
                    scale, offset = 1.0 / c, 0.0
                else:
                    raise _unsupported(op, " dividing by a tensor")
                return self.emit("Rescaling", name, {"scale": scale, "offset": offset}, ins)
        raise _unsupported(op, " (a Keras op)")


def _shards(weights: list[tuple[str, np.ndarray]]) -> tuple[list[dict], bytes]:
    specs = [{"name": n, "shape": list(v.shape), "dtype": "float32"} for n, v in weights]
    data = b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for _, v in weights)
    return specs, data


def write_tfjs(model: Any, folder: str | Path, metadata: dict | None = None) -> dict[str, Any]:
    """Write ``model`` as a TF.js Layers model: ``folder/model.json`` + ``group1-shard*.bin``.

    Args:
        model: a Keras 3 model with one image input and one output.
        folder: the output folder (replaced).
        metadata: extra JSON kept in ``userDefinedMetadata`` (e.g. class names).

    Returns:
        The input the TF.js model takes: ``{"shape": [H, W, C], "dtype": "float32",
        "range": [0, 255], "resize": None | {"from", "to", "interpolation"}}``.

    Raises:
        ConfigError: a layer without a TF.js Layers equivalent, or several inputs/outputs.
    """
    import keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(
            "The TF.js export handles models with one image input and one output; this model "
            f"has {len(model.inputs)} inputs and {len(model.outputs)} outputs."
        )
    flat = _Flattener()
    flat.add_input(model.inputs[0])
    [out] = flat.run(model, [flat.input_ref])
    if out == flat.input_ref:
        raise ConfigError("The model computes nothing from its input; nothing to export.")
    specs, data = _shards(flat.weights)
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    count = max(1, -(-len(data) // SHARD_BYTES))
    paths = [f"group1-shard{i + 1}of{count}.bin" for i in range(count)]
    for i, path in enumerate(paths):
        (folder / path).write_bytes(data[i * SHARD_BYTES : (i + 1) * SHARD_BYTES])
    shape = flat.input_entry["config"]["batch_input_shape"][1:]
    spec = {"shape": shape, "dtype": "float32", "range": [0, 255], "resize": flat.resize}
    model_json = {
        "format": "layers-model",
        "generatedBy": f"keras v{keras.__version__}",
        "convertedBy": "Retrain Studio (retrain.export.export_tfjs)",
        "modelTopology": {
            "keras_version": keras.__version__,
            "backend": "tensorflow",
            "model_config": {
                "class_name": "Model",
                "config": {
                    "name": tfjs_name(model.name),
                    "layers": flat.layers,
                    "input_layers": [flat.input_ref],
                    "output_layers": [out],
                },
            },
        },
        "weightsManifest": [{"paths": paths, "weights": specs}],
        "userDefinedMetadata": {"input": spec, **(metadata or {})},
    }
    (folder / MODEL_FILE).write_text(json.dumps(model_json))
    return spec


def resize_for_tfjs(images: np.ndarray, spec: dict) -> np.ndarray:
    """Images as the TF.js model takes them: float32, resized when the Keras model resized.

    Uses the same resize as the Keras model's Resizing layer (Keras's own ops), so a check
    compares the models, not two resizers.
    """
    images = np.asarray(images, dtype=np.float32)
    resize = spec.get("resize")
    if not resize:
        return images
    import keras

    return _np(
        keras.ops.image.resize(
            images, tuple(resize["to"]), interpolation=resize["interpolation"], antialias=False
        )
    )


# --- Running a TF.js model in Node -------------------------------------------------------


def tfjs_cache_dir() -> Path:
    """Where `ensure_tfjs` keeps ``node_modules/@tensorflow/tfjs`` (``RETRAIN_TFJS_DIR``)."""
    env = os.environ.get("RETRAIN_TFJS_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
        f"retrain-studio/tfjs-{TFJS_VERSION}"
    )


def ensure_tfjs(install: bool = True) -> Path:
    """The folder whose ``node_modules`` holds ``@tensorflow/tfjs`` `TFJS_VERSION`.

    Installs it there with npm the first time (into a temporary folder, then renamed, so
    concurrent callers never see half an install).

    Raises:
        ConfigError: Node.js or npm is missing, or the install failed.
    """
    if shutil.which("node") is None:
        raise ConfigError(
            "Checking a TF.js export needs Node.js, which is not installed (apt-get install nodejs npm)."
        )
    folder = tfjs_cache_dir()
    if (folder / "node_modules" / "@tensorflow" / "tfjs" / "package.json").is_file():
        return folder
    npm = shutil.which("npm")
    if not install or npm is None:
        raise ConfigError(
            f"Checking a TF.js export needs @tensorflow/tfjs {TFJS_VERSION} in '{folder}'; "
            "install npm (apt-get install npm) so it can be installed there."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tfjs-", dir=folder.parent))
    try:
        (tmp / "package.json").write_text('{"private": true}')
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--fetch-retries=1",
             f"@tensorflow/tfjs@{TFJS_VERSION}"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )  # fmt: skip
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"Installing @tensorflow/tfjs {TFJS_VERSION} with npm failed: {last}")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "node_modules").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# Serves the model folder over HTTP on 127.0.0.1 and loads it with tf.loadLayersModel, as a
# web page would; reads float32 images (N, H, W, C) from a raw file; prints the outputs.
_NODE_SCRIPT = r"""
const http = require('http'), fs = require('fs'), path = require('path');
const tf = require('@tensorflow/tfjs');
const [dir, imagesPath, shapeJson, outPath] = process.argv.slice(2);
const server = http.createServer((req, res) => {
  const file = path.join(dir, path.basename(decodeURIComponent(req.url.split('?')[0])));
  fs.readFile(file, (err, data) => {
    if (err) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, {'Content-Type': file.endsWith('.json') ? 'application/json'
                                                                : 'application/octet-stream'});
    res.end(data);
  });
});
server.listen(0, '127.0.0.1', async () => {
  try {
    await tf.setBackend('cpu');
    const url = `http://127.0.0.1:${server.address().port}/model.json`;
    const model = await tf.loadLayersModel(url);
    const shape = JSON.parse(shapeJson);
    const buf = fs.readFileSync(imagesPath);
    const all = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
    const per = shape.slice(1).reduce((a, b) => a * b, 1);
    const rows = [];
    for (let i = 0; i < shape[0]; i += 32) {
      const n = Math.min(32, shape[0] - i);
      const x = tf.tensor(all.subarray(i * per, (i + n) * per), [n, ...shape.slice(1)]);
      const y = model.predict(x);
      rows.push(...(await y.array()));
      tf.dispose([x, y]);
    }
    fs.writeFileSync(outPath, JSON.stringify({outputs: rows, backend: tf.getBackend(),
                                              version: tf.version.tfjs}));
  } catch (err) {
    console.error(String(err && err.message || err).split('\n')[0]);
    process.exitCode = 1;
  } finally {
    server.close();
  }
});
"""


def run_in_tfjs(folder: str | Path, images: np.ndarray, tfjs_dir: str | Path | None = None) -> dict:
    """Load ``folder/model.json`` with ``tf.loadLayersModel`` in Node and predict ``images``.

    ``images`` must already be what the TF.js model takes (see `resize_for_tfjs`).

    Returns:
        ``{"outputs": float32 array, "backend": "cpu", "version": "4.22.0"}``.

    Raises:
        ConfigError: Node/TF.js missing, or TF.js failed to load or run the model.
    """
    modules = Path(tfjs_dir) if tfjs_dir else ensure_tfjs()
    images = np.ascontiguousarray(images, dtype="<f4")
    with tempfile.TemporaryDirectory(prefix="tfjs-run-") as tmp:
        tmp = Path(tmp)
        (tmp / "run.js").write_text(_NODE_SCRIPT)
        (tmp / "images.f32").write_bytes(images.tobytes())
        env = {**os.environ, "NODE_PATH": str(modules / "node_modules")}
        proc = subprocess.run(
            ["node", str(tmp / "run.js"), str(Path(folder).resolve()), str(tmp / "images.f32"),
             json.dumps(list(images.shape)), str(tmp / "out.json")],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            env=env,
        )  # fmt: skip
        if proc.returncode != 0 or not (tmp / "out.json").is_file():
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise ConfigError(f"TF.js could not run the model: {(lines or ['no output'])[-1]}")
        result = json.loads((tmp / "out.json").read_text())
    result["outputs"] = np.asarray(result["outputs"], dtype=np.float32)
    return result
