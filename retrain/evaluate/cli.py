"""The ``evaluate``, ``forgetting`` and ``predict`` commands: each prints JSON."""

from __future__ import annotations

from typing import Any

from retrain.evaluate.explain import predict
from retrain.evaluate.metrics import evaluate_model
from retrain.evaluate.retention import forgetting


def cli_evaluate(args: Any) -> dict[str, Any]:
    """`python -m retrain evaluate --model MODEL.keras --data DATA [--split S]
    [--preprocessing KEY]`."""
    return evaluate_model(
        args.model,
        args.data,
        args.split,
        workspace=args.workspace,
        preprocessing_choice=getattr(args, "preprocessing", "auto") or "auto",
    )


def cli_forgetting(args: Any) -> dict[str, Any]:
    """`python -m retrain forgetting --original MODEL --run RUN_DIR --data OLD_DATA
    [--original-classes a,b,c]`."""
    return forgetting(
        args.original,
        args.run,
        args.data,
        args.workspace,
        original_classes=getattr(args, "original_classes", None),
        preprocessing_choice=getattr(args, "preprocessing", "auto") or "auto",
    )


def cli_predict(args: Any) -> dict[str, Any]:
    """`python -m retrain predict --model MODEL.keras IMAGE...` -> ``{"model", "predictions"}``."""
    return {
        "model": str(args.model),
        "predictions": predict(args.model, list(args.images), args.top_k),
    }
