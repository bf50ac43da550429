"""The Train page (AppTest): guards, the settings form, and the live view of fabricated runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_run_dir
from streamlit.testing.v1 import AppTest

from retrain.runs import rundir

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/train.py"


@pytest.fixture
def session(tmp_path, make_image_folder):
    """A workspace with an ingested (imbalanced) dataset and a chosen base."""
    from retrain import data

    folder = make_image_folder(classes=("cat", "dog"), per_class={"cat": 30, "dog": 4})
    workspace = tmp_path / "ws"
    workspace.mkdir()
    dataset = data.ingest(folder, workspace)
    return {"workspace": workspace, "manifest": str(dataset.manifest_path), "dataset": dataset}


def _app(session: dict, run_id: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGE)
    at.session_state["workspace"] = session["workspace"]
    at.session_state["dataset"] = session["manifest"]
    at.session_state["base"] = "builtin:digits-cnn"
    at.session_state["surgery"] = {"cut_at": "flatten", "freeze": "all", "dropout": 0.2}
    if run_id:
        at.session_state["run_id"] = run_id
    return at


def _fabricate(workspace: Path, run_id: str, state: str, epochs: int, **status) -> Path:
    config = {
        "base": "builtin:digits-cnn",
        "epochs": 3,
        "fine_tune_epochs": 2,
        "device": {"backend": "tensorflow", "device": "CPU"},
        "precision": "float32",
    }
    lines = [
        {
            "epoch": e,
            "phase": 1 if e <= 3 else 2,
            "loss": 1.0 / e,
            "accuracy": 0.5 + 0.1 * e,
            "val_loss": 1.2 / e,
            "val_accuracy": 0.4 + 0.1 * e,
            "lr": 1e-3,
            "seconds": 1.0,
            "images_per_second": 100.0,
        }
        for e in range(1, epochs + 1)
    ]
    run_dir = write_run_dir(
        workspace / "runs" / run_id,
        config,
        status={"state": state, "created": 1.0, **status},
        metrics=lines,
    )
    rundir.log_path(run_dir).write_text("worker started\nepoch 1 done\n")  # the worker's output
    return run_dir


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _text(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    for kind in ("success", "error", "warning", "info"):
        parts += [str(el.value) for el in getattr(at, kind)]
    return "\n".join(parts)


def test_guard_asks_for_a_dataset_first():
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGE)
    at.run()
    assert not at.exception
    assert "Upload a dataset first." in [i.value for i in at.info]


def _open_more(at: AppTest, *keys: str) -> AppTest:
    """Open the Train page's lazy expanders (what a click sets), e.g. ``"advanced"``."""
    for key in keys:
        at.session_state[f"train_more_{key}"] = True
    return at


def test_form_is_built_from_the_config_and_offers_class_weights(session):
    at = _app(session).run()
    assert not at.exception
    assert at.number_input(key="epochs").value == 30  # a budget: early stopping ends it
    assert at.number_input(key="batch_size").value == 32
    assert at.number_input(key="lr").value is None  # empty = found by the range test
    # The imbalance warning opens its expander; the others build their widgets once opened.
    assert at.checkbox(key="class_weights").value is False
    for key in ("early_stopping", "fine_tune_epochs"):
        with pytest.raises(KeyError):
            at.number_input(key=key)
    _open_more(at, "advanced", "fine_tune").run()
    assert at.number_input(key="early_stopping").value == 5
    assert at.selectbox(key="cache_features").value == "auto"
    assert at.checkbox(key="class_weights").value is False  # offered: the data is imbalanced
    assert any("imbalanced" in w.value for w in at.warning)
    assert at.button(key="start_training").disabled is False
    assert at.button(key="stop_training").disabled is True
    # Phase 2 follows by default, and the page says so until it is set to 0.
    assert at.number_input(key="fine_tune_epochs").value is None  # empty = automatic
    assert "Phase 2 then fine-tunes the top of the base" in _text(at)
    assert "3-12 s each" not in _text(at)  # the starter model's epochs are cheap
    at.number_input(key="fine_tune_epochs").set_value(0).run()
    assert "Phase 2 then" not in _text(at)


