"""The jobs a comparison reads: their run directories, overrides and summaries, from
one sweep or several (other days, machines, SLURM arrays) joined into one set."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from polca_study.errors import ConfigError
from polca_study.reporting import keys

# Overrides that change how a job runs, not what it measures: never part of a condition.
RUN_KEYS = (*keys.RUN_KEYS, *keys.MACHINE_KEYS, *keys.STUDY_KEYS)
FAILED = "failed.json"  # in a job's directory: why it did not run (app/cli.py writes it)


@dataclass(frozen=True)
class Job:
    """One job's record: where it ran, its command-line overrides, its summary."""

    run_dir: Path
    overrides: dict[str, str]
    metrics: dict


def job_overrides(run_dir: Path) -> dict[str, str]:
    """The job's command-line overrides, from Hydra's record."""
    path = run_dir / ".hydra" / "overrides.yaml"
    items = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
    # `+sweep=x` adds a key Hydra's grammar marks; the key is `sweep`
    return {k.lstrip("+~"): v for k, v in (o.split("=", 1) for o in items if "=" in o)}


def find_jobs(*dirs: Path) -> list[Job]:
    """The jobs with a summary under `dirs` (sweeps of other days, machines or SLURM
    arrays), in directory and job order. A job present twice is counted once. Jobs of
    one condition must have run with one config and one package version: otherwise
    their seeds would not measure one thing, and a ConfigError names the first
    difference."""
    jobs, seen, conditions = [], {}, {}
    for directory in dirs:
        for summary in sorted(
            Path(directory).rglob("summary.json"), key=lambda p: (job_number(p.parent), str(p))
        ):
            job = Job(summary.parent, job_overrides(summary.parent), json.loads(summary.read_text()))
            settings = _settings(job)
            name = label(measured(job.overrides))
            first = conditions.setdefault(name, (job, settings))
            difference = _first_difference(first[1], settings)
            if difference:
                raise ConfigError(
                    f"{first[0].run_dir} and {job.run_dir} are jobs of one condition ({name or 'all'}) "
                    f"run differently: {difference}; compare them apart"
                )
            identity = (name, str(job.overrides.get("seed", job.metrics.get("seed"))))
            if identity not in seen:
                seen[identity] = job
                jobs.append(job)
    return jobs


RECORD = (".hydra/config.yaml", ".hydra/overrides.yaml", "summary.json")  # what a comparison reads


def keep_jobs(jobs: list[Job], archive: Path) -> int:
    """Append the jobs' records (summary, composed config, overrides) to `archive`, one
    directory per job named by its condition and seed, so that results kept in a
    repository grow by appending and a comparison reads them as it reads a sweep. A job
    the archive holds already is kept as it was (a job counts once). Returns how many
    were added."""
    from polca_study.atomic import write_text_atomic

    added = 0
    for job in jobs:
        over = job.overrides
        name = label({**measured(over), "seed": over.get("seed", job.metrics.get("seed"))}).replace(", ", ",")
        target = Path(archive) / name.replace("/", "_")
        if (target / "summary.json").exists():
            continue
        for part in RECORD:  # the summary last: a directory with one is a whole record
            source = job.run_dir / part
            if source.exists():
                (target / part).parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(target / part, source.read_text())
        added += 1
    return added


def _settings(job: Job) -> dict:
    """What a job's results depend on: its config (but the seed and the settings of how
    it ran) and the package version that ran it."""
    path = job.run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
    for key in ("seed", *RUN_KEYS):
        config.pop(key, None)
    version = ((job.metrics.get("environment") or {}).get("versions") or {}).get("polca-study")
    return {"config": config, "version": version}


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if a == b else f"{path}: {a!r} there, {b!r} here"


def as_jobs(where: Path | Sequence[Job]) -> list[Job]:
    return find_jobs(where) if isinstance(where, str | Path) else list(where)


def measured(overrides: dict[str, str], keys=None) -> dict[str, str]:
    """The overrides that say what a job measures, but its seed (among `keys`)."""
    return {
        k: v
        for k, v in overrides.items()
        if k != "seed" and k not in RUN_KEYS and (keys is None or k in keys)
    }


def label(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def job_number(run_dir: Path) -> tuple[int, str]:
    return (int(run_dir.name), "") if run_dir.name.isdigit() else (1 << 30, run_dir.name)


def failed_jobs(*dirs: Path) -> list[dict]:
    """The jobs that could not run as set (`failed.json`: job, overrides, error)."""
    paths = [
        p for d in dirs for p in sorted(Path(d).rglob(FAILED), key=lambda p: (job_number(p.parent), str(p)))
    ]
    return [json.loads(p.read_text()) for p in paths]
