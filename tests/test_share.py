"""Share links: a read-only snapshot of a finished run; bad ids, revoke, expiry, TTL, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_run_dir

from retrain.runs.jobs import session_has_live_run
from retrain.sessions import share
from retrain.sessions.share import ShareError
from retrain.sessions.workspace import cleanup_sessions, home, new_session_token, session_workspace

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<img src=x onerror=alert(1)>"

# Every shape of id a hostile or careless visitor can put after ?share=.
BAD_SHARE_IDS = [
    "",
    " ",
    ".",
    "..",
    "../",
    "../x",
    "../../sessions",
    "..%2f..%2fsessions",
    "%2e%2e",
    "/etc/passwd",
    "/",
    "a/b",
    "a\\b",
    "~",
    "x" * 31,  # one short
    "x" * 33,  # one long
    "x" * 200,
    "A" * 31 + "/",
    "A" * 31 + ".",
    "A" * 31 + "\x00",
    "A" * 31 + "\n",
    "A" * 31 + " ",
    "A" * 31 + "é",
    "../" + "A" * 29,
    ".." + "A" * 30,
    HOSTILE,
    "shares",
    None,
    12345,
    ["A" * 32],
]

REPORT = {
    "split": "val",
    "num_images": 6,
    "class_names": ["cat", "dog", HOSTILE],
    "accuracy": 0.5,
    "loss": 0.9,
    "macro": {"precision": 0.5, "recall": 0.5, "f1": 0.4},
    "per_class": {"cat": {"precision": 1.0, "recall": 0.5, "f1": 0.6, "support": 2}},
    "confusion_matrix": [[1, 1, 0], [0, 1, 1], [0, 1, 1]],
    "predictions": [{"path": "/secret/owner/cat/0.png", "true": "cat", "predicted": "cat"}],
    "misclassified": [{"path": "/secret/owner/cat/1.png", "true": "cat", "predicted": "dog"}],
}


@pytest.fixture
def owner_session() -> Path:
    return session_workspace(new_session_token())


@pytest.fixture
def shared_run(make_run, owner_session) -> Path:
    return make_run(owner_session, classes=("cat", "dog", "owl"), per_class=6, epochs=2)


def _fake_model_run(workspace: Path, run_id: str = "run-fake", state: str = "done") -> Path:
    """A run directory with a stand-in model file (no Keras needed)."""
    import zipfile

    run_dir = write_run_dir(
        workspace / "runs" / run_id,
        {"base": "builtin:digits-cnn", "class_names": REPORT["class_names"], "epochs": 1},
        status={"state": state},
        metrics=[{"epoch": 1, "val_accuracy": 0.5, "accuracy": 0.6, "loss": 1.0}],
    )
    with zipfile.ZipFile(run_dir / "best.keras", "w") as zf:
        zf.writestr("retrain.json", json.dumps({"class_names": REPORT["class_names"]}))
    return run_dir


@pytest.mark.parametrize("bad", BAD_SHARE_IDS, ids=repr)
def test_every_bad_share_id_is_no_such_link(bad, owner_session):
    before = sorted(p for p in home().rglob("*"))
    for call in (share.read_share, share.share_folder, share.revoke_share):
        with pytest.raises(ShareError, match="^No such link"):
            call(bad)
    with pytest.raises(ShareError, match="^No such link"):
        share.copy_to_workspace(bad, owner_session)
    assert sorted(p for p in home().rglob("*") if "shares" not in p.parts) == [
        p for p in before if "shares" not in p.parts
    ]


def test_a_well_formed_unknown_id_is_no_such_link():
    with pytest.raises(ShareError, match="^No such link"):
        share.read_share(share.new_share_id())


def test_share_ids_are_unguessable():
    ids = {share.new_share_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(share.is_valid_share_id(i) and len(i) == 32 for i in ids)  # 192 bits
    # None reads as a command-line option (`retrain unshare <id>`): about 3 in 200 would.
    assert not any(i.startswith("-") for i in ids)


def test_share_snapshot_holds_results_but_no_image_paths(owner_session):
    run_dir = _fake_model_run(owner_session)
    owner = share.owner_key(owner_session)
    made = share.create_share(run_dir, REPORT, owner=owner, downloads=False)
    assert set(made) == {"url_path", "share_id", "expires"}
    assert made["url_path"] == f"/?share={made['share_id']}"
    record = share.read_share(made["share_id"])
    assert record["class_names"] == REPORT["class_names"]
    assert record["downloads"] is False and record["examples"] == {}
    report = share.read_report(record)
    assert report["confusion_matrix"] == REPORT["confusion_matrix"]
    assert "predictions" not in report and "misclassified" not in report
    text = "".join(p.read_text(errors="ignore") for p in record["folder"].rglob("*") if p.is_file())
    assert "/secret/owner" not in text
    assert owner_session.name not in text, "the session token must not be written into a share"
    assert str(owner_session) not in text
    assert share.read_shared_metrics(record)[0]["val_accuracy"] == 0.5
    assert share.list_shares(owner)[0]["share_id"] == made["share_id"]
    assert share.list_shares(share.owner_key("someone-else")) == []


def test_only_finished_runs_with_a_model_are_shared(owner_session):
    running = _fake_model_run(owner_session, "run-running", state="running")
    with pytest.raises(ShareError, match="only a finished run can be shared"):
        share.create_share(running, REPORT, owner="o")
    with pytest.raises(ShareError, match="only a finished run"):
        share.create_share(owner_session / "runs" / "nope", REPORT, owner="o")
    empty = write_run_dir(
        owner_session / "runs" / "run-empty", {"epochs": 1}, status={"state": "done"}
    )
    with pytest.raises(ShareError, match="no saved model"):
        share.create_share(empty, REPORT, owner="o")
    done = _fake_model_run(owner_session)
    for hours in (0, -1, 24 * 91):
        with pytest.raises(ShareError, match="out of range"):
            share.create_share(done, REPORT, owner="o", expires_hours=hours)
    assert not [p for p in share.shares_root().iterdir()]


def test_revoked_and_expired_links_say_so(owner_session):
    run_dir = _fake_model_run(owner_session)
    owner = share.owner_key(owner_session)
    now = time.time()
    made = share.create_share(run_dir, REPORT, owner=owner, expires_hours=1, now=now)
    share_id = made["share_id"]
    with pytest.raises(ShareError, match="^This link expired on "):
        share.read_share(share_id, now=now + 3601)
    # Someone else's session cannot revoke it.
    with pytest.raises(ShareError, match="^No such link"):
        share.revoke_share(share_id, owner=share.owner_key("another-session-token"))
    assert share.read_share(share_id, now=now)
    share.revoke_share(share_id, owner=owner)
    with pytest.raises(ShareError, match="^This link was revoked by its owner"):
        share.read_share(share_id)
    assert [p.name for p in share.share_folder(share_id).iterdir()] == [share.SHARE_FILE]
    assert share.list_shares(owner) == []
    # Pruning deletes an expired share's files but keeps its "expired" answer.
    other = share.create_share(run_dir, REPORT, owner=owner, expires_hours=1, now=now)
    assert share.prune_shares(now=now + 10) == []
    assert share.prune_shares(now=now + 7200) == [other["share_id"]]
    with pytest.raises(ShareError, match="^This link expired"):
        share.read_share(other["share_id"], now=now + 7200)


def test_a_share_survives_its_owners_session_being_swept(owner_session, tmp_path):
    run_dir = _fake_model_run(owner_session)
    made = share.create_share(run_dir, REPORT, owner=share.owner_key(owner_session))
    old = time.time() - 3 * 24 * 3600
    for p in [owner_session, *owner_session.rglob("*")]:
        os.utime(p, (old, old))
    assert cleanup_sessions(session_has_live_run, ttl_hours=24) == [owner_session]
    assert not owner_session.exists()
    record = share.read_share(made["share_id"])
    assert share.share_file(record, share.MODEL_FILE).is_file()
    visitor = session_workspace(new_session_token())
    copied = share.copy_to_workspace(made["share_id"], visitor)
    assert (
        Path(copied["model"]).is_file()
        and Path(copied["model"]).parent.parent == visitor / "models"
    )
    assert copied["examples"] is None


def test_examples_are_shared_only_when_ticked(shared_run, owner_session):
    from retrain.evaluate import evaluate_run

    report = evaluate_run(shared_run, "val", include_predictions=True)
    owner = share.owner_key(owner_session)
    without = share.read_share(share.create_share(shared_run, report, owner=owner)["share_id"])
    assert share.example_images(without) == {}
    assert not (without["folder"] / share.EXAMPLES_DIR).exists()
    visitor = session_workspace(new_session_token())
    assert share.copy_to_workspace(without["share_id"], visitor)["examples"] is None
    assert not list(visitor.rglob("*.png")), "no owner image may reach the visitor"

    made = share.create_share(shared_run, report, owner=owner, examples=True, downloads=True)
    record = share.read_share(made["share_id"])
    shown = share.example_images(record)
    assert set(shown) == {"cat", "dog", "owl"}
    assert all(1 <= len(v) <= share.EXAMPLES_PER_CLASS for v in shown.values())
    copied = share.copy_to_workspace(made["share_id"], visitor)
    examples = Path(copied["examples"])
    assert sorted(p.name for p in examples.iterdir()) == ["cat", "dog", "owl"]
    card = share.share_file(record, share.CARD_FILE).read_text()
    assert card.startswith("# Model card") and str(owner_session) not in card


def test_cli_share_and_unshare(shared_run, owner_session):
    env = {**os.environ, "RETRAIN_HOME": str(home()), "CUDA_VISIBLE_DEVICES": ""}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "retrain", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    done = cli("share", str(shared_run), "--downloads", "--expires", "2")
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert set(made) == {"url_path", "share_id", "expires"}
    assert 7100 < made["expires"] - time.time() <= 7200
    record = share.read_share(made["share_id"])
    assert record["downloads"] is True
    # The CLI's share of a session's run belongs to that session (its Runs page lists it).
    assert share.list_shares(share.owner_key(owner_session))[0]["share_id"] == made["share_id"]
    assert share.read_report(record)["accuracy"] >= 0

    for bad in ("../x", "A" * 31 + "/"):
        refused = cli("unshare", bad)
        assert refused.returncode == 2 and refused.stderr.startswith("error: No such link")
    gone = cli("unshare", made["share_id"])
    assert gone.returncode == 0, gone.stderr
    with pytest.raises(ShareError, match="revoked"):
        share.read_share(made["share_id"])
    bad = cli("share", str(shared_run), "--expires", "0")
    assert bad.returncode == 2 and "out of range" in bad.stderr


def test_exported_files_travel_only_with_downloads(owner_session):
    run_dir = _fake_model_run(owner_session)
    export = run_dir / "export"
    (export / "saved_model").mkdir(parents=True)
    (export / "saved_model" / "saved_model.pb").write_bytes(b"pb")
    (export / "model.onnx").write_bytes(b"onnx")
    (export / "run-fake-export.zip").write_bytes(b"zip")
    (export / "notes.txt").write_text("not an export")
    without = share.read_share(share.create_share(run_dir, REPORT, owner="o", card="c")["share_id"])
    assert share.export_files(without) == []
    assert not (without["folder"] / share.EXPORTS_DIR).exists()
    made = share.create_share(run_dir, REPORT, owner="o", downloads=True, card="c")
    record = share.read_share(made["share_id"])
    assert [p.name for p in share.export_files(record)] == ["model.onnx", "run-fake-export.zip"]
    # A tampered record cannot point outside the share.
    record["exports"] = ["../../sessions/x", "/etc/passwd"]
    assert share.export_files(record) == []
