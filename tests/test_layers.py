"""The layering: sae_assets.core knows nothing of Dagster, boto3 or resources; no test module
imports another."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "sae_assets" / "core"
FORBIDDEN = ("dagster", "boto3", "botocore", "resources", "sae_assets.defs")


def imported_modules(path: Path) -> list[str]:
    """The absolute module names a source file imports."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_core_sources_import_nothing_forbidden():
    offenders = [f"{path.name}: {n}" for path in sorted(CORE.rglob("*.py")) for n in imported_modules(path)
                 if n.split(".")[0] in FORBIDDEN or n.startswith(FORBIDDEN)]
    assert not offenders, offenders


def test_importing_core_loads_no_forbidden_module():
    modules = sorted(".".join(p.relative_to(CORE).with_suffix("").parts) for p in CORE.rglob("*.py")
                     if p.stem != "__init__")
    assert "sae.metrics" in modules and "features.windows" in modules  # every stage's modules, not only the top
    code = (
        "import sys\n"
        + "".join(f"import sae_assets.core.{m}\n" for m in modules)
        + f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[:4]!r}]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout.strip()}"


def test_no_test_module_imports_another():
    """Shared helpers live in plain modules (support.py, dev_server.py, cluster.py, ...): no module
    of tests/ imports a test module, and with it that module's marks, skips and import-time work."""
    tests = Path(__file__).resolve().parent
    test_modules = {p.stem for p in tests.glob("test_*.py")}
    offenders = [f"{path.name}: {n}" for path in sorted(tests.glob("*.py")) for n in imported_modules(path)
                 if n.split(".")[0] in test_modules]
    assert not offenders, offenders
