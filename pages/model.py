"""The Model step: pick a base model, look at its layers, put a new head on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from pages._service import default_head_choice, model_answer
from pages._stack import stack_html
from pages._ui import (
    ORIGINAL_NAMES_WORDS,
    as_text,
    demo_mode,
    ensure_session,
    link,
    load_dataset_cached,
    old_data_picker,
    page_words,
    remember,
    saved_upload,
)
from retrain.errors import RetrainError
from retrain.models import (
    MODEL_EXTENSIONS,
    PREPROCESSING_CHOICES,
    ZOO,
    layer_stack,
)
from retrain.models.preprocessing import PREPROCESSING

SOURCES = ("Built-in starter model", "Keras applications (ImageNet)", "Upload .keras/.h5")
WEIGHTS = ("ImageNet (downloaded once)", "None (random weights)", "Upload a weights file")
FREEZE = {
    "all": "Frozen base (feature extraction)",
    "top": "Fine-tune the top K layers",
    "none": "Train everything",
}


# On this page the preprocessing flags are the Preprocessing section's widgets.
CLI_WORDS = (
    ("(--old-data)", "(the Preprocessing section above)"),
    ("with --preprocessing", "there"),
    ("Set --preprocessing", "Choose it in the Preprocessing section above"),
    (" (--preprocessing)", ""),
    *ORIGINAL_NAMES_WORDS,
)


def model_page_words(text: str) -> str:
    """``text`` in this page's words (`pages._ui.page_words` with the preprocessing widgets)."""
    return page_words(text, CLI_WORDS)


def conversion_words(origin: dict) -> str:
    """What the page says about a converted Keras 2 model: how close it is to the original,
    or that the comparison is running (a model worker checks it after its first answer)."""
    if origin.get("conversion_max_abs_diff") is None:
        return (
            f"{origin['converted']}; its outputs are being compared with the original's "
            "(read with tf_keras) in the background. If they differ, the model is refused, "
            "with the reason, before anything trains on it."
        )
    return (
        f"{origin['converted']}; outputs match the original's (read with tf_keras) within "
        f"{origin['conversion_max_abs_diff']:.1e}."
    )


def seed_widgets(spec: str, names: list[str]) -> None:
    """Start this page's widgets from the remembered choice (``surgery``) for this model.

    Streamlit drops a page's widget values when another page is shown, and on a reload; without
    this, coming back here reset every choice (keep mode, freezing, head) to its default and
    wrote that over the remembered one, so Train trained something else.
    """
    surgery = st.session_state.get("surgery") or {}
    if not surgery or st.session_state.get("base") != spec:
        return
    mode, _, k = str(surgery.get("freeze") or "all").partition(":")
    values: dict[str, Any] = {
        "head_mode": "keep" if surgery.get("keep_old_classes") else "replace",
        "hidden_units": int(surgery.get("hidden_units") or 0),
        "dropout": float(surgery.get("dropout", 0.2)),
        "add_conv": int(surgery.get("add_conv") or 0),
        "binary_sigmoid": bool(surgery.get("binary_sigmoid")),
    }
    if mode in FREEZE:
        values["freeze_mode"] = mode
    if mode == "top" and k.isdigit() and 1 <= int(k) <= len(names):
        values["freeze_k"] = int(k)
    if surgery.get("cut_at") in names:
        values[f"cut_at::{spec}"] = names.index(surgery["cut_at"])
    if surgery.get("original_classes"):
        values["original_classes"] = surgery["original_classes"]
    if surgery.get("preprocessing") in PREPROCESSING_CHOICES:  # found or set: keep that key
        values["preprocessing_choice"] = surgery["preprocessing"]
    for key, value in values.items():
        if key not in st.session_state:
            st.session_state[key] = value


def dataset_classes() -> list[str] | None:
    """Class names of the session's dataset, or None when there is none yet."""
    manifest = st.session_state.get("dataset")
    if not manifest:
        return None
    try:
        return list(load_dataset_cached(manifest).class_names)
    except RetrainError:
        return None


