"""Horizontal bar charts drawn as plain HTML and CSS (`st.html`), for the charts every visitor
sees on their way through the flow: the Dataset page's images per class and the Model page's
layer stack.

They used to be Plotly figures. Plotly's script is 4.7 MB; the first chart of a browser tab
cost it about 1.3 s of CPU, and each later one about 0.2 s. On a shared demo host the visitors'
browsers may share the server's cores (the load benchmark's do), and on a laptop that is a
second of lag after an upload (docs/benchmarks.md). These bars need no script at all; hovering
a row still tells its numbers (the ``title`` attribute).

Every label and hover text is escaped here: class names and layer names come from uploads.
Rows carry ``data-`` attributes (label, status, each segment's series and value) so tests read
what is drawn.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

_STYLE = """<style>
.rs-bars{font-size:0.8rem;line-height:1.15;}
.rs-bars .rs-title{font-weight:600;margin-bottom:0.3rem;}
.rs-legend{display:flex;gap:1.1rem;margin:0 0 0.4rem 0;flex-wrap:wrap;}
.rs-legend i{display:inline-block;width:0.75rem;height:0.75rem;border-radius:2px;
  margin-right:0.3rem;vertical-align:-1px;}
.rs-rows{overflow-y:auto;}
.rs-row{display:grid;grid-template-columns:minmax(8rem,32%) 1fr 6rem;align-items:center;
  gap:0.5rem;height:18px;}
.rs-row:hover{background:rgba(128,128,128,0.12);}
.rs-name{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;}
.rs-mono .rs-name{font-family:monospace;}
.rs-track{height:12px;display:flex;}
.rs-seg{display:block;height:100%;}
.rs-seg:first-child{border-radius:2px 0 0 2px;}
.rs-seg:last-child{border-radius:0 2px 2px 0;}
.rs-stub{min-width:2px;}
.rs-value{text-align:right;font-variant-numeric:tabular-nums;opacity:0.8;}
.rs-note{margin-top:0.3rem;opacity:0.7;}
</style>"""


@dataclass
class Segment:
    """One coloured part of a bar: ``percent`` of the track, in ``series``' colour."""

    series: str
    value: float
    percent: float


@dataclass
class Row:
    """One bar: its label, its segments (left to right), the number shown right of it, and
    what a hover says."""

    label: str
    segments: list[Segment]
    value_text: str
    hover: str
    status: str = ""


def log_percent(value: float, largest: float) -> float:
    """A bar's length in percent of the track on a log scale, so that a 1 k-parameter block
    still shows next to a 2 M one; 0 for 0 or 1 (drawn as a thin stub)."""
    if value <= 1 or largest <= 1:
        return 0.0
    return round(100 * math.log10(value) / math.log10(largest), 1)


def linear_percent(value: float, largest: float) -> float:
    """A bar's length in percent of the track, proportional to ``value``."""
    return round(100 * value / largest, 1) if largest > 0 else 0.0


def _segment(segment: Segment, colours: dict[str, str]) -> str:
    colour = colours.get(segment.series, "#999999")
    stub = " rs-stub" if segment.percent == 0 else ""
    return (
        f'<span class="rs-seg{stub}" data-series="{html.escape(segment.series)}" '
        f'data-value="{segment.value:g}" '
        f'style="width:{segment.percent}%;background:{colour}"></span>'
    )


def _row(row: Row, colours: dict[str, str]) -> str:
    attrs = "".join(
        f' data-{name}="{html.escape(value)}"'
        for name, value in (("label", row.label), ("status", row.status))
        if value
    )
    segments = "".join(_segment(s, colours) for s in row.segments)
    return (
        f'<div class="rs-row"{attrs} title="{html.escape(row.hover)}">'
        f'<span class="rs-name">{html.escape(row.label)}</span>'
        f'<span class="rs-track">{segments}</span>'
        f'<span class="rs-value">{html.escape(row.value_text)}</span></div>'
    )


def bars_html(
    rows: list[Row],
    colours: dict[str, str],
    *,
    name: str,
    title: str = "",
    note: str = "",
    max_height_px: int | None = None,
    mono_labels: bool = False,
) -> str:
    """The chart: a legend of the series present (in ``colours``' order), the rows top to
    bottom, and a note under them. ``name`` says what the chart is (for screen readers);
    ``max_height_px`` scrolls the rows beyond that height; ``mono_labels`` sets the labels in
    a fixed-width font (layer names)."""
    present = {s.series for row in rows for s in row.segments}
    legend = "".join(
        f'<span><i style="background:{colour}"></i>{html.escape(series)}</span>'
        for series, colour in colours.items()
        if series in present
    )
    height = f' style="max-height:{max_height_px}px"' if max_height_px else ""
    return (
        f'{_STYLE}<div class="rs-bars{" rs-mono" if mono_labels else ""}" role="figure" aria-label="{html.escape(name)}">'
        + (f'<div class="rs-title">{html.escape(title)}</div>' if title else "")
        + f'<div class="rs-legend">{legend}</div>'
        + f'<div class="rs-rows"{height}>{"".join(_row(r, colours) for r in rows)}</div>'
        + (f'<div class="rs-note">{html.escape(note)}</div>' if note else "")
        + "</div>"
    )
