"""The Runs page: table, overlaid curves, reuse a config, delete with confirmation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import write_run_dir
from streamlit.testing.v1 import AppTest

from retrain.runs.rundir import write_status
from retrain.sessions.workspace import new_session_token, session_workspace

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(
    workspace: Path, run_id: str, best: float, state: str = "done", age: float = 0, **settings
):
    """A run directory as the worker writes it (no model needed on this page)."""
    run_dir = workspace / "runs" / run_id
    config = {
        "data": "/data/flowers.zip",
        "dataset_name": "flowers",
        "base": "applications:MobileNetV2",
        "epochs": 3,
        "lr": 0.001,
        "freeze": "all",
        "fine_tune_epochs": 2,
        **settings,
    }
    now = time.time() - age
    status = {"state": state, "created": now - 100, "started": now - 100, "finished": now - 58}
    if state == "running":
        status.update(pid=1, finished=None)
    rows = [
        {"epoch": e, "loss": 1 / e, "accuracy": best * e / 3, "val_loss": 1.2 / e,
         "val_accuracy": best * e / 3, "seconds": 1.0}
        for e in (1, 2, 3)
    ]  # fmt: skip
    return write_run_dir(run_dir, config, status=status, metrics=rows)


def _open(runs: list[tuple[str, float, str]]) -> tuple[AppTest, Path]:
    token = new_session_token()
    workspace = session_workspace(token)
    for i, (run_id, best, state) in enumerate(runs):
        _fake_run(workspace, run_id, best, state, age=100 * (len(runs) - i))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["token"] = token  # the session cookie
    at.run()
    at.switch_page("pages/runs.py").run()
    assert not at.exception, at.exception
    return at, workspace


def test_no_runs_yet():
    at, _ = _open([])
    assert "No runs yet" in at.info[0].value


def test_table_lists_state_config_best_accuracy_and_duration():
    at, _ = _open([("run-a", 0.6, "done"), ("run-b", 0.9, "failed")])
    table = at.dataframe[0].value.set_index("run")
    assert list(table.index) == ["run-b", "run-a"]  # newest first
    assert table.loc["run-a", "state"] == "done" and table.loc["run-b", "state"] == "failed"
    assert table.loc["run-b", "best val accuracy"] == 0.9
    assert table.loc["run-a", "duration (s)"] == 42.0
    assert "MobileNetV2" in table.loc["run-a", "config"]
    assert "+2 fine-tune" in table.loc["run-a", "config"]
    assert "keep old classes" not in table.loc["run-a", "config"]


def test_a_keep_old_run_says_so_in_the_table():
    token = new_session_token()
    workspace = session_workspace(token)
    _fake_run(workspace, "run-k", 0.8, keep_old_classes=True, old_data="/data/old.zip")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["token"] = token  # the session cookie
    at.run()
    at.switch_page("pages/runs.py").run()
    assert not at.exception, at.exception
    summary = at.dataframe[0].value.set_index("run").loc["run-k", "config"]
    assert "keep old classes (with old images)" in summary


def test_two_selected_runs_are_overlaid_one_is_not():
    at, _ = _open([("run-a", 0.6, "done"), ("run-b", 0.9, "done")])
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {trace["name"] for trace in spec["data"]} == {"run-a", "run-b"}
    assert [trace["y"][-1] for trace in spec["data"]] == [0.9, 0.6]
    at.multiselect(key="runs_compare").set_value(["run-a"]).run()
    assert not at.get("plotly_chart")
    assert any("at least two runs" in c.value for c in at.caption)


def test_start_a_new_run_from_a_runs_config_remembers_it():
    at, workspace = _open([("run-a", 0.6, "done"), ("run-b", 0.9, "done")])
    at.selectbox(key="runs_pick").select("run-a").run()
    at.button(key="runs_reuse").click().run()
    assert not at.exception, at.exception
    assert at.session_state["run_id"] == "run-a"
    assert at.session_state["base"] == "applications:MobileNetV2"
    # The sidebar names the base as the Model page does, not by its spec.
    assert at.session_state["base_label"] == "MobileNetV2 (ImageNet)"
    # The Train page's widgets (keyed by TrainConfig field names) are prefilled.
    assert at.session_state["epochs"] == 3 and at.session_state["fine_tune_epochs"] == 2
    assert at.session_state["lr"] == 0.001
    assert at.session_state["surgery"]["freeze"] == "all"
    saved = json.loads((workspace / "session.json").read_text())
    assert saved["run_id"] == "run-a"

    # A run whose phase 2 budget was the automatic one (config.json holds the resolved 15)
    # fills the box as automatic, so the new run's freezing still decides it.
    _fake_run(workspace, "run-c", 0.7, fine_tune_epochs=15)
    at.run()
    at.selectbox(key="runs_pick").select("run-c").run()
    at.button(key="runs_reuse").click().run()
    assert not at.exception, at.exception
    assert at.session_state["fine_tune_epochs"] is None and at.session_state["epochs"] == 3


def test_reuse_names_the_dataset_as_the_dataset_page_does(tmp_path):
    """The sidebar after "Start a new run from this config": the dataset's name, classes and
    image count (as the Dataset page gives them), and the built-in model's own name."""
    from retrain.data import ingest
    from retrain.data.sample import sample_dataset

    token = new_session_token()
    workspace = session_workspace(token)
    dataset = ingest(sample_dataset(tmp_path), workspace)
    _fake_run(
        workspace,
        "run-d",
        0.8,
        base="builtin:digits-cnn",
        manifest_path=str(dataset.manifest_path),
        dataset_name=dataset.name,
        class_names=list(dataset.class_names),
    )
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["token"] = token
    at.run()
    at.switch_page("pages/runs.py").run()
    at.button(key="runs_reuse").click().run()
    assert not at.exception, at.exception
    assert at.session_state["dataset_label"] == (
        f"{dataset.name}: {len(dataset.class_names)} classes, {dataset.num_images():,} images"
    )
    assert at.session_state["base_label"] == "Digits CNN (built-in, digits 0-4)"

    # A run whose dataset no longer reads leaves the session's dataset as it was.
    broken = workspace / "datasets" / "gone" / "manifest.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    _fake_run(workspace, "run-e", 0.7, manifest_path=str(broken), dataset_name="gone")
    at.run()
    at.selectbox(key="runs_pick").select("run-e").run()
    at.button(key="runs_reuse").click().run()
    assert not at.exception, at.exception
    assert at.session_state["run_id"] == "run-e"
    assert at.session_state["dataset"] == str(dataset.manifest_path)