def save_model_upload(files: list[Any], workspace: Path) -> str | None:
    """Save an uploaded model (+ labels.txt) under the workspace's models/ folder; return its path.

    Saved once per upload: the page reruns on every click while the file sits in the uploader,
    and reading + hashing a large model each time is wasted work.
    """
    models = [f for f in files if Path(f.name).suffix.lower() in MODEL_EXTENSIONS]
    if not models:
        return None
    ids = tuple(f.file_id for f in files)
    saved = st.session_state.get("_model_upload_saved")
    if saved and saved[0] == ids and Path(saved[1]).is_file():
        return saved[1]
    model = models[0]
    saved_path = saved_upload(workspace / "models", model, default_name="model.h5")
    if saved_path is None:
        return None
    target = Path(saved_path)
    labels = [f for f in files if Path(f.name).name.lower().endswith(".txt")]
    if labels:
        (target.parent / "labels.txt").write_bytes(labels[0].getvalue())
    st.session_state["_model_upload_saved"] = (ids, str(target))
    return str(target)


def layer_table(stack: list[dict], query: str = "") -> pd.DataFrame:
    """The layer table under the bars: one row per layer, filtered by name or type."""
    table = pd.DataFrame(stack)
    table["output_shape"] = table["output_shape"].astype(str)
    columns = [
        c for c in ("name", "type", "output_shape", "params", "status", "parent") if c in table
    ]
    if "parent" in table and not table["parent"].notna().any():
        columns.remove("parent")  # not a nested model: the column would say "None" on every row
    if query:
        mask = table["name"].str.contains(query, case=False, regex=False) | table[
            "type"
        ].str.contains(query, case=False, regex=False)
        table = table[mask]
    return table[columns]


def spec_from_widgets(source: str, workspace: Path) -> tuple[str | None, bool]:
    """The BASE spec the widgets describe, and whether it loads without asking (no download)."""
    if source == SOURCES[0]:
        return "builtin:digits-cnn", True
    if source == SOURCES[1]:
        name = st.selectbox(
            "Backbone", list(ZOO), key="zoo_name", help="keras.applications; all take RGB images"
        )
        weights = st.radio("Weights", WEIGHTS, key="zoo_weights", horizontal=True)
        st.caption(
            "Why ImageNet: features learnt on 1.2 M photos transfer to most image tasks; "
            "random weights only show the architecture."
        )
        if weights == WEIGHTS[0]:
            return f"applications:{name}:imagenet", False
        if weights == WEIGHTS[1]:
            return f"applications:{name}:none", True
        # An upload, not a server path: a hosted app must never read files outside the session.
        upload = st.file_uploader(
            "Weights file (.weights.h5 / .h5) for this backbone",
            type=["h5"],
            key="zoo_weights_file",
        )
        path = save_model_upload([upload], workspace) if upload else None
        return (f"applications:{name}:{path}" if path else None), False
    files = st.file_uploader(
        "Model file (.keras or .h5) and optional labels.txt",
        type=["keras", "h5", "hdf5", "txt"],
        accept_multiple_files=True,
        key="model_upload",
        help="Teachable Machine exports (keras_model.h5 + labels.txt) work as they are.",
    )
    if not files:
        earlier = st.session_state.get("base", "")
        if earlier and ":" not in earlier and Path(earlier).is_file():
            st.caption(f"Using the model uploaded earlier: {as_text(Path(earlier).name)}")
            return earlier, True
        return None, False
    return save_model_upload(files, workspace), True


# ------------------------------------------------------------------------------------------

workspace = ensure_session()
st.title("Model")
st.caption(
    "Pick a pretrained model, look at its layers, and replace its head (the classifier) with "
    "one for your classes."
)

remembered = st.session_state.get("base", "")
default_source = 0
if remembered.startswith("applications:") and not demo_mode():
    default_source = 1
elif remembered and not remembered.startswith("builtin:") and not demo_mode():
    default_source = 2
