"""`BaseModel` and the small Keras helpers that read a model: layers, shapes, channels, the cut.

Keras is imported inside the functions (`_keras`), so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from retrain.errors import ModelError
from retrain.models import preprocessing

# Layer types that make up a classifier tail (the "original head"), walking back from the end.
_TAIL_FREE = {"Activation", "Softmax", "Dropout", "Flatten", "Reshape"}
_TAIL_OUTPUT = {"Dense", "Conv2D", "EinsumDense"}
_TAIL_MORE = {"Dense", "Dropout", "Activation", "Softmax", "ReLU", "EinsumDense"}


@dataclass
class BaseModel:
    """A loaded base model with what retraining needs to know about it."""

    model: Any  # keras.Model, as loaded, original head included
    spec: str  # the BASE string it came from (re-loadable by load_base)
    name: str  # display name
    input_size: tuple[int, int] | None  # (H, W) the base expects; None = any
    preprocessing: str  # key of retrain.models.preprocessing.REGISTRY
    class_names: list[str] | None  # the original head's classes if known
    suggested_cut: str  # name of the last layer before the classifier
    has_original_head: bool  # whether layers after suggested_cut form a classifier
    # Additive: where the model came from and how it was read (conversion check, guesses).
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Channels of the images the model takes: 1 (grayscale) or 3 (RGB)."""
        return image_channels(self.model)


# --------------------------------------------------------------------------------------
# Keras helpers


def _keras() -> Any:
    """Import Keras late (``import retrain.models`` stays cheap)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


#: The ``class_name`` of a nested model in a saved model config (Keras 2 or 3).
MODEL_CLASS_NAMES = frozenset({"Sequential", "Functional", "Model"})


@contextlib.contextmanager
def variables_made_after() -> Iterator[None]:
    """Inside, layers that build only declare their variables (a `keras.StatelessScope`);
    `make_from` says which value one is to be made from. On leaving, each declared variable
    is made once: from that value, else by its own initializer.

    For a model whose weights are copied in right after it is built (a converted Keras 2
    file, a base replayed under a new head): built the plain way, each variable was filled at
    random first and then overwritten, a third of such a build's time.
    """
    keras = _keras()
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        with keras.StatelessScope():  # leaving it makes all declared variables, in order
            pass


def make_from(variable: Any, value: Any) -> None:
    """Have `variables_made_after` make ``variable`` from ``value`` (an array or a tensor of
    its shape)."""
    variable._initializer = lambda shape, dtype: value  # noqa: ARG005  (Keras calls it so)


def is_model(layer: Any) -> bool:
    """Whether ``layer`` is a nested Functional/Sequential model (a container of layers)."""
    keras = _keras()
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth")
    )


def iter_layers(model: Any, parent: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Yield ``(parent_path, layer)`` for every leaf layer, nested models flattened depth-first.

    Input layers are skipped; ``parent_path`` is ``"outer/inner"`` for nested models, None at
    the top. The position in this sequence is the layer *index* used by cut points.
    """
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if is_model(layer):
            yield from iter_layers(layer, f"{parent}/{layer.name}" if parent else layer.name)
        else:
            yield parent, layer


def output_leaf(model: Any) -> Any:
    """Return the leaf layer that produces ``model``'s (first) output, through nesting."""
    if not is_model(model):
        return model
    if type(model).__name__ == "Sequential":
        return output_leaf(model.layers[-1])
    layer = model.outputs[0]._keras_history[0]
    return output_leaf(layer)


def layer_output_shape(layer: Any) -> list[int | None] | None:
    """The output shape of a layer as a JSON-friendly list (None when ambiguous)."""
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    return list(shape)


def count_params(weights: Any) -> int:
    """The number of scalars in a list of weights (variables or arrays)."""
    total = 0
    for w in weights:
        n = 1
        for d in w.shape:
            n *= int(d)
        total += n
    return total


def _params(layer: Any) -> int:
    return count_params(layer.weights)


def _trainable_params(layer: Any) -> int:
    return count_params(layer.trainable_weights)


#: Channel counts of the images a model may take, with their names in the user's words.
IMAGE_CHANNELS: dict[int, str] = {1: "grayscale", 3: "RGB"}


def _shape_text(shape: Any) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def not_an_image(shape: Any) -> str | None:
    """What an input of ``shape`` (batch dimension first) takes when it is no image input.

    Returns None for ``(batch, height, width, 1 or 3)``, else the words for the message
    "'x' takes <this>", e.g. ``"sequences of shape (None, 60, 1)"``.
    """
    dims = tuple(None if d is None else int(d) for d in shape)
    text = _shape_text(dims)
    if len(dims) == 4 and dims[-1] in IMAGE_CHANNELS:
        return None
    if len(dims) == 2:
        return f"vectors of shape {text}"
    if len(dims) == 3:
        return f"sequences of shape {text}"
    if len(dims) == 4 and dims[1] in IMAGE_CHANNELS:
        return f"channels-first images of shape {text}"
    if len(dims) == 4:
        return f"images with {dims[-1]} channels, shape {text}"
    if len(dims) == 5:
        return f"videos or volumes of shape {text}"
    return f"input of shape {text}"


