"""The HTML bar charts (pages._bars, pages._stack): what they draw, and that names from
uploads are shown as typed, never run as HTML."""

from __future__ import annotations

import re

from pages._bars import Row, Segment, bars_html, linear_percent, log_percent
from pages._stack import MAX_BARS, stack_html


def _rows(drawn: str) -> list[str]:
    return re.findall(r'<div class="rs-row"[^>]*>', drawn)


def test_lengths_are_log_or_linear_and_zero_is_a_stub():
    assert log_percent(1_000_000, 1_000_000) == 100.0
    assert log_percent(1_000, 1_000_000) == 50.0
    assert log_percent(1, 1_000_000) == 0.0 and log_percent(0, 10) == 0.0
    assert linear_percent(6, 12) == 50.0 and linear_percent(3, 0) == 0.0
    drawn = bars_html([Row("a", [Segment("x", 0, 0.0)], "0", "a")], {"x": "#000"}, name="t")
    assert 'class="rs-seg rs-stub"' in drawn


def test_names_from_uploads_are_escaped_everywhere():
    evil = '<img src=x onerror="alert(1)">'
    drawn = bars_html(
        [Row(evil, [Segment(evil, 3, 50.0)], evil, f"{evil} hover", status=evil)],
        {evil: "#123456"},
        name=evil,
        title=evil,
        note=evil,
    )
    assert "<img" not in drawn and 'onerror="' not in drawn
    assert drawn.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") >= 6


def test_legend_shows_only_the_series_drawn_in_the_given_order():
    colours = {"train": "#1", "val": "#2", "test": "#3"}
    drawn = bars_html(
        [Row("cat", [Segment("test", 2, 20.0), Segment("train", 8, 80.0)], "10", "cat")],
        colours,
        name="counts",
    )
    legend = re.search(r'<div class="rs-legend">(.*?)</div>', drawn).group(1)
    assert re.findall(r"</i>(\w+)</span>", legend) == ["train", "test"]


def test_layer_stack_colours_each_block_and_names_its_layers():
    rows = [
        {"name": "conv1", "type": "Conv2D", "params": 448, "status": "frozen"},
        {"name": "pool1", "type": "MaxPooling2D", "params": 0, "status": "frozen"},
        {"name": "predictions", "type": "Dense", "params": 325, "status": "removed"},
        {"name": "head_output", "type": "Dense", "params": 195, "status": "new"},
    ]
    drawn = stack_html(rows)
    statuses = re.findall(r'data-status="(\w+)"', drawn)
    assert statuses[0] == "frozen" and statuses[-1] == "new" and "removed" in statuses
    assert re.search(r'title="[^"]*448 params, 1 layer\n[^"]*conv1', drawn)
    assert ">no weights<" in drawn  # pool1: a bar without parameters says so


def test_layer_stack_of_a_deep_model_is_grouped_to_at_most_max_bars():
    rows = [
        {"name": f"block{i}_conv{j}", "type": "Conv2D", "params": 1000, "status": "frozen"}
        for i in range(200)
        for j in range(2)
    ]
    assert 1 <= len(_rows(stack_html(rows))) <= MAX_BARS
