"""The Evaluate page: guards, metrics, the confusion-matrix drill-down, forgetting, try an image."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from retrain import evaluate
from retrain.runs import rundir
from retrain.sessions.workspace import new_session_token, session_workspace

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "run-page-eval"


@pytest.fixture(scope="module")
def trained(make_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with one finished run (trained once per module)."""
    workspace = tmp_path_factory.mktemp("page_eval_ws")
    make_run(workspace, classes=("cat", "dog", "owl"), epochs=2, run_id=RUN_ID)
    return workspace


def _session(trained: Path, **remembered) -> tuple[str, Path]:
    token = new_session_token()
    workspace = session_workspace(token)
    shutil.copytree(trained, workspace, dirs_exist_ok=True)
    (workspace / "session.json").write_text(json.dumps(remembered))
    return token, workspace


def _open(token: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["token"] = token  # the session cookie
    at.run()
    assert not at.exception, at.exception
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception, at.exception
    return at


def _set_config(workspace: Path, **values) -> None:
    run_dir = workspace / "runs" / RUN_ID
    rundir.write_config(
        run_dir, rundir.RunConfig.from_dict({**rundir.read_config(run_dir), **values})
    )


def _data_zip(run_dir: Path) -> bytes:
    """The run's own training images, zipped as class folders (the "original task" here)."""
    buf = io.BytesIO()
    data = Path(rundir.read_config(run_dir)["data"])
    with zipfile.ZipFile(buf, "w") as zf:
        for file in sorted(data.rglob("*.png")):
            zf.write(file, file.relative_to(data).as_posix())
    return buf.getvalue()


def test_without_a_run_it_asks_to_train_first(trained):
    token, _ = _session(trained)
    at = _open(token)
    assert "Train a model first" in at.info[0].value


def test_an_unfinished_run_is_not_evaluated(trained):
    token, workspace = _session(trained, run_id=RUN_ID)
    rundir.write_status(workspace / "runs" / RUN_ID, "failed")
    at = _open(token)
    assert "is failed" in at.info[0].value
    assert not at.metric


def test_metrics_confusion_cells_and_mistakes_match_the_report(trained):
    token, workspace = _session(trained, run_id=RUN_ID)
    report = evaluate.evaluate_run(workspace / "runs" / RUN_ID)
    at = _open(token)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy"] == f"{report['accuracy']:.1%}"
    assert metrics["Loss"] == f"{report['loss']:.3f}"
    assert metrics["Images"] == str(report["num_images"])
    # Scored on the validation images that picked the epoch: the page says so, and what to do.
    assert any("also picked the saved epoch" in c.value for c in at.caption)
    assert not [r for r in at.radio if r.key == "eval_split"]  # the only split: no choice shown
    assert "Did it forget" not in [s.value for s in at.subheader]  # no base with a head

    # Pick a cell (the chart's click selection is not available in AppTest).
    names = report["class_names"]
    at.selectbox(key="eval_cell_true").select(names[0]).run()
    at.selectbox(key="eval_cell_pred").select(names[0]).run()
    count = report["confusion_matrix"][0][0]
    assert any(
        f"**{count}** images of **{names[0]}** predicted as **{names[0]}**" in m.value
        for m in at.markdown
    )


def test_a_dataset_with_test_images_is_scored_on_them_first(make_run, tmp_path):
    """The test images never picked an epoch: the honest score is the default, val one click."""
    token = new_session_token()
    workspace = session_workspace(token)
    make_run(workspace, classes=("cat", "dog"), epochs=1, run_id=RUN_ID, splits=("train", "test"))
    (workspace / "session.json").write_text(json.dumps({"run_id": RUN_ID}))
    at = _open(token)
    choice = at.radio(key="eval_split")
    assert choice.options == ["test", "validation (held out in training)"]
    assert choice.value == "test"
    test_report = evaluate.evaluate_run(workspace / "runs" / RUN_ID, split="test")
    assert {m.label: m.value for m in at.metric}["Images"] == str(test_report["num_images"])
    assert any(c.value.startswith("Test images: never trained on") for c in at.caption)

    choice.set_value("val").run()
    assert not at.exception, at.exception
    val_report = evaluate.evaluate_run(workspace / "runs" / RUN_ID, split="val")
    assert {m.label: m.value for m in at.metric}["Images"] == str(val_report["num_images"])
    assert any("the test images give the untouched one" in c.value for c in at.caption)


def test_forgetting_check_with_an_uploaded_zip(trained, tmp_path):
    token, workspace = _session(trained, run_id=RUN_ID)
    run_dir = workspace / "runs" / RUN_ID
    # The run's own model as "the original": its kept layers are unchanged -> drop 0.
    original = tmp_path / "original.keras"
    shutil.copy(run_dir / "best.keras", original)
    _set_config(workspace, base=str(original))
    at = _open(token)
    assert "Did it forget the original task?" in [s.value for s in at.subheader]

    at.get("file_uploader")[0].set_value(("old.zip", _data_zip(run_dir), "application/zip")).run()
    at.toggle(key="eval_forget_run").set_value(True).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Drop"] == "0.0%"
    assert metrics["Before retraining"] == metrics["After retraining"]
    assert any("drop 0 by construction" in i.value for i in at.info)
    table = at.dataframe[-1]
    assert list(table.value.columns) == ["class", "before", "after"]
    assert '"format": "percent"' in table.proto.columns, "per-class shares read as percentages"


def test_try_an_image_shows_the_top_classes(trained):
    token, workspace = _session(trained, run_id=RUN_ID)
    data = Path(rundir.read_config(workspace / "runs" / RUN_ID)["data"])
    image = data / "owl" / "0.png"
    at = _open(token)
    at.slider(key="eval_k").set_value(2).run()
    at.toggle(key="eval_gradcam").set_value(True).run()
    uploader = [u for u in at.get("file_uploader") if u.proto.id.endswith("eval_try_images")]
    uploader[0].set_value([("owl.png", image.read_bytes(), "image/png")]).run()
    assert not at.exception, at.exception
    expected = evaluate.predict(workspace / "runs" / RUN_ID / "best.keras", [image], 2)[0]
    best = expected["top_k"][0]
    assert any(f"**{best['class']}** ({best['probability']:.0%})" in m.value for m in at.markdown)
    images = [e for e in at.main if type(e).__name__ == "Image"]
    assert any("Grad-CAM" in str(e.proto) for e in images)


def _without_names(source: Path, target: Path) -> Path:
    """``source`` (.keras) with Retrain Studio's metadata removed: a model that carries no class
    names, like most models people bring."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            if item.filename != "retrain.json":
                zout.writestr(item, zin.read(item.filename))
    return target


def test_forgetting_for_a_model_without_class_names_takes_them_from_the_names_box(
    trained, tmp_path
):
    token, workspace = _session(trained, run_id=RUN_ID)
    run_dir = workspace / "runs" / RUN_ID
    original = _without_names(run_dir / "best.keras", tmp_path / "plain.keras")
    _set_config(workspace, base=str(original), original_classes=None)
    at = _open(token)
    assert "Did it forget the original task?" in [s.value for s in at.subheader]
    names_box = at.text_input(key="eval_original_classes")
    assert "output order" in names_box.label

    at.get("file_uploader")[0].set_value(("old.zip", _data_zip(run_dir), "application/zip")).run()
    # Two names for three outputs: one line, in the page's words.
    at.text_input(key="eval_original_classes").set_value("cat, dog").run()
    at.toggle(key="eval_forget_run").set_value(True).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "--original-classes" not in errors[0], errors
    # The right names, in output order: the check runs.
    at.text_input(key="eval_original_classes").set_value("cat,dog,owl").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Drop"] == "0.0%"
    named_by = [c.value for c in at.caption if "original classes named by" in c.value]
    assert named_by and "typed in the box above" in named_by[0], named_by
    assert "--original-classes" not in named_by[0]
