"""The Train step: settings (built from TrainConfig), Start/Stop, and the live view of a run.

Training runs in a worker process (``retrain.runs.jobs``); this page only reads the run directory.
The live view is a fragment that reruns every second while the run is active: it reads the
new metrics lines and the progress (``retrain.runs.rundir``) into ``st.session_state["_train_live"]``
and redraws the curves. A reload reattaches through ``?run=<run_id>`` (and the remembered
``run_id``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from pages._ui import (
    SURGERY_KEYS,
    demo_mode,
    ensure_session,
    link,
    load_dataset_cached,
    old_data_picker,
    remember,
    require,
)
from retrain.errors import RetrainError
from retrain.runs import jobs, rundir, runners
from retrain.sessions.workspace import run_path
from retrain.training.config import TrainConfig, demo_capped

# The demo's cap on both phases: 14 head + 6 fine-tune epochs (config.demo_capped) reach 96.6%
# on the built-in sample in 10 s; 20 head epochs alone 87.7%, 5 only ~67%.
DEMO_MAX_EPOCHS = 20
LIVE_KEY = "_train_live"  # {run_id: {"offset", "rows", "progress"}}: the fragment's cache
BASIC = ("epochs", "batch_size", "lr", "val_split")
#: The settings' sections, by key (``train_more_<key>``): lazy expanders, whose widgets are
#: built only while open (they were about 60% of the page's elements in the browser); closed,
#: their settings are the remembered ones (`_restore_settings`), else the defaults.
EXPANDERS = {
    "augment": ("Augmentation and class balance", ("augment", "class_weights")),
    "fine_tune": (
        "Fine-tuning (phase 2: unfreeze the top of the base)",
        ("fine_tune_epochs", "fine_tune_lr", "fine_tune_layers"),
    ),
    "advanced": (
        "Advanced",
        (
            "optimizer",
            "image_size",
            "resize_mode",
            "seed",
            "early_stopping",
            "reduce_lr",
            "cache_features",
            "mixed_precision",
            "workers",
        ),
    ),
}
#: Shown when the Model page chose "Add classes, keep the old ones".
KEEP_FIELDS = ("rehearsal_per_class", "distill_weight", "bias_correction", "distill_temperature")
LABELS = {
    "rehearsal_per_class": "Old images rehearsed per class",
    "distill_weight": "Distillation weight (empty = automatic)",
    "distill_temperature": "Distillation temperature",
    "bias_correction": "Correct the lean toward new classes",
    "lr": "Learning rate (empty = found)",
    "fine_tune_epochs": "Fine-tune epochs (empty = automatic)",
    "val_split": "Validation fraction",
    "fine_tune_lr": "Fine-tune learning rate",
    "fine_tune_layers": "Layers to unfreeze",
    "early_stopping": "Early stopping patience (epochs, 0 = off)",
    "reduce_lr": "Lower the learning rate on plateaus",
    "cache_features": "Feature cache",
    "image_size": "Image size (pixels)",
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SECTION_FIELDS = tuple(n for _, names in EXPANDERS.values() for n in names)
FORM_FIELDS = (*BASIC, *SECTION_FIELDS, *KEEP_FIELDS)


def _label(name: str) -> str:
    return LABELS.get(name, name.replace("_", " ").capitalize())


def _default(name: str, max_epochs: int | None = None) -> Any:
    """The form's default for a field: TrainConfig's, but the demo's cap for its epochs (the
    demo's head epochs are cheap; use them all)."""
    return max_epochs if name == "epochs" and max_epochs else FIELDS[name].default


def _limits(name: str, max_epochs: int | None = None) -> tuple[Any, Any]:
    """The lowest and highest value a number field's widget takes (the demo caps epochs)."""
    meta = FIELDS[name].metadata
    return meta.get("min"), max_epochs if name == "epochs" and max_epochs else meta.get("max")


