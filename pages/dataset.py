"""Step 1, Dataset: upload a zip of class folders (or use the sample) and see what is in it."""

from __future__ import annotations

import streamlit as st

from pages._bars import Row, Segment, bars_html, linear_percent
from pages._service import prefetch_model_page
from pages._ui import as_text, dataset_label, ensure_session, link, load_dataset_cached, remember
from retrain.data import Dataset, ingest, ingest_upload, load_dataset, thumbnails
from retrain.data.sample import sample_dataset
from retrain.errors import RetrainError
from retrain.sessions.workspace import home

MAX_PREVIEW_CLASSES = 24
THUMBS_PER_CLASS = 6
SPLIT_COLOURS = {"train": "#4F46E5", "val": "#F59E0B", "test": "#10B981"}
# Page-private: (file_id, error or None) of the last upload handled, so that reruns neither
# ingest it again nor forget why it failed.
UPLOAD_SEEN = "_dataset_upload_seen"


@st.cache_data(show_spinner=False, max_entries=8)
def _thumbnails(manifest_path: str, per_class: int) -> dict:
    return thumbnails(load_dataset(manifest_path), per_class=per_class, size=96)


def _use(dataset: Dataset) -> None:
    remember(dataset=str(dataset.manifest_path), dataset_label=dataset_label(dataset))
    # The next step's answer (the new head for these classes) is computed while they look here.
    prefetch_model_page(len(dataset.class_names), str(workspace))


def counts_html(counts: dict[str, dict[str, int]]) -> str:
    """Images per class: one bar per class, a coloured part per split (train, val, test)."""
    totals = {
        name: sum(per[name] for per in counts.values() if name in per)
        for name in dict.fromkeys(n for per in counts.values() for n in per)
    }
    largest = max(totals.values(), default=0)
    rows = [
        Row(
            label=name,
            segments=[
                Segment(split, per[name], linear_percent(per[name], largest))
                for split, per in counts.items()
                if per.get(name)
            ],
            value_text=f"{total:,}",
            hover=f"{name}: "
            + ", ".join(f"{per.get(name, 0):,} {split}" for split, per in counts.items()),
        )
        for name, total in totals.items()
    ]
    return bars_html(
        rows,
        SPLIT_COLOURS,
        name=f"Images per class, {len(rows)} classes",
        title="Images per class",
        max_height_px=420,
    )


def _ingest_with_progress(run, what: str) -> Dataset | str:
    """Run an ingest with a progress bar; return the dataset or the error to show."""
    bar = st.progress(0.0, text=f"Reading {what}...")

    def progress(fraction: float, message: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=message)

    try:
        with st.spinner(f"Checking {what}: decoding every image and counting classes..."):
            return run(progress)
    except RetrainError as err:
        return str(err)
    finally:
        bar.empty()


def _render(dataset: Dataset) -> None:
    counts = dataset.counts()
    st.subheader(dataset.name, divider="gray")
    cols = st.columns(4)
    cols[0].metric("Classes", len(dataset.class_names))
    cols[1].metric("Images", f"{dataset.num_images():,}")
    if len(counts) > 1:
        totals = {split: sum(per.values()) for split, per in counts.items()}
        others = [s for s in counts if s != "train"]
        cols[2].metric("Train images", f"{totals['train']:,}")
        cols[3].metric(
            " / ".join(s.capitalize() for s in others) + " images",
            " / ".join(f"{totals[s]:,}" for s in others),
        )
    else:
        per_class = counts["train"].values()
        cols[2].metric("Smallest class", f"{min(per_class):,}")
        cols[3].metric("Largest class", f"{max(per_class):,}")
    if set(counts) == {"train"}:
        st.caption(
            "No split folders: part of each class is held out for validation when you train."
        )

    with st.container(key="class_counts"):
        st.html(counts_html(counts))

    if dataset.warnings:
        st.markdown("**Things to check**")
        for warning in dataset.warnings:
            st.warning(as_text(warning), icon=":material/warning:")  # warnings quote names
    else:
        st.success("No problems found: enough images per class, balanced, no duplicates.")

    with st.expander(f"Skipped files ({len(dataset.skipped)})", icon=":material/block:"):
        if dataset.skipped:
            st.caption("These files were not used. System files from macOS/Windows are normal.")
            st.dataframe(dataset.skipped, hide_index=True, width="stretch")
        else:
            st.caption("Every file was used.")

    st.markdown("**A few images per class**")
    shown = dataset.class_names[:MAX_PREVIEW_CLASSES]
    thumbs = _thumbnails(str(dataset.manifest_path), THUMBS_PER_CLASS)
    train_counts = counts["train"]
    images_word = "training images" if len(counts) > 1 else "images"
    for name in shown:
        left, right = st.columns([1, 5], vertical_alignment="center")
        left.markdown(f"**{as_text(name)}**  \n{train_counts.get(name, 0):,} {images_word}")
        if thumbs.get(name):
            right.image(thumbs[name], width=80)
        else:
            right.caption("No preview available.")
    if len(dataset.class_names) > len(shown):
        st.caption(f"Showing {len(shown)} of {len(dataset.class_names)} classes.")


workspace = ensure_session()
st.title("Dataset")
st.markdown(
    "Upload a **.zip of your images, one folder per class** (`cats/1.jpg`, `dogs/7.png`). "
    "A single wrapper folder is fine, and so are `train/`, `val/` (or `validation/`) and "
    "`test/` folders that each hold the same class folders."
)

upload_col, sample_col = st.columns([3, 1], vertical_alignment="bottom")
with upload_col:
    uploaded = st.file_uploader(
        "Zip of class folders",
        type=["zip"],
        key="dataset_upload",
        help="JPEG, PNG, BMP, GIF, WebP or TIFF images. At least 2 classes, 10+ images each.",
    )
with sample_col:
    use_sample = st.button(
        "Use sample dataset",
        key="use_sample",
        icon=":material/auto_awesome:",
        help="Handwritten digits 5-9 (about 900 small images). No upload or download needed.",
        width="stretch",
    )

if use_sample:
    result = _ingest_with_progress(
        lambda progress: ingest(sample_dataset(home()), workspace, progress=progress),
        "the sample digits",
    )
    if isinstance(result, str):
        st.error(result, icon=":material/error:")
    else:
        _use(result)
elif uploaded is not None:
    seen = st.session_state.get(UPLOAD_SEEN)
    if seen is None or seen[0] != uploaded.file_id:
        uploaded.seek(0)
        result = _ingest_with_progress(
            lambda progress: ingest_upload(uploaded, uploaded.name, workspace, progress=progress),
            f"'{uploaded.name}'",
        )
        failed = isinstance(result, str)
        st.session_state[UPLOAD_SEEN] = (uploaded.file_id, result if failed else None)
        if not failed:
            _use(result)
        seen = st.session_state[UPLOAD_SEEN]
    if seen[1]:
        st.error(seen[1], icon=":material/error:")
        if st.session_state.get("dataset"):
            st.caption("Still using the previous dataset, shown below.")

current = st.session_state.get("dataset")
if not current:
    st.info(
        "No dataset yet. Upload a zip above, or click **Use sample dataset** to try "
        "everything with handwritten digits.",
        icon=":material/info:",
    )
    st.stop()

try:
    dataset = load_dataset_cached(current)
except RetrainError as err:
    st.error(str(err), icon=":material/error:")
    remember(dataset=None, dataset_label=None)
    st.stop()

_render(dataset)
link("model", "Next: choose a model")
