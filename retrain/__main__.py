"""The command line: ``python -m retrain <command> ...`` (the same code path as the dashboard).

Every command prints one JSON object on stdout. Bad input exits 2 with one line on stderr
and no traceback. Handlers are imported only for the command that runs, so ``ingest`` never
pays for importing TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from retrain.errors import RetrainError


def _workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="folder for extracted data, caches and runs (default: $RETRAIN_HOME or ./workspace)",
    )


def _original_classes_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--original-classes",
        default=None,
        metavar='"a,b,c"',
        help="names of the original model's outputs, in output order, when it carries none "
        "(default: its labels.txt/metadata, else the old data's class folders, sorted)",
    )


def _preprocessing_arg(parser: argparse.ArgumentParser, what: str) -> None:
    from retrain.training.config import PREPROCESSINGS  # no Keras: the registry is plain data

    parser.add_argument(
        "--preprocessing",
        default="auto",
        choices=PREPROCESSINGS,
        help=f"how pixels are scaled for {what}, or set it: inside, raw (0-255), unit ([0,1]), "
        "tf ([-1,1]), torch (ImageNet mean/std), caffe (BGR minus ImageNet means)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="python -m retrain",
        description="Retrain Keras image classifiers on new target data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="check a zip/folder of images and print its summary")
    p.add_argument("data", help="DATA.zip or a folder of class folders")
    _workspace_arg(p)
    p.set_defaults(handler="retrain.data.splits:cli_ingest")

    p = sub.add_parser("describe", help="print a base model's layer table")
    p.add_argument(
        "base",
        help="path to .keras/.h5 | applications:<Name>[:imagenet|:none|:<weights file>] | builtin:<name>",
    )
    _original_classes_arg(p)
    _preprocessing_arg(p, "the model (auto: detected, or the probe's best with --old-data)")
    p.add_argument(
        "--old-data",
        default=None,
        metavar="OLD",
        help="the original task's images (zip/folder of class folders): score each "
        "preprocessing on them through the original head (preprocessing_probe)",
    )
    _workspace_arg(p)
    p.set_defaults(handler="retrain.models.summary:cli_describe")

    p = sub.add_parser("train", help="train in the foreground, writing a run directory")
    from retrain.training.config import add_config_arguments  # argparse only; Keras loads later

    add_config_arguments(p)
    _workspace_arg(p)
    p.set_defaults(handler="retrain.runs.worker:cli_train")

    p = sub.add_parser(
        "submit",
        help="start a run in the background (local worker or Ray job) and return at once",
    )
    add_config_arguments(p)
    p.add_argument(
        "--runner",
        choices=["local", "ray"],
        default=None,
        help="where the run trains (default: $RETRAIN_RUNNER, else local; docs/scale-out.md)",
    )
    p.add_argument(
        "--gpus",
        default=None,
        help="ray: GPUs the job asks Ray for, a number or auto: 1 when the cluster has a GPU "
        "or its autoscaler can add one, else 0 (default: $RETRAIN_RAY_GPUS, else auto)",
    )
    p.add_argument(
        "--cpus",
        type=float,
        default=None,
        help="ray: CPUs the job asks Ray for (default: $RETRAIN_RAY_CPUS, else 1)",
    )
    _workspace_arg(p)
    p.set_defaults(handler="retrain.runs.runners:cli_submit")

    p = sub.add_parser("status", help="print a run's status (detects dead workers)")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(handler="retrain.runs.runners:cli_status")

    p = sub.add_parser("stop", help="ask a running training to stop after the current batch")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(handler="retrain.runs.runners:cli_stop")

    p = sub.add_parser("evaluate", help="score a model on a labelled folder/zip")
    p.add_argument("--model", required=True, type=Path, help="MODEL.keras")
    p.add_argument("--data", required=True, help="DATA.zip or folder with the model's classes")
    p.add_argument(
        "--split", default=None, help="split to score (default: test, else val, else all)"
    )
    _preprocessing_arg(p, "the model (auto: a Retrain Studio model has it inside)")
    _workspace_arg(p)
    p.set_defaults(handler="retrain.evaluate.cli:cli_evaluate")

    p = sub.add_parser("forgetting", help="score the original task before/after retraining")
    p.add_argument("--original", required=True, help="the original model (BASE syntax)")
    p.add_argument("--run", required=True, type=Path, help="RUN_DIR of the retraining")
    p.add_argument("--data", required=True, help="the original task's data (zip/folder)")
    _original_classes_arg(p)
    _preprocessing_arg(p, "the original model (auto: what the run used)")
    _workspace_arg(p)
    p.set_defaults(handler="retrain.evaluate.cli:cli_forgetting")

    p = sub.add_parser("export", help="export a finished run")
    p.add_argument("--run", required=True, type=Path, help="RUN_DIR")
    p.add_argument(
        "--format",
        action="append",
        required=True,
        choices=[
            *("keras", "savedmodel", "tflite", "tflite-int8", "onnx", "tfjs"),
            *("labels", "card", "all"),
        ],
        help="repeat for several formats",
    )
    p.set_defaults(handler="retrain.export.export:cli_export")

    p = sub.add_parser(
        "share", help="make a read-only share link for a finished run: {url_path, share_id}"
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--downloads", action="store_true", help="the link offers the model files for download"
    )
    p.add_argument(
        "--examples",
        action="store_true",
        help="include a few held-out images per class (without it no image is shared)",
    )
    p.add_argument(
        "--expires",
        type=float,
        default=None,
        metavar="HOURS",
        help="hours until the link stops working (default 168 = 7 days, at most 2160)",
    )
    p.set_defaults(handler="retrain.sessions.share:cli_share")

    p = sub.add_parser("unshare", help="revoke a share link")
    p.add_argument("share_id", metavar="ID")
    p.set_defaults(handler="retrain.sessions.share:cli_unshare")

    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("--model", required=True, type=Path, help="MODEL.keras")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(handler="retrain.evaluate.cli:cli_predict")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "workspace", None) is None and "workspace" in vars(args):
        from retrain.sessions.workspace import home

        args.workspace = home()
    module_name, func_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        result = handler(args)
    except RetrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        json.dump(result, sys.stdout, indent=None if os.environ.get("RETRAIN_JSON_COMPACT") else 2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
