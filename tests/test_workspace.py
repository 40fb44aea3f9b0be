"""The W&B workspace and report of a comparison, checked in their serialised spec (offline)."""

import json

import pytest
import wandb

from polca_study.reporting import workspace as views
from polca_study.tasks import TASKS

GROUP, STUDY = "compare_methods", "tune_methods"


@pytest.fixture(autouse=True)
def no_wandb_api(monkeypatch):
    """Building and writing the views must never ask W&B (a login, the network)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the offline views called wandb.Api()")

    monkeypatch.setattr(wandb, "Api", refuse)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)


@pytest.fixture
def spec(tmp_path):
    sweep = tmp_path / GROUP
    sweep.mkdir()
    workspace, report = views.comparison_views(None, "polca-study", GROUP, sweep, [STUDY])
    path = views.write_spec(sweep, workspace, report)
    assert path == sweep / "wandb_views.json"
    assert [p.name for p in sweep.iterdir()] == ["wandb_views.json"]  # no temporary file left
    return json.loads(path.read_text())


def sections(spec) -> dict[str, list[dict]]:
    config = spec["workspace"]["spec"]["section"]["panelBankConfig"]
    return {s["name"]: s["panels"] for s in config["sections"]}


def test_workspace_has_the_four_sections_and_their_panels(spec):
    assert spec["workspace"]["displayName"] == f"polca-study: {GROUP}"
    assert spec["workspace"]["entity"] == "offline" and spec["workspace"]["project"] == "polca-study"
    panels = sections(spec)
    assert list(panels) == ["Headline metrics", "Tuning", "Cluster trajectories", "Tables"]

    bars = panels["Headline metrics"]
    expected = [*TASKS["arithmetic"].metrics.views, "hidden_breakthrough_fraction"]
    assert [p["viewType"] for p in bars] == ["Bar Chart"] * len(expected)
    assert [p["config"]["metrics"] for p in bars] == [[m] for m in expected]
    # the mean over a condition's seeds, with one standard deviation as error bars
    assert {(p["config"]["groupAgg"], p["config"]["groupArea"]) for p in bars} == {("mean", "stddev")}

    (tuning,) = panels["Tuning"]
    assert tuning["viewType"] == "Parallel Coordinates Plot"
    assert [c["accessor"] for c in tuning["config"]["columns"]] == [
        "config:cluster.value.min_cluster_size",
        "config:cluster.value.min_samples",
        "config:cluster.value.selection_method",
        "config:cluster.value.normalize",
        "config:cluster.value.grouping",
        "summary:carry_recovery_excess",
    ]

    charts, curves = panels["Cluster trajectories"][:2], panels["Cluster trajectories"][2:]
    for chart, key in zip(charts, ["charts/trajectories_v0", "charts/trajectories_v1"], strict=True):
        assert chart["viewType"] == "Vega2"
        assert chart["config"]["panelDefId"] == "wandb/lineseries/v0"
        fields = chart["config"]["userQuery"]["queryFields"][0]["fields"]
        table = next(f for f in fields if f["name"] == "summaryTable")
        assert table["args"] == [{"name": "tableKey", "value": f"{key}_table"}]
    assert [(c["viewType"], c["config"]["xAxis"], c["config"]["metrics"]) for c in curves] == [
        ("Run History Line Plot", "trainer/step", ["eval/loss"]),
        ("Run History Line Plot", "trainer/step", ["eval/accuracy"]),
    ]

    tables = panels["Tables"]
    assert {p["viewType"] for p in tables} == {"Weave"}
    # the key the panel's query picks from each run's summary
    keys = [p["config"]["panel2Config"]["exp"]["fromOp"]["inputs"]["key"]["val"] for p in tables]
    assert keys == ["tables/comparison", "tables/seeds", "tables/paired"]

    assert spec["panels"][0] == "Headline metrics: BarPlot carry_recovery (mean ± sd over seeds)"
    assert (
        spec["panels"][4] == "Tuning: ParallelCoordinatesPlot cluster settings against carry_recovery_excess"
    )
    assert len(spec["panels"]) == sum(len(p) for p in panels.values()) == 12


def test_workspace_runs_are_the_group_grouped_by_method_and_carry_rate(spec):
    (runset,) = spec["workspace"]["spec"]["section"]["runSets"]
    assert runset["filters"]["filters"] == [
        {"key": {"section": "run", "name": "group"}, "op": "=", "value": GROUP, "disabled": False}
    ]
    assert runset["grouping"] == [
        {"section": "config", "name": "method.value.name"},
        {"section": "config", "name": "dataset.value.carry_rate"},
    ]


def block_outline(spec) -> list[tuple]:
    """(heading level, text) or (panel types, run groups, grouped) per report block; the
    library pads the report with empty paragraphs, which are left out."""
    outline = []
    for block in spec["report"]["spec"]["blocks"]:
        if block["type"] == "heading":
            outline.append((block["level"], block["children"][0]["text"]))
        elif block["type"] == "paragraph" and block["children"][0]["text"]:
            outline.append(("p",))
        elif block["type"] == "panel-grid":
            (runset,) = block["metadata"]["runSets"]
            groups = [f["value"] for f in runset["filters"]["filters"]]
            types = [p["viewType"] for p in block["metadata"]["panelBankSectionConfig"]["panels"]]
            outline.append((types, groups, bool(runset["grouping"])))
    return outline


def test_report_follows_the_comparison_docs(spec):
    assert spec["report"]["displayName"] == f"polca-study comparison: {GROUP}"
    assert block_outline(spec) == [
        (1, "The method comparison"),
        ("p",),
        (2, "Held-out results"),
        (["Bar Chart"] * 4, [GROUP], True),
        (2, "POLCA against each baseline, paired by seed"),
        (["Weave"], [GROUP], True),
        (2, "Tuning"),
        # the tuning study's trials, one line each
        (["Parallel Coordinates Plot"], [STUDY], False),
        (2, "Cluster trajectories"),
        (["Vega2", "Vega2", "Run History Line Plot", "Run History Line Plot"], [GROUP], True),
    ]
    intro = next(
        b for b in spec["report"]["spec"]["blocks"] if b["type"] == "paragraph" and b["children"][0]["text"]
    )
    text = intro["children"][0]["text"]
    assert "carry_recovery_excess" in text and "dataset.carry_rate" in text


def test_a_text_sweep_gets_the_text_tasks_objective_and_regimes(tmp_path):
    """The views come from the task the sweep's jobs ran, never a hard-coded one."""
    job = tmp_path / "0" / ".hydra"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text("dataset:\n  name: text\n")
    workspace, report = views.comparison_views(None, "p", GROUP, tmp_path)
    spec = {"workspace": views.spec(workspace), "report": views.spec(report)}
    dumped = json.dumps(spec)
    assert "label_purity_excess" in dumped and "carry_recovery_excess" not in dumped
    (runset,) = spec["workspace"]["spec"]["section"]["runSets"]
    assert "dataset.value.source" in json.dumps(runset["grouping"]) and "carry_rate" not in json.dumps(runset)


