"""The Shared model page (``/?share=<id>``): read-only, hostile names as text, bad ids refused."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_share import BAD_SHARE_IDS, REPORT, _fake_model_run

import pages._ui as ui
from retrain.data import load_dataset
from retrain.sessions import share
from retrain.sessions.workspace import home, new_session_token, session_workspace

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
HOSTILE = "<img src=x onerror=alert(1)>"


def _open(share_id, monkeypatch, cookie: str | None = None) -> AppTest:
    monkeypatch.setattr(ui, "browser_cookie_token", lambda: cookie)
    at = AppTest.from_file(APP, default_timeout=120)
    if share_id is not None:
        at.query_params["share"] = share_id
    at.run()
    assert not at.exception, at.exception
    return at


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _markdown(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in at.error] + [i.value for i in at.info]
    return "\n".join(parts)


def _buttons(at: AppTest) -> list[str]:
    return [b.label for b in at.button] + [b.proto.label for b in at.get("download_button")]


@pytest.fixture
def owner() -> Path:
    return session_workspace(new_session_token())


@pytest.mark.parametrize("bad", [b for b in BAD_SHARE_IDS if isinstance(b, str)], ids=repr)
def test_a_bad_share_id_says_no_such_link(bad, monkeypatch, owner):
    _fake_model_run(owner)
    before = _files(home())
    at = _open(bad, monkeypatch)
    assert [e.value for e in at.error] == [share.NO_SUCH_LINK]
    assert _buttons(at) == ["Open my workspace"]
    assert not at.get("plotly_chart") and not at.get("file_uploader")
    changed = {k for k in set(_files(home())) ^ set(before) if not k.startswith("sessions/")}
    assert not changed


def test_revoked_and_expired_links_say_so_in_one_line(monkeypatch, owner):
    run_dir = _fake_model_run(owner)
    made = share.create_share(run_dir, REPORT, owner=share.owner_key(owner), card="# Model card")
    share.revoke_share(made["share_id"])
    at = _open(made["share_id"], monkeypatch)
    assert [e.value for e in at.error] == [
        "This link was revoked by its owner: ask them for a new one."
    ]
    old = share.create_share(
        run_dir, REPORT, owner="o", expires_hours=1, now=time.time() - 7200, card="# Model card"
    )
    at = _open(old["share_id"], monkeypatch)
    assert len(at.error) == 1 and at.error[0].value.startswith("This link expired on ")


def test_the_shared_page_shows_results_and_hostile_names_as_text(monkeypatch, owner):
    run_dir = _fake_model_run(owner)
    card = f"# Model card\n\nClassifies into `{HOSTILE}`.\n\n- dataset: {HOSTILE}\n"
    made = share.create_share(run_dir, REPORT, owner="o", card=card)
    before = _files(owner)
    at = _open(made["share_id"], monkeypatch)
    assert at.title[0].value == "Shared model"
    text = _markdown(at)
    assert "\\<img src=x onerror=alert(1)\\>" in text  # escaped in the class list
    # Markdown elements never carry a raw tag: escaped, or inside code (shown as is).
    for element in [*at.markdown, *at.caption]:
        raw = element.value.replace("\\<img", "").replace(f"`{HOSTILE}`", "")
        assert "<img" not in raw, element.value
    assert "- dataset: \\<img src=x onerror=alert(1)\\>" in text
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heatmap = next(t for c in charts for t in c["data"] if t["type"] == "heatmap")
    assert heatmap["x"][2] == "&lt;img src=x onerror=alert(1)&gt;"
    assert heatmap["z"] == REPORT["confusion_matrix"]
    assert any(t["type"] == "scatter" for c in charts for t in c["data"])  # the curves
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy"] == "50.0%" and metrics["Held-out images"] == "6"
    # Read-only: no downloads (not allowed), nothing that trains, deletes, shares or revokes.
    assert _buttons(at) == ["Copy to my workspace"]
    assert at.file_uploader(key="shared_try_upload")
    assert not at.sidebar.get("page_link")
    assert _files(owner) == before


def test_downloads_only_when_the_owner_allowed_them(monkeypatch, owner):
    run_dir = _fake_model_run(owner)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.tflite").write_bytes(b"x" * 2_000_000)
    made = share.create_share(run_dir, REPORT, owner="o", downloads=True, card="# Model card")
    at = _open(made["share_id"], monkeypatch)
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == [
        "Model (.keras)",
        "Labels (labels.txt)",
        "Model card (.md)",
        "model.tflite (2.0 MB)",
    ]


def test_copy_to_my_workspace_gives_the_visitor_a_base_model(monkeypatch, owner):
    run_dir = _fake_model_run(owner)
    made = share.create_share(run_dir, REPORT, owner="o", card="# Model card")
    owner_files = _files(owner)
    visitor = new_session_token()
    session_workspace(visitor)
    at = _open(made["share_id"], monkeypatch, cookie=visitor)
    at.button(key="shared_copy").click().run()
    assert not at.exception, at.exception
    assert at.session_state["token"] == visitor
    base = Path(at.session_state["base"])
    assert base.is_file() and base.is_relative_to(home() / "sessions" / visitor / "models")
    assert at.session_state["base_label"].startswith("Shared model:")
    assert "dataset" not in at.session_state  # no example images were shared
    saved = json.loads((home() / "sessions" / visitor / "session.json").read_text())
    assert saved["base"] == str(base)
    assert _files(owner) == owner_files
    assert "Copied" in at.success[0].value
    # "Open my workspace" under it works: its click reruns the page with "Copy" unclicked.
    # (The browser then shows the visitor's Dataset page; AppTest keeps the page it ran.)
    at.button(key="shared_open_own").click().run()
    assert not at.exception, at.exception
    assert "share" not in at.query_params


def test_try_it_classifies_the_visitors_image(monkeypatch, make_run, owner):
    run_dir = make_run(owner, classes=("cat", "dog", HOSTILE), per_class=6, epochs=6)
    from retrain.evaluate import evaluate_run

    made = share.create_share(run_dir, evaluate_run(run_dir, "val"), owner="o", card="# Model card")
    owner_files = _files(owner)
    at = _open(made["share_id"], monkeypatch)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (220, 40, 40)).save(buf, "PNG")
    at.file_uploader(key="shared_try_upload").upload(f"{HOSTILE}.png", buf.getvalue(), "image/png")
    at.run()
    assert not at.exception, at.exception
    top = [m.value for m in at.markdown if m.value.startswith("Top class:")]
    assert len(top) == 1, _markdown(at)
    assert "<img" not in top[0].replace("\\<img", "")
    table = at.dataframe[-1].value  # after the per-class table
    assert len(table) == 3 and set(table["class"]) == {"cat", "dog", HOSTILE}
    token = at.session_state["token"]
    tries = list((home() / "sessions" / token / "uploads" / "try").rglob("*.png"))
    assert [p.name for p in tries] == ["_img src=x onerror=alert(1)_.png"]
    assert _files(owner) == owner_files


def test_copy_with_example_images_gives_a_small_dataset_too(monkeypatch, make_run, owner):
    run_dir = make_run(owner, classes=("cat", "dog", HOSTILE), per_class=6, epochs=2)
    from retrain.evaluate import evaluate_run

    report = evaluate_run(run_dir, "val")
    made = share.create_share(run_dir, report, owner="o", examples=True, card="# Model card")
    at = _open(made["share_id"], monkeypatch)
    assert [c.value for c in at.caption if c.value.startswith("\\<img")] == [
        "\\<img src=x onerror=alert(1)\\>"
    ]
    at.button(key="shared_copy").click().run()
    assert not at.exception, at.exception
    dataset = Path(at.session_state["dataset"])
    visitor = home() / "sessions" / at.session_state["token"]
    assert dataset.is_relative_to(visitor) and dataset.name == "manifest.json"
    copied = load_dataset(dataset)  # named in the sidebar as the Dataset page names it
    assert at.session_state["dataset_label"] == (
        f"{copied.name}: 3 classes, {copied.num_images()} images"
    )
    assert "_img src=x onerror=alert(1)_" in dataset.read_text()  # the folder name, cleaned


@pytest.mark.parametrize("page", ["train", "evaluate"])
def test_train_and_evaluate_pages_offer_share_for_a_finished_run(page, monkeypatch, make_run):
    token = new_session_token()
    workspace = session_workspace(token)
    run_dir = make_run(workspace, classes=("cat", "dog"), per_class=6, epochs=2, run_id="run-t")
    from retrain.data import ingest

    dataset = ingest(Path(json.loads((run_dir / "config.json").read_text())["data"]), workspace)
    (workspace / "session.json").write_text(
        json.dumps(
            {
                "dataset": str(dataset.manifest_path),
                "dataset_label": "cats",
                "base": "builtin:digits-cnn",
                "base_label": "starter",
                "run_id": "run-t",
            }
        )
    )
    at = _open(None, monkeypatch, cookie=token)
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, at.exception
    assert at.button(key=f"{'train' if page == 'train' else 'eval'}_share_create")