def not_an_image_error(label: str, kind: str) -> ModelError:
    """The refusal of a model whose input is ``kind`` (from `not_an_image`)."""
    return ModelError(
        f"'{label}' takes {kind}; Retrain Studio retrains image classifiers (input "
        "(height, width, 1) grayscale or (height, width, 3) RGB). Upload an image classifier."
    )


def image_channels(model: Any) -> int:
    """How many channels (1 grayscale, 3 RGB) the images ``model`` takes have."""
    return int(model.inputs[0].shape[-1])


def describe_input(size: tuple[int, int] | list[int] | None, channels: int) -> str:
    """The input in the user's words: ``"28x28 grayscale"``, ``"any size RGB"``."""
    where = f"{size[0]}x{size[1]}" if size else "any size"
    return f"{where} {IMAGE_CHANNELS.get(channels, f'{channels}-channel')}"


def check_image_model(model: Any, label: str) -> tuple[int, int] | None:
    """Check that ``model`` takes one image; return its (H, W) or None when any size.

    Images may be grayscale (1 channel) or RGB (3); `image_channels` says which.

    Raises:
        ModelError: several inputs, not an image input (see `not_an_image`), or not a graph
            model.
    """
    if not is_model(model):
        raise ModelError(
            f"'{label}' is a subclassed Keras model; only Sequential and Functional models can "
            "be inspected and retrained. Save it as a Functional model."
        )
    if len(model.inputs) != 1:
        raise ModelError(
            f"'{label}' has {len(model.inputs)} inputs; an image classifier with one image "
            "input (height, width, 1 or 3) is expected."
        )
    shape = tuple(model.inputs[0].shape)
    kind = not_an_image(shape)
    if kind is not None:
        raise not_an_image_error(label, kind)
    if shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def suggest_cut(model: Any) -> tuple[str, bool]:
    """Find the last layer before the classifier tail; return (name, has_original_head).

    The tail is: trailing activations/dropout/flatten, one output layer (Dense or Conv2D),
    then any Dense/Dropout/Activation before it (a hidden layer of the old head).
    """
    leaves = [layer for _, layer in iter_layers(model)]
    i = len(leaves) - 1
    while i >= 0 and type(leaves[i]).__name__ in _TAIL_FREE:
        i -= 1
    if i < 0 or type(leaves[i]).__name__ not in _TAIL_OUTPUT:
        return leaves[-1].name, False
    i -= 1
    while i >= 0 and type(leaves[i]).__name__ in _TAIL_MORE:
        i -= 1
    if i < 0:
        return leaves[0].name, False
    return leaves[i].name, True


def _cut_before(model: Any, classifier_start: str) -> str:
    """Name of the last non-Dropout leaf before ``classifier_start`` (zoo entries)."""
    leaves = [layer for _, layer in iter_layers(model)]
    names = [layer.name for layer in leaves]
    i = names.index(classifier_start) - 1
    while i > 0 and type(leaves[i]).__name__ == "Dropout":
        i -= 1
    return names[i]


def detect_preprocessing(model: Any) -> tuple[str, str]:
    """Guess the preprocessing of a loaded model; return (key, how it was found).

    The key is one of `retrain.models.preprocessing.REGISTRY`; a model retrained here has its
    preprocessing inside (layers named ``retrain_...``).
    """
    leaves = [layer for _, layer in iter_layers(model)][:4]
    for layer in leaves:
        if type(layer).__name__ in ("Rescaling", "Normalization") or layer.name.startswith(
            preprocessing.LAYER_PREFIX
        ):
            return "inside", f"{type(layer).__name__} layer '{layer.name}' inside the model"
    names = {layer.name for _, layer in iter_layers(model)}
    if {"Conv1", "bn_Conv1", "out_relu"} <= names or "expanded_conv_depthwise" in names:
        return "tf", "MobileNetV2 family (Keras preprocess_input: [-1, 1])"
    if {"conv1_conv", "post_relu"} <= names:
        return "tf", "ResNetV2 family (Keras preprocess_input: [-1, 1])"
    return "unit", ASSUMED_PREPROCESSING


#: How `detect_preprocessing` says that it found nothing and fell back to "unit".
ASSUMED_PREPROCESSING = "not detectable; assumed [0, 1] scaling"


def preprocessing_warning(base: BaseModel) -> str | None:
    """A one-line warning when the preprocessing was assumed, not detected, probed or set."""
    if base.origin.get("preprocessing_source") != ASSUMED_PREPROCESSING:
        return None
    return (
        f"'{base.name}' has no preprocessing layer and does not say how its pixels were scaled; "
        "[0, 1] (unit) is assumed. Give the original task's images (--old-data) to find it, or "
        "set it with --preprocessing."
    )
