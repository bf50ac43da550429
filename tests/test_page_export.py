"""The Export page: guard, build with progress, self-test table, downloads, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from retrain.sessions.workspace import new_session_token, session_workspace

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "run-page-export"


@pytest.fixture(scope="module")
def trained(make_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workspace = tmp_path_factory.mktemp("page_export_ws")
    make_run(workspace, classes=("cat", "dog"), epochs=2, run_id=RUN_ID)
    return workspace


def _open(trained: Path, **remembered) -> tuple[AppTest, Path]:
    token = new_session_token()
    workspace = session_workspace(token)
    shutil.copytree(trained, workspace, dirs_exist_ok=True)
    (workspace / "session.json").write_text(json.dumps(remembered))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.session_state["token"] = token  # the session cookie
    at.run()
    at.switch_page("pages/export.py").run()
    assert not at.exception, at.exception
    return at, workspace


def test_without_a_finished_run_it_points_to_train(trained):
    at, _ = _open(trained)
    assert "Train a model first" in at.info[0].value
    at, workspace = _open(trained, run_id="run-that-does-not-exist")
    assert "is not in this session" in at.info[0].value


def test_build_shows_self_test_downloads_and_the_model_card(trained):
    at, workspace = _open(trained, run_id=RUN_ID)
    formats = at.multiselect(key="export_formats")
    assert formats.value == ["keras", "labels", "card"]  # the quick ones by default
    assert any(option.startswith("TFLite int8") for option in formats.options)
    assert any(option.startswith("TensorFlow SavedModel") for option in formats.options)
    assert not at.get("download_button")  # nothing built yet
    # It says whose model it exports: the epoch of best.keras that the run recorded.
    from retrain.runs import rundir

    run_dir = workspace / "runs" / RUN_ID
    rundir.write_status(run_dir, "done", saved_epoch=1)
    accuracy = rundir.read_metrics(run_dir)[0]["val_accuracy"]
    at.run()
    said = [m.value for m in at.markdown if m.value.startswith(f"Exports **{RUN_ID}**")]
    assert said and f"the model of epoch 1, validation accuracy {accuracy:.1%}" in said[0], said

    at.button(key="export_build").click().run()
    assert not at.exception, at.exception

    table = at.dataframe[0].value
    assert list(table["format"]) == ["keras"]  # the files with outputs to compare
    assert list(table["ok"]) == ["yes"]
    said = [c.value for c in at.caption]
    assert "Also written, and read back as written: labels.txt and MODEL_CARD.md." in said
    assert table.loc[0, "max |diff|"] < 1e-5
    # Columns no format filled are left out: no int8 here, and nothing failed.
    assert "int8 accuracy drop" not in table and "error" not in table
    assert "argmax agreement" in table and "checked in" in table
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(label.startswith("model.keras") for label in labels)
    assert any(label.startswith("labels.txt") for label in labels)
    assert "Everything as one zip" in labels
    assert any(m.value.startswith("# Model card") for m in at.markdown)

    # A text file that did not read back is an error that says what to do, not a quiet row.
    export_json = run_dir / "export" / "export.json"
    result = json.loads(export_json.read_text())
    result["self_test"]["labels"]["ok"] = False
    export_json.write_text(json.dumps(result))
    at.run()
    assert [e.value for e in at.error] == [
        "Not read back as written: labels.txt. Build the exports again."
    ]


def test_onnx_and_tfjs_are_offered_built_and_checked_in_their_runtimes(trained):
    at, workspace = _open(trained, run_id=RUN_ID)
    formats = at.multiselect(key="export_formats")
    assert any(option.startswith("ONNX") for option in formats.options)
    assert any(option.startswith("TF.js Layers") for option in formats.options)
    formats.set_value(["onnx", "tfjs"]).run()
    at.button(key="export_build").click().run()
    assert not at.exception, at.exception

    table = at.dataframe[0].value
    assert list(table["format"]) == ["onnx", "tfjs"]
    assert table.loc[0, "ok"] == "yes" and table.loc[0, "max |diff|"] < 1e-3
    if shutil.which("node"):
        assert table.loc[1, "ok"] == "yes", table.loc[1, "error"]
        assert table.loc[1, "checked in"].startswith("TF.js 4.22.0")
    else:
        assert table.loc[1, "ok"] == "NO" and "Node.js" in table.loc[1, "error"]
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(label.startswith("model.onnx") for label in labels)
    assert any(label.startswith("tfjs.zip") for label in labels)  # model.json + shards

    # A reload (a fresh page) offers the formats of the export it shows, not the defaults.
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    again.session_state["token"] = workspace.name  # the same session, as its cookie names it
    again.run()
    again.switch_page("pages/export.py").run()
    assert not again.exception, again.exception
    assert again.multiselect(key="export_formats").value == ["onnx", "tfjs"]
