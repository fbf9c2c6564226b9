"""The import graph: no cycles, imports point down (DESIGN.md), no torch where none is needed, and no
function grows past ~80 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "modelprobe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """modelprobe modules this file imports at run time (function-level imports too; not TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                base = package
                for _ in range(child.level - 1):
                    base = base.rpartition(".")[0]
                mod = (f"{base}.{child.module}" if child.module else base) if child.level else (child.module or "")
                for alias in child.names:  # `from . import x` may name a submodule
                    out.add(f"{mod}.{alias.name}" if _exists(f"{mod}.{alias.name}") else mod)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m == "modelprobe" or m.startswith("modelprobe.")}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH or w == v:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert _cycles() == []


# room -> rooms it must never import
FORBIDDEN = {
    "modelprobe.subject": ("modelprobe.report", "modelprobe.kinds", "modelprobe.toolkit", "modelprobe.spec"),
    "modelprobe.spec": ("modelprobe.kinds", "modelprobe.subject", "modelprobe.toolkit", "modelprobe.report"),
    "modelprobe.report": ("modelprobe.subject", "modelprobe.kinds", "modelprobe.toolkit"),
    "modelprobe.toolkit": ("modelprobe.kinds", "modelprobe.report.writers", "modelprobe.report.html"),
    "modelprobe.stats": ("modelprobe.subject", "modelprobe.kinds", "modelprobe.report"),
}


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_down(room):
    bad = [(m, i) for m, imps in GRAPH.items() if m == room or m.startswith(room + ".")
           for i in imps if any(i == f or i.startswith(f + ".") for f in FORBIDDEN[room])]
    assert bad == []


def test_no_function_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                where = (str(path.relative_to(PACKAGE)), node.name)
                if n > 80:
                    long.append((*where, n))
    assert long == []


def test_schema_validate_and_the_specs_import_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from modelprobe.cli import main\n"
        f"assert main(['schema', '-o', {str(tmp_path / 's.json')!r}]) in (0, None)\n"
        f"assert main(['validate', {str(PACKAGE.parent / 'probes')!r}]) in (0, None)\n"
        "from modelprobe.kinds import KINDS\n"
        "assert [KINDS[k].Spec for k in KINDS]\n"
        "import modelprobe.toolkit.prompts, modelprobe.toolkit.controls, modelprobe.toolkit.metrics\n"
        "import modelprobe.toolkit.behaviour, modelprobe.toolkit.ablation_task, modelprobe.toolkit.steering\n"
        "import modelprobe.toolkit.activations\n"
        "from modelprobe.subject import Site, resolve_layer, resolve_sites, unfetched\n"  # the face's pure names
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_finding_the_builtin_kinds_imports_none_of_them():
    """The registry reads kind modules and kind packages as source: a kind loads only when it is named."""
    code = (
        "import sys\n"
        "from modelprobe.kinds import KINDS\n"
        "assert len(KINDS) >= 14\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('modelprobe.kinds.') and m != 'modelprobe.kinds.base')\n"
        "assert not loaded, loaded\n"
        "KINDS['direction']\n"
        "assert 'modelprobe.kinds.direction' in sys.modules and 'modelprobe.kinds.circuit' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- the subject face ------------------------------------------------------------------------------------

SUBJECT = PACKAGE / "subject"


def _subject_modules_named(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each `modelprobe.subject.<module>` this file reaches past the face: an import of
    any kind (function-level and TYPE_CHECKING ones too) or a module name in a string (LazyModule)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        named: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            named = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            named = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = [node.value]
        for m in named:
            head, _, sub = m.rpartition(".")
            if head == "modelprobe.subject" and (SUBJECT / f"{sub}.py").is_file():
                out.append((node.lineno, sub))
                break
    return out


def test_outside_code_uses_only_the_subject_face():
    """Code outside subject/ imports `modelprobe.subject` (its face, subject/__init__.py), never a module
    inside it, so the engine's modules can be split and merged without touching a kind."""
    bad = [f"{p.relative_to(PACKAGE)}:{line} modelprobe.subject.{sub}"
           for p in sorted(PACKAGE.rglob("*.py")) if SUBJECT not in p.parents
           for line, sub in _subject_modules_named(p)]
    assert bad == []


def test_the_subject_face_names_resolve():
    """Every name of the face loads, and the TYPE_CHECKING imports (what editors see) are the same names."""
    import modelprobe.subject as face

    tree = ast.parse((SUBJECT / "__init__.py").read_text())
    typed = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
             for imp in node.body if isinstance(imp, ast.ImportFrom) for a in imp.names}
    assert typed == set(face._WHERE)
    assert [n for n in face.__all__ if getattr(face, n, None) is None] == []
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        face.nothing_here  # noqa: B018


def test_every_kind_claims_map_uses_the_claim_name_type():
    """A claim name becomes a pytest id: every kind's `claims:` map is keyed by the one checked type."""
    from typing import get_args

    from modelprobe.kinds import KINDS
    from modelprobe.spec import ClaimName

    keys = {name: get_args(KINDS[name].Spec.model_fields["claims"].annotation)[:1] for name in KINDS}
    assert {name: k for name, k in keys.items() if k != (ClaimName,)} == {}


def test_a_kind_name_is_written_once():
    """The kind's name lives in its spec's `kind` Literal: no kind class sets `name` again, and the
    registry reads the built-in kinds' names from the source exactly as the classes give them."""
    from modelprobe.kinds import KINDS, builtin_kinds

    again = []
    for path in (PACKAGE / "kinds").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(isinstance(s, ast.Assign) and getattr(s.targets[0], "id", "")
                                                      == "Spec" for s in node.body):
                again += [(path.name, node.name) for s in node.body if isinstance(s, ast.Assign | ast.AnnAssign)
                          and s.value is not None and "name" in {getattr(t, "id", "") for t in
                                                                 (s.targets if isinstance(s, ast.Assign) else [s.target])}]
    assert again == []
    assert {name: KINDS[name].name for name in builtin_kinds()} == {name: name for name in builtin_kinds()}


def test_no_claim_redeclares_the_inherited_tolerance():
    from modelprobe.kinds import KINDS
    from modelprobe.spec import ClaimSpec

    claims = {get_claim(KINDS[name].Spec) for name in KINDS}
    assert [c.__name__ for c in claims if "tolerance" in c.__annotations__ and c is not ClaimSpec] == []


def get_claim(spec: type) -> type:
    from typing import get_args

    return get_args(spec.model_fields["claims"].annotation)[1]
