"""Comparison over seeds: bootstrap intervals, the paired test, tables from job folders."""

import itertools
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from polca_study.errors import ConfigError
from polca_study.reporting.compare import aggregate_seeds, paired_differences, seed_frame, write_comparison
from polca_study.reporting.jobs import find_jobs
from polca_study.reporting.paired_stats import bootstrap_interval, sign_flip_p


def test_bootstrap_interval_covers_the_known_mean_and_shrinks_with_seeds():
    rng = np.random.default_rng(0)
    widths, covered = [], 0
    for _ in range(200):
        v = rng.normal(0.3, 0.1, 20)
        lo, hi = bootstrap_interval(v, draws=2000, seed=1)
        assert lo <= v.mean() <= hi
        covered += lo <= 0.3 <= hi
        widths.append(hi - lo)
    # a percentile bootstrap slightly under-covers at n = 20; far from 95% would be a bug
    assert 0.85 <= covered / 200 <= 0.99
    # the width of a 95% interval of the mean: about 2 * 1.96 * 0.1 / sqrt(20)
    assert np.median(widths) == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(20), rel=0.15)
    assert np.isnan(bootstrap_interval(np.array([1.0]))[0])


def test_sign_flip_p_against_enumeration_by_hand():
    d = np.array([0.1, 0.2, 0.3, -0.05, 0.15])
    observed = abs(d.mean())
    count = sum(
        abs(np.mean(np.array(s) * d)) >= observed - 1e-12 for s in itertools.product((1, -1), repeat=5)
    )
    assert sign_flip_p(d) == count / 32
    assert sign_flip_p(np.ones(5)) == 2 / 32  # the smallest p five seeds can give


@pytest.mark.parametrize("n", [1, 2, 7, 18])
def test_sign_flip_p_counts_what_listing_every_flip_gives(n):
    """Past 16 seeds too (the counting is by halves): against all 2^n flips listed, on
    differences with ties and a zero among them."""
    rng = np.random.default_rng(n)
    d = np.round(rng.normal(0.02, 0.1, n), 2)
    if n > 2:
        d[:2] = [0.05, 0.0]  # a tie in magnitude with a later value, and no change at one seed
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    listed = float((np.abs((signs * d).mean(axis=1)) >= abs(d.mean()) - 1e-12).mean())
    assert sign_flip_p(d) == pytest.approx(listed, abs=1e-15)
    assert sign_flip_p(np.zeros(n)) == 1.0


def _job(root, name, overrides, metrics):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    (d / "summary.json").write_text(json.dumps(metrics))


def test_tables_over_seeds_from_a_synthetic_sweep(tmp_path):
    """Known values: POLCA = 0.5 + 0.01 s, loss = 0.2 + 0.02 s over seeds s = 0..4, on
    two data settings; the loss also ran on one extra seed POLCA did not."""
    for data in ("0.08", "null"):
        for s in range(5):
            common = [f"seed={s}", f"dataset.carry_rate={data}"]
            _job(
                tmp_path,
                f"p{data}{s}",
                ["method=polca", *common],
                {"seed": s, "carry_recovery": 0.5 + 0.01 * s, "clusters": 10},
            )
            _job(
                tmp_path,
                f"l{data}{s}",
                ["method=loss", *common],
                {"seed": s, "carry_recovery": 0.2 + 0.02 * s, "clusters": 2},
            )
        _job(
            tmp_path,
            f"l{data}9",
            ["method=loss", "seed=9", f"dataset.carry_rate={data}"],
            {"seed": 9, "carry_recovery": 0.9, "clusters": 2},
        )
    frame = seed_frame(tmp_path)
    assert len(frame) == 22
    agg = aggregate_seeds(frame).set_index(["condition", "metric"])
    row = agg.loc[("dataset.carry_rate=0.08, method=polca", "carry_recovery")]
    assert row.n == 5 and row["mean"] == pytest.approx(0.52)
    assert row["std"] == pytest.approx(np.std([0.5, 0.51, 0.52, 0.53, 0.54], ddof=1))
    assert row.ci_low < 0.52 < row.ci_high
    assert agg.loc[("dataset.carry_rate=null, method=loss", "carry_recovery")].n == 6
    paired = paired_differences(frame)
    rec = paired[paired.metric == "carry_recovery"].set_index("context")
    assert set(rec.index) == {"dataset.carry_rate=0.08", "dataset.carry_rate=null"}
    got = rec.loc["dataset.carry_rate=0.08"]
    assert got.baseline == "method=loss" and got.n == 5  # seed 9 has no POLCA partner
    assert got.polca_minus_baseline == pytest.approx(0.3 - 0.01 * 2)
    assert got.sign_flip_p == pytest.approx(2 / 32)
    write_comparison(tmp_path)
    assert "0.520 ± 0.016" in (tmp_path / "seeds.md").read_text()
    assert (tmp_path / "paired.csv").exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "0.520 [" in summary and "+0.280 [" in summary  # POLCA's mean; its paired gain


