"""What a base model is, in words: its layer table and groups, `describe`, the preprocessing
choice, the original class names, and the ``describe`` command.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from retrain.errors import ModelError
from retrain.models import preprocessing
from retrain.models.keras_helpers import (
    BaseModel,
    _params,
    _trainable_params,
    describe_input,
    iter_layers,
    layer_output_shape,
    output_leaf,
    preprocessing_warning,
)
from retrain.models.load import load_base


def layer_rows(model: Any) -> list[dict[str, Any]]:
    """The layer table: one row per leaf layer (nested models flattened, ``parent`` set)."""
    rows = []
    for index, (parent, layer) in enumerate(iter_layers(model)):
        rows.append(
            {
                "index": index,
                "name": layer.name,
                "type": type(layer).__name__,
                "output_shape": layer_output_shape(layer),
                "params": _params(layer),
                "trainable": bool(layer.trainable) and _trainable_params(layer) > 0
                if layer.weights
                else bool(layer.trainable),
                "parent": parent,
            }
        )
    return rows


def layer_stack(
    base_rows: list[dict[str, Any]], new_rows: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The layers of the layer-stack picture, input first, each with ``part`` and ``status``.

    Args:
        base_rows: the base model's `layer_rows` (``describe(...)["layers"]``).
        new_rows: the new model's `surgery.summary` rows, or None before a surgery exists.

    Returns:
        The new model's front layers, then every base layer (``"removed"`` when the cut drops
        it, else its status in the new model), then the new head's layers. A base layer that
        is also a head layer (the original head kept and widened) is listed once, in the head,
        marked ``kept``.
        Without ``new_rows``: the base layers, all ``"frozen"``.
    """
    if new_rows is None:
        return [{**row, "status": "frozen", "part": "base"} for row in base_rows]
    kept = {row["name"]: row for row in new_rows}
    base_names = {row["name"] for row in base_rows}
    head = [  # a head layer named like a base layer: the original head, kept ("keep" mode)
        {**row, "kept": True} if row["name"] in base_names else row
        for row in new_rows
        if row["part"] == "head"
    ]
    in_head = {row["name"] for row in head}
    stack = [row for row in new_rows if row["part"] == "front"]
    for row in base_rows:
        if row["name"] in in_head:
            continue  # drawn once, as a head layer (with its new size), not twice
        status = kept[row["name"]]["status"] if row["name"] in kept else "removed"
        stack.append({**row, "status": status, "part": "base"})
    return stack + head


def layer_block(row: dict[str, Any]) -> str:
    """A readable group for a layer: its numbered block, else its nested model, else itself."""
    match = re.match(r"^(.*?(?:block|stage|conv)_?\d+[a-z]?)(?:_|$)", row["name"])
    if match:
        return match.group(1)
    if row.get("part") == "head":
        return "original head (widened)" if row.get("kept") else "new head"
    if row.get("part") == "front":
        return "input + preprocessing"
    return row.get("parent") or row["name"]


def _group_status(statuses: list[str]) -> str:
    """One colour per block: new, else trainable if any layer trains, else frozen/removed."""
    for status in ("new", "trainable", "frozen"):
        if status in statuses:
            return status
    return "removed"


def group_layers(rows: list[dict[str, Any]], max_groups: int = 48) -> list[dict[str, Any]]:
    """Group layer rows into the bars of the layer-stack picture.

    Consecutive layers of one block (`layer_block`) and of one kind (base, new, removed) form
    a group; while there are more than ``max_groups``, neighbours of one kind merge pairwise
    (``"conv1 … conv2"``).

    Args:
        rows: layers in order, each with ``name``, ``params``, ``status`` (``"new"``,
            ``"trainable"``, ``"frozen"`` or ``"removed"``) and optionally ``part``/``parent``
            (`layer_stack` gives them).
        max_groups: at most this many groups, where merging can reach it.

    Returns:
        One dict per group, in order: ``block`` (its label), ``kind``, ``params`` (sum),
        ``layers`` (names), ``statuses`` (per layer) and ``status`` (the group's colour).
    """
    groups: list[dict[str, Any]] = []
    for row in rows:
        kind = {"removed": "removed", "new": "new"}.get(row["status"], "base")
        key = (layer_block(row), kind)
        if groups and (groups[-1]["block"], groups[-1]["kind"]) == key:
            group = groups[-1]
        else:
            group = {"block": key[0], "kind": kind, "params": 0, "layers": [], "statuses": []}
            groups.append(group)
        group["params"] += row["params"]
        group["layers"].append(row["name"])
        group["statuses"].append(row["status"])
    while len(groups) > max_groups:
        merged: list[dict[str, Any]] = []
        for group in groups:
            last = merged[-1] if merged else None
            if last is not None and last["kind"] == group["kind"] and not last["closed"]:
                last["params"] += group["params"]
                last["layers"] += group["layers"]
                last["statuses"] += group["statuses"]
                last["block"] = f"{last['block'].split(' … ')[0]} … {group['block']}"
                last["closed"] = True
            else:
                merged.append({**group, "closed": False})
        if len(merged) == len(groups):
            break
        groups = merged
    for group in groups:
        group.pop("closed", None)
        group["status"] = _group_status(group["statuses"])
    return groups


