"""The docs against the code: docs/configuration.md's settings table, and every relative link.

The environment variables are derived from the settings modules themselves, in two independent
ways that must agree: the names their source passes to ``os.environ`` / ``env.get`` / the modules'
own readers (``_int(env, "PORT", ...)``, ``_env_path("MODEL_DIR")``; ast, nothing executed), and
``BackendSettings.to_env()``, the settings' own list of the variables ``from_env`` reads back. The
table must list exactly that set, and each default it states must equal what ``from_env`` gives
with none of them set.
"""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from backend import server_settings as backend_settings
from stable_sam import settings as model_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
SETTINGS_MODULES = [ROOT / "stable_sam" / "settings.py", ROOT / "backend" / "server_settings.py"]
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*_[A-Z0-9_]+|[A-Z]{3,}")
# Defaults the table states in words, because no literal says them; each is checked by a test below.
PROSE_DEFAULTS = {"PLUGIN_CHECKPOINT": "the shipped plugin"}


def env_names_read(path: Path) -> Set[str]:
    """The environment variables ``path`` reads: string constants passed as a name to ``X.get`` /
    ``os.getenv`` / a function defined in the module itself, or used as ``os.environ[...]``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own_functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    names: Set[str] = set()

    def add(node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ENV_NAME.fullmatch(node.value):
            names.add(node.value)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            reader = ((isinstance(func, ast.Attribute) and func.attr in ("get", "getenv"))
                      or (isinstance(func, ast.Name) and func.id in own_functions))
            if reader:
                for arg in node.args[:2]:  # get(name, default) / _int(env, name, ...) / _env_path(name)
                    add(arg)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            add(node.slice)
    return names


def code_env_names() -> Set[str]:
    names: Set[str] = set()
    for path in SETTINGS_MODULES:
        names |= env_names_read(path)
    return names


def settings_table() -> List[Tuple[str, str, str]]:
    """(variable, default, meaning) rows of the one table in docs/configuration.md."""
    tables: List[List[Tuple[str, str, str]]] = []
    rows = None
    for line in CONFIG_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            rows = None
            continue
        if cells[:2] == ["variable", "default"]:
            rows = []
            tables.append(rows)
        elif rows is not None and not set(line) <= set("|-: "):
            assert len(cells) == 3, f"docs/configuration.md: a row must have 3 cells: {line}"
            rows.append((cells[0], cells[1], cells[2]))
    assert len(tables) == 1, f"docs/configuration.md must hold exactly one settings table, found {len(tables)}"
    return tables[0]


def table_variables() -> Dict[str, Tuple[str, str]]:
    out: Dict[str, Tuple[str, str]] = {}
    for variable, default, meaning in settings_table():
        m = re.fullmatch(r"`([A-Z0-9_]+)`", variable)
        assert m, f"docs/configuration.md: one variable per row, as `NAME`: {variable!r}"
        assert m.group(1) not in out, f"docs/configuration.md lists {m.group(1)} twice"
        out[m.group(1)] = (default, meaning)
    return out


def defaults_from_env(monkeypatch) -> Dict[str, object]:
    """Each variable's value as ``from_env`` reads it with no variable set."""
    for name in code_env_names():
        monkeypatch.delenv(name, raising=False)
    s = backend_settings.BackendSettings.from_env()
    env_names = getattr(backend_settings, "ENV_NAMES", {})
    by_env = {env_names.get(f.name, f.name.upper()): getattr(s, f.name) for f in fields(s)}
    return {name: by_env[name] for name in code_env_names() if name in by_env}


def test_settings_code_agrees_with_itself():
    """The two views of the variables the settings read (their source, and to_env) are the same set:
    a variable read without a field, or a field to_env would pass on but from_env never reads,
    would make the table's reference unreliable (and a training job would not get it)."""
    read = code_env_names()
    passed_on = set(backend_settings.BackendSettings().to_env())
    assert read == passed_on, (f"read but not passed on by to_env: {sorted(read - passed_on)}; "
                               f"passed on but never read: {sorted(passed_on - read)}")


