"""The import rules of the layout hold: one door to Stripe, no Flask below the web layer,
the web layer imported by nobody below it, no import circles. And no function in the
domain is over :data:`DOMAIN_FUNCTION_MAX_LINES` lines long."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["app", "cli", "config", "models", "jobs", "domain"]
# A function is counted from its ``def`` line to its last line (decorators excluded).
DOMAIN_FUNCTION_MAX_LINES = 60


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_gateway_imports_stripe() -> None:
    importers = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "stripe" in _imports(path)
    )
    assert importers == ["domain/stripe/gateway.py"]


def _modules(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_the_domain_config_and_models_never_import_flask() -> None:
    """Every module of ``domain``, ``config`` and ``models`` is imported in a fresh
    interpreter; neither Flask nor Werkzeug comes with them."""
    names = sorted(n for n in _modules("domain", "config", "models") if not n.startswith("models.migrations"))  # alembic's scripts
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in ('flask', 'werkzeug', 'flask_login', 'flask_talisman') if m in sys.modules)\n"
        "assert not loaded, f'imported: {loaded}'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_domain_and_jobs_never_import_the_web_app_or_the_cli() -> None:
    offenders = sorted(
        str(path.relative_to(ROOT))
        for name, path in _modules("domain", "jobs", "models", "config").items()
        if {"app", "cli"} & _imports(path)  # anywhere in the file, function bodies too
    )
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth of the file (a lazy import
    in a function is still a dependency). ``from pkg import sub`` is an edge to
    ``pkg.sub`` when that is a module, else to ``pkg``."""
    modules = _modules(*PACKAGES)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules]
                targets = subs or [node.module]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def test_no_import_circles() -> None:
    """No two modules of the project import each other, directly or through others
    (Tarjan's strongly connected components over the import graph)."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert circles == []


def test_config_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    assert _imports(ROOT / "config" / "__init__.py") <= allowed


def test_only_the_case_lifecycle_changes_a_case_status() -> None:
    """Every status change of a duplicate case goes through domain/cases/lifecycle.py
    (transition table + audit entry): no other module assigns a case's ``status`` or
    builds a case with one."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "domain" / "cases" / "lifecycle.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr == "status":
                        owner = ast.unparse(target.value).lower()
                        if "case" in owner or owner in ("active", "latest"):
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.status =")
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("DuplicateCase"):
                    if any(k.arg == "status" for k in node.keywords):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: DuplicateCase(status=...)")
    assert offenders == []


def _functions_over(package: str, limit: int) -> list[str]:
    """``path:line name (n lines)`` for every function of ``package`` longer than
    ``limit`` lines: module functions, methods and nested functions alike."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(functions, key=lambda n: n.lineno):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_domain_function_is_over_60_lines() -> None:
    offenders = _functions_over("domain", DOMAIN_FUNCTION_MAX_LINES)
    assert offenders == [], f"over {DOMAIN_FUNCTION_MAX_LINES} lines:\n" + "\n".join(offenders)