def test_delete_needs_confirmation_and_removes_the_run():
    at, workspace = _open([("run-a", 0.6, "done"), ("run-b", 0.9, "done")])
    at.selectbox(key="runs_pick").select("run-a").run()
    assert (workspace / "runs" / "run-a").is_dir()  # opening the popover deletes nothing
    at.button(key="runs_delete_confirm").click().run()
    assert not at.exception, at.exception
    assert not (workspace / "runs" / "run-a").exists()
    assert list(at.dataframe[0].value["run"]) == ["run-b"]


def test_a_running_run_cannot_be_deleted():
    at, workspace = _open([("run-a", 0.6, "done"), ("run-b", 0.9, "running")])
    at.selectbox(key="runs_pick").select("run-b").run()
    assert any("cannot be deleted" in c.value for c in at.caption)


def test_a_run_whose_worker_died_shows_as_interrupted_and_can_be_deleted():
    import subprocess
    import sys

    at, workspace = _open([])
    run_dir = _fake_run(workspace, "run-crashed", 0.5, "running")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_status(run_dir, "running", pid=dead.pid)
    at.run()
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["run-crashed", "state"] == "interrupted"


def test_share_a_finished_run_then_revoke_it(make_run):
    from retrain.sessions import share

    token = new_session_token()
    workspace = session_workspace(token)
    make_run(workspace, classes=("cat", "dog", "<img src=x onerror=alert(1)>"), run_id="run-s")
    _fake_run(workspace, "run-live", 0.5, "running")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.session_state["token"] = token  # the session cookie
    at.run()
    at.switch_page("pages/runs.py").run()
    assert any("No live share links" in c.value for c in at.caption)
    at.selectbox(key="runs_pick").select("run-live").run()
    assert not [b for b in at.button if b.key == "runs_share_create"], "only finished runs"
    at.selectbox(key="runs_pick").select("run-s").run()
    at.checkbox(key="runs_share_downloads").check()
    at.button(key="runs_share_create").click().run()
    assert not at.exception, at.exception
    mine = share.list_shares(share.owner_key(workspace))
    assert len(mine) == 1 and mine[0]["run_id"] == "run-s" and mine[0]["downloads"] is True
    codes = [c.value for c in at.code]
    assert any(code.endswith(f"/?share={mine[0]['share_id']}") for code in codes), codes
    record = share.read_share(mine[0]["share_id"])
    assert share.read_report(record)["confusion_matrix"]
    assert share.share_file(record, share.CARD_FILE).read_text().startswith("# Model card")
    # Another session sees none of it; the owner revokes it from the list.
    assert share.list_shares(share.owner_key(session_workspace(new_session_token()))) == []
    at.button(key=f"share_revoke_{mine[0]['share_id']}").click().run()
    assert not at.exception, at.exception
    assert share.list_shares(share.owner_key(workspace)) == []
    with pytest.raises(share.ShareError, match="revoked"):
        share.read_share(mine[0]["share_id"])
