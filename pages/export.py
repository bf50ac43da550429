"""The Export step: files others can load, each reloaded and checked before you download it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from pages._service import model_answer
from pages._share import card_markdown
from pages._ui import ensure_session, require_finished_run
from retrain.export import export
from retrain.runs import rundir

FORMAT_LABELS = {
    "keras": ".keras (Keras 3: raw images in, probabilities out)",
    "savedmodel": "TensorFlow SavedModel (TF Serving, TensorFlow Hub)",
    "tflite": "TFLite float (Android/iOS/edge)",
    "tflite-int8": "TFLite int8 (4x smaller, microcontrollers/Edge TPU)",
    "onnx": "ONNX (onnxruntime and other ONNX runtimes; raw images in)",
    "tfjs": "TF.js Layers (web apps: tf.loadLayersModel; model.json + weights)",
    "labels": "labels.txt (class names, one per line)",
    "card": "Model card (Markdown)",
}
# Built in seconds; SavedModel/TFLite add TensorFlow conversions, so they are opt-in.
QUICK_FORMATS = ("keras", "labels", "card")
MIME = {".keras": "application/zip", ".tflite": "application/octet-stream", ".md": "text/markdown"}


def _size_text(size: int) -> str:
    """'812 bytes', '17 KB', '3.4 MB': never '0 KB' for a small file."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024**2:
        return f"{size / 1024:,.0f} KB"
    return f"{size / 1024**2:,.1f} MB"


def _read_result(out: Path) -> dict | None:
    try:
        return json.loads((out / "export.json").read_text())
    except (OSError, ValueError):
        return None


def _self_test_table(self_test: dict) -> pd.DataFrame | None:
    """One row per model file, checked on images in its runtime (None when there is none:
    labels.txt and the card have no outputs to compare, `_text_files_words` says theirs)."""
    rows = []
    for fmt, entry in self_test.items():
        if fmt not in export.MODEL_FORMATS:
            continue
        rows.append(
            {
                "format": fmt,
                "ok": "yes" if entry.get("ok") else "NO",
                "max |diff|": entry.get("max_abs_diff"),
                "argmax agreement": entry.get("argmax_agreement"),
                "int8 accuracy drop": entry.get("accuracy_drop"),
                "images": entry.get("images"),
                "checked in": entry.get("runtime", "Python"),
                "error": entry.get("error", ""),
            }
        )
    if not rows:
        return None
    table = pd.DataFrame(rows)
    # A column nobody's format filled (int8 drop without int8, error when all passed) is noise
    # that squeezes the others ("checked in" was cut off).
    blank = table.isna() | (table == "")
    empty = [c for c in table if c not in ("format", "ok") and blank[c].all()]
    return table.drop(columns=empty)


def _text_files_words(self_test: dict) -> tuple[str, bool] | None:
    """What the self-test says of the text files (labels.txt, the model card) and whether all
    read back as written; None when none was built."""
    built = [fmt for fmt in self_test if fmt not in export.MODEL_FORMATS]
    if not built:
        return None
    failed = [export.FILE_NAMES[fmt] for fmt in built if not self_test[fmt].get("ok")]
    if failed:
        return f"Not read back as written: {' and '.join(failed)}. Build the exports again.", False
    listed = " and ".join(export.FILE_NAMES[fmt] for fmt in built)
    return f"Also written, and read back as written: {listed}.", True


workspace = ensure_session()
st.title("Export")
st.caption("Take the model away: every file is reloaded in a fresh process and checked.")

run_dir = require_finished_run(workspace, "export")
run_id = run_dir.name
saved_epoch, saved_accuracy = rundir.saved_score(
    rundir.read_status_file(run_dir) or {}, rundir.read_metrics(run_dir)
)
if saved_epoch is not None:
    st.markdown(
        f"Exports **{run_id}**: the model of epoch {saved_epoch}, validation accuracy "
        f"{saved_accuracy:.1%} (the one Evaluate scores)."
    )

has_tf = export.tensorflow_available()
options = [f for f in export.FORMATS if has_tf or f not in export.NEEDS_TENSORFLOW]
if not has_tf:
    st.caption("SavedModel, TFLite and ONNX need TensorFlow, which this installation lacks.")
# After a reload, the formats of the export shown below, not the quick defaults.
built = _read_result(rundir.export_dir(run_dir))
built_formats = [f for f in (built or {}).get("self_test", {}) if f in options]
formats = st.multiselect(
    "Formats",
    options,
    default=built_formats or [f for f in QUICK_FORMATS if f in options],
    format_func=FORMAT_LABELS.get,
    key="export_formats",
    help="SavedModel, TFLite and ONNX take longer to build. int8 is calibrated on a sample of "
    "the training images and its accuracy drop is measured. TF.js is checked in TF.js itself "
    "(Node.js; the first check installs @tensorflow/tfjs with npm).",
)
if st.button("Build exports", type="primary", key="export_build", disabled=not formats):
    built_now = model_answer(
        "export",
        "Building and checking the exports",
        progress_bar=True,
        run_dir=str(run_dir),
        formats=list(formats),
    )
    if built_now is not None:
        st.progress(1.0, text="Done: every file was reloaded and checked.")

out = rundir.export_dir(run_dir)
result = _read_result(out)
if result is None:
    st.stop()

st.subheader("Self-test")
st.caption(
    "Each file reloaded in a fresh process (TF.js in Node) and run on validation images: largest "
    "difference of probabilities to the trained model and how often the top class agrees."
)
table = _self_test_table(result["self_test"])
if table is not None:
    st.dataframe(
        table,
        hide_index=True,
        key="export_self_test",
        column_config={"argmax agreement": st.column_config.NumberColumn(format="percent")},
    )
text_files = _text_files_words(result["self_test"])
if text_files is not None:
    words, read_back = text_files
    (st.caption if read_back else st.error)(words)

st.subheader("Downloads")
files = [Path(f) for f in result["files"] if Path(f).exists()]
for i, path in enumerate(files):
    folder = path.is_dir()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if folder else 0
    size = size or path.stat().st_size
    name = f"{path.name}.zip" if folder else path.name
    # Files are read (or zipped) only when the button is clicked, not on every rerun.
    payload = (
        (lambda path=path: export.zip_exports(run_dir, [path], name=path.name).read_bytes())
        if folder
        else (lambda path=path: path.read_bytes())
    )
    st.download_button(
        f"{name} ({_size_text(size)})",
        payload,
        file_name=name,
        mime=MIME.get(path.suffix, "application/zip" if folder else "application/octet-stream"),
        key=f"export_download_{i}",
    )
if files:
    st.download_button(
        "Everything as one zip",
        lambda: export.zip_exports(run_dir, files).read_bytes(),
        file_name=f"{run_dir.name}-export.zip",
        mime="application/zip",
        type="primary",
        key="export_download_all",
    )

card = out / export.FILE_NAMES["card"]
if card.is_file():
    with st.expander("Model card preview", expanded=True):
        st.markdown(card_markdown(card.read_text()))  # names in it show as text