def _widget(name: str, max_epochs: int | None = None) -> Any:
    """One input for a TrainConfig field; its key is the field name, its help the field's."""
    f = FIELDS[name]
    help_text = f.metadata["help"]
    default = _default(name, max_epochs)
    choices = f.metadata.get("choices")
    if isinstance(default, bool):
        return st.checkbox(_label(name), value=default, help=help_text, key=name)
    if choices:
        return st.selectbox(
            _label(name), choices, index=choices.index(default), help=help_text, key=name
        )
    lo, hi = _limits(name, max_epochs)
    if "int" in str(f.type):
        return st.number_input(
            _label(name),
            min_value=lo,
            max_value=hi,
            value=default,
            step=1,
            help=help_text,
            key=name,
            placeholder="automatic",
        )
    return st.number_input(
        _label(name),
        min_value=float(lo),
        max_value=float(hi),
        value=default,
        step=1e-4 if name.endswith("lr") else 0.05,
        format="%g",
        help=help_text,
        key=name,
        placeholder="automatic",
    )


def _imbalanced(manifest: str) -> str | None:
    """The dataset's imbalance warning, if it has one."""
    try:
        dataset = load_dataset_cached(manifest)
    except RetrainError:
        return None
    return next((w["message"] for w in dataset.warning_items if w["code"] == "imbalance"), None)


def _phase2_words(base: str) -> str:
    """What the settings say about phase 2, which follows a frozen-base head by default. An
    ImageNet backbone's phase 2 epochs cost far more than its head epochs on a CPU
    (bench/phase2_cost.py), so the page says so and how to end it."""
    words = (
        " Phase 2 then fine-tunes the top of the base at a tenth of the rate and keeps that "
        "only where it does better (see Fine-tuning)."
    )
    if base.startswith("applications:"):
        words += (
            " Its epochs cost, on a CPU, 3-12 s each for 960 images (MobileNetV2 to "
            "ResNet50V2; 12-42 s with augmentation on) against under a second for a head "
            "epoch. Stop keeps the best model so far."
        )
    return words


def _config_form(manifest: str, base: str, surgery: dict, max_epochs: int | None) -> dict[str, Any]:
    """Render the settings (``max_epochs``: the demo's cap, or None); return their values,
    those of the closed sections included (remembered, else the defaults)."""
    values: dict[str, Any] = {}
    freeze = surgery.get("freeze") or "all"
    if freeze == "all":
        phase2 = (
            _phase2_words(base)
            if st.session_state.get("fine_tune_epochs") != 0 and not surgery.get("keep_old_classes")
            else ""
        )
        st.caption(
            "Phase 1 trains only the new head with the base frozen: it keeps what the model "
            "already knows and is fast (the base's outputs are computed once)." + phase2
        )
    else:
        st.caption(
            f"Phase 1 trains the new head and the base layers you unfroze ({freeze}); "
            "slower than a frozen base, and the feature cache is off."
        )
    columns = st.columns(len(BASIC))
    for column, name in zip(columns, BASIC, strict=True):
        with column:
            values[name] = _widget(name, max_epochs)
            why = FIELDS[name].metadata["help"]
            st.caption(why[:1].upper() + why[1:])
    if max_epochs:
        st.caption(f"Demo: at most {max_epochs} epochs per run.")
    warning = _imbalanced(manifest)
    for key, (title, names) in EXPANDERS.items():
        shown = [n for n in names if n != "class_weights" or warning]
        more = st.expander(
            title,
            expanded=bool(warning) and key == "augment",  # where the warning is
            key=f"train_more_{key}",
            on_change="rerun",
        )
        if not more.open:
            values.update({n: st.session_state.get(n, _default(n)) for n in shown})
            continue
        with more:
            if "class_weights" in names:
                if warning:
                    st.warning(warning)
                else:
                    st.caption("Classes are balanced: class weights are not needed.")
            for name in shown:
                values[name] = _widget(name)
    changed = _changed_words(values, SECTION_FIELDS)
    if changed:  # the sections may be closed: say what in them is not the default
        st.caption(f"Set in the sections above: {changed}.")
    if surgery.get("keep_old_classes"):
        with st.expander("Keep the old classes", expanded=True):
            values["old_data"] = old_data_picker(st.session_state["workspace"], base, "train")
            for name in KEEP_FIELDS:
                values[name] = _widget(name)
    st.caption(f"New head (from the Model page): {_head_text(surgery)}.")
    return values


