import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from polca_study.cli import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("POLCA_DATA_DIR", ROOT / "data"))


def require_corpus() -> None:
    """Skip a test that needs the offline corpus when it is absent, unless the run must
    have it (`make test` and CI set POLCA_REQUIRE_CORPUS=1 after `make corpus`)."""
    if (DATA_DIR / "austen" / "SOURCE").exists():
        return
    message = f"the offline corpus is not in {DATA_DIR}: run `make corpus`"
    if os.environ.get("POLCA_REQUIRE_CORPUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


POLCA = [sys.executable, "-m", "polca_study"]


def compose_config(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture
def tiny_overrides(tmp_path):
    """A seconds-long study writing its cache and runs into tmp_path."""
    return [
        "experiment=tiny",
        "logger=offline",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        "figures=false",
        "num_threads=1",
    ]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(
        {
            "WANDB_API_KEY": "",
            "WANDB_SILENT": "true",
            "POLCA_CACHE_DIR": str(tmp_path / "cache"),
            "HYDRA_FULL_ERROR": "0",
        }
    )
    e.pop("WANDB_API_KEY")
    return e
