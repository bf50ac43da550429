"""The request kinds: what each computes in a worker, and what defines its answer.

This is the one contract the web tier and the model workers share. A kind is a function that
takes JSON arguments and returns a JSON answer (`Kind.run`, called in a worker; it imports
Keras inside), plus what the web tier needs to address its answer by content without any
ML framework: the files whose bytes decide it (`Kind.files`) and the arguments that do not
(`Kind.context`, e.g. the session's workspace).

The functions call the same library functions as the CLI (``models.describe``,
``evaluate.evaluate_run``, ``evaluate.predict``, ...): one code path, two front ends.
"""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.errors import ConfigError
from retrain.runs import rundir
from retrain.service import cache
from retrain.sessions import share

Answer = dict[str, Any]


def _no_files(args: dict[str, Any]) -> list[Path]:
    return []


@dataclass(frozen=True)
class Kind:
    """One request kind.

    Attributes:
        run: the worker-side function, ``run(**args) -> answer``; ``progress`` is passed too
            when `reports_progress`.
        files: web side: files whose content (hashed) decides the answer, beyond file paths
            given directly as arguments (those are hashed anyway).
        context: arguments that do not change the answer (left out of its address).
        cache: whether answers are kept on disk (a kind that writes files elsewhere, like
            export, is not).
        timeout_s: how long a page waits for the answer.
        reports_progress: ``run`` takes ``progress(text, fraction)``.
        long: may take minutes (a whole split through the model, an export): a worker kept
            for quick requests never takes it (`retrain.service.pool`), so it never holds up
            a Model page.
    """

    run: Callable[..., Answer]
    files: Callable[[dict[str, Any]], list[Path]] = _no_files
    context: tuple[str, ...] = ()
    cache: bool = True
    timeout_s: float = 600.0
    reports_progress: bool = False
    long: bool = False


# --------------------------------------------------------------------------------------
# Loaded models stay in the worker: a second request on the same model skips loading it.

_BASES: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_MAX_BASES = 4


def _spec_version(spec: str) -> tuple:
    """What identifies a loaded base: the spec and, for a file, its size and mtime."""
    path = Path(spec)
    if ":" not in spec and path.is_file():
        stat = path.stat()
        labels = path.parent / "labels.txt"  # names the classes: a new one is a new base
        named = labels.stat().st_mtime_ns if labels.is_file() else None
        return (spec, stat.st_size, stat.st_mtime_ns, named)
    return (spec,)


def load_base(spec: str, workspace: str | None = None) -> Any:
    """`retrain.models.load_base`, the last few bases kept loaded (surgery never modifies one)."""
    from retrain.models.load import load_base as load

    key = _spec_version(spec)
    if key in _BASES:
        _BASES.move_to_end(key)
        return _BASES[key]
    base = load(spec, workspace=Path(workspace) if workspace else None)
    _BASES[key] = base
    while len(_BASES) > _MAX_BASES:
        _BASES.popitem(last=False)
    return base


def unchecked(spec: str) -> bool:
    """Whether ``spec``'s loaded base is a converted Keras 2 model whose check is still to come
    (`models.load.writes_after`): answers made from it say so, and are made again after it."""
    return any(
        key[0] == spec and base.origin.get("conversion_check") for key, base in _BASES.items()
    )


def forget_base(spec: str) -> None:
    """Stop keeping ``spec``'s base loaded (its conversion check failed after an answer)."""
    for key in [key for key in _BASES if key[0] == spec]:
        del _BASES[key]


def held_specs() -> list[str]:
    """The BASE specs this process keeps loaded (`load_base`), the latest last."""
    return list(dict.fromkeys(key[0] for key in _BASES))


