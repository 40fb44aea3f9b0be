import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from polca_study.study.config import CONF_DIR, register

register()  # the schemas, as the command line registers them

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


# Where W&B, Hugging Face and matplotlib keep their state: under the test session's
# temporary directory, never the user's home.
PRIVATE_DIRS = {
    "WANDB_DIR": "wandb",
    "WANDB_DATA_DIR": "wandb-data",
    "WANDB_CACHE_DIR": "wandb-cache",
    "WANDB_CONFIG_DIR": "wandb-config",
    "HF_HOME": "huggingface",
    "MPLCONFIGDIR": "matplotlib",
}


@pytest.fixture(autouse=True, scope="session")
def private_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    patch = pytest.MonkeyPatch()
    for variable, name in PRIVATE_DIRS.items():
        patch.setenv(variable, str(root / name))
    patch.setenv("POLCA_DATA_DIR", str(DATA_DIR.resolve()))
    yield root
    patch.undo()


@pytest.fixture
def env(tmp_path):
    """The environment of a polca-study subprocess: offline W&B, the cache in tmp_path,
    and an empty HOME of its own (tests check nothing is written there)."""
    e = dict(os.environ)
    e.update(
        {
            "WANDB_SILENT": "true",
            "POLCA_CACHE_DIR": str(tmp_path / "cache"),
            "HYDRA_FULL_ERROR": "0",
            "HOME": str(tmp_path / "home"),
        }
    )
    e.pop("WANDB_API_KEY", None)
    (tmp_path / "home").mkdir(exist_ok=True)
    return e


@pytest.fixture(autouse=True)
def default_dtype_is_restored():
    """Every test leaves torch's default dtype as it found it (float32): a float64 test
    that leaked would silently change the precision of every test after it."""
    import torch

    yield
    leaked = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    assert leaked == torch.float32, f"the test left torch's default dtype at {leaked}"
