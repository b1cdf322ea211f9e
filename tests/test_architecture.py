"""The import rules of the layout hold: one door to Stripe, no Flask below the web layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["app", "config", "models", "jobs", "domain"]


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
    assert importers == ["app/gateway.py"]


def test_models_config_and_services_never_import_flask() -> None:
    code = (
        "import sys, config, models, models.migrate, jobs, app.gateway, domain.ledger.inbox, domain.ledger.applier, "
        "domain.ledger, app.services.orders\n"
        "assert 'flask' not in sys.modules, 'flask was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_config_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    assert _imports(ROOT / "config" / "__init__.py") <= allowed


def test_only_the_case_lifecycle_changes_a_case_status() -> None:
    """Every status change of a duplicate case goes through app/services/case_lifecycle.py
    (transition table + audit entry): no other module assigns a case's ``status`` or
    builds a case with one."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "app" / "services" / "case_lifecycle.py":
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