def _base_files(args: dict[str, Any]) -> list[Path]:
    """Files beside the spec that change the answer: the built-in starter model's file (when
    trained), or the ``labels.txt`` next to an uploaded model (it names the classes)."""
    spec = str(args.get("spec") or "")
    if spec.startswith("builtin:"):
        from retrain.models.builtin import builtin_path

        path = builtin_path(spec.split(":", 1)[1] or "digits-cnn")
        return [path] if path.is_file() else []
    if ":" not in spec and spec:
        return [Path(spec).parent / "labels.txt"]  # hashed as "missing" when there is none
    return []


# --------------------------------------------------------------------------------------
# Model page


def describe(
    spec: str,
    preprocessing: str = "auto",
    old_data: str | None = None,
    workspace: str | None = None,
    original_classes: str | None = None,
) -> Answer:
    """The base's layer table and facts: `models.describe_choice`, as ``retrain describe``."""
    from retrain.models.summary import describe_choice

    return describe_choice(
        load_base(spec, workspace),
        preprocessing,
        old_data,
        workspace=Path(workspace) if workspace else None,
        original_classes=original_classes,
    )


def head_preview(
    spec: str,
    choice: dict[str, Any],
    classes: list[str] | None = None,
    num_classes: int | None = None,
    workspace: str | None = None,
) -> Answer:
    """The new model of the Model page's choices: its diff and layer table (`surgery.preview`),
    and for "add classes, keep the old ones" the outputs before and after.

    A replaced head's preview depends on how many classes there are, not on their names: send
    ``num_classes`` then, and every session with as many classes and the same choices shares
    one answer. Keep mode names the outputs, so it needs ``classes``.
    """
    from retrain.models import surgery
    from retrain.models.summary import resolve_preprocessing

    if classes is None:
        classes = [f"class {i + 1}" for i in range(int(num_classes or 0))]

    base = load_base(spec, workspace)
    if choice.get("preprocessing"):  # found or set on the page (a copy; the base is shared)
        base = resolve_preprocessing(base, choice["preprocessing"])
    freeze = surgery.FreezeSpec.parse(choice.get("freeze") or "all")
    if choice.get("keep_old_classes"):
        return _extension_preview(base, list(classes), choice, freeze, workspace)
    result = surgery.replace_head(
        base,
        list(classes),
        cut_at=choice.get("cut_at"),
        head=surgery.HeadSpec(
            hidden_units=int(choice.get("hidden_units") or 0),
            dropout=float(choice.get("dropout", 0.2)),
            binary_sigmoid=bool(choice.get("binary_sigmoid")),
            add_conv=int(choice.get("add_conv") or 0),
        ),
        freeze=freeze,
    )
    return surgery.preview(result)


def _extension_preview(
    base: Any, classes: list[str], choice: dict, freeze: Any, workspace: str | None
) -> Answer:
    from retrain import models
    from retrain.models import surgery

    folders = None
    if choice.get("old_data"):
        from retrain.data.store import ingest

        folders = list(ingest(choice["old_data"], Path(workspace or ".")).class_names)
    old, rule = models.original_class_names(base, folders, choice.get("original_classes"))
    result = surgery.extend_head(base, old, classes, freeze=freeze)

    def after(i: int, name: str) -> str:
        if i >= len(old):
            return "new"
        return "kept, your images of it join it" if name in classes else "kept"

    outputs = [
        {
            "output": i,
            "class": name,
            "before": name if i < len(old) else "",
            "after": after(i, name),
        }
        for i, name in enumerate(result.class_names)
    ]
    return {
        **surgery.preview(result),
        "outputs": outputs,
        "names_rule": models.CLASS_NAME_RULES[rule],
    }


def base_head(spec: str, workspace: str | None = None) -> Answer:
    """Whether the base has a classifier head, and the class names it carries (if any)."""
    base = load_base(spec, workspace)
    return {
        "name": base.name,
        "has_head": bool(base.has_original_head),
        "class_names": list(base.class_names or []),
    }


# --------------------------------------------------------------------------------------
# Evaluate page


