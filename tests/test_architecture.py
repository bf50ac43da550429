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


# What pages may import of the two packages whose functions load or train a model: the
# settings (retrain.training.config), the preprocessing table, and retrain.models' constants
# and pure helpers (ZOO, layer_stack), none of which builds a Keras model.
PAGE_SAFE_MODULES = {"retrain.training.config", "retrain.models.preprocessing"}
PAGE_SAFE_MODEL_NAMES = {
    "BUILTIN_LABELS",
    "CLASS_NAME_RULES",
    "MODEL_EXTENSIONS",
    "PREPROCESSING_CHOICES",
    "ZOO",
    "group_layers",
    "layer_stack",
    "spec_label",
}
MODEL_PACKAGES = ("training", "models")


def _model_loading_imports(source: str) -> tuple[list[str], list[str]]:
    """``(imports of retrain.training/retrain.models, those that are not page-safe)`` in
    ``source``, each as a dotted target (``retrain.models.load_base``)."""
    seen: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            seen += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            seen += [f"{node.module}.{alias.name}" for alias in node.names]
    seen = [t for t in seen if t.split(".")[:1] == ["retrain"] and t.split(".")[1:2] != []]
    seen = [t for t in seen if t.split(".")[1] in MODEL_PACKAGES]
    safe_names = {f"retrain.models.{name}" for name in PAGE_SAFE_MODEL_NAMES}
    bad = [
        t
        for t in seen
        if t not in safe_names
        and not any(t == m or t.startswith(m + ".") for m in PAGE_SAFE_MODULES)
    ]
    return seen, bad


def test_the_page_import_check_flags_model_loading_imports():
    flagged = [
        "from retrain.models import load_base",
        "from retrain.models import describe, ZOO",
        "from retrain import models",
        "import retrain.models",
        "import retrain.models.surgery",
        "from retrain.models.load import load_base",
        "from retrain.models import surgery",
        "from retrain import training",
        "from retrain.training import train",
        "from retrain.training.train import train",
        "from retrain.training.devices import describe_device",
    ]
    for source in flagged:
        assert _model_loading_imports(source)[1], source
    allowed = [
        "from retrain.models import ZOO, layer_stack, group_layers",
        "from retrain.models.preprocessing import PREPROCESSING",
        "from retrain.training.config import TrainConfig",
        "from retrain.data import ingest",
        "from retrain.runs import jobs",
    ]
    for source in allowed:
        assert _model_loading_imports(source)[1] == [], source


def test_pages_reach_models_only_through_the_model_workers():
    """Pages import nothing of retrain.training or retrain.models whose functions load or
    train a model (load_base, describe, surgery, train, devices...); they send requests."""
    files = [ROOT / "app.py", *(ROOT / "pages").rglob("*.py")]
    seen: list[str] = []
    offenders = {}
    for path in files:
        found, bad = _model_loading_imports(path.read_text())
        seen += found
        if bad:
            offenders[path.name] = bad
    assert offenders == {}
    # The check looked at real imports: pages do use the page-safe names.
    assert {"retrain.models.ZOO", "retrain.training.config.TrainConfig"} <= set(seen)


def _page_imports() -> set[str]:
    """The ``retrain`` modules the app and its pages import (``from retrain.x import y``: x)."""
    found: set[str] = set()
    for path in [ROOT / "app.py", *(ROOT / "pages").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] == "retrain":
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "retrain")
    return found


def test_app_and_library_import_without_tensorflow():
    """`import retrain` and the app's own modules must not pull in TensorFlow or Keras."""
    pages_import = sorted(_page_imports())
    assert {"retrain.data", "retrain.models", "retrain.runs.jobs"} <= set(pages_import)
    code = (
        "import sys, retrain, retrain.sessions.workspace, retrain.data, retrain.models\n"
        "import pages._ui, pages._service\n"
        "import retrain.service, retrain.service.client, retrain.service.kinds\n"
        f"import {', '.join(pages_import)}\n"
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
    modules (``from retrain import RetrainError``) count as the package itself. Importing a
    module of another subpackage also runs that package's ``__init__`` (``data.images`` ->
    ``data``, which re-exports the whole package): that counts as an import too.
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
    for target in list(found):
        parts = target.split(".")
        for end in range(1, len(parts)):
            outer = ".".join(parts[:end])
            if not me.startswith(outer + "."):  # our own packages are already imported
                found.add(outer)
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
    assert {
        "runs.rundir",
        "training.config",
        "training.callbacks",
        "runs.worker",
        "runs.jobs",
        "training.train",
        "data",
        "data.store",
        "models",
        "models.load",
        "evaluate.metrics",
        "sessions.workspace",
    } <= set(graph)
    # arrows into another package include its __init__ (which imports the package's modules)
    assert {"data", "data.images"} <= graph["training.config"]
    assert {"data.store", "data.cache", "models.load"} <= graph["data"] | graph["models"]
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_imports_run_downhill_between_training_and_jobs():
    graph = _import_graph()
    assert "runs.jobs" not in graph["training.train"]
    assert "training.train" not in graph["runs.jobs"]
    assert {"runs.jobs", "training.train"} <= graph["runs.worker"]  # the one module that joins them
    # the run directory and the workspace are the bottom: they import nothing above them
    assert graph["sessions.workspace"] <= {"errors", "__init__"}
    assert graph["sessions"] == set()  # and their package's __init__ imports nothing
    assert graph["runs"] == set()
    assert graph["runs.rundir"] <= {"errors", "sessions", "sessions.workspace", "__init__"}
    assert graph["training.config"] <= {
        "errors",
        "data",
        "data.images",
        "training.devices",
        "models",
        "models.preprocessing",
        "__init__",
    }


def test_every_retrain_package_says_what_it_is():
    """Each subpackage's ``__init__`` has a docstring; every folder of modules is a package."""
    packages = {p.parent for p in (ROOT / "retrain").rglob("__init__.py")}
    expected = {"data", "models", "training", "runs", "evaluate", "export", "sessions", "service"}
    assert {p.name for p in packages} >= {"retrain", *expected}
    assert {p.parent for p in (ROOT / "retrain").rglob("*.py")} == packages
    undocumented = sorted(
        str(p.relative_to(ROOT))
        for p in packages
        if not (ast.get_docstring(ast.parse((p / "__init__.py").read_text())) or "").strip()
    )
    assert undocumented == []


def test_run_file_names_are_spelled_only_by_rundir():
    """The run directory's file formats have one owner; the others call it."""
    names = ("status.json", "metrics.jsonl", "progress.json", "split.json")
    files = [
        *(ROOT / "retrain").rglob("*.py"),
        *(ROOT / "pages").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
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