def test_an_imagenet_backbone_says_what_its_phase_2_epochs_cost_and_how_to_end_them(session):
    at = _app(session)
    at.session_state["base"] = "applications:MobileNetV2:none"
    at.session_state["surgery"] = {"cut_at": "out_relu", "freeze": "all", "dropout": 0.2}
    at.run()
    assert not at.exception
    text = _text(at)
    assert "Phase 2 then fine-tunes the top of the base" in text
    assert "on a CPU, 3-12 s each for 960 images" in text
    assert "Stop keeps the best model so far" in text


def test_demo_mode_caps_epochs(session, monkeypatch):
    monkeypatch.setenv("RETRAIN_DEMO", "1")
    at = _app(session).run()
    assert at.number_input(key="epochs").value == 20
    assert at.number_input(key="epochs").max == 20


def test_demo_cap_holds_for_both_phases_whatever_the_widgets_say(session, monkeypatch):
    from retrain.runs import jobs

    monkeypatch.setenv("RETRAIN_DEMO", "1")
    started = {}

    def fake_start(config, workspace):
        started["config"] = config
        return _fabricate(Path(workspace), "run-demo", "done", 1)

    monkeypatch.setattr(jobs, "start_run", fake_start)
    at = _open_more(_app(session), "fine_tune").run()
    at.number_input(key="epochs").set_value(15)
    at.number_input(key="fine_tune_epochs").set_value(50)
    at.button(key="start_training").click().run()
    config = started["config"]
    assert config.epochs == 14 and config.fine_tune_epochs == 6


def test_the_form_shows_the_shown_runs_settings_after_coming_back(session):
    """Leaving the page forgets widget values; the form must not fall back to the defaults
    while the run below it used other settings."""
    _fabricate(session["workspace"], "run-done", "done", 3)  # config: 3 epochs + 2 fine-tune
    at = _open_more(_app(session, "run-done"), "fine_tune").run()
    assert at.number_input(key="epochs").value == 3
    assert at.number_input(key="fine_tune_epochs").value == 2
    at.number_input(key="epochs").set_value(7).run()  # what the person types is kept
    assert at.number_input(key="epochs").value == 7
    # Only that is remembered as theirs: the rest comes back from the run it shows.
    saved = json.loads((session["workspace"] / "session.json").read_text())
    assert saved["train_settings"] == {"epochs": 7}


def test_a_runs_automatic_fine_tune_epochs_come_back_as_automatic(session):
    """A run's config holds the number an empty box resolved to (15 after a frozen base); the
    form shows the empty box again, so a later change of the freezing still decides it."""
    run_dir = _fabricate(session["workspace"], "run-auto", "done", 3)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "fine_tune_epochs": 15}))
    at = _open_more(_app(session, "run-auto"), "fine_tune").run()
    assert not at.exception, at.exception
    assert at.number_input(key="fine_tune_epochs").value is None
    assert at.number_input(key="epochs").value == 3  # the rest is the run's
    assert "fine-tune epochs" not in _text(at)


def test_settings_survive_a_closed_expander_another_page_and_a_reload(session, monkeypatch):
    """Streamlit forgets a widget's value when it is not drawn; the form remembers what the
    person set (session.json) and a run starts with it, expander open or not."""
    from retrain.runs import jobs

    started = {}

    def fake_start(config, workspace):
        started["config"] = config
        return _fabricate(Path(workspace), "run-new", "done", 1)

    monkeypatch.setattr(jobs, "start_run", fake_start)
    at = _open_more(_app(session), "fine_tune", "advanced").run()
    at.number_input(key="fine_tune_epochs").set_value(0).run()
    at.selectbox(key="optimizer").select("sgd").run()
    at.number_input(key="epochs").set_value(12).run()
    assert "Phase 2 then" not in _text(at)
    _open_more(at, "fine_tune", "advanced")
    at.session_state["train_more_fine_tune"] = False  # closed: its widgets are not built
    at.session_state["train_more_advanced"] = False
    at.run()
    with pytest.raises(KeyError):
        at.number_input(key="fine_tune_epochs")
    assert "Phase 2 then" not in _text(at)  # still 0, though not drawn
    assert "Set in the sections above: fine-tune epochs 0, optimizer sgd." in _text(at)
    saved = json.loads((session["workspace"] / "session.json").read_text())
    assert saved["train_settings"] == {"epochs": 12, "fine_tune_epochs": 0, "optimizer": "sgd"}

    # A reload: a fresh page on the same workspace shows them again, and starts with them.
    again = _app(session)
    again.session_state["train_settings"] = saved["train_settings"]  # as ensure_session reads it
    _open_more(again, "fine_tune").run()
    assert again.number_input(key="epochs").value == 12
    assert again.number_input(key="fine_tune_epochs").value == 0
    again.button(key="start_training").click().run()
    assert not again.exception, again.exception
    config = started["config"]
    assert (config.epochs, config.fine_tune_epochs, config.optimizer) == (12, 0, "sgd")

    # Back to a default is forgotten; a remembered value a demo cap no longer allows is dropped.
    again.number_input(key="epochs").set_value(30).run()
    saved = json.loads((session["workspace"] / "session.json").read_text())
    assert "epochs" not in saved["train_settings"]
    monkeypatch.setenv("RETRAIN_DEMO", "1")
    capped = _app(session)
    capped.session_state["train_settings"] = {"epochs": 25}
    capped.run()
    assert not capped.exception, capped.exception
    assert capped.number_input(key="epochs").value == 20


