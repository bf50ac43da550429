"""Evaluate: how good a model really is: metrics, mistakes, forgetting, predictions.

Where things happen:

- ``loading``    a run's model and config, the model's classes and input size, the data split
- ``metrics``    class probabilities and the report (`evaluate_model`, `evaluate_run`)
- ``retention``  `forgetting`: what the retrained model still knows of the original task
- ``explain``    `predict` (top-k) and Grad-CAM
- ``cli``        the ``evaluate``, ``forgetting`` and ``predict`` commands

The public names are re-exported here (``from retrain import evaluate`` then
``evaluate.evaluate_run``); modules inside the library import from the defining module.
Scoring, forgetting and prediction use Keras 3 only, so they run with any Keras backend.
"""

from __future__ import annotations

from retrain.evaluate.cli import cli_evaluate, cli_forgetting, cli_predict
from retrain.evaluate.explain import grad_cam, grad_cam_overlay, predict
from retrain.evaluate.loading import (
    DEFAULT_TOP_K,
    available_splits,
    load_model,
    load_split,
    match_classes,
    model_channels,
    model_class_names,
    model_image_size,
    read_run_config,
    resolve_dataset,
    run_model_path,
)
from retrain.evaluate.metrics import (
    class_probabilities,
    evaluate_model,
    evaluate_run,
    raw_outputs,
    recorded_validation,
    run_dataset,
    run_images,
    score,
    validation_indices,
)
from retrain.evaluate.retention import FORGETTING_METHODS, forgetting, transplant_weights

__all__ = [
    "DEFAULT_TOP_K",
    "FORGETTING_METHODS",
    "available_splits",
    "class_probabilities",
    "cli_evaluate",
    "cli_forgetting",
    "cli_predict",
    "evaluate_model",
    "evaluate_run",
    "forgetting",
    "grad_cam",
    "grad_cam_overlay",
    "load_model",
    "load_split",
    "match_classes",
    "model_channels",
    "model_class_names",
    "model_image_size",
    "predict",
    "raw_outputs",
    "read_run_config",
    "recorded_validation",
    "resolve_dataset",
    "run_dataset",
    "run_images",
    "run_model_path",
    "score",
    "transplant_weights",
    "validation_indices",
]