source = st.radio("Where the model comes from", SOURCES, index=default_source, key="model_source")
spec, automatic = spec_from_widgets(source, workspace)
if spec is None:
    st.info("Upload a .keras or .h5 model to continue, or pick another source.")
    st.stop()
loaded = automatic or spec == remembered
if not loaded and st.button("Load model", key="model_load", type="primary"):
    loaded = True
if not loaded:
    st.info("Press **Load model** (ImageNet weights are downloaded once, then cached).")
    st.stop()

info = model_answer(
    "describe",
    "Loading the model (the built-in one trains for a few seconds, once)",
    spec=spec,
    workspace=str(workspace),
)
if info is None:
    st.stop()
seed_widgets(spec, [row["name"] for row in info["layers"]])
defaults = default_head_choice(info)  # the Dataset page asked for this head ahead of time

# --- preprocessing: set by hand, or found by scoring the original task's images ----------
# A lazy expander, like the head's options below: closed, the choice is the remembered one
# (`seed_widgets`), else auto, and a visitor's browser never loads the select box's scripts.
prep_options = st.expander(
    "Preprocessing (how pixels are scaled for this model)",
    key="preprocessing_options",
    on_change="rerun",
)
prep_choice = st.session_state.get("preprocessing_choice", "auto")
probe_data = None
if prep_options.open:
    with prep_options:
        prep_choice = st.selectbox(
            "Preprocessing",
            PREPROCESSING_CHOICES,
            key="preprocessing_choice",
            format_func=lambda k: (
                "auto (detect, or probe with old data)"
                if k == "auto"
                else f"{k}: {PREPROCESSING[k]}"
            ),
        )
        st.caption(
            "Why it matters: a model fed pixels scaled differently from its training quietly gets "
            "everything wrong. Give the original task's images and each way is scored on them."
        )
        if spec.startswith("builtin:"):
            if st.checkbox(
                "Check with the sample digits 0-4 (its original task)", key="probe_sample"
            ):
                from retrain.data.sample import sample_dataset

                probe_data = str(sample_dataset(workspace, "0-4"))
        else:
            old_upload = st.file_uploader(
                "The original task's images (zip of class folders), to probe",
                type=["zip"],
                key="probe_old_data",
            )
            if old_upload is not None:
                probe_data = saved_upload(workspace / "uploads", old_upload)
if prep_choice != "auto" or probe_data:
    probed = model_answer(
        "describe",
        "Scoring each preprocessing on the original task's images",
        spec=spec,
        preprocessing=prep_choice,
        old_data=probe_data,
        workspace=str(workspace),
    )
    info = probed or info

# --- the base model ------------------------------------------------------------------------
st.subheader(info["name"])
cols = st.columns(5)
cols[0].metric("Parameters", f"{info['total_params']:,}")
cols[1].metric("Trainable", f"{info['trainable_params']:,}")
cols[2].metric("Layers", info["num_layers"])
# "28x28 grayscale" does not fit a fifth of the page: the colour goes in the label.
size, colour = info["input"].rsplit(" ", 1)
cols[3].metric(f"Input ({colour})", size.replace("x", "×", 1), help=f"{info['input']} images")
cols[4].metric("Original classes", len(info["class_names"] or []) or info["output_shape"][-1])
st.caption(
    f"Preprocessing: **{info['preprocessing']}**, {PREPROCESSING[info['preprocessing']]} "
    f"({model_page_words(info['origin'].get('preprocessing_source', ''))}). The new model applies it "
    "inside, so it takes raw images."
)
if info.get("preprocessing_warning") and prep_choice == "auto":
    st.warning(model_page_words(info["preprocessing_warning"]))
