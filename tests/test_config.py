"""retrain.training.config: one parser of the freeze text, the demo cap, no Keras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from retrain.errors import ConfigError
from retrain.models import surgery
from retrain.training.config import FreezeSpec, TrainConfig, demo_capped

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "spec", "stored"),
    [
        ("all", FreezeSpec("all"), "all"),
        ("ALL", FreezeSpec("all"), "all"),
        (" none ", FreezeSpec("none"), "none"),
        ("top:5", FreezeSpec("top", k=5), "top:5"),
        ("TOP:5", FreezeSpec("top", k=5), "top:5"),
        ("Top: 3", FreezeSpec("top", k=3), "top:3"),
        ("names:Conv1, bn1", FreezeSpec("names", names=("Conv1", "bn1")), "names:Conv1,bn1"),
    ],
)
def test_the_config_and_the_surgery_read_freeze_text_by_one_rule(text, spec, stored):
    assert FreezeSpec.parse(text) == spec
    config = TrainConfig(freeze=text)
    assert config.freeze == stored  # one spelling in config.json and on the pages
    assert config.freeze_spec == spec
    assert surgery.FreezeSpec is FreezeSpec  # surgery re-exports the one parser


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("top:0", "K >= 1"),
        ("TOP:0", "K >= 1"),
        ("top:-2", "K >= 1"),
        ("top:", "K >= 1"),
        ("names:", "names no layers"),
        ("half", "Unknown freeze 'half'"),
        ("all:3", "Unknown freeze"),
    ],
)
def test_bad_freeze_text_is_rejected_alike_by_both(text, match):
    with pytest.raises(ConfigError, match=match):
        FreezeSpec.parse(text)
    with pytest.raises(ConfigError, match=f"--freeze '{text}' is not understood: .*{match}"):
        TrainConfig(freeze=text)


def test_demo_cap_holds_for_the_whole_run():
    # A run that fine-tunes keeps up to 30% of the cap for phase 2; the head gets the rest.
    capped = demo_capped(TrainConfig(epochs=15, fine_tune_epochs=50), 20)
    assert (capped.epochs, capped.fine_tune_epochs) == (14, 6)
    capped = demo_capped(TrainConfig(epochs=30, fine_tune_epochs=3), 20)
    assert (capped.epochs, capped.fine_tune_epochs) == (17, 3)
    capped = demo_capped(TrainConfig(), 20)  # the defaults: 30 + 15
    assert (capped.epochs, capped.fine_tune_epochs) == (14, 6)
    head_only = demo_capped(TrainConfig(fine_tune_epochs=0), 20)
    assert (head_only.epochs, head_only.fine_tune_epochs) == (20, 0)
    small = TrainConfig(epochs=3, fine_tune_epochs=2)
    assert demo_capped(small, 20) is small


def test_config_and_rundir_import_no_framework():
    code = (
        "import sys, retrain.training.config, retrain.runs.rundir, retrain.runs.worker\n"
        "import retrain.runs.procs\n"
        "print(','.join(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_requested_settings_put_the_automatic_phase_2_budget_back_to_automatic():
    """config.json holds the resolved budget; read back for a form, it is "automatic" again
    where it is what automatic gives, and a number a person chose stays a number."""
    assert TrainConfig().fine_tune_epochs == 15  # resolved: every reader sees a number
    assert TrainConfig().requested()["fine_tune_epochs"] is None
    assert TrainConfig.from_json({"fine_tune_epochs": 15}).requested()["fine_tune_epochs"] is None
    assert TrainConfig(fine_tune_epochs=2).requested()["fine_tune_epochs"] == 2
    # Where automatic gives 0 (phase 1 already trains the base), 15 was chosen: it stays.
    assert TrainConfig(freeze="none", fine_tune_epochs=15).requested()["fine_tune_epochs"] == 15
    assert TrainConfig(freeze="none").requested()["fine_tune_epochs"] is None
    assert TrainConfig(epochs=7).requested()["epochs"] == 7
