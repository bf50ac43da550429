"""The Evaluate step: how good the run's model really is, what it gets wrong, what it forgot."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from pages._charts import confusion_figure, plain
from pages._service import model_answer
from pages._share import share_panel
from pages._ui import (
    as_text,
    ensure_session,
    link,
    page_words,
    require_finished_run,
    saved_upload,
)
from retrain import evaluate
from retrain.errors import RetrainError
from retrain.models import CLASS_NAME_RULES
from retrain.runs import rundir
from retrain.sessions.uploads import save_upload

GALLERY_MAX = 24


@st.cache_data(show_spinner=False, max_entries=8)
def _splits(run_dir: str, config_mtime: float) -> list[str]:
    """The splits to score, the first the default: the test images when the dataset has them
    (untouched by training and by the choice of the saved epoch), else the validation ones."""
    dataset = evaluate.run_dataset(run_dir)
    return (["test"] if dataset.splits.get("test") else []) + ["val"]


def _split_words(split: str, splits: list[str]) -> str:
    """What the score on ``split`` is worth, and where the untouched one is."""
    if split == "test":
        return (
            "Test images: never trained on and not used to pick the saved epoch, so this score "
            "is the one to expect on new images."
        )
    words = "These validation images also picked the saved epoch, so the score leans a little "
    if "test" in splits:
        return words + "optimistic: the test images give the untouched one."
    return words + (
        "optimistic. For an untouched score, zip your images as `train/` and `test/` folders "
        "that each hold the class folders: Evaluate then offers the test images."
    )


def _forgetting_figure(result: dict) -> go.Figure:
    """Per old class: accuracy before and after retraining, side by side."""
    names = list(result["per_class"])
    fig = go.Figure()
    for key, colour in (("before", "#8aa4c8"), ("after", "#f29e4c")):
        fig.add_bar(
            x=names, y=[result["per_class"][n][key] for n in names], name=key, marker_color=colour
        )
    fig.update_layout(
        barmode="group",
        height=300,
        margin=dict(l=10, r=10, t=30, b=10),
        yaxis=dict(title="accuracy", range=[0, 1], tickformat=".0%"),
        legend=dict(orientation="h", y=1.1),
    )
    return fig


def names_rule(key: str) -> str:
    """How the original classes were named (a `CLASS_NAME_RULES` key), in this page's words."""
    return page_words(CLASS_NAME_RULES.get(key, key))


def _per_class_figure(report: dict) -> go.Figure:
    names = list(report["per_class"])
    fig = go.Figure(
        [
            go.Bar(name=metric, x=names, y=[report["per_class"][n][metric] for n in names])
            for metric in ("precision", "recall", "f1")
        ]
    )
    fig.update_layout(barmode="group", yaxis_range=[0, 1], height=320, margin=dict(t=10, b=10))
    return fig


def _gallery(items: list[dict], empty: str) -> None:
    if not items:
        st.caption(empty)
        return
    cols = st.columns(6)
    for i, item in enumerate(items[:GALLERY_MAX]):
        with cols[i % 6]:
            st.image(
                item["path"],
                caption=f"{item['true']} → {item['predicted']} ({item['confidence']:.0%})",
                width="stretch",
            )
    if len(items) > GALLERY_MAX:
        st.caption(f"Showing {GALLERY_MAX} of {len(items)}.")


def _selected_cell(event, names: list[str]) -> tuple[str, str] | None:
    """The (true, predicted) class of the clicked cell; the figure's labels are escaped."""
    by_label = {plain(name): name for name in names}
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    for point in points:
        if point.get("x") in by_label and point.get("y") in by_label:
            return by_label[point["y"]], by_label[point["x"]]
    return None


workspace = ensure_session()
st.title("Evaluate")
st.caption("How good the model really is, on images it did not train on.")

run_dir = require_finished_run(workspace, "evaluate")
run_id = run_dir.name

try:
    model_path = evaluate.run_model_path(run_dir)
    config = evaluate.read_run_config(run_dir)
    splits = _splits(str(run_dir), rundir.config_path(run_dir).stat().st_mtime)
except RetrainError as err:
    st.error(str(err))
    st.stop()

