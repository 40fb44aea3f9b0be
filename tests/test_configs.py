"""The real config composes with every group option; bad input fails before any work."""

import subprocess
from pathlib import Path

import pytest

from polca_study.study.config import validate
from tests.conftest import CONF_DIR, POLCA, ROOT, compose_config

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
# options whose intervals only fit their own presets: compose them with matching intervals
COMPANIONS = {
    ("train", "paper"): ["polca.interval=20", "basis.interval=200"],
    # a store or a model is the option's mandatory setting (`path: ???`)
    ("snapshots", "recorded"): ["snapshots.path=runs/mine"],
    ("snapshots", "huggingface"): ["snapshots.path=EleutherAI/pythia-70m"],
}


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(group):
    for option in sorted(Path(CONF_DIR, group).glob("*.yaml")):
        key = f"+{group}" if group == "sweep" else group
        cfg = compose_config([f"{key}={option.stem}", *COMPANIONS.get((group, option.stem), [])])
        settings = validate(cfg)
        assert settings.model.d_model > 0


def test_default_config_values():
    s = validate(compose_config())
    assert s.dataset.name == "arithmetic" and s.method.name == "polca"
    assert s.logger.mode == "auto" and s.polca.second_order == "path"
    assert s.basis.interval % s.train.checkpoint_every == 0