def _changed_words(values: dict[str, Any], names: tuple[str, ...]) -> str:
    """``names``' settings that differ from their defaults, in the form's words, e.g.
    "fine-tune epochs 0, optimizer sgd"; empty when none does."""
    words = []
    for name in names:
        if name not in values or values[name] == _default(name):
            continue
        label = _label(name).split(" (")[0]  # "Fine-tune epochs (empty = automatic)"
        value = "automatic" if values[name] is None else values[name]
        words.append(f"{label[:1].lower()}{label[1:]} {value}")
    return ", ".join(words)


def _head_text(surgery: dict) -> str:
    """The Model page's choices in the user's words."""
    if not surgery:
        return "the defaults"
    if surgery.get("keep_old_classes"):
        return "the original head kept and widened: its classes first, then yours"
    freeze = surgery.get("freeze") or "all"
    frozen = {"all": "base frozen", "none": "whole base trains"}.get(
        freeze,
        f"top {freeze.partition(':')[2]} base layers train"
        if freeze.startswith("top:")
        else freeze,
    )
    parts = [f"cut after '{surgery['cut_at']}'" if surgery.get("cut_at") else "", frozen]
    if surgery.get("hidden_units"):
        parts.append(f"a hidden layer of {surgery['hidden_units']} units")
    if surgery.get("add_conv"):
        parts.append(f"an added conv block of {surgery['add_conv']} filters")
    parts.append(f"dropout {surgery.get('dropout', 0.2):g}")
    if surgery.get("binary_sigmoid"):
        parts.append("one sigmoid output")
    return ", ".join(p for p in parts if p)


def _build_config(manifest: str, base: str, surgery: dict, values: dict) -> TrainConfig:
    # The Train page's own choices (e.g. the old data) win over the Model page's.
    settings = {
        k: surgery[k] for k in SURGERY_KEYS if surgery.get(k) is not None and k not in values
    }
    if settings.get("cut_at") is not None:
        settings["cut_at"] = str(settings["cut_at"])
    clean = {k: v for k, v in values.items() if v is not None}
    config = TrainConfig(data=manifest, base=base, **settings, **clean)
    # The demo's cap holds for the whole run (both phases), whatever the widgets allowed.
    return demo_capped(config, DEMO_MAX_EPOCHS) if demo_mode() else config


def _fits(name: str, value: Any, max_epochs: int | None) -> bool:
    """Whether ``value`` is one the field's widget can show (a remembered value from before a
    demo cap or a changed field is dropped, not an error)."""
    f = FIELDS[name]
    choices = f.metadata.get("choices")
    if isinstance(f.default, bool):
        return isinstance(value, bool)
    if choices:
        return value in choices
    if value is None:
        return f.default is None  # the "automatic" (empty) box
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    lo, hi = _limits(name, max_epochs)
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _restore_settings(max_epochs: int | None) -> None:
    """Put the remembered settings (``train_settings``) back into the form's keys.

    Streamlit forgets a widget's value whenever the widget is not drawn: another page, a
    reload, a closed expander. What the person is editing (already in the keys) wins.
    """
    for name, value in (st.session_state.get("train_settings") or {}).items():
        if name in FORM_FIELDS and name not in st.session_state and _fits(name, value, max_epochs):
            st.session_state[name] = value


