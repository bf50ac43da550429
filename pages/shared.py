"""Shared model: the read-only page of a share link (``/?share=<id>``).

Shows what the owner shared (classes, curves, accuracy, per class, confusion matrix, model
card), lets the visitor try the model on their own image, and copies the model into the
visitor's own workspace. Nothing here reads or writes the owner's workspace: the page reads
only the share's snapshot (`retrain.sessions.share`); uploads and copies go to the visitor's session.
Every name on it (classes, models) was typed by someone else and is shown as text.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from pages._charts import confusion_figure
from pages._service import model_answer
from pages._share import card_markdown
from pages._ui import as_text, dataset_label, ensure_session, remember, saved_upload
from retrain.errors import RetrainError
from retrain.sessions import share

TRY_IMAGE_PX = 224


def _open_own_workspace() -> None:
    if st.button("Open my workspace", key="shared_open_own", icon=":material/home:"):
        st.query_params.clear()
        st.rerun()


def _curves(rows: list[dict]) -> go.Figure:
    fig = go.Figure()
    epochs = list(range(1, len(rows) + 1))
    for metric, name in (("accuracy", "train accuracy"), ("val_accuracy", "validation accuracy")):
        if any(isinstance(r.get(metric), int | float) for r in rows):
            fig.add_scatter(
                x=epochs, y=[r.get(metric) for r in rows], mode="lines+markers", name=name
            )
    fig.update_layout(
        height=300,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="epoch",
        yaxis=dict(title="accuracy", range=[0, 1], tickformat=".0%"),
        legend=dict(orientation="h", y=1.1),
    )
    return fig


def _try_it(record: dict, workspace) -> None:
    st.subheader("Try it")
    st.caption("Your image goes to your own session, never to the owner's.")
    source = st.radio("Image from", ["Upload", "Camera"], horizontal=True, key="shared_try_source")
    if source == "Upload":
        image = st.file_uploader(
            "An image to classify", type=["png", "jpg", "jpeg", "bmp", "gif", "webp"],
            key="shared_try_upload",
        )  # fmt: skip
    else:
        image = st.camera_input("Take a picture", key="shared_try_camera")
    if image is None:
        return
    path = saved_upload(workspace / "uploads" / "try", image)
    if path is None:
        return
    model = str(share.share_file(record, share.MODEL_FILE))
    answer = model_answer("predict", "Classifying", model=model, images=[str(path)], top_k=3)
    if answer is None:
        return
    result = answer["predictions"][0]
    cols = st.columns([1, 2])
    cols[0].image(str(path), width=TRY_IMAGE_PX)
    best = result["top_k"][0]
    cols[1].markdown(f"Top class: **{as_text(best['class'])}** ({best['probability']:.0%})")
    cols[1].dataframe(
        pd.DataFrame(
            [{"class": r["class"], "probability": r["probability"]} for r in result["top_k"]]
        ),
        hide_index=True,
        key="shared_try_table",
        column_config={
            "probability": st.column_config.ProgressColumn(format="%.3f", min_value=0, max_value=1)
        },
    )
    with cols[0]:
        cam = model_answer("grad_cam", "Computing Grad-CAM", model=model, image=str(path))
    if cam is not None and cam.get("png"):
        cols[0].image(cam["png"], caption="Grad-CAM: where the model looked", width=TRY_IMAGE_PX)
    elif cam is not None:
        cols[0].caption("Grad-CAM needs a conv base and the TensorFlow backend.")


def _copy(record: dict, workspace) -> None:
    st.subheader("Copy to my workspace")
    with_examples = bool(record.get("examples"))
    st.caption(
        "Puts this model in your own session as a base model to retrain"
        + (", with the owner's example images as a small dataset." if with_examples else ".")
        + " Nothing of the owner's workspace comes with it."
    )
    if st.button("Copy to my workspace", key="shared_copy", type="primary"):
        try:
            copied = share.copy_to_workspace(record["share_id"], workspace)
            choices = {"base": copied["model"], "base_label": copied["label"]}
            if copied["examples"]:
                from retrain.data import ingest

                dataset = ingest(copied["examples"], workspace)
                choices["dataset"] = str(dataset.manifest_path)
                choices["dataset_label"] = dataset_label(dataset)
            remember(**choices)
        except RetrainError as err:
            st.error(str(err))
        else:
            st.session_state["_shared_copied"] = record["share_id"]
    # Drawn from the session, not from the click: the next click ("Open my workspace") reruns
    # the page with "Copy" unclicked, and a button drawn only after that click was never reached.
    if st.session_state.get("_shared_copied") == record["share_id"]:
        st.success("Copied: it is your base model now.")
        _open_own_workspace()


workspace = ensure_session()
st.title("Shared model")
try:
    record = share.read_share(st.query_params.get("share", ""))
except RetrainError as err:
    st.error(str(err), icon=":material/link_off:")
    _open_own_workspace()
    st.stop()

names = [str(n) for n in record.get("class_names") or []]
st.caption(
    "Read-only: a model someone trained with Retrain Studio and shared with a link. "
    "Nothing on this page changes their work."
)
st.markdown(f"**{len(names)} classes:** " + ", ".join(as_text(n) for n in names))
report = share.read_report(record)
if report:
    cols = st.columns(4)
    cols[0].metric("Accuracy", f"{report['accuracy']:.1%}", help=f"split: {report.get('split')}")
    if isinstance(report.get("macro"), dict):
        cols[1].metric("Macro F1", f"{report['macro']['f1']:.3f}")
    if isinstance(report.get("top_k"), dict):
        cols[2].metric(f"Top-{report['top_k']['k']} accuracy", f"{report['top_k']['accuracy']:.1%}")
    cols[3].metric("Held-out images", report.get("num_images", "?"))

rows = share.read_shared_metrics(record)
left, right = st.columns(2)
with left:
    st.subheader("Learning curves")
    if rows:
        st.plotly_chart(_curves(rows), key="shared_curves", width="stretch")
    else:
        st.caption("No per-epoch metrics were recorded.")
with right:
    st.subheader("Confusion matrix")
    if report.get("confusion_matrix"):
        st.plotly_chart(
            confusion_figure(report["class_names"], report["confusion_matrix"]),
            key="shared_confusion",
            width="stretch",
        )
    else:
        st.caption("No evaluation was shared.")

if isinstance(report.get("per_class"), dict):
    st.subheader("Per class")
    st.dataframe(
        pd.DataFrame([{"class": name, **values} for name, values in report["per_class"].items()]),
        hide_index=True,
        key="shared_per_class",
    )

examples = share.example_images(record)
if examples:
    st.subheader("Example images")
    for name, paths in examples.items():
        st.caption(as_text(name))
        st.image([str(p) for p in paths], width=96)

_try_it(record, workspace)

if record.get("downloads"):
    st.subheader("Downloads")
    cols = st.columns(3)
    for col, (label, name, file_name, mime) in zip(
        cols,
        (
            ("Model (.keras)", share.MODEL_FILE, "model.keras", "application/octet-stream"),
            ("Labels (labels.txt)", share.LABELS_FILE, "labels.txt", "text/plain"),
            ("Model card (.md)", share.CARD_FILE, "model_card.md", "text/markdown"),
        ),
        strict=True,
    ):
        path = share.share_file(record, name)
        if path.is_file():
            col.download_button(
                label, path.read_bytes(), file_name=file_name, mime=mime, key=f"shared_dl_{name}"
            )
    for i, path in enumerate(share.export_files(record)):
        st.download_button(
            f"{path.name} ({path.stat().st_size / 1e6:,.1f} MB)",
            path.read_bytes(),
            file_name=path.name,
            mime="application/octet-stream",
            key=f"shared_dl_export_{i}",
        )

card = share.share_file(record, share.CARD_FILE)
if card.is_file():
    with st.expander("Model card"):
        st.markdown(card_markdown(card.read_text()))

_copy(record, workspace)
