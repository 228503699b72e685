"""Dagster's `dg` CLI (dagster-dg-cli) on this project: `dg check defs` and `dg list defs`.

Both run as subprocesses from the repository root, configured by `[tool.dg]` in pyproject.toml
(a plain project whose code location is `sae_assets.definitions`), with the venv of this
interpreter first on PATH and as VIRTUAL_ENV (else dg warns that the active venv is not the
project's), and DAGSTER_HOME in a temporary directory. `dg list defs --json` must list every
asset key of `defs`; `dg check defs` must fail, naming the key, on a run config with an unknown
key. Each command loads the code location once (seconds); the listing is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_assets.definitions import CONFIG_ENV_VAR, defs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT_S = 180


def dg(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `dg *args` in the repository root with DAGSTER_HOME=home and `env` added."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "VIRTUAL_ENV": str(BIN.parent), "DAGSTER_HOME": str(home), "NO_COLOR": "1", **env}
    return subprocess.run([str(BIN / "dg"), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)


def dagster_home(directory: Path) -> Path:
    home = directory / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> subprocess.CompletedProcess[str]:
    """One `dg list defs --json` for the module."""
    return dg("list", "defs", "--json", home=dagster_home(tmp_path_factory.mktemp("dg_list")))


def test_dg_list_defs_lists_every_asset_of_the_code_location(listing):
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "warning" not in listing.stderr.lower(), listing.stderr
    listed = {asset["asset_key"] for asset in json.loads(listing.stdout)["assets"]}
    expected = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert listed == expected


def test_dg_check_defs_passes(tmp_path):
    result = dg("check", "defs", home=dagster_home(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout
    assert "warning" not in result.stderr.lower(), result.stderr


def test_dg_check_defs_fails_on_an_unknown_config_key_and_names_it(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sae:\n  no_such_key: 1\n")
    result = dg("check", "defs", home=dagster_home(tmp_path), **{CONFIG_ENV_VAR: str(config)})
    assert result.returncode != 0
    assert "unknown config key 'sae.no_such_key'" in result.stdout + result.stderr