def test_settings_table_lists_exactly_the_variables_the_code_reads():
    read = code_env_names()
    assert len(read) > 20, f"the ast scan found too few variables ({sorted(read)}): is it still looking at the right calls?"
    documented = set(table_variables())
    assert not read - documented, f"read by the settings but missing from docs/configuration.md: {sorted(read - documented)}"
    assert not documented - read, f"in docs/configuration.md but read by no settings module: {sorted(documented - read)}"


def _stated(cell: str, value: object) -> Tuple[bool, str]:
    """Whether the table's default cell states ``value``; (ok, what the code says)."""
    if isinstance(value, Path):
        try:
            said = "<repo>/" + value.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            said = str(value)
    elif value is None or value == "" or value == ():
        said = "-"
    elif isinstance(value, bool):
        said = "1" if value else "0"
    elif isinstance(value, (int, float)):
        said = f"{value:g}" if isinstance(value, float) else str(value)
    else:
        said = str(value)
    literal = cell[1:-1] if len(cell) > 1 and cell.startswith("`") and cell.endswith("`") else cell
    if re.fullmatch(r"-?\d+(\.\d+)?", literal) and said not in ("-",) and re.fullmatch(r"-?[\d.e+]+", said):
        return float(literal) == float(said), said
    return literal == said, said


def test_settings_table_defaults_match_the_code(monkeypatch):
    defaults = defaults_from_env(monkeypatch)
    wrong = []
    for name, (cell, _meaning) in table_variables().items():
        if name in PROSE_DEFAULTS:
            assert cell == PROSE_DEFAULTS[name], f"{name}: default {cell!r}, expected {PROSE_DEFAULTS[name]!r}"
            continue
        if name not in defaults:
            continue  # not a read variable: the listing test reports it
        ok, said = _stated(cell, defaults[name])
        if not ok:
            wrong.append(f"{name}: the table says {cell!r}, the code {said!r}")
    assert not wrong, "docs/configuration.md defaults differ from from_env's:\n" + "\n".join(wrong)


def test_plugin_checkpoint_prose_default(monkeypatch):
    """'the shipped plugin': unset, the committed small SAM serves checkpoints/plugin_sam_tiny_rts.pt,
    and the row names that file; vit_b/l/h get none."""
    for name in code_env_names():
        monkeypatch.delenv(name, raising=False)
    s = model_settings.ModelSettings.from_env()
    assert s.plugin_path == model_settings.SAM_TINY_PLUGIN
    rel = model_settings.SAM_TINY_PLUGIN.relative_to(ROOT).as_posix()
    assert rel in table_variables()["PLUGIN_CHECKPOINT"][1]
    monkeypatch.setenv("SAM_MODEL_TYPE", "vit_h")
    assert model_settings.ModelSettings.from_env().plugin_path is None


def test_one_settings_table_in_the_docs():
    """Elsewhere the docs link to docs/configuration.md instead of repeating its table."""
    for path in markdown_files():
        if path == CONFIG_DOC:
            continue
        for line in path.read_text().splitlines():
            assert not re.match(r"\|\s*variable\s*\|", line), f"{path.relative_to(ROOT)} has a settings table: {line}"


def markdown_files() -> List[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += [p for p in sorted(ROOT.glob("*/README.md")) if not p.parent.name.startswith(".")]
    return files


def heading_anchors(path: Path) -> Set[str]:
    """GitHub's anchors for the headings of ``path``."""
    anchors: Set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = m.group(1).strip().lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(path):
    broken = []
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"line {number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
                broken.append(f"line {number}: {target} (no such heading in {dest.name})")
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_fits_one_screen():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150 and len(text.encode()) <= 10_000, \
        "README.md is the newcomer's one screen: move detail to docs/"


def test_readme_names_every_console_script():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in scripts
               if name not in readme and not (name.startswith("stable-sam-bench-") and "stable-sam-bench-*" in readme)]
    assert not missing, f"console scripts from pyproject.toml the README's table does not name: {missing}"
