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
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "retrain").rglob("*.py")
        if "streamlit" in _imports(p)
    ]
    assert offenders == []


ML_FRAMEWORKS = {"keras", "tensorflow", "tf_keras", "jax", "jaxlib", "torch", "onnxruntime"}


def test_pages_never_import_an_ml_framework():
    files = [ROOT / "app.py", *(ROOT / "pages").rglob("*.py")]
    offenders = [p.name for p in files if _imports(p) & ML_FRAMEWORKS]
    assert offenders == []


def test_pages_reach_models_only_through_the_model_workers():
    """Pages import no retrain module whose functions load a model; they send requests."""
    loaders = {"models", "surgery", "probe", "keep", "train", "callbacks", "devices"}
    files = [ROOT / "app.py", *(ROOT / "pages").rglob("*.py")]
    offenders = {}
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "retrain":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrain."):
                names = [node.module.split(".")[1]]
            bad = sorted(set(names) & loaders - {"models"})
            # retrain.models is allowed for its constants and pure helpers (ZOO, layer_stack)
            # only: never load_base/describe, which build a Keras model.
            if isinstance(node, ast.ImportFrom) and node.module == "retrain.models":
                bad += sorted(
                    a.name
                    for a in node.names
                    if a.name in {"load_base", "describe", "ensure_builtin"}
                )
            if bad:
                offenders[path.name] = bad
    assert offenders == {}


def test_app_and_library_import_without_tensorflow():
    """`import retrain` and the app's own modules must not pull in TensorFlow or Keras."""
    code = (
        "import sys, retrain, retrain.workspace, retrain.data, pages._ui, pages._service\n"
        "import retrain.service, retrain.service.client, retrain.service.kinds\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def _module_name(path: Path) -> str:
    """``retrain/service/kinds.py`` -> ``service.kinds``; a package's ``__init__`` -> its name."""
    parts = list(path.relative_to(ROOT / "retrain").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _resolve(dotted: list[str], modules: set[str]) -> str:
    """The longest prefix of ``dotted`` (after ``retrain``) that is a module, else the package."""
    for end in range(len(dotted), 0, -1):
        name = ".".join(dotted[:end])
        if name in modules:
            return name
    return "__init__"


def _retrain_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``retrain`` modules ``path`` imports, at any depth of the file (inside functions too).

    Modules of subpackages are named with dots (``service.kinds``). ``from retrain.x import y``
    counts as importing module ``x.y`` when there is one, else ``x``; names that are not
    modules (``from retrain import RetrainError``) count as the package itself.
    """
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me.split(".")[:-1] if path.name != "__init__.py" else me.split(".")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "retrain":
                    found.add(_resolve(parts[1:], modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "retrain":
                parts = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                found.add(_resolve([*parts, alias.name], modules))
    found.discard(me)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / "retrain").rglob("*.py")}
    return {name: _retrain_imports(path, set(files)) for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_retrain_modules_import_each_other_without_cycles():
    """Counting imports inside functions: an import there is still an arrow."""
    graph = _import_graph()
    assert {"rundir", "config", "callbacks", "worker", "jobs", "train"} <= set(graph)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_imports_run_downhill_between_training_and_jobs():
    graph = _import_graph()
    assert "jobs" not in graph["train"] and "train" not in graph["jobs"]
    assert {"jobs", "train"} <= graph["worker"]  # the one module that joins them
    # the run directory and the workspace are the bottom: they import nothing above them
    assert graph["workspace"] <= {"errors", "__init__"}
    assert graph["rundir"] <= {"errors", "workspace", "__init__"}
    assert graph["config"] <= {"errors", "data", "devices", "preprocessing", "__init__"}


def test_run_file_names_are_spelled_only_by_rundir():
    """The run directory's file formats have one owner; the others call it."""
    names = ("status.json", "metrics.jsonl", "progress.json", "split.json")
    files = [
        *(ROOT / "retrain").glob("*.py"),
        *(ROOT / "pages").glob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        ROOT / "app.py",
    ]
    offenders = sorted(
        f"{p.relative_to(ROOT)}: {name}"
        for p in files
        if p.name not in ("rundir.py", Path(__file__).name)
        for name in names
        if name in p.read_text()
    )
    assert offenders == []