def _remember_settings(
    values: dict[str, Any], max_epochs: int | None, shown_run: dict[str, Any]
) -> None:
    """Remember the form's settings that differ from its defaults and from the shown run's
    (those come back from the run, `_prefill_from_run`); written only on a change."""
    changed = {
        n: v
        for n, v in values.items()
        if n in FORM_FIELDS
        and v != _default(n, max_epochs)
        and (n not in shown_run or shown_run[n] != v)
    }
    if changed != (st.session_state.get("train_settings") or {}):
        remember(train_settings=changed or None)


def _prefill_from_run(run_dir: Path) -> dict[str, Any]:
    """Show the shown run's settings in the form, except those the person is editing; return
    them (`TrainConfig.requested`: what was automatic stays the empty box).

    Streamlit forgets a widget's value when its page is left; without this the form would
    come back with the defaults while the run below it used other settings.
    """
    config = jobs.read_config(run_dir)  # {} when unreadable
    with contextlib.suppress(RetrainError):
        config = {k: v for k, v in TrainConfig.from_json(config).requested().items() if k in config}
    for name in FORM_FIELDS:
        if name in config and name not in st.session_state:
            if config[name] is None and FIELDS[name].default is not None:
                continue
            st.session_state[name] = config[name]
    return config


def _live(run_id: str, run_dir: Path) -> dict[str, Any]:
    """Read the run's new metrics lines and progress into session state; return the cache."""
    cache = st.session_state.setdefault(LIVE_KEY, {}).setdefault(
        run_id, {"offset": 0, "rows": [], "progress": None}
    )
    rows, offset = jobs.read_new_metrics(run_dir, cache["offset"])
    if offset < cache["offset"]:  # the file was rewritten (a resumed run)
        cache["rows"] = []
    if rows:
        by_epoch = {r["epoch"]: r for r in cache["rows"]}
        by_epoch.update({r["epoch"]: r for r in rows if "epoch" in r})
        cache["rows"] = [by_epoch[e] for e in sorted(by_epoch)]
    cache["offset"] = offset
    cache["progress"] = jobs.read_progress(run_dir)
    return cache