split = splits[0]
if len(splits) > 1:  # a choice of one is no choice: the caption below names the images
    split = st.radio(
        "Images to score",
        splits,
        format_func={"val": "validation (held out in training)", "test": "test"}.get,
        horizontal=True,
        key="eval_split",
    )
report = model_answer(
    "evaluate_run", "Scoring the model on held-out images", run_dir=str(run_dir), split=split
)
if report is None:
    st.stop()

cols = st.columns(5)
cols[0].metric("Accuracy", f"{report['accuracy']:.1%}", help="sklearn accuracy_score")
cols[1].metric("Loss", f"{report['loss']:.3f}", help="log loss (cross-entropy), sklearn log_loss")
cols[2].metric("Macro F1", f"{report['macro']['f1']:.3f}", help="F1 averaged over classes")
if "top_k" in report:
    cols[3].metric(f"Top-{report['top_k']['k']} accuracy", f"{report['top_k']['accuracy']:.1%}")
cols[4].metric("Images", report["num_images"], help=f"split: {report['split']}")
st.caption(_split_words(split, splits))

names = report["class_names"]
left, right = st.columns(2)
with left:
    st.subheader("Confusion matrix")
    st.caption("Rows: true class, columns: predicted. Click a cell to see its images.")
    event = st.plotly_chart(
        confusion_figure(names, report["confusion_matrix"]),
        key="eval_confusion",
        on_select="rerun",
        selection_mode=("points",),
        width="stretch",
    )
with right:
    st.subheader("Per class")
    st.caption("Precision: how often a prediction of the class is right. Recall: how many found.")
    st.plotly_chart(_per_class_figure(report), key="eval_per_class", width="stretch")

cell = _selected_cell(event, names)
with st.expander("Images in a cell", expanded=cell is not None):
    if cell is None:
        pick = st.columns(2)
        true_name = pick[0].selectbox("True class", names, key="eval_cell_true")
        pred_name = pick[1].selectbox("Predicted class", names, key="eval_cell_pred")
        cell = (true_name, pred_name)
    items = [p for p in report["predictions"] if p["true"] == cell[0] and p["predicted"] == cell[1]]
    st.markdown(
        f"**{len(items)}** images of **{as_text(cell[0])}** predicted as **{as_text(cell[1])}**"
    )
    _gallery(items, "No images in this cell.")

st.subheader("Mistakes, most confident first")
_gallery(report["misclassified"], "No mistakes on these images.")

with st.expander("Full report (JSON)"):
    st.json({k: v for k, v in report.items() if k != "predictions"}, expanded=False)

# --- forgetting check -----------------------------------------------------------------
base_spec = config.get("base", "")
base_info = (
    model_answer(
        "base_head",
        "Reading the base model",
        show_errors=False,
        spec=base_spec,
        workspace=str(workspace),
    )
    if base_spec
    else None
)
if base_spec and base_info is None:
    st.caption("Forgetting check unavailable: the base model of this run cannot be read.")