def _sweep_job(root, number, method, seed, lr=0.001, version="0.1.0"):
    """A job as a named study's sweep writes it: overrides, the composed config, the summary."""
    d = root / str(number)
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"+sweep={root.name}", f"method={method}", f"seed={seed}"]
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    config = {"seed": seed, "method": {"name": method}, "train": {"lr": lr}, "cache_dir": str(root)}
    OmegaConf.save(OmegaConf.create(config), d / ".hydra" / "config.yaml")
    value = (0.5 if method == "polca" else 0.2) + 0.01 * seed * (1 + (method == "loss"))
    metrics = {
        "seed": seed,
        "carry_recovery": value,
        "clusters": 3,
        "environment": {"versions": {"polca-study": version}},
    }
    (d / "summary.json").write_text(json.dumps(metrics))


def test_sweeps_of_disjoint_seeds_join_into_the_tables_of_one_sweep(tmp_path):
    """Seeds run on other days (or machines, SLURM arrays, named studies) join one set of
    tables: the same as one sweep over all of them; a job present twice counts once."""
    one, early, late = tmp_path / "one", tmp_path / "early", tmp_path / "late"
    jobs = [(method, seed) for seed in range(6) for method in ("polca", "loss")]
    for number, (method, seed) in enumerate(jobs):
        _sweep_job(one, number, method, seed)
        _sweep_job(early if seed < 3 else late, number % 6, method, seed)
    write_comparison(one)
    write_comparison(tmp_path / "joined", sources=[early, late, early])  # early twice: counted once
    for name in ("seeds.csv", "paired.csv", "summary.md"):
        assert (tmp_path / "joined" / name).read_text() == (one / name).read_text(), name
    assert len(seed_frame(find_jobs(early, late, early))) == 12


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        ({"lr": 0.002}, "config.train.lr: 0.001 there, 0.002 here"),
        ({"version": "0.2.0"}, "version: '0.1.0' there, '0.2.0' here"),
    ],
)
def test_jobs_of_one_condition_run_differently_are_refused(tmp_path, change, difference):
    for number, seed in enumerate(range(3)):
        _sweep_job(tmp_path / "a", number, "polca", seed)
    _sweep_job(tmp_path / "b", 0, "polca", 7, **change)
    with pytest.raises(ConfigError) as refused:
        write_comparison(tmp_path / "joined", sources=[tmp_path / "a", tmp_path / "b"])
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'a' / '0'} and {tmp_path / 'b' / '0'} are jobs of one condition")
    assert message.endswith(f"run differently: {difference}; compare them apart")
    assert not (tmp_path / "joined").exists()


