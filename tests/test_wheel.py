"""The package as users install it: a wheel, outside the checkout."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TOP_LEVEL_SKIP = {".venv", ".git", ".cache", "data", "build", "multirun", "outputs"}


def test_wheel_carries_its_configs_and_runs_outside_the_checkout(tmp_path, env):
    """Build the wheel, install it into a fresh virtual environment and run the tiny study
    from an empty directory. The environment sees the project's installed dependencies
    through a .pth file (installing torch and the rest again would take minutes here);
    `pip check` then proves the wheel's declared dependencies are all satisfied."""
    dist = tmp_path / "dist"
    # build from a copy: setuptools leaves build/ beside the sources it builds
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=lambda where, names: TOP_LEVEL_SKIP & set(names) if Path(where) == ROOT else set(),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    (wheel,) = dist.glob("polca_study-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "polca_study/conf/config.yaml" in names
    assert "polca_study/conf/sweep/compare_methods.yaml" in names  # named studies too
    assert any(n.startswith("hydra_plugins/polca_optuna_sweeper/") for n in names)

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    py = fresh / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ensurepip's old setuptools would shadow the newer one torch declares
    subprocess.run(
        [str(py), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True, capture_output=True
    )
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run(
        [
            str(fresh / "bin" / "polca-study"),
            "experiment=tiny",
            "logger=disabled",
            "progress=false",
            "figures=false",
            "num_threads=1",
            "hydra.run.dir=run",
        ],
        cwd=work,
        env={**env, "POLCA_CACHE_DIR": str(work / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "run" / "summary.json").exists()  # outputs in the user's directory
    where = subprocess.run(
        [str(py), "-c", "import polca_study; print(polca_study.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(site)  # the installed package, not the checkout
