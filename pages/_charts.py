"""Figures more than one page draws (the confusion matrix: Evaluate and the Shared model page).

Names go into Plotly through `plain`: Plotly reads a few HTML tags in label text, so a class
named ``<b>x</b>`` or ``<img src=x onerror=...>`` must reach it escaped, and show as typed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go


def plain(name: object) -> str:
    """A name for a Plotly label, shown as the characters it is made of."""
    return html.escape(str(name), quote=False)


def confusion_figure(class_names: Sequence[str], matrix: Sequence[Sequence[int]]) -> go.Figure:
    """Rows: true class, columns: predicted; each cell shows its count."""
    labels = [plain(n) for n in class_names]
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=labels,
            y=labels,
            texttemplate="%{z}",
            colorscale="Blues",
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis_title="predicted class",
        yaxis_title="true class",
        yaxis_autorange="reversed",
        height=max(320, 40 * len(labels) + 120),
        margin=dict(l=10, r=10, t=10, b=10),
    )
    return fig
