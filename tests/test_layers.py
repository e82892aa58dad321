"""One-way layers: ``scripts -> backend -> stable_sam``, read from the source (ast, nothing imported).
Beside them, outside the product: ``training/`` (how the shipped small SAM is trained), which
imports the library only, and ``research/`` (synthetic worlds, oracles), which imports the library,
the command-line tools and training/.

- no import cycles among stable_sam's modules, nor among backend's (imports inside functions count
  too: a lazy import that closes a cycle is still a cycle);
- stable_sam never imports backend, scripts (``stable_sam_cli``) or tests;
- backend never imports scripts or tests; a script never imports tests or another script;
- scripts/finetune.py adapts an export with the library alone (the backend only reads a live project);
- the test support (``backend.testing``: drawn scenes, Label Studio regions, a local server, the
  loopback guard) is never imported by the product (stable_sam, backend); the scripts and tests may;
- the product (stable_sam, backend, the scripts) never imports training/ or research/, and neither
  is installed (pyproject.toml) or copied into the Docker image (.dockerignore, Dockerfile);
- no module name is used twice across the packages (``backend.model`` beside ``stable_sam.model``
  reads as one thing).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"stable_sam": ROOT / "stable_sam", "backend": ROOT / "backend", "stable_sam_cli": ROOT / "scripts",
            "training": ROOT / "training", "research": ROOT / "research"}
PRODUCT = ("stable_sam", "backend", "stable_sam_cli")
OUTSIDE = ("training", "research")


def module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def modules() -> Dict[str, Path]:
    return {module_name(pkg, p): p for pkg, root in PACKAGES.items() for p in sorted(root.rglob("*.py"))}


def imported(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The modules (of ``known``, else their top-level names) that ``path`` imports anywhere."""
    is_package = path.name == "__init__.py"
    out: Set[str] = set()

    def add(target: str) -> None:
        # the longest known module that the dotted name is, or lies in
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in known:
                out.add(candidate)
                return
        out.add(parts[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                full = f"{prefix}.{alias.name}"
                add(full if full in known else prefix)
    out.discard(name)
    return out


def graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imported(name, path, set(known)) for name, path in known.items()}


def cycles(edges: Dict[str, Set[str]], within: str) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan) among ``within``'s modules."""
    nodes = sorted(n for n in edges if n == within or n.startswith(within + "."))
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v] & set(nodes)):
            # a package's __init__ re-exporting its own submodules is not a cycle through them
            if v == w.rsplit(".", 1)[0]:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def layer(name: str) -> str:
    return name.split(".")[0]


def test_no_import_cycles_in_stable_sam():
    assert cycles(graph(), "stable_sam") == []


def test_no_import_cycles_in_backend():
    assert cycles(graph(), "backend") == []


def test_layers_point_one_way():
    forbidden = {"stable_sam": {"backend", "stable_sam_cli", "scripts", "tests", *OUTSIDE},
                 "backend": {"stable_sam_cli", "scripts", "tests", *OUTSIDE},
                 "stable_sam_cli": {"scripts", "tests", "backend_helpers", "ls_server", "conftest", *OUTSIDE},
                 "training": {"backend", "stable_sam_cli", "scripts", "tests", "research"},
                 "research": {"backend", "scripts", "tests"}}  # research runs the CLI's tools (python -m research)
    script_names = {p.stem for p in PACKAGES["stable_sam_cli"].glob("*.py")}  # `import bench_x` from scripts/
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if layer(target) in forbidden[layer(name)]:
                wrong.append(f"{name} -> {target}")
            elif layer(name) == "stable_sam_cli" and (target in script_names or (
                    layer(target) == "stable_sam_cli" and target != "stable_sam_cli")):
                wrong.append(f"{name} -> {target} (a script imports another script)")
    assert wrong == []


TESTING = "backend.testing"


def is_testing(name: str) -> bool:
    return name == TESTING or name.startswith(TESTING + ".")


def test_the_product_never_imports_the_test_support():
    wrong = [f"{name} -> {target}" for name, targets in graph().items()
             if layer(name) in ("stable_sam", "backend") and not is_testing(name)
             for target in targets if is_testing(target)]
    assert wrong == []


def test_training_and_research_are_not_the_product():
    """Neither installed by pyproject.toml nor copied into the Docker image (a product import of
    them is refused by ``test_layers_point_one_way``)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = project["tool"]["setuptools"]["packages"]
    assert not [p for p in installed if p.split(".")[0] in OUTSIDE]
    assert not [s for s in project["project"]["scripts"].values() if s.split(".")[0] in OUTSIDE]
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copied = [line.split()[1].strip("/") for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")]
    for folder in OUTSIDE:
        assert folder in ignored and folder not in copied
        assert not (ROOT / folder).exists() or (ROOT / folder / "README.md").is_file(), f"{folder}/ has no README.md"


def test_no_module_name_is_used_twice():
    by_name: Dict[str, List[str]] = {}
    for name, path in modules().items():
        if path.stem not in ("__init__", "__main__"):
            by_name.setdefault(path.stem, []).append(name)
    assert {stem: names for stem, names in by_name.items() if len(names) > 1} == {}


def test_the_check_sees_imports():
    """The graph is not empty by mistake: known edges, a lazy import and a relative one are there."""
    g = graph()
    assert "stable_sam.model" in g["stable_sam.predictor"]
    assert "backend.training_job" in g["stable_sam_cli.finetune"]  # imported inside a function
    assert "stable_sam.data.dataset" in g["stable_sam.data.coco"]
    assert "backend.testing.local_server" in g["stable_sam_cli.soak"]
    assert "stable_sam.data.synthetic_split" in g["research.region_world"]  # the world registers itself
    assert "training.photo_scenes" in g["training.pretrain"]
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.x"}, "a": set()}, "a") == [["a.x", "a.y"]]


def test_finetune_reads_an_export_with_the_library_alone():
    """scripts/finetune.py imports the server layer only in the function that reads a live project."""
    tree = ast.parse((PACKAGES["stable_sam_cli"] / "finetune.py").read_text())

    def backend_imports(nodes) -> List[str]:
        nodes = list(nodes)
        names = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)]
        return [m for m in names if layer(m) == "backend"]

    assert backend_imports(tree.body) == []
    reading = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and backend_imports(ast.walk(f))}
    assert reading == {"live_project_dataset"}
