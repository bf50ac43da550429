"""retrain.runs.rundir: the run directory's files, read and written in one place."""

from __future__ import annotations

import numpy as np
import pytest

from retrain.errors import RunError
from retrain.runs import rundir


def test_run_config_round_trips_and_tolerates_missing_and_extra_keys(tmp_path):
    flat = {"data": "d.zip", "base": "builtin:digits-cnn", "epochs": 3, "run_id": "run-1",
            "class_names": ["a", "b"], "num_val": 0, "something_new": {"x": 1}}  # fmt: skip
    rundir.write_config(tmp_path, rundir.RunConfig.from_dict(flat))
    config = rundir.load_config(tmp_path)
    assert config.run_id == "run-1" and config.class_names == ["a", "b"] and config.num_val == 0
    assert config.settings == {"data": "d.zip", "base": "builtin:digits-cnn", "epochs": 3,
                               "something_new": {"x": 1}}  # fmt: skip
    assert config.dataset_id is None and config.get("epochs") == 3
    assert config.get("dataset_id", "none") == "none"
    assert rundir.read_config(tmp_path) == flat  # unset keys are not written as null


def test_a_folder_without_a_config_is_not_a_run(tmp_path):
    assert rundir.read_config(tmp_path) == {}
    with pytest.raises(RunError, match="is not a run directory"):
        rundir.load_config(tmp_path)
    with pytest.raises(RunError, match="is not a run directory"):
        rundir.check_run_dir(tmp_path)
    with pytest.raises(RunError, match="is not a run directory"):
        rundir.request_stop(tmp_path)


def test_status_updates_keep_other_keys_and_drop_the_queue_position(tmp_path):
    rundir.write_status(tmp_path, "queued", position=2, created=1.0)
    assert rundir.read_status_file(tmp_path)["position"] == 2
    status = rundir.write_status(tmp_path, "running", pid=5)
    assert status["created"] == 1.0 and status["pid"] == 5 and "position" not in status
    assert rundir.read_status_file(tmp_path) == status


def test_metrics_append_truncate_and_best(tmp_path):
    for epoch, acc in ((1, 0.5), (2, 0.75), (2, 0.7), (3, None)):
        rundir.append_metrics(tmp_path, {"epoch": epoch, "val_accuracy": acc})
    assert [r["epoch"] for r in rundir.read_metrics(tmp_path)] == [1, 2, 2, 3]
    assert rundir.best_val_accuracy(rundir.read_metrics(tmp_path)) == 0.75
    kept = rundir.truncate_metrics(tmp_path, 2)  # a resume from epoch 2: one line per epoch
    assert [r["epoch"] for r in kept] == [1, 2] and rundir.read_metrics(tmp_path) == kept
    rows, offset = rundir.read_new_metrics(tmp_path, 0)
    assert rows == kept and rundir.read_new_metrics(tmp_path, offset) == ([], offset)


def test_split_is_recorded_and_must_be_disjoint(tmp_path):
    assert rundir.read_split(tmp_path) is None  # runs of older versions have none
    rundir.write_split(tmp_path, ["a/1.png", "b/1.png"], ["a/2.png"])
    assert rundir.read_split(tmp_path) == {"train": ["a/1.png", "b/1.png"], "val": ["a/2.png"]}
    with pytest.raises(RunError, match="both train and val"):
        rundir.write_split(tmp_path, ["a/1.png"], ["a/1.png"])
    paths = ["a/1.png", "a/2.png", "b/1.png"]
    assert rundir.indices_of(paths, ["b/1.png", "a/1.png"]).tolist() == [0, 2]
    with pytest.raises(RunError, match="no longer in its data"):
        rundir.indices_of(paths, ["c/9.png"])


def test_checkpoint_round_trip(tmp_path):
    assert rundir.load_checkpoint(tmp_path) is None and not rundir.has_checkpoint(tmp_path)
    rundir.save_checkpoint(tmp_path, {"w0": np.arange(3.0)}, {"epoch": 2})
    meta, npz = rundir.load_checkpoint(tmp_path)
    assert meta == {"epoch": 2} and npz["w0"].tolist() == [0.0, 1.0, 2.0]
    assert rundir.has_checkpoint(tmp_path)


def test_stop_pid_progress_and_log(tmp_path):
    rundir.write_status(tmp_path, "running")
    assert not rundir.stop_requested(tmp_path)
    rundir.request_stop(tmp_path)
    assert rundir.stop_requested(tmp_path)
    rundir.clear_stop(tmp_path)
    assert not rundir.stop_requested(tmp_path)
    assert rundir.read_pid(tmp_path) is None
    rundir.write_pid(tmp_path, 1234)
    assert rundir.read_pid(tmp_path) == 1234
    rundir.clear_pid(tmp_path)
    assert rundir.read_pid(tmp_path) is None
    assert rundir.read_progress(tmp_path) is None
    rundir.write_progress(tmp_path, {"phase": "preparing"})
    assert rundir.read_progress(tmp_path)["phase"] == "preparing"
    assert rundir.read_progress(tmp_path)["time"] > 0
    assert rundir.log_size(tmp_path) == 0 and rundir.read_log_tail(tmp_path) == ""
    rundir.log_path(tmp_path).write_text("".join(f"line {i}\n" for i in range(50)))
    assert rundir.read_log_tail(tmp_path, lines=2) == "line 48\nline 49"
