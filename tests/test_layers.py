"""The package's shape: its layers hold (import-linter), no module grows past a reader,
the config stays light to import, and the public import paths still work."""

import ast
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGES = (ROOT / "polca_study", ROOT / "hydra_plugins")
MAX_LINES = 500
# every command-line check imports the config: none of these may come with it
HEAVY = ("pandas", "scipy", "hdbscan", "sklearn", "wandb", "matplotlib")


def _modules():
    return sorted(p for root in PACKAGES for p in root.rglob("*.py"))


def test_the_layer_contracts_hold():
    """pyproject.toml's contracts: the layers from the command line down to the core, the
    core free of Hydra, W&B, pandas and files, tasks and snapshots free of the study, and
    no import cycle between the modules of any package."""
    lint = shutil.which("lint-imports", path=str(ROOT / ".venv" / "bin")) or shutil.which("lint-imports")
    assert lint, "lint-imports is not installed: pip install -e .[dev]"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_is_longer_than_a_reader_holds():
    long = {
        str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _long_functions(path, limit: int) -> list[str]:
    """Functions over `limit` lines without a comment saying why, in the lines just
    above them (`# long: ...`)."""
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            reason = any("# long:" in line for line in lines[max(0, first - 4) : first - 1])
            if length > limit and not reason:
                out.append(f"{path.relative_to(ROOT)}:{node.name} ({length} lines)")
    return out


def test_no_function_is_long_without_a_reason():
    long = [f for p in _modules() for f in _long_functions(p, 60)]
    assert not long, long


@pytest.mark.parametrize("module", ["polca_study.study.config", "polca_study.app.cli"])
def test_the_config_imports_no_heavy_library(module):
    """The config and the command line (every command-line check pays them) stay light."""
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize(
    "statement",
    [
        "from polca_study.polca import ModuleLoss, build_basis, decompose, flatten_parameters, causal_lm_loss",  # noqa: E501
        "from polca_study.record import SnapshotRecorder, HFTrainerRecorder, LightningRecorder",
        "from polca_study.snapshots import SnapshotStore",
    ],
)
def test_the_public_imports_of_the_readme_work(statement):
    subprocess.run([sys.executable, "-c", statement], cwd=ROOT, check=True)


def test_the_faces_hand_out_the_layers_objects():
    from polca_study import polca, record
    from polca_study.core import basis, decompose, module_loss
    from polca_study.snapshots import record as recorders

    assert polca.build_basis is basis.build_basis
    assert polca.decompose is decompose.decompose
    assert polca.ModuleLoss is module_loss.ModuleLoss
    assert record.SnapshotRecorder is recorders.SnapshotRecorder