def test_the_summary_puts_the_papers_table_8_beside_our_means(tmp_path):
    for number, (method, seed) in enumerate((m, s) for s in range(3) for m in ("polca", "loss")):
        _sweep_job(tmp_path, number, method, seed)
        summary = tmp_path / str(number) / "summary.json"
        metrics = json.loads(summary.read_text())
        metrics.update(carry_top1_carry_homogeneity=0.6 + 0.1 * seed, hidden_breakthrough_fraction=0.25)
        summary.write_text(json.dumps(metrics))
    write_comparison(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "Ours (mean over seeds) / the paper's Table 8 (one seed, uniform training data)" in text
    polca = next(line for line in text.splitlines() if line.startswith("| method=polca ") and " / " in line)
    assert "0.700 / 0.973" in polca and "0.250 / 0.355" in polca and "- / 0.946" in polca


def test_a_label_files_skills_join_the_tables_with_their_paired_excess(tmp_path):
    """Known values: the label `copy`'s excess is 0.3 + 0.01 s for POLCA and 0.1 for the
    loss over seeds s = 0..3; the tables name it after the label."""
    for s in range(4):
        for method, excess in (("polca", 0.3 + 0.01 * s), ("loss", 0.1)):
            score = {"recovery": excess + 0.2, "recovery_excess": excess, "hidden": s % 2 == 0}
            metrics = {"method": method, "seed": s, "labels": {"copy": score}}
            metrics.update({f"label_copy_{k}": v for k, v in score.items()})
            _job(tmp_path / "sweep", f"{method}-{s}", [f"method={method}", f"seed={s}"], metrics)
    write_comparison(tmp_path / "sweep")
    agg = aggregate_seeds(seed_frame(find_jobs(tmp_path / "sweep")))
    polca = agg[agg["condition"] == "method=polca"].set_index("metric")
    assert polca.loc["label_copy_recovery_excess", "mean"] == pytest.approx(0.315)
    assert polca.loc["label_copy_hidden", "mean"] == 0.5
    paired = paired_differences(seed_frame(find_jobs(tmp_path / "sweep")))
    row = paired[paired["metric"] == "label_copy_recovery_excess"].iloc[0]
    assert (row["baseline"], row["n"]) == ("method=loss", 4)
    assert row["polca_minus_baseline"] == pytest.approx(0.215)
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "copy excess" in summary and "copy hidden" in summary
    assert "copy recovery" in (tmp_path / "sweep" / "comparison.md").read_text()


def test_kept_job_records_grow_by_appending_and_give_the_tables_of_one_sweep(tmp_path):
    """Seeds kept in a repository's results: each sweep's jobs appended on its day, the
    archive compared as a sweep; appending a sweep again adds nothing."""
    from polca_study.reporting.compare import main

    one, early, late = tmp_path / "one", tmp_path / "early", tmp_path / "late"
    for number, (method, seed) in enumerate((m, s) for s in range(6) for m in ("polca", "loss")):
        _sweep_job(one, number, method, seed)
        _sweep_job(early if seed < 3 else late, number % 6, method, seed)
    write_comparison(one)
    kept, tables = tmp_path / "results" / "jobs", tmp_path / "results"
    main([str(tables), str(early), "--keep", str(kept)])
    main([str(tables), str(late), str(early), "--keep", str(kept)])
    assert len(list(kept.glob("*/summary.json"))) == 12
    assert (kept / "method=polca,seed=4" / ".hydra" / "config.yaml").exists()
    for name in ("seeds.csv", "paired.csv", "summary.md"):
        assert (tables / name).read_text() == (one / name).read_text(), name


def test_another_tasks_published_values_are_not_put_beside_ours(tmp_path):
    """A text sweep has nothing of the paper's arithmetic Table 8 to be read beside."""
    for s in range(3):
        for method in ("polca", "loss"):
            metrics = {
                "method": method,
                "seed": s,
                "label_purity_excess": 0.01 * s,
                "hidden_breakthrough_fraction": 0.5,
            }
            _job(tmp_path / "text", f"{method}-{s}", [f"method={method}", f"seed={s}"], metrics)
    write_comparison(tmp_path / "text")
    assert "Table 8" not in (tmp_path / "text" / "summary.md").read_text()


def test_t_test_power_against_known_values():
    from polca_study.reporting.paired_stats import seeds_for_power, t_test_power

    assert t_test_power(0.0, 10) == pytest.approx(0.05)  # no effect: the test's level
    # Cohen's tables (paired t, two-sided 5%): d = 1 with 10 pairs has power 0.80; d = 0.5
    # needs 34 pairs for 80%
    assert t_test_power(1.0, 10) == pytest.approx(0.803, abs=0.002)
    assert seeds_for_power(0.5) == 34
    assert t_test_power(-1.0, 10) == t_test_power(1.0, 10)
    assert np.isnan(seeds_for_power(0.01))  # would need more than MOST_SEEDS


def test_paired_markdown_says_where_no_feasible_number_of_seeds_has_the_power():
    import pandas as pd

    from polca_study.reporting.compare import paired_markdown
    from polca_study.reporting.paired_stats import MOST_SEEDS

    paired = pd.DataFrame({"baseline": ["a", "b"], "seeds_for_80_power": [12.0, float("nan")]})
    rows = paired_markdown(paired).splitlines()[2:]
    assert rows[0].split("|")[2].strip() == "12"
    assert rows[1].split("|")[2].strip() == f"> {MOST_SEEDS:,}"
