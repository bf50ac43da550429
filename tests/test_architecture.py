"""Invariants of the layout: thin pages, a Streamlit-free library, a fast first render."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_streamlit():
    offenders = [p.name for p in (ROOT / "retrain").rglob("*.py") if "streamlit" in _imports(p)]
    assert offenders == []


def test_pages_never_import_keras_or_tensorflow():
    files = [ROOT / "app.py", *(ROOT / "pages").glob("*.py")]
    offenders = [p.name for p in files if _imports(p) & {"keras", "tensorflow", "tf_keras"}]
    assert offenders == []


def test_app_and_library_import_without_tensorflow():
    """`import retrain` and the app's own modules must not pull in TensorFlow or Keras."""
    code = (
        "import sys, retrain, retrain.workspace, retrain.data, pages._ui\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