def _curve_figure(rows: list[dict], metric: str, title: str) -> go.Figure:
    fig = go.Figure()
    epochs = [r["epoch"] for r in rows]
    for key, name in ((metric, "train"), (f"val_{metric}", "validation")):
        fig.add_trace(
            go.Scatter(x=epochs, y=[r.get(key) for r in rows], mode="lines+markers", name=name)
        )
    phase1 = [r["epoch"] for r in rows if r.get("phase", 1) == 1]
    if phase1 and any(r.get("phase") == 2 for r in rows):
        fig.add_vline(
            x=max(phase1) + 0.5,
            line_dash="dash",
            line_color="gray",
            annotation_text="fine-tuning starts",
        )
    fig.update_layout(
        title=title,
        xaxis_title="epoch",
        height=320,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.25),
    )
    # Epochs are whole numbers; without this plotly labels 1.2, 1.4, ...
    fig.update_xaxes(tickmode="linear", dtick=max(1, len(epochs) // 10), tick0=1)
    if epochs:  # half an epoch either side, or the markers' padding draws a tick past the last
        fig.update_xaxes(range=[min(epochs) - 0.5, max(epochs) + 0.5])
    return fig


def _lr_figure(found: dict) -> go.Figure:
    """The learning-rate range test: smoothed loss against the rate, the chosen rate marked."""
    fig = go.Figure(
        go.Scatter(x=found["lrs"], y=found["losses"], mode="lines", name="loss (smoothed)")
    )
    fig.add_vline(
        x=found["lr"],
        line_dash="dash",
        line_color="#e4572e",
        annotation_text=f"chosen: {found['lr']:.2g}",
    )
    fig.update_layout(
        title="Learning rate finder: training loss while the rate grows",
        xaxis_title="learning rate (log scale)",
        yaxis_title="loss",
        height=300,
        margin=dict(l=10, r=10, t=40, b=10),
        showlegend=False,
    )
    fig.update_xaxes(type="log")
    return fig


def _use_rate(lr: float) -> None:
    """The "use this rate" button: put the found rate in the form (the person can edit it)."""
    st.session_state["lr"] = float(lr)


def _lr_view(run_dir: Path) -> None:
    """The run's range test, when it found its learning rate: the curve and the choice."""
    found = rundir.read_lr_find(run_dir)
    if not found or not found.get("lrs"):
        return
    with st.expander(f"Learning rate: {found['lr']:.2g}, found by a range test", expanded=False):
        st.plotly_chart(_lr_figure(found), key="train_lr_chart")
        what = "cached base outputs" if found.get("on") == "features" else "images"
        st.caption(
            f"{found.get('steps', len(found['lrs']))} training steps on "
            f"{found.get('images', '?')} {what} while the rate grew from "
            f"{found['lrs'][0]:.0e} to {found['lrs'][-1]:.1g} ({found.get('seconds', 0):.1f} s); "
            "the chosen rate sits where the loss falls steadily, before its lowest point "
            "(fastai's 'valley' rule). Phase 2 (fine-tuning) uses a tenth of it."
        )
        st.button(
            "Use this learning rate for the next run",
            key="train_use_lr",
            on_click=_use_rate,
            args=(found["lr"],),
            help="Puts it in the Learning rate box above; change it there if you like.",
        )


def _done_text(status: dict, rows: list[dict]) -> str:
    """The headline of a finished run: the validation score of the model that Evaluate, Export
    and a share use (``best.keras``, of epoch ``saved_epoch``), not of some other epoch."""
    what = "Stopped" if status.get("stopped") else "Done"
    epoch, accuracy = rundir.saved_score(status, rows)
    if accuracy is None:
        best = jobs.best_val_accuracy(rows)
        return f"{what}: best validation accuracy {best:.1%}." if best is not None else f"{what}."
    text = f"{what}: validation accuracy {accuracy:.1%} at epoch {epoch}"
    if status.get("bias_corrected"):
        return text + " before the old/new bias correction; Evaluate scores the corrected model."
    return text + ", the model that Evaluate and Export use."


def _stopped_text(status: dict) -> str | None:
    """ "Early stopping ended it at epoch N of M" when early stopping ended the run."""
    budget, stopped = status.get("epochs_budget"), status.get("early_stopped_epoch")
    if stopped and budget:
        return (
            f"Early stopping ended it at epoch {stopped} of {budget}: the validation loss had "
            "stopped improving."
        )
    return None


def _task_figure(rows: list[dict]) -> go.Figure:
    """The forgetting curve: held-out accuracy of the old classes and of the new ones."""
    fig = go.Figure()
    epochs = [r["epoch"] for r in rows]
    for key, name, colour in (
        ("old_val_accuracy", "old classes", "#e4572e"),
        ("new_val_accuracy", "new classes", "#3bb273"),
    ):
        if any(r.get(key) is not None for r in rows):
            fig.add_trace(
                go.Scatter(
                    x=epochs,
                    y=[r.get(key) for r in rows],
                    mode="lines+markers",
                    name=name,
                    line=dict(color=colour),
                )
            )
    fig.update_layout(
        title="Old task vs new task (held-out accuracy, among all classes)",
        xaxis_title="epoch",
        yaxis=dict(range=[0, 1.02], tickformat=".0%"),
        height=320,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.25),
    )
    fig.update_xaxes(tickmode="linear", dtick=max(1, len(epochs) // 10), tick0=1)
    return fig


def _progress_text(progress: dict) -> tuple[float, str]:
    phase = progress.get("phase")
    if not isinstance(phase, int):
        return 0.0, f"{str(phase or 'starting').capitalize()}..."
    epochs, batches = progress.get("epochs") or 1, progress.get("batches") or 1
    epoch, batch = progress.get("epoch") or 1, progress.get("batch") or 0
    done = ((epoch - 1) + batch / batches) / epochs
    parts = [f"Epoch {epoch}/{epochs}", f"batch {batch}/{batches}"]
    if progress.get("images_per_second"):
        parts.append(f"{progress['images_per_second']:,.0f} images/s")
    eta = progress.get("eta_seconds")
    if eta is not None:
        parts.append(f"ETA {eta / 60:.1f} min" if eta >= 90 else f"ETA {eta:.0f} s")
    if phase == 2:
        parts.insert(0, "fine-tuning")
    return min(max(done, 0.0), 1.0), " · ".join(parts)


def _log_tail(cache: dict[str, Any], run_dir: Path) -> str:
    """The log's tail, re-read only when the log grew (the view redraws every second)."""
    size = rundir.log_size(run_dir)
    if cache.get("log_size") != size:
        cache["log_size"], cache["log"] = size, jobs.read_log_tail(run_dir)
    return cache["log"]


def _run_view(run_id: str, run_dir: Path) -> None:
    """Everything about one run; redrawn every second by the fragment while it is active."""
    status = jobs.read_status(run_dir)
    state = status["state"]
    cache = _live(run_id, run_dir)
    # config.json is final once the worker has recorded its device: read it once per run.
    config = cache.get("config") or jobs.read_config(run_dir)
    if config.get("device"):
        cache["config"] = config
    device = config.get("device") or {}
    if device:
        st.caption(
            f"Device: {device.get('device', '?')} · backend {device.get('backend', '?')}"
            + (f" · {config['precision']}" if config.get("precision") else "")
            + (" · feature cache on" if config.get("feature_cache") else "")
        )
    if state == "queued" and status.get("waiting"):  # a Ray job waiting for the cluster
        waiting, jobs_waiting = status["waiting"], status.get("cluster_waiting")
        st.info(  # Ray tells how many jobs wait, not the place of this one
            waiting[0].upper()
            + waiting[1:]
            + (f" ({jobs_waiting} jobs waiting there)." if jobs_waiting else ".")
        )
    elif state == "queued":
        position = status.get("position")
        st.info(
            f"Waiting for a free training slot (position {position} in the queue)."
            if position
            else "Starting the training process..."
        )
    elif state in ("running", "stopping"):
        progress = cache["progress"] or {}
        value, text = _progress_text(progress)
        st.progress(
            value, text=("Stopping after this batch · " if state == "stopping" else "") + text
        )
    elif state == "failed":
        st.error(status.get("error") or "The training failed; see the log below.")
    elif state == "interrupted":
        st.warning(status.get("error"))
    elif state == "done":
        st.success(_done_text(status, cache["rows"]))
        stopped = _stopped_text(status)
        if stopped:
            st.caption(stopped)
        link("evaluate", "Evaluate the model", icon=":material/fact_check:")
    rows = cache["rows"]
    if rows:
        left, right = st.columns(2)
        with left:
            st.plotly_chart(_curve_figure(rows, "loss", "Loss"), key="train_loss_chart")
        with right:
            st.plotly_chart(_curve_figure(rows, "accuracy", "Accuracy"), key="train_accuracy_chart")
        if any(r.get("old_val_accuracy") is not None for r in rows):
            st.plotly_chart(_task_figure(rows), key="train_tasks_chart")
            st.caption(
                "Each epoch the held-out images of the old classes and of the new ones are "
                "scored among all classes: a falling old curve is forgetting, as it happens."
            )
    elif state in ("queued", "running", "stopping"):
        st.caption("The curves appear when the first epoch finishes.")
    _lr_view(run_dir)
    with st.expander("Worker log"):
        st.code(_log_tail(cache, run_dir) or "(empty)", language=None)
    if state not in jobs.ACTIVE_STATES and st.session_state.get("_train_was_active") == run_id:
        # The run just ended: rerun the whole page once so the buttons and polling update.
        st.session_state.pop("_train_was_active", None)
        st.rerun()
    if state in jobs.ACTIVE_STATES:
        st.session_state["_train_was_active"] = run_id


def _show_picked_run() -> None:
    picked = st.session_state["train_run_pick"]
    remember(run_id=picked)
    st.query_params["run"] = picked


workspace = ensure_session()
st.title("Train")
manifest = require("dataset", "Upload a dataset first.", "dataset")
base = require("base", "Choose a base model first.", "model")
surgery = st.session_state.get("surgery") or {}

# Which run to show: the link (?run=), else the remembered one.
run_id = st.query_params.get("run") or st.session_state.get("run_id")
run_dir: Path | None = None
status: dict[str, Any] = {}
if run_id:
    try:
        run_dir = run_path(workspace, run_id)
        status = jobs.read_status(run_dir)
    except RetrainError:
        run_dir, run_id = None, None
if run_id and st.query_params.get("run") != run_id:
    st.query_params["run"] = run_id
if run_id and st.session_state.get("run_id") != run_id:
    remember(run_id=run_id)
active = status.get("state") in jobs.ACTIVE_STATES
epochs_cap = DEMO_MAX_EPOCHS if demo_mode() else None
_restore_settings(epochs_cap)  # first: what the person set wins over the shown run's
shown_run = _prefill_from_run(run_dir) if run_dir is not None else {}

with st.container(border=True):
    st.subheader("Settings")
    values = _config_form(manifest, base, surgery, epochs_cap)
    _remember_settings(values, epochs_cap, shown_run)
    start, stop, resume = st.columns(3)
    clicked_start = start.button(
        "Start training", key="start_training", type="primary", disabled=active
    )
    clicked_stop = stop.button("Stop", key="stop_training", disabled=not active)
    clicked_resume = False
    if status.get("resumable"):
        clicked_resume = resume.button("Resume from the last epoch", key="resume_training")

try:
    if clicked_start:
        config = _build_config(manifest, base, surgery, values)
        run_dir = Path(runners.get_runner().start(config, workspace)["run_dir"])
        remember(run_id=run_dir.name)
        st.query_params["run"] = run_dir.name
        st.rerun()
    if clicked_stop and run_dir is not None:
        runners.runner_for(run_dir).stop(run_dir)
        st.toast("Stopping after the current batch; what was trained is kept.")
    if clicked_resume and run_dir is not None:
        runners.runner_for(run_dir).resume(run_dir, workspace)
        st.rerun()
except RetrainError as err:
    st.error(str(err))

if run_id and run_dir is not None:
    st.subheader(f"Run {run_id}")
    if active:
        st.fragment(run_every=1.0)(_run_view)(run_id, run_dir)
    else:
        _run_view(run_id, run_dir)
        from pages._share import share_panel  # the Share button of a finished run

        share_panel(run_dir, key="train_share")


def _runs_table(workspace: Path, runs: list[dict] | None = None) -> None:
    """This session's runs. While a run trains it is redrawn with the live view (it said
    0/6 epochs beside a progress bar at epoch 4/6); the run picker below stays outside, so
    picking a run still reruns the whole page."""
    st.dataframe(
        [
            {
                "run": r["run_id"],
                "state": r["state"],
                "base": r["base"],
                "epochs": f"{r['epochs_done']}/{r['epochs']}",
                "best val accuracy": r["best_val_accuracy"],
            }
            for r in (runs if runs is not None else jobs.list_runs(workspace))
        ],
        hide_index=True,
        key="train_runs_table",
    )


runs = jobs.list_runs(workspace)
if runs:
    st.subheader("This session's runs")
    if active:
        st.fragment(run_every=2.0)(_runs_table)(workspace)  # lists the runs anew each time
    else:
        _runs_table(workspace, runs)
    ids = [r["run_id"] for r in runs]
    if run_id in ids:
        st.session_state["train_run_pick"] = run_id
    st.selectbox("Show run", ids, key="train_run_pick", on_change=_show_picked_run)