def describe(base: BaseModel) -> dict[str, Any]:
    """Describe a base model: the `describe` CLI JSON (layer table, totals, cut, preprocessing).

    Beyond the CLI contract it adds ``name``, ``spec``, ``input_size``, ``class_names``,
    ``has_original_head``, ``head_layers`` (what the suggested cut removes), ``num_layers``,
    ``preprocessing_help`` and ``origin``.
    """
    model = base.model
    rows = layer_rows(model)
    names = [r["name"] for r in rows]
    cut_index = names.index(base.suggested_cut) if base.suggested_cut in names else len(rows) - 1
    total = _params(model)
    trainable = _trainable_params(model)
    return {
        "name": base.name,
        "spec": base.spec,
        "input_shape": list(model.inputs[0].shape),
        "output_shape": list(model.outputs[0].shape),
        "total_params": total,
        "trainable_params": trainable,
        "layers": rows,
        "suggested_cut": base.suggested_cut,
        "preprocessing": base.preprocessing,
        "preprocessing_help": preprocessing.describe(base.preprocessing),
        "input_size": list(base.input_size) if base.input_size else None,
        "class_names": base.class_names,
        "has_original_head": base.has_original_head,
        "head_layers": names[cut_index + 1 :],
        "num_layers": len(rows),
        "origin": base.origin,
        "channels": base.channels,
        "input": describe_input(base.input_size, base.channels),
        "preprocessing_warning": preprocessing_warning(base),
        **(
            {
                "preprocessing_probe": base.origin["preprocessing_probe"],
                "preprocessing_probe_info": base.origin.get("preprocessing_probe_info"),
            }
            if base.origin.get("preprocessing_probe")
            else {}
        ),
    }


#: What ``--preprocessing`` accepts: "auto" (detection, or the probe when old data is given)
#: or a key of `retrain.models.preprocessing.REGISTRY`.
PREPROCESSING_CHOICES: tuple[str, ...] = ("auto", *preprocessing.REGISTRY)


def resolve_preprocessing(
    base: BaseModel,
    choice: str | None = "auto",
    old_data: Any = None,
    *,
    workspace: Path | None = None,
    original_classes: str | list[str] | None = None,
    image_size: tuple[int, int] | None = None,
    resize_mode: str = "squash",
    seed: int = 0,
) -> BaseModel:
    """Set the base's preprocessing by hand, or find it with the probe on the old data.

    ``auto`` without old data keeps the detected key. With old data (the original task's
    images), every candidate is scored through the original head (`retrain.models.probe`); under
    ``auto`` the best wins, and a key set by hand is kept but warned about when it scores
    clearly worse. The scores land in ``origin["preprocessing_probe"]`` (key -> accuracy) and
    ``origin["preprocessing_probe_info"]`` (log losses, sample, margin, warning).

    Returns:
        A copy of ``base`` (the Keras model is shared) with ``preprocessing`` and ``origin`` set.

    Raises:
        ModelError: an unknown key, an RGB-only key for a grayscale model, or old data whose
            classes cannot be matched to the model's outputs.
        ConfigError, DatasetError: unusable old data.
    """
    import dataclasses

    from retrain.models import probe

    choice = (choice or "auto").strip()
    origin = dict(base.origin)
    key = base.preprocessing
    if choice != "auto":
        entry = preprocessing.get(choice)
        if entry.rgb_only and base.channels != 3:
            raise ModelError(
                f"Preprocessing '{choice}' works on RGB images; '{base.name}' takes "
                f"{describe_input(base.input_size, base.channels)} images. Use one of: "
                + ", ".join(k for k, e in preprocessing.REGISTRY.items() if not e.rgb_only)
                + "."
            )
        key = choice
        origin["preprocessing_source"] = "set by hand (--preprocessing)"
    if old_data:
        dataset = probe.old_dataset(old_data, workspace)
        names, _rule = original_class_names(base, dataset.class_names, original_classes)
        result = probe.probe(
            base.model,
            names,
            dataset,
            image_size=tuple(base.input_size or image_size or (224, 224)),
            channels=base.channels,
            has_layers_inside=base.preprocessing == "inside",
            resize_mode=resize_mode,
            seed=seed,
        )
        info = result.summary()
        if choice == "auto":
            key = result.best
            origin["preprocessing_source"] = (
                f"probe on {result.images} old images: {result.describe(result.best)}"
                + ("" if result.clear else " (not clearly ahead)")
            )
        else:
            info["warning"] = probe.check_choice(result, choice)
        origin["preprocessing_probe"] = result.accuracy
        origin["preprocessing_probe_info"] = info
    return dataclasses.replace(base, preprocessing=key, origin=origin)