if info.get("preprocessing_probe"):
    probe_info = info["preprocessing_probe_info"]
    scores = pd.DataFrame(
        {
            "preprocessing": list(info["preprocessing_probe"]),
            "accuracy": list(info["preprocessing_probe"].values()),
            "log loss": [probe_info["log_loss"][k] for k in info["preprocessing_probe"]],
        }
    ).sort_values("log loss")
    scores["chosen"] = scores["preprocessing"] == info["preprocessing"]
    st.dataframe(
        scores,
        hide_index=True,
        key="probe_scores",
        column_config={"accuracy": st.column_config.NumberColumn(format="percent")},
    )
    st.caption(
        f"Probe: {probe_info['images']} images of the original task "
        f"({probe_info['per_class']} per class, seed {probe_info['seed']}) through the original "
        f"head; best: **{probe_info['best']}**. {probe_info['margin'].capitalize()}."
    )
    if probe_info.get("warning"):
        st.warning(model_page_words(probe_info["warning"]))
if info["origin"].get("converted"):
    st.caption(conversion_words(info["origin"]))
if info["class_names"]:
    st.caption("Original classes: " + ", ".join(info["class_names"][:20]))

# --- the architecture, drawn as soon as it is known (the new head colours it below) ----------
st.subheader("Layer stack")
st.caption(
    "One bar per block of layers, input at the top; length = parameters, colour = what happens."
)
with st.container(key="layer_stack"):
    stack_slot = st.empty()


def draw_stack(rows: list[dict]) -> None:
    stack_slot.html(stack_html(rows))


draw_stack(layer_stack(info["layers"]))

# --- head replacement controls -------------------------------------------------------------
classes = dataset_classes()
names = [row["name"] for row in info["layers"]]
st.subheader("New head")
if classes is None:
    st.info("No dataset yet: the new head needs your classes. The architecture is shown below.")
    link("dataset", "Go to Dataset")
else:
    st.caption(f"{len(classes)} classes from your dataset: {as_text(', '.join(classes[:12]))}")
HEAD_MODES = {
    "replace": "Replace the classifier (new classes only)",
    "keep": "Add classes, keep the old ones",
}
head_mode = st.radio(
    "What happens to the model's own classes",
    list(HEAD_MODES),
    format_func=HEAD_MODES.get,
    key="head_mode",
    horizontal=True,
    disabled=not info["has_original_head"],
    help="Replace: the model forgets its classes and learns yours. Keep: its classifier is "
    "widened, its classes stay (first, in their order) and yours are added after them.",
)
keep_old = head_mode == "keep" and info["has_original_head"]
old_data = original_classes = None
if keep_old:
    st.caption(
        "Why keep: one model that knows the old classes and yours. Its original head is kept "
        "(so the cut and head options below do not apply). A few old images rehearsed every "
        "epoch keep the old classes; without them only distillation does, which keeps far less."
    )
    if not info["class_names"]:
        original_classes = (
            st.text_input(
                "Names of the model's outputs, comma-separated, in output order",
                key="original_classes",
                placeholder="empty = the old images' class folders, sorted",
            ).strip()
            or None
        )
    old_data = old_data_picker(workspace, spec, "model")

suggested = names.index(defaults["cut_at"])
cut_key = f"cut_at::{spec}"
# Where to cut is said in words; the layer list is one click away (a lazy expander, as the
# head's options: closed, the cut is the remembered one, else the suggested one).
cut_index = st.session_state.get(cut_key, suggested)
if not isinstance(cut_index, int) or not 0 <= cut_index < len(names):
    cut_index = suggested
removed = names[cut_index + 1 :]
st.caption(
    f"Keeps the original head ({', '.join(removed[:8])}) and widens its output layer."
    if keep_old
    else f"Cut after **{names[cut_index]}**: removes {len(removed)} "
    f"layer{'s' if len(removed) != 1 else ''} ({', '.join(removed[:8])}"
    f"{' …' if len(removed) > 8 else ''}). "
    + (
        "Why this default: it is the last layer before the original classifier."
        if cut_index == suggested
        else f"Default: after '{info['suggested_cut']}', the end of the feature extractor."
    )
)
if not keep_old:
    cut_options = st.expander("Cut somewhere else", key="cut_options", on_change="rerun")
    if cut_options.open:
        with cut_options:
            cut_index = st.selectbox(
                "Cut after layer (the last layer that is kept)",
                range(len(names)),
                # A fixed default: a remembered choice (seed_widgets) overrides it. (A default
                # that went to None once the key existed made a new widget, which the browser
                # showed empty.)
                index=suggested,
                format_func=lambda i: f"{i} · {names[i]} ({info['layers'][i]['type']})",
                key=cut_key,
            )