def test_paper_preset_matches_the_paper():
    s = validate(compose_config(["experiment=paper_arithmetic"]))
    assert (s.model.n_layers, s.model.d_model, s.model.n_heads, s.model.d_mlp) == (3, 512, 4, 2048)
    assert (s.train.steps, s.train.batch_size, s.train.lr) == (10000, 64, 1e-5)
    assert (s.basis.k, s.basis.interval, s.polca.interval) == (1, 200, 20)
    assert s.dataset.carry_rate is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("basis.k=0", "basis.k must be >= 1"),
        ("cluster.min_cluster_size=-3", "cluster.min_cluster_size must be >= 2"),
        ("score.permutations=0", "score.permutations must be >= 1"),
        ("polca.second_order=fourth", "polca.second_order must be one of"),
        ("polca.interval=30", "polca.interval=30 must be a multiple of train.checkpoint_every"),
        ("model.n_heads=3", "model.d_model (64) must be divisible by model.n_heads (3)"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config([override]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("basis.k=0", "basis.k must be >= 1"),
        ("cluster.min_cluster_size=-3", "cluster.min_cluster_size must be >= 2"),
        ("model=huge", "model=huge is not an option of model: paper, small, tiny"),
        ("method=polka", "(did you mean polca?)"),
        ("basis.kk=3", "basis.kk is not a setting of polca-study (did you mean basis.k?)"),
        ("+cluster.min_cluster_siz=5", "(did you mean cluster.min_cluster_size?)"),
        ("+foo=1", "foo is not a setting of polca-study"),
        ("train.steps=many", "train.steps=many: Value 'many' of type 'str' could not be converted"),
        ("polca.second_order=exat", "got 'exat' (did you mean exact?)"),
        ("seed=1,2", "seed=1,2 is a sweep: add -m"),
    ],
)
@pytest.mark.slow  # a process each
def test_cli_fails_fast_with_one_clear_line(override, message, tmp_path, env):
    cache = tmp_path / "cache"
    proc = subprocess.run(
        POLCA + [override, f"cache_dir={cache}", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert proc.stderr.startswith("polca-study: error: ") and message in proc.stderr
    assert not cache.exists()  # failed before any stage ran
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_multirun_checks_every_job_before_launching_any(tmp_path, env):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        POLCA
        + ["-m", "seed=0,1", "basis.k=1,0", f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "polca-study: error: basis.k must be >= 1, got 0 (job seed=0 basis.k=0)"
    assert not sweep.exists()  # no job was launched


def test_schema_defaults_are_the_default_run():
    """The dataclasses' defaults and the default YAML cannot drift apart: reading
    config.py gives the settings of a plain `polca-study` run."""
    from dataclasses import MISSING, fields, is_dataclass

    from omegaconf import OmegaConf

    from polca_study.study.config import Config
    from polca_study.study.sources import TrainSnapshots
    from polca_study.tasks.arithmetic import ArithmeticConfig

    def defaults(cls) -> dict:  # the declared defaults, before __post_init__ derives any
        out = {}
        for f in fields(cls):
            value = f.default if f.default is not MISSING else f.default_factory()
            if f.name == "dataset":  # typed by the group's option: the default run's
                value = ArithmeticConfig
            if f.name == "snapshots":
                value = TrainSnapshots
            out[f.name] = (
                defaults(value)
                if isinstance(value, type) and is_dataclass(value)
                else (defaults(type(value)) if is_dataclass(value) else value)
            )
        return out

    composed = OmegaConf.to_container(compose_config(), resolve=False)
    schema = defaults(Config)
    differ = {}
    for key, value in schema.items():
        if isinstance(value, dict):
            differ.update(
                {f"{key}.{k}": (v, composed[key][k]) for k, v in value.items() if composed[key][k] != v}
            )
        elif composed[key] != value:
            differ[key] = (value, composed[key])
    assert differ == {}


def test_relative_paths_resolve_against_where_the_command_ran(tmp_path):
    from omegaconf import OmegaConf

    from polca_study.app.cli import resolve_paths

    (tmp_path / "runs" / "mine").mkdir(parents=True)
    cfg = OmegaConf.create(
        {
            "cache_dir": ".cache/polca_study",
            "dataset": {"data_dir": "data", "files": ["corpus/*.txt", "/abs/x.txt"]},
            "snapshots": {"path": "runs/mine", "tokenizer": "EleutherAI/pythia-70m"},
        }
    )
    resolve_paths(cfg, str(tmp_path))
    assert cfg.cache_dir == str(tmp_path / ".cache/polca_study")
    assert cfg.dataset.data_dir == str(tmp_path / "data")
    assert cfg.dataset.files == [str(tmp_path / "corpus/*.txt"), "/abs/x.txt"]
    assert cfg.snapshots.path == str(tmp_path / "runs/mine")  # exists there: a path
    assert cfg.snapshots.tokenizer == "EleutherAI/pythia-70m"  # does not: a hub id


def test_the_schemas_import_neither_scipy_nor_hdbscan():
    """Every CLI process and `--help` imports the schemas: the Lanczos code (scipy), the
    clustering (hdbscan) and the models of other libraries load when a stage runs."""
    import sys

    heavy = ["scipy.sparse.linalg", "hdbscan", "sklearn", "transformers", "polca_study.polca"]
    code = f"import sys, polca_study.study.config; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_composition_error_keeps_its_reason():
    # Hydra's message puts the reason on its second line; the one-line error keeps it
    from polca_study.app.preflight import check_command_line

    problem = check_command_line(["-m", "+sweep=tune_methods", "hydra/sweeper=basic"])
    assert problem is not None
    assert "Key 'study_name' not in 'BasicSweeperConf'" in problem and "\n" not in problem


ONE_JOB = {  # each study's axes fixed on the command line: one job to compose
    "tune_methods": [
        "method=polca",
        "cluster.selection_method=eom",
        "cluster.normalize=final",
        "cluster.grouping=none",
    ],
    "compare_methods": ["method=polca", "dataset.carry_rate=0.08", "seed=200"],
}


@pytest.mark.parametrize("sweep", ["tune_methods", "compare_methods"])
@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_local", "basic"])
def test_the_named_studies_run_on_any_launcher(sweep, launcher):
    # docs/cluster.md's commands: a sweep that set a joblib-only key (n_jobs) could not
    # be composed with another launcher
    from polca_study.app.preflight import check_command_line

    assert (
        check_command_line(["-m", f"+sweep={sweep}", f"hydra/launcher={launcher}", *ONE_JOB[sweep]]) is None
    )


def test_the_check_composes_the_jobs_that_will_run(monkeypatch):
    """A key the command line sets replaces the sweep's axis (as in Hydra's sweepers):
    `seed=200` runs the seed-200 jobs only, and only those are composed."""
    from polca_study.app import preflight

    composed = []
    compose = preflight._compose
    monkeypatch.setattr(preflight, "_compose", lambda o, hydra=False: composed.append(o) or compose(o, hydra))
    assert (
        preflight.check_command_line(["-m", "+sweep=compare_methods", "seed=200", "method=polca,loss"])
        is None
    )
    jobs = composed[1:]  # after the base config
    assert len(jobs) == 2 * 2  # the sweep's two data regimes x the command line's two methods
    assert all([o for o in job if o.startswith("seed=")] == ["seed=200"] for job in jobs)