#: How `original_class_names` named the original outputs.
CLASS_NAME_RULES = {
    "model": "the model carries them (labels.txt, built-in or Retrain Studio metadata)",
    "flag": "given with --original-classes, in output order",
    "folders": "the old data's class folders, sorted (image_dataset_from_directory's order)",
}


def output_count(base: BaseModel) -> int:
    """How many classes the original head tells apart (a 1-unit sigmoid head counts 2)."""
    n = base.model.outputs[0].shape[-1]
    return 2 if n == 1 else int(n or 0)


def original_class_names(
    base: BaseModel,
    old_class_folders: list[str] | None = None,
    original_classes: str | list[str] | None = None,
) -> tuple[list[str], str]:
    """Name the original head's outputs, in output order; return ``(names, rule)``.

    The rule (a key of `CLASS_NAME_RULES`) is, by priority: ``"flag"`` when
    ``original_classes`` is given (``"a,b,c"`` or a list), ``"model"`` when the model carries
    names, ``"folders"`` when only the old data's class folders are known: sorted, they map
    to output indices as ``keras.utils.image_dataset_from_directory`` assigned them.

    Raises:
        ModelError: the model has no classifier head; the names do not match the number of
            outputs; duplicate or empty names; nothing to name the outputs with.
    """
    if not base.has_original_head:
        raise ModelError(
            f"'{base.name}' has no classifier head (it ends in "
            f"{type(output_leaf(base.model)).__name__} '{output_leaf(base.model).name}'), so it "
            "has no original classes. Use a model whose last layer is a Dense classifier."
        )
    n = output_count(base)
    if original_classes is not None and not isinstance(original_classes, str):
        original_classes = ",".join(str(c) for c in original_classes)
    if original_classes is not None and original_classes.strip():
        names = [c.strip() for c in original_classes.split(",")]
        rule = "flag"
        if any(not c for c in names) or len(set(names)) != len(names):
            raise ModelError(
                f"--original-classes '{original_classes}' has empty or repeated names; give "
                f"{n} distinct names, comma-separated, in output order."
            )
        if len(names) != n:
            raise ModelError(
                f"--original-classes names {len(names)} classes but '{base.name}' has {n} "
                f"outputs; pass {n} names, comma-separated, in output order."
            )
        return names, rule
    if base.class_names:
        return list(base.class_names), "model"
    if old_class_folders:
        names = sorted(str(c) for c in old_class_folders)
        if len(names) != n:
            raise ModelError(
                f"'{base.name}' carries no class names and the old data has {len(names)} class "
                f"folders for its {n} outputs; pass --original-classes with {n} names in "
                "output order."
            )
        return names, "folders"
    raise ModelError(
        f"'{base.name}' carries no class names for its {n} outputs; pass --original-classes "
        f'"a,b,..." ({n} names in output order) or the old data (its class folders, sorted).'
    )


def describe_choice(
    base: BaseModel,
    preprocessing: str = "auto",
    old_data: Any = None,
    *,
    workspace: Path | None = None,
    original_classes: str | list[str] | None = None,
) -> dict[str, Any]:
    """`describe` of ``base`` with its preprocessing set by hand or probed on ``old_data``, and
    its outputs named by ``original_classes`` when given (``class_names_rule`` says which rule
    named them). ``base`` itself is never changed (the model workers share loaded bases)."""
    if preprocessing != "auto" or old_data:
        base = resolve_preprocessing(
            base, preprocessing, old_data, workspace=workspace, original_classes=original_classes
        )
    if original_classes:
        names, rule = original_class_names(base, None, original_classes)
        out = describe(dataclasses.replace(base, class_names=names))
        out["class_names_rule"] = rule
        return out
    out = describe(base)
    if base.class_names:
        out["class_names_rule"] = "model"
    return out


def cli_describe(args: Any) -> dict[str, Any]:
    """``python -m retrain describe BASE [--original-classes a,b,c]``: the layer table.

    With ``--original-classes`` the output names replace what the model carries, and
    ``class_names_rule`` says which rule named them.
    """
    workspace = getattr(args, "workspace", None)
    return describe_choice(
        load_base(args.base, workspace=workspace),
        getattr(args, "preprocessing", "auto"),
        getattr(args, "old_data", None),
        workspace=workspace,
        original_classes=getattr(args, "original_classes", None),
    )