freeze_mode = st.radio(
    "What trains",
    list(FREEZE),
    index=list(FREEZE).index(defaults["freeze"]),
    format_func=FREEZE.get,
    key="freeze_mode",
    horizontal=True,
)
st.caption(
    "Why frozen first: the base keeps what it already knows and only the new head learns; "
    "fine-tune later at a 10-100x lower learning rate. BatchNorm layers always stay frozen."
)
kept_count = cut_index + 1
freeze = freeze_mode
if freeze_mode == "top":
    k = st.slider(
        "K: layers at the top of the base that train",
        1,
        max(kept_count, 2),
        min(20, kept_count),
        key="freeze_k",
    )
    freeze = f"top:{k}"
# The head's options sit in lazy expanders, built only when opened (their number inputs and
# slider were 0.1-0.15 of the first visit's 0.7 CPU-s in Chromium). Closed, the values are the
# ones remembered for this model (`seed_widgets`), else the defaults; "Before → after" lists
# the head they give.
hidden_units = st.session_state.get("hidden_units", defaults["hidden_units"])
dropout = st.session_state.get("dropout", defaults["dropout"])
two_classes = classes is not None and len(classes) == 2 and not keep_old
binary_sigmoid = two_classes and st.session_state.get("binary_sigmoid", defaults["binary_sigmoid"])
add_conv = st.session_state.get("add_conv", defaults["add_conv"])


def head_number(label: str, key: str, top: int, step: int) -> int:
    """A head option's number input (0 to ``top``), its default from `default_head_choice`."""
    return st.number_input(label, 0, top, defaults[key], step=step, key=key, disabled=keep_old)


head_options = st.expander(  # a fixed label (see the layer table's below)
    "Head options (Keras: Dense, Dropout)", key="head_options", on_change="rerun"
)
if head_options.open:
    with head_options:
        hidden_units = head_number("Hidden Dense units (0 = none)", "hidden_units", 4096, 32)
        st.caption("Why none: one output layer on pooled features is enough for most transfers.")
        dropout = st.slider(
            "Dropout", 0.0, 0.8, defaults["dropout"], 0.05, key="dropout", disabled=keep_old
        )
        st.caption("Why 0.2: a little dropout keeps a small head from memorising few images.")
        if two_classes:
            binary_sigmoid = st.checkbox(
                "One sigmoid unit (binary cross-entropy)",
                defaults["binary_sigmoid"],
                key="binary_sigmoid",
            )
            st.caption("Why off: softmax over 2 units is equivalent and keeps the same code path.")
conv_block = st.expander(
    "Add a conv block (Keras: Conv2D 3×3 + MaxPooling2D)", key="conv_block", on_change="rerun"
)
if conv_block.open:
    with conv_block:
        add_conv = head_number("Filters (0 = no block)", "add_conv", 1024, 16)
        st.caption(
            "Why none: pretrained features are usually enough; a block helps when you cut early "
            "(a 4-D cut output) and the new images differ a lot."
        )

choice = {
    "cut_at": names[cut_index],
    "freeze": freeze,
    "hidden_units": int(hidden_units),
    "dropout": float(dropout),
    "add_conv": int(add_conv),
    "binary_sigmoid": bool(binary_sigmoid),
}
if prep_choice != "auto" or info.get("preprocessing_probe"):
    choice["preprocessing"] = info["preprocessing"]  # Train uses what was found or set here
if keep_old:  # the original head is kept: no cut or head options go to Train
    choice.update(
        cut_at=None,
        hidden_units=0,
        add_conv=0,
        binary_sigmoid=False,
        keep_old_classes=True,
        old_data=old_data,
        original_classes=original_classes,
    )