def test_start_builds_the_config_and_attaches_to_the_new_run(session, monkeypatch):
    from retrain.runs import jobs

    started = {}

    def fake_start(config, workspace):
        started["config"] = config
        return _fabricate(Path(workspace), "run-new", "done", 1)

    monkeypatch.setattr(jobs, "start_run", fake_start)
    at = _app(session).run()
    at.number_input(key="epochs").set_value(4)
    at.checkbox(key="class_weights").check()
    at.button(key="start_training").click().run()
    assert not at.exception
    config = started["config"]
    assert config.epochs == 4 and config.class_weights is True
    assert config.data == session["manifest"] and config.base == "builtin:digits-cnn"
    assert config.cut_at == "flatten" and config.freeze == "all"
    assert at.session_state["run_id"] == "run-new"
    assert at.query_params["run"] in ("run-new", ["run-new"])


def test_finished_run_shows_curves_with_phase_boundary_and_best_accuracy(session):
    _fabricate(session["workspace"], "run-done", "done", 5, best_epoch=5)
    at = _app(session, "run-done").run()
    assert not at.exception
    charts = _charts(at)
    assert len(charts) == 2
    for chart in charts:
        traces = chart["data"]
        assert [t["name"] for t in traces] == ["train", "validation"]
        assert all(len(t["x"]) == 5 for t in traces)
        assert chart["layout"]["shapes"][0]["x0"] == 3.5  # phase 2 starts after epoch 3
        assert chart["layout"]["xaxis"]["range"] == [0.5, 5.5]  # no tick past the last epoch
    assert "validation accuracy 90.0% at epoch 5, the model that Evaluate and Export use" in (
        _text(at)
    )
    assert "Device: CPU" in _text(at)
    assert at.button(key="stop_training").disabled is True


@pytest.mark.parametrize(
    ("status", "says"),
    [
        # best.keras is epoch 4's: its score, not the highest of any epoch (epoch 5's 90%)
        ({"best_epoch": 5, "saved_epoch": 4}, "validation accuracy 80.0% at epoch 4, the model"),
        (
            {"best_epoch": 5, "saved_epoch": 3, "bias_corrected": True},
            "validation accuracy 70.0% at epoch 3 before the old/new bias correction; "
            "Evaluate scores the corrected model.",
        ),
        ({}, "Done: best validation accuracy 90.0%."),  # no epoch recorded: the best of all
    ],
)
def test_a_finished_runs_headline_scores_the_model_evaluate_and_export_use(session, status, says):
    _fabricate(session["workspace"], "run-saved", "done", 5, **status)
    at = _app(session, "run-saved").run()
    assert not at.exception
    assert says in _text(at)


