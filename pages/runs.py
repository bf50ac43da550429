"""Runs: this session's training runs side by side; compare curves, reuse a config, share a
finished run as a read-only link (and revoke it), clean up."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from pages._share import owner_shares, share_panel
from pages._ui import (
    PAGE_FILES,
    SURGERY_KEYS,
    dataset_label,
    ensure_session,
    link,
    load_dataset_cached,
    prefill_train_settings,
    remember,
)
from retrain.errors import RetrainError
from retrain.models import spec_label
from retrain.runs import jobs
from retrain.sessions.workspace import is_within
from retrain.training.config import TrainConfig


def _details(run: dict) -> dict:
    """What the page shows of one `jobs.list_runs` row, with its duration."""
    started, finished = run.get("started"), run.get("finished")
    if isinstance(started, int | float):
        end = finished if isinstance(finished, int | float) else time.time()
        duration = end - started
    else:
        duration = sum(m.get("seconds") or 0 for m in run["metrics"]) or None
    return {**run, "duration_s": duration}


def _summary(config: dict) -> str:
    if not config:
        return "(no config)"
    parts = [
        config.get("base", "?"),
        f"data {config.get('dataset_name') or config.get('data', '?')}",
        f"freeze {config.get('freeze', '?')}",
        f"{config.get('epochs', '?')} ep @ lr {_lr_text(config)}",
    ]
    if config.get("keep_old_classes"):  # else a replace run and a keep run read the same
        how = "with old images" if config.get("old_data") else "distillation only"
        parts.insert(1, f"keep old classes ({how})")
    if config.get("fine_tune_epochs"):
        parts.append(f"+{config['fine_tune_epochs']} fine-tune")
    if config.get("augment"):
        parts.append("augment")
    return " · ".join(str(p) for p in parts)


def _curves(selected: list[str], details: dict[str, dict], metric: str) -> go.Figure:
    fig = go.Figure()
    for run_id in selected:
        rows = details[run_id]["metrics"]
        fig.add_trace(
            go.Scatter(
                x=[r.get("epoch") for r in rows],
                y=[r.get(metric) for r in rows],
                mode="lines+markers",
                name=run_id,
            )
        )
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, height=340, margin=dict(t=10, b=10))
    fig.update_xaxes(tickmode="linear", dtick=1, tick0=1)
    return fig


def _lr_text(config: dict) -> str:
    """The run's learning rate: as set, or the one its range test found (--lr auto)."""
    if config.get("lr") is not None:
        return f"{config['lr']:g}"
    used = config.get("lr_used")
    return f"{used:.2g} (found)" if isinstance(used, (int, float)) else "auto"


def _reuse(run_id: str, config: dict, workspace: Path) -> None:
    """Make a run's choices the session's (the run, its base model, surgery and dataset) and
    fill the Train page's settings with its config."""
    try:
        settings = TrainConfig.from_json(config).requested()
    except RetrainError as err:
        st.error(str(err))
        st.stop()
    prefill_train_settings(settings)
    surgery = {k: settings[k] for k in SURGERY_KEYS}
    surgery["cut_at"] = settings["cut_at"] or config.get("cut_at_used")
    choices = {"run_id": run_id, "surgery": surgery}
    if settings.get("base"):
        choices["base"] = settings["base"]
        choices["base_label"] = spec_label(settings["base"])
    manifest = config.get("manifest_path")
    if manifest and is_within(Path(manifest), workspace):
        with contextlib.suppress(RetrainError):  # a dataset gone or unreadable is not taken
            dataset = load_dataset_cached(manifest)
            choices.update(dataset=manifest, dataset_label=dataset_label(dataset))
    remember(**choices)


workspace = ensure_session()
st.title("Runs")
st.caption(
    "Every training run of this session. Compare them, reuse a config, share a finished one "
    "as a read-only link, delete old ones."
)

runs = jobs.list_runs(workspace)
if not runs:
    st.info("No runs yet. Train a model first.")
    link("train", "Go to Train")
    st.stop()

details = {run["run_id"]: _details(run) for run in runs}
run_ids = list(details)

table = pd.DataFrame(
    [
        {
            "run": run_id,
            "state": d["state"],
            "config": _summary(d["config"]),
            "best val accuracy": d["best_val_accuracy"],
            "epochs": len(d["metrics"]),
            "duration (s)": None if d["duration_s"] is None else round(d["duration_s"], 1),
        }
        for run_id, d in details.items()
    ]
)
st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    key="runs_table",
    column_config={
        "best val accuracy": st.column_config.ProgressColumn(
            format="%.3f", min_value=0, max_value=1
        )
    },
)

st.subheader("Compare curves")
selected = st.multiselect(
    "Runs to overlay (two or more)", run_ids, default=run_ids[:2], key="runs_compare"
)
if len(selected) >= 2:
    metric = st.radio(
        "Curve",
        ["val_accuracy", "val_loss", "accuracy", "loss"],
        horizontal=True,
        key="runs_metric",
    )
    st.plotly_chart(_curves(selected, details, metric), key="runs_curves", width="stretch")
else:
    st.caption("Pick at least two runs to overlay their learning curves.")

st.subheader("One run")
current = st.session_state.get("run_id")
chosen = st.selectbox(
    "Run",
    run_ids,
    index=run_ids.index(current) if current in run_ids else 0,
    key="runs_pick",
)
state = details[chosen]["state"]
cols = st.columns([1, 1.5, 0.9, 0.9])  # the second label is the longest: not cut off
if cols[0].button("Open in Evaluate", key="runs_open", disabled=state != "done"):
    remember(run_id=chosen)
    st.switch_page(PAGE_FILES["evaluate"])
if cols[1].button(
    "Start a new run from this config",
    key="runs_reuse",
    help="The Train page opens with this run's settings filled in.",
):
    _reuse(chosen, details[chosen]["config"], workspace)
    st.switch_page(PAGE_FILES["train"])
with cols[2].popover("Delete run", disabled=state in jobs.ACTIVE_STATES):
    st.write(f"Delete **{chosen}** and all its files? This cannot be undone.")
    if st.button("Yes, delete it", type="primary", key="runs_delete_confirm"):
        try:
            jobs.delete_run(workspace, chosen)
        except RetrainError as err:
            st.error(str(err))
            st.stop()
        if st.session_state.get("run_id") == chosen:
            remember(run_id=None)
        st.rerun()
with cols[3]:
    share_panel(details[chosen]["run_dir"], key="runs_share")
if state in jobs.ACTIVE_STATES:
    st.caption("A run in progress cannot be deleted; stop it on the Train page first.")

owner_shares(workspace)