def test_tuning_falls_back_to_the_comparison_group_and_takes_several_study_groups(tmp_path):
    _, report = views.comparison_views("me", "p", GROUP, tmp_path)
    assert block_outline({"report": views.spec(report)})[7] == (["Parallel Coordinates Plot"], [GROUP], False)
    _, report = views.comparison_views("me", "p", GROUP, tmp_path, ["tune_a", "tune_b"])
    (grid,) = [b for b in views.spec(report)["spec"]["blocks"] if b["type"] == "panel-grid"][2:3]
    (leaf,) = grid["metadata"]["runSets"][0]["filters"]["filters"]
    assert (leaf["op"], leaf["value"]) == ("IN", ["tune_a", "tune_b"])
    assert views.spec(report)["project"] == {"name": "p", "entityName": "me"}


def test_cli_writes_the_spec_for_the_directory_s_group(tmp_path, capsys):
    sweep = tmp_path / GROUP
    sweep.mkdir()
    views.main([str(sweep), "--study-group", STUDY, "--project", "proj"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(sweep / "wandb_views.json")
    assert out[1].strip() == "Headline metrics: BarPlot carry_recovery (mean ± sd over seeds)"
    written = json.loads((sweep / "wandb_views.json").read_text())
    assert written["workspace"]["displayName"] == f"polca-study: {GROUP}"
    assert written["workspace"]["project"] == "proj"
    assert block_outline(written)[7][1] == [STUDY]


def test_publish_without_a_login_exits_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        views.main([str(tmp_path), "--publish"])
    assert exit_.value.code == "--publish needs a W&B login (WANDB_API_KEY)"
    assert not (tmp_path / "wandb_views.json").exists()