def test_a_run_that_found_its_rate_and_stopped_early_says_so(session, monkeypatch):
    from retrain.runs import jobs
    from retrain.training import lr_find

    run_dir = _fabricate(
        session["workspace"], "run-auto", "done", 5, best_epoch=5,
        early_stopped_epoch=5, restored_epoch=3, epochs_budget=30,
    )  # fmt: skip
    lrs = [float(x) for x in lr_find.lr_schedule(40)]
    losses = [2.0 - i / 40 for i in range(40)]
    rundir.write_lr_find(
        run_dir,
        {"lrs": lrs, "losses": losses, "lr": 0.0042, "rule": "valley", "steps": 40,
         "seconds": 0.7, "images": 30, "on": "features"},
    )  # fmt: skip
    at = _app(session, "run-auto").run()
    assert not at.exception
    assert "Early stopping ended it at epoch 5 of 30" in _text(at)
    charts = _charts(at)
    lr_chart = next(c for c in charts if "Learning rate finder" in str(c["layout"]["title"]))
    assert lr_chart["data"][0]["x"] == pytest.approx(lrs)
    assert lr_chart["layout"]["xaxis"]["type"] == "log"
    assert lr_chart["layout"]["shapes"][0]["x0"] == pytest.approx(0.0042)  # the chosen rate
    assert "Learning rate: 0.0042, found by a range test" in [e.label for e in at.expander]
    # The person can take the found rate into the form and change it before the next run.
    at.button(key="train_use_lr").click().run()
    assert at.number_input(key="lr").value == pytest.approx(0.0042)
    started = {}

    def fake_start(config, workspace):
        started["config"] = config
        return _fabricate(Path(workspace), "run-next", "done", 1)

    monkeypatch.setattr(jobs, "start_run", fake_start)
    at.number_input(key="lr").set_value(0.003).run()
    at.button(key="start_training").click().run()
    assert started["config"].lr == pytest.approx(0.003)


def test_running_run_draws_the_epochs_that_exist_and_progress(session):
    import psutil

    me = psutil.Process(os.getpid())
    run_dir = _fabricate(
        session["workspace"],
        "run-live",
        "running",
        2,
        pid=me.pid,
        pid_started=me.create_time(),
    )
    rundir.write_progress(
        run_dir,
        {
            "phase": 1,
            "epoch": 3,
            "epochs": 5,
            "batch": 2,
            "batches": 4,
            "images_per_second": 123.0,
            "eta_seconds": 12.0,
        },
    )
    at = _app(session, "run-live").run()
    assert not at.exception
    charts = _charts(at)
    assert len(charts) == 2 and all(len(t["x"]) == 2 for c in charts for t in c["data"])
    assert "shapes" not in charts[0]["layout"] or not charts[0]["layout"]["shapes"]
    bar = at.get("progress")[0].proto
    assert "Epoch 3/5 · batch 2/4 · 123 images/s · ETA 12 s" in bar.text
    assert at.session_state["_train_live"]["run-live"]["offset"] > 0
    assert at.button(key="start_training").disabled is True

    # A new epoch appears on the next poll; Stop writes the stop request.
    rundir.append_metrics(run_dir, {"epoch": 3, "phase": 1, "loss": 0.3, "val_loss": 0.4})
    at.button(key="stop_training").click().run()
    assert rundir.stop_requested(run_dir)
    assert all(len(t["x"]) == 3 for c in _charts(at) for t in c["data"])
    # The runs table below is redrawn with the live view (a fragment): it counts the epochs too.
    runs = at.dataframe[-1].value.set_index("run")
    assert runs.loc["run-live", "epochs"].startswith("3/")


def test_failed_and_queued_runs_say_what_happened(session):
    _fabricate(
        session["workspace"],
        "run-a-failed",
        "failed",
        1,
        error="Training diverged (loss is NaN) at epoch 2; lower the learning rate, e.g. --lr 1e-4",
    )
    at = _app(session, "run-a-failed").run()
    assert [e.value for e in at.error] == [
        "Training diverged (loss is NaN) at epoch 2; lower the learning rate, e.g. --lr 1e-4"
    ]
    import psutil

    me = psutil.Process(os.getpid())
    _fabricate(
        session["workspace"],
        "run-b-queued",
        "queued",
        0,
        position=2,
        pid=me.pid,
        pid_started=me.create_time(),
    )
    at = _app(session, "run-b-queued").run()
    assert "position 2 in the queue" in _text(at)
    table = at.dataframe[0].value
    assert set(table["state"]) == {"failed", "queued"}


def test_a_reload_reattaches_through_the_run_link(session):
    _fabricate(session["workspace"], "run-linked", "done", 2)
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGE)
    at.session_state["workspace"] = session["workspace"]
    at.session_state["dataset"] = session["manifest"]
    at.session_state["base"] = "builtin:digits-cnn"
    at.query_params["run"] = "run-linked"
    at.run()
    assert not at.exception
    assert at.session_state["run_id"] == "run-linked"
    assert [h.value for h in at.subheader if h.value.startswith("Run ")] == ["Run run-linked"]
    assert all(len(t["x"]) == 2 for c in _charts(at) for t in c["data"])