base_label = info["name"]
preview = None
if classes is not None:
    # A replaced head depends on the number of classes only: sessions share that answer.
    named = {"classes": list(classes)} if keep_old else {"num_classes": len(classes)}
    preview = model_answer(
        "head_preview",
        "Building the new model",
        words=model_page_words,
        spec=spec,
        choice=choice,
        workspace=str(workspace),
        **named,
    )
    if preview is not None and (
        st.session_state.get("base") != spec
        or st.session_state.get("surgery") != choice
        or st.session_state.get("base_label") != base_label
    ):
        remember(base=spec, base_label=base_label, surgery=choice)
elif st.session_state.get("base") != spec:
    remember(base=spec, base_label=base_label, surgery=choice)

# --- before / after -------------------------------------------------------------------------
if preview is not None:
    diff = preview["diff"]
    st.subheader("Before → after")
    cols = st.columns(4)
    cols[0].metric(
        "Parameters",
        f"{diff['params_after']:,}",
        f"{diff['params_after'] - diff['params_before']:+,} vs before",
        delta_color="off",  # fewer parameters is not bad news
    )
    cols[1].metric("Trainable parameters", f"{diff['trainable_params']:,}")
    cols[2].metric("Frozen layers", diff["frozen"], help=f"{diff['batchnorm_frozen']} BatchNorm")
    cols[3].metric("Trainable base layers", diff["trainable"])
    loss = (
        "sparse categorical cross-entropy"
        if preview["loss"].startswith("sparse")
        else "binary cross-entropy"
    )
    if diff.get("mode") == "keep":  # nothing removed; the original head's output grows
        changes = (
            f"- **Kept**: the original head ({', '.join(diff['kept_head'])}); its output layer "
            f"'{diff['widened']}' widened from {len(diff['old_classes'])} to "
            f"{preview['output_shape'][-1]} units\n"
        )
    else:
        changes = (
            f"- **Removed** ({len(diff['removed'])}): "
            f"{', '.join(diff['removed'][:12]) or 'nothing'}\n"
            f"- **Added**: {', '.join(diff['added'])}\n"
        )
    st.markdown(
        changes + f"- **Output**: {preview['output_shape'][-1]} units, loss {loss} "
        f"(labels as {preview['label_encoding']}: `{preview['loss']}`)\n"
        f"- **Input**: raw {diff['image_size'][0]}×{diff['image_size'][1]} "
        f"{'grayscale' if info['channels'] == 1 else 'RGB'} images"
    )
    if preview.get("outputs"):
        st.markdown(
            f"**Outputs before → after** (original names: {model_page_words(preview['names_rule'])})"
        )
        st.dataframe(preview["outputs"], hide_index=True, key="model_outputs_table")
    stack = layer_stack(info["layers"], preview["rows"])
    draw_stack(stack)  # now coloured by what the new head keeps, freezes and adds
else:
    stack = layer_stack(info["layers"])

# The tables are one click away, and built only when opened (a lazy expander): the bars above
# are the picture. Drawing two full tables on every visit was most of this page's cost in the
# browser, and sending them was the server's (docs/benchmarks.md, issue 17).
# Fixed labels: an expander's label is part of its identity, and one that changed with the
# head (its layer count) closed itself on every change.
layer_tables = st.expander(
    "All layers (table, search)",
    icon=":material/table_rows:",
    key="layer_tables",
    on_change="rerun",
)
if layer_tables.open:
    with layer_tables:
        query = st.text_input(f"Search the {len(stack)} layers (name or type)", key="layer_search")
        st.dataframe(layer_table(stack, query), hide_index=True, width="stretch", key="layer_table")
if preview is not None:
    summary = st.expander("New model summary", key="new_model_summary", on_change="rerun")
    if summary.open:
        with summary:
            st.dataframe(pd.DataFrame(preview["rows"]), hide_index=True, width="stretch")
    link("train", "Next: train")
