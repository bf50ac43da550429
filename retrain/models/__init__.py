"""Models: base models in (files, the keras.applications zoo, the built-in CNN) and what is
done to them before training.

Where things happen:

- ``load``           `load_base`: a BASE spec -> a `BaseModel` (safe loading, labels, zoo)
- ``keras2``         Keras 2 / Teachable Machine ``.h5`` files rebuilt as Keras 3
- ``builtin``        the built-in starter model (``builtin:digits-cnn``)
- ``summary``        `describe`, the layer table and groups, preprocessing choice, class names
- ``keras_helpers``  `BaseModel` and small helpers that read a Keras model
- ``modelfile``      saving and reading ``.keras`` files with Retrain Studio's metadata
- ``modelsize``      the weights a model file declares, from its headers (refused early)
- ``preprocessing``  how raw pixels become a base's input: one registry
- ``probe``          which preprocessing a model was trained with, scored on its old data
- ``surgery``        cut a base, put a new head on it, choose what stays frozen

The names of ``load``, ``keras2``, ``builtin``, ``summary`` and ``keras_helpers`` are
re-exported here (``from retrain.models import ZOO, layer_stack``); modules inside the library
import from the defining module. Importing this package imports no ML framework: Keras loads
inside the functions that need it.
"""

from __future__ import annotations

from retrain.models.builtin import BUILTIN_LABELS, build_digits_cnn, builtin_path, ensure_builtin
from retrain.models.keras2 import convert_keras2_h5
from retrain.models.keras_helpers import (
    ASSUMED_PREPROCESSING,
    IMAGE_CHANNELS,
    BaseModel,
    check_image_model,
    count_params,
    describe_input,
    detect_preprocessing,
    image_channels,
    is_model,
    iter_layers,
    layer_output_shape,
    not_an_image,
    not_an_image_error,
    output_leaf,
    preprocessing_warning,
    suggest_cut,
)
from retrain.models.load import (
    MODEL_EXTENSIONS,
    ZOO,
    ZooEntry,
    config_input_shape,
    load_base,
    parse_labels,
    spec_label,
)
from retrain.models.summary import (
    CLASS_NAME_RULES,
    PREPROCESSING_CHOICES,
    cli_describe,
    describe,
    describe_choice,
    group_layers,
    layer_block,
    layer_rows,
    layer_stack,
    original_class_names,
    output_count,
    resolve_preprocessing,
)

__all__ = [
    "ASSUMED_PREPROCESSING",
    "BUILTIN_LABELS",
    "BaseModel",
    "CLASS_NAME_RULES",
    "IMAGE_CHANNELS",
    "MODEL_EXTENSIONS",
    "PREPROCESSING_CHOICES",
    "ZOO",
    "ZooEntry",
    "build_digits_cnn",
    "builtin_path",
    "check_image_model",
    "cli_describe",
    "config_input_shape",
    "convert_keras2_h5",
    "count_params",
    "describe",
    "describe_choice",
    "describe_input",
    "detect_preprocessing",
    "ensure_builtin",
    "group_layers",
    "image_channels",
    "is_model",
    "iter_layers",
    "layer_block",
    "layer_output_shape",
    "layer_rows",
    "layer_stack",
    "load_base",
    "not_an_image",
    "not_an_image_error",
    "original_class_names",
    "output_count",
    "output_leaf",
    "parse_labels",
    "preprocessing_warning",
    "resolve_preprocessing",
    "spec_label",
    "suggest_cut",
]
