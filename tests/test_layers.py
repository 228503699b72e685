"""The layering: sae_assets.core knows nothing of Dagster, boto3 or resources; loading the code
location (sae_assets.definitions and every sae_assets.defs module) loads no torch, no model or
tokenizer library, no dataframe library and no numeric core; no project module imports Dagster's
private `dagster._core`; no test module imports another."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "sae_assets" / "core"
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


CODE_LOCATION_MAY_NOT_LOAD = ("torch", "transformer_lens", "tokenizers", "safetensors", "polars", "numpy", "pyarrow",
                              "matplotlib", "boto3", "datasets", "transformers")
"""What the code server, every run worker and `dg check defs` would otherwise import before a step
even starts; the asset bodies import what they use."""


CONFIG_MODULES = ("sae_assets.core.config", "sae_assets.core.partition_budget")
"""The core modules the code location loads: the run config and its partition-count check (stdlib only)."""


def test_loading_the_code_location_loads_no_heavy_module():
    """In a fresh interpreter: import sae_assets.definitions and every sae_assets.defs module, then
    list the heavy modules and the sae_assets.core modules other than the config's that got loaded."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import sae_assets.definitions, sae_assets.defs\n"
        "for m in pkgutil.iter_modules(sae_assets.defs.__path__):\n"
        "    importlib.import_module('sae_assets.defs.' + m.name)\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({CODE_LOCATION_MAY_NOT_LOAD!r}))\n"
        f"core = sorted(m for m in sys.modules if m.startswith('sae_assets.core.') and m not in {CONFIG_MODULES!r})\n"
        "defs = sorted(m for m in sys.modules if m.startswith('sae_assets.defs.'))\n"
        "print(','.join(heavy)); print(','.join(core)); print(len(defs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    heavy, core, defs = out.stdout.rstrip("\n").split("\n")
    assert int(defs) >= 10, "the check imported the defs modules"
    assert heavy == "", f"loading the code location imported {heavy}"
    assert core == "", f"loading the code location imported core modules {core}"
    assert out.stderr == "", f"loading the code location printed: {out.stderr}"


def test_no_project_module_imports_dagster_private_core():
    sources = [*sorted((REPO / "sae_assets").rglob("*.py")), *sorted((REPO / "resources").rglob("*.py"))]
    assert len(sources) > 30
    offenders = [f"{p.relative_to(REPO)}: {n}" for p in sources for n in imported_modules(p)
                 if n.startswith("dagster._")]
    assert not offenders, offenders


def test_no_test_module_imports_another():
    """Shared helpers live in plain modules (support.py, dev_server.py, cluster.py, ...): no module
    of tests/ imports a test module, and with it that module's marks, skips and import-time work."""
    tests = Path(__file__).resolve().parent
    test_modules = {p.stem for p in tests.glob("test_*.py")}
    offenders = [f"{path.name}: {n}" for path in sorted(tests.glob("*.py")) for n in imported_modules(path)
                 if n.split(".")[0] in test_modules]
    assert not offenders, offenders