def _run_files(args: dict[str, Any]) -> list[Path]:
    """A run's answer depends on its model, its config and its recorded split."""
    from retrain.errors import RunError
    from retrain.evaluate.loading import run_model_path

    run_dir = Path(args["run_dir"])
    files = [rundir.config_path(run_dir), run_dir / rundir.SPLIT_FILE]
    with contextlib.suppress(RunError):  # no model yet: the worker says so in its words
        files.append(run_model_path(run_dir))
    return files


def evaluate_run(run_dir: str, split: str = "val") -> Answer:
    """`evaluate.evaluate_run` with the predictions (the confusion matrix's images)."""
    from retrain import evaluate

    return evaluate.evaluate_run(run_dir, split, include_predictions=True)


def forgetting(
    spec: str,
    run_dir: str,
    data: str,
    workspace: str,
    original_classes: str | None = None,
) -> Answer:
    """`evaluate.forgetting`: the original task scored before and after retraining."""
    from retrain import evaluate

    return evaluate.forgetting(spec, run_dir, data, workspace, original_classes=original_classes)


def _model_files(args: dict[str, Any]) -> list[Path]:
    return [Path(args["model"])]


def predict(model: str, images: list[str], top_k: int = 3) -> Answer:
    """`evaluate.predict`: the top classes of each image."""
    from retrain import evaluate

    return {"predictions": evaluate.predict(model, list(images), int(top_k))}


def grad_cam(model: str, image: str) -> Answer:
    """Grad-CAM of ``image`` under ``model`` as a PNG (named by both files' content) in the
    service's files folder; ``{"png": None}`` where it does not apply (no conv base, or not
    the TensorFlow backend)."""
    from PIL import Image

    from retrain import evaluate
    from retrain.service.cache import file_hash, files_dir

    overlay = evaluate.grad_cam_overlay(model, image)
    if overlay is None:
        return {"png": None}
    target = files_dir() / f"gradcam-{file_hash(model)[:16]}-{file_hash(image)[:16]}.png"
    Image.fromarray(overlay).save(target)
    return {"png": str(target)}


# --------------------------------------------------------------------------------------
# Export page


def export(run_dir: str, formats: list[str], progress: Callable | None = None) -> Answer:
    """`export.export_run`: build the chosen files and self-test each in its own runtime."""
    from retrain.export import export as exporter

    return exporter.export_run(run_dir, list(formats), progress=progress)


KINDS: dict[str, Kind] = {
    "describe": Kind(describe, files=_base_files, context=("workspace",)),
    "head_preview": Kind(head_preview, files=_base_files, context=("workspace",)),
    "base_head": Kind(base_head, files=_base_files, context=("workspace",)),
    "evaluate_run": Kind(evaluate_run, files=_run_files, long=True),
    "forgetting": Kind(forgetting, files=_run_files, context=("workspace",), long=True),
    "predict": Kind(predict, files=_model_files),
    "grad_cam": Kind(grad_cam, files=_model_files),
    "export": Kind(export, cache=False, timeout_s=3600.0, reports_progress=True, long=True),
    "share_card": Kind(share.card_answer, files=_run_files),  # a share's model card
}


def key_of(kind: str, args: dict[str, Any]) -> str:
    """The content address of ``kind(**args)``'s answer (`cache.request_key` with the kind's
    files and context): what the web side looks up and a worker writes under."""
    spec = get(kind)
    return cache.request_key(kind, args, spec.context, spec.files)


def get(kind: str) -> Kind:
    """The `Kind` named ``kind``.

    Raises:
        ConfigError: no such kind.
    """
    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(
            f"Unknown model request '{kind}'. Known: {', '.join(sorted(KINDS))}."
        ) from None


def run(kind: str, args: dict[str, Any], progress: Callable | None = None) -> Answer:
    """Compute the answer of one request in this process (a worker, or inline)."""
    spec = get(kind)
    call_args = dict(args)
    if spec.reports_progress:
        call_args["progress"] = progress
    answer = spec.run(**call_args)
    # Answers cross processes as JSON: fail here, in the worker, on anything that is not.
    return json.loads(json.dumps(answer, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
