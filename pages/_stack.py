"""The Model page's layer stack: one bar per block of layers, input at the top (`pages._bars`).

Colour = what happens to the block (frozen, trainable, new, removed); length = its parameters
on a log scale; a hover names its layers.
"""

from __future__ import annotations

from typing import Any

from pages._bars import Row, Segment, bars_html, log_percent
from retrain.models import group_layers

STATUS_COLOURS = {
    "frozen": "#8aa4c8",
    "trainable": "#f29e4c",
    "new": "#3bb273",
    "removed": "#d3d3d3",
}
MAX_BARS = 48


def _row(index: int, group: dict[str, Any], largest: int) -> Row:
    label = f"{index:02d} {group['block']}"
    layers = group["layers"]
    shown = ", ".join(layers[:6]) + (f", … ({len(layers) - 6} more)" if len(layers) > 6 else "")
    params = group["params"]
    plural = "s" if len(layers) != 1 else ""
    return Row(
        label=label,
        segments=[Segment(group["status"], params, log_percent(params, largest))],
        value_text=f"{params:,}" if params else "no weights",
        hover=f"{label}: {group['status']}\n{params:,} params, {len(layers)} layer{plural}\n{shown}",
        status=group["status"],
    )


def stack_html(rows: list[dict[str, Any]]) -> str:
    """The layer stack of ``rows`` (as `retrain.models.layer_stack` gives them), grouped into
    at most `MAX_BARS` bars (`group_layers`)."""
    groups = group_layers(rows, MAX_BARS)
    largest = max((g["params"] for g in groups), default=0)
    return bars_html(
        [_row(i, g, largest) for i, g in enumerate(groups)],
        STATUS_COLOURS,
        name=f"Layer stack, {len(groups)} blocks",
        note="Bar length: parameters, log scale. Hover a bar for its layers.",
        mono_labels=True,
    )