if base_info and base_info["has_head"]:
    st.subheader("Did it forget the original task?")
    keep_run = bool(config.get("keep_old_classes"))
    st.caption(
        "The original model is scored on its own task; then the retrained model itself, among "
        "all its classes (what a user of the exported model gets)."
        if keep_run
        else "The original model is scored on its own task; then the retrained layers are put "
        "back under the original head and scored again. A frozen base forgets nothing."
    )
    old_data = None
    if config.get("old_data") and st.toggle(
        "Use this run's old data (its held-out images)", value=True, key="eval_forget_own"
    ):
        old_data = str(config["old_data"])
    offer_digits = old_data is None and base_spec.startswith("builtin:digits")
    if offer_digits and st.toggle(
        "Use the built-in digits 0-4 (the original task)", key="eval_forget_builtin"
    ):
        from retrain.data.sample import sample_dataset
        from retrain.sessions.workspace import home

        old_data = str(sample_dataset(home(), "0-4"))
    if old_data is None:
        upload = st.file_uploader(
            "The original task's images (zip of class folders)", type=["zip"], key="eval_forget_zip"
        )
        if upload is not None:
            old_data = saved_upload(workspace / "uploads", upload)
    original_classes = None
    if not base_info["class_names"] and not config.get("original_classes"):
        original_classes = (
            st.text_input(
                "Names of the original outputs, comma-separated, in output order",
                key="eval_original_classes",
                placeholder="empty = the old images' class folders, sorted",
                help="The original model carries no class names. Type them in output order, "
                "or leave this empty: the old images' class folders, sorted, name the outputs.",
            ).strip()
            or None
        )
    # A toggle, not a button: the (cached) result stays on screen while other widgets change.
    if old_data and st.toggle("Check forgetting", key="eval_forget_run"):
        result = model_answer(
            "forgetting",
            "Scoring the original task before and after",
            words=page_words,
            spec=base_spec,
            run_dir=str(run_dir),
            data=old_data,
            workspace=str(workspace),
            original_classes=original_classes,
        )
        if result is not None:
            cols = st.columns(3)
            cols[0].metric("Before retraining", f"{result['before']:.1%}")
            cols[1].metric("After retraining", f"{result['after']:.1%}")
            cols[2].metric("Drop", f"{result['drop']:.1%}", delta_color="inverse")
            st.info(result["note"])
            st.caption(
                f"After = {result['method_help']}. {result['num_images']} old images; "
                f"original classes named by: {names_rule(result['class_names_rule'])}."
            )
            st.plotly_chart(_forgetting_figure(result), key="eval_forget_chart", width="stretch")
            st.dataframe(
                [
                    {"class": name, "before": row["before"], "after": row["after"]}
                    for name, row in result["per_class"].items()
                ],
                hide_index=True,
                key="eval_forget_table",
                column_config={  # shares, shown like the metrics above (95.6%, not 0.956)
                    "before": st.column_config.NumberColumn(format="percent"),
                    "after": st.column_config.NumberColumn(format="percent"),
                },
            )

# --- try an image -----------------------------------------------------------------------
st.subheader("Try an image")
uploads = st.file_uploader(
    "Images to classify",
    type=["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"],
    accept_multiple_files=True,
    key="eval_try_images",
)
top_k = st.slider(
    "Classes to show", 1, max(1, min(5, len(names))), min(3, len(names)), key="eval_k"
)
show_cam = st.toggle(
    "Show where the model looked (Grad-CAM)",
    key="eval_gradcam",
    help="Red = the regions that raised the top class's score most. Needs a conv base.",
)
if uploads:
    try:
        paths = [save_upload(workspace / "uploads", u.name, u.getvalue()) for u in uploads]
    except RetrainError as err:  # the session's upload or disk quota (retrain.sessions.quotas)
        st.error(str(err))
        st.stop()
    answer = model_answer(
        "predict", "Classifying", model=str(model_path), images=list(map(str, paths)), top_k=top_k
    )
    if answer is not None:
        for upload, path, result in zip(uploads, paths, answer["predictions"], strict=True):
            cols = st.columns([1, 3])
            cols[0].image(str(path), caption=upload.name, width="stretch")
            if show_cam:
                with cols[0]:
                    cam = model_answer(
                        "grad_cam", "Computing Grad-CAM", model=str(model_path), image=str(path)
                    )
                if cam is not None and cam["png"] is None:
                    cols[0].caption("Grad-CAM needs a conv base and the TensorFlow backend.")
                elif cam is not None:
                    cols[0].image(cam["png"], caption="Grad-CAM", width="stretch")
            best = result["top_k"][0]
            cols[1].markdown(f"**{as_text(best['class'])}** ({best['probability']:.0%})")
            fig = go.Figure(
                go.Bar(
                    x=[r["probability"] for r in result["top_k"]][::-1],
                    y=[r["class"] for r in result["top_k"]][::-1],
                    orientation="h",
                )
            )
            fig.update_layout(
                height=60 + 30 * len(result["top_k"]), margin=dict(t=5, b=5), xaxis_range=[0, 1]
            )
            cols[1].plotly_chart(
                fig, key=f"eval_try_{path.parent.name}_{path.name}", width="stretch"
            )

share_panel(run_dir, key="eval_share")  # a read-only link to this finished run
link("export", "Next: export the model")
