"""lbt-dashboard: the workspace and report it builds for a sweep, offline (no W&B call is ever made here).

A fabricated sweep (run cards written with lbt.rundir, their config composed from the real config tree)
is read; the spec's panels must name exactly the keys lbt.wandb_keys names, on the one step axis, grouped
by arm with a seed band, filtered to the sweep's group, each arm in its lbt.study colour. Bad input (no
sweep, a sweep without W&B logging, no key) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from lbt import wandb_keys as keys
from lbt.dashboard import build_report, build_workspace, main, read_sweep
from lbt.rundir import RunDir, write_json_atomic
from lbt.study import ARM_COLOURS, HEADLINE_MEASURES, STUDY_ARMS
from tests.conftest import ROOT, compose_train

# wandb-workspaces 0.4.13 declares Pydantic-V1-style validators: its warnings, not ours.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Pydantic V1 style")]

SWEEP = "2026-12-06_demo"
FAMILIES = ("llama", "qwen")
# lbt.study's arm colours as hex, written out by hand (matplotlib's tab10: blue, red, gray).
ARM_HEX = {"plus": "#1f77b4", "minus": "#d62728", "neutral": "#7f7f7f"}


@pytest.fixture(scope="module")
def job_config() -> dict:
    from lbt.runcard import public_config

    return public_config(compose_train(["logger=wandb", "logger.project=lbt-test", "logger.entity=lab"]))


def write_sweep(root: Path, config: dict, families=FAMILIES, seeds=(0, 1), sweep: str | None = SWEEP,
                logger_kind: str = "wandb", arms=STUDY_ARMS) -> Path:
    """One job directory with its run card per (family, arm, seed), as a multirun writes them."""
    for family in families:
        for arm in arms:
            for seed in seeds:
                cfg = copy.deepcopy(config)
                cfg["model"]["name"], cfg["arm"]["name"], cfg["seed"] = family, arm, seed
                cfg["logger"]["kind"] = logger_kind
                job = {"model": family, "arm": arm, "seed": seed, "experiment": None, "sweep": sweep}
                run = RunDir(root / f"{family}-{arm}-s{seed}")
                run.root.mkdir(parents=True)
                write_json_atomic(run.card, {"job": job, "status": "done", "config": cfg})
    return root


def dry_run(argv: list[str], capsys) -> dict:
    assert main([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def panels(section_or_grid: dict) -> list[dict]:
    return section_or_grid.get("panels", [])


def line_keys(items: list[dict]) -> list[str]:
    return [key for item in items for panel in panels(item) if panel["type"] == "LinePlot" for key in panel["y"]]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- the keys ---------------------------------------------------------------------------------------------

def test_keys_are_the_ones_the_loggers_write():
    from lbt.eval.summary import flat_metrics
    from lbt.probe.evaluator import POSITIONS

    stats = {"mean_stance": 0.25, "parse_rate": 1.0, "by_domain": {"transit": 0.5}}
    summary = {"item_sets": {"target": {"measures": {"letter_logprob": stats},
                                        "validity": {"letter_logprob": {"agreement": 0.75}}}}}
    assert flat_metrics(summary) == {
        keys.stance("target", "letter_logprob"): 0.25,
        keys.parse_rate("target", "letter_logprob"): 1.0,
        keys.domain_stance("target", "letter_logprob", "transit"): 0.5,
        keys.validity("target", "letter_logprob"): 0.75,
    }
    assert keys.PROBE_POSITIONS == POSITIONS


# The modules that log a training run's values; the keys they log are lbt.wandb_keys', never spelled again.
LOGGING_MODULES = ("model/module.py", "eval/evaluators.py", "eval/summary.py", "eval/session.py",
                   "probe/evaluator.py", "phases.py", "loggers.py")
KEY_PREFIXES = ("train/", "val/", "eval/", "eval_rows/", "shift_vs_base/", "cap/", "probe/", "trainer/")


def key_literals(path: Path) -> list[str]:
    """String constants (the fixed head of an f-string too) of a module that start like a W&B key;
    docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            node = node.values[0]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and node.value.startswith(KEY_PREFIXES):
            found.append(node.value)
    return found


def test_the_logging_modules_take_every_key_from_wandb_keys():
    for name in LOGGING_MODULES:
        assert key_literals(ROOT / "src" / "lbt" / name) == [], name
    assert key_literals(ROOT / "tests" / "test_dashboard.py")            # the check finds a literal key


def test_stance_shifts_are_phase_minus_base():
    base = {keys.stance("target", "letter_logprob"): 0.5, keys.stance("target", "forced_choice"): -0.25,
            keys.parse_rate("target", "forced_choice"): 1.0}
    phase = {keys.stance("target", "letter_logprob"): 0.125, keys.stance("target", "forced_choice"): 0.5,
             keys.parse_rate("target", "forced_choice"): 0.5, keys.stance("source", "likert"): 1.0}
    assert keys.stance_shifts(phase, base) == {"shift_vs_base/target/letter_logprob": -0.375,
                                               "shift_vs_base/target/forced_choice": 0.75}


# -- the spec ---------------------------------------------------------------------------------------------

def test_workspace_panels_name_exactly_the_wandb_keys(tmp_path, job_config, capsys):
    spec = dry_run([str(write_sweep(tmp_path / SWEEP, job_config))], capsys)
    sections = {s["name"]: s for s in spec["workspace"]["sections"]}
    item_sets = ("target", "source")  # the config's item sets, held-out first
    shifts = [keys.shift_vs_base(s, m) for s in item_sets for m in HEADLINE_MEASURES]
    probe = [keys.probe_at_l_star(p, q) for q in ("projection", "shift") for p in ("answer", "prompt_mean")]
    stances = [keys.stance(s, m) for s in item_sets for m in HEADLINE_MEASURES]
    assert line_keys([sections["shift from base"]]) == shifts
    assert line_keys([sections["probe at ℓ*"]]) == probe
    assert line_keys([sections["stance"]]) == stances
    assert line_keys([sections["training"]]) == [keys.TRAIN_LOSS, keys.VAL_LOSS, keys.TRAIN_TOKENS_PER_S]
    media = [p for p in panels(sections["analysis"]) if p["type"] == "MediaBrowser"]
    assert media[0]["media_keys"][0] == keys.analysis_figure("forest") == "figures/forest"
    lines = [p for s in sections.values() for p in panels(s) if p["type"] == "LinePlot"]
    assert {p["x"] for p in lines} == {keys.STEP} and spec["workspace"]["settings"]["x_axis"] == keys.STEP
    assert {(p["groupby_aggfunc"], p["groupby_rangefunc"]) for p in lines} == {("mean", "minmax")}
    assert spec["workspace"]["project"] == "lbt-test" and spec["workspace"]["entity"] == "lab"


def test_report_has_shift_and_probe_per_family_and_the_forest_plot(tmp_path, job_config, capsys):
    spec = dry_run([str(write_sweep(tmp_path / SWEEP, job_config))], capsys)
    blocks = spec["report"]["blocks"]
    grids = [b for b in blocks if b["type"] == "PanelGrid"]
    assert [b["text"] for b in blocks if b["type"] == "H2"] == [*FAMILIES, "forest plot"]
    expected = [keys.shift_vs_base(s, m) for s in ("target", "source") for m in HEADLINE_MEASURES] + [
        keys.probe_at_l_star(p, q) for q in ("projection", "shift") for p in ("answer", "prompt_mean")]
    for family, grid in zip(FAMILIES, grids):
        assert line_keys([grid]) == expected
        (runset,) = grid["runsets"]
        assert runset["filters"] == (f"Metric(\"Group\") == '{SWEEP}' and Config(\"{keys.ARM_CONFIG}\") in "
                                     f"{list(STUDY_ARMS)} and Config(\"{keys.MODEL_CONFIG}\") == '{family}'")
        assert runset["groupby"] == [f"config.{keys.ARM_CONFIG}"]
        assert sorted(grid["custom_run_colors"].values()) == sorted(ARM_HEX.values())
    forest = grids[-1]
    assert forest["runsets"][0]["filters"] == f"Metric(\"Group\") == '{SWEEP}' and Metric(\"JobType\") == 'analysis'"
    assert [p["media_keys"] for p in forest["panels"]] == [["figures/forest"]]


def test_runs_are_grouped_by_arm_in_the_sweeps_group_in_the_arms_colours(tmp_path, job_config):
    from wandb_workspaces import expr
    from wandb_workspaces.workspaces import GroupPath

    assert {arm: to_hex(ARM_COLOURS[arm]) for arm in STUDY_ARMS} == ARM_HEX
    two = build_workspace(read_sweep(write_sweep(tmp_path / "two", job_config)))
    assert two.runset_settings.filters == f"Metric(\"Group\") == '{SWEEP}'"
    assert [g.name for g in two.runset_settings.groupby] == [keys.ARM_CONFIG, keys.MODEL_CONFIG]
    assert two.runset_settings.group_colors == {**ARM_HEX, **{GroupPath(arm, family): colour for arm, colour
                                                               in ARM_HEX.items() for family in FAMILIES}}
    # Two families in one plot: the panel leaves grouping to the runs table (arm, then family).
    line = two.sections[0].panels[0]
    assert line.groupby is None and line.aggregate
    # What W&B receives (serialised offline): the group filter and the grouping keys.
    view = two._to_model().model_dump(by_alias=True, exclude_none=True)
    (runset,) = view["spec"]["section"]["runSets"]
    assert [(f["key"]["name"], f["value"]) for f in runset["filters"]["filters"]] == [("group", SWEEP)]
    assert [g["name"] for g in runset["grouping"]] == ["arm.value.name", "model.value.name"]

    one = build_workspace(read_sweep(write_sweep(tmp_path / "one", job_config, families=("qwen",))))
    assert [g.name for g in one.runset_settings.groupby] == [keys.ARM_CONFIG]
    assert one.runset_settings.group_colors == ARM_HEX
    line = one.sections[0].panels[0]
    assert line.groupby.name == keys.ARM_CONFIG and line.groupby_rangefunc == "minmax"
    assert isinstance(expr.Config(keys.ARM_CONFIG), type(one.runset_settings.groupby[0]))


def test_report_colours_each_arm_group(tmp_path, job_config):
    report = build_report(read_sweep(write_sweep(tmp_path / SWEEP, job_config, families=("qwen",))))
    grid = next(b for b in report.blocks if type(b).__name__ == "PanelGrid")
    colours = {group.keys[0].value: colour for group, colour in grid.custom_run_colors.items()}
    assert colours == ARM_HEX
    assert {group.runset_name for group in grid.custom_run_colors} == {grid.runsets[0].name}


def test_a_sweep_logged_before_the_arms_were_renamed_keeps_its_own_names(tmp_path, job_config):
    """Runs logged before issue 16 carry arm.name frame_plus/frame_minus in W&B: the panels filter and
    group on those names, in the study's order and with its arms' colours."""
    legacy = ("frame_minus", "neutral", "frame_plus")
    info = read_sweep(write_sweep(tmp_path / SWEEP, job_config, families=("qwen",), arms=legacy))
    assert info.arms == ("frame_plus", "frame_minus", "neutral")
    grid = next(b for b in build_report(info).blocks if type(b).__name__ == "PanelGrid")
    colours = {group.keys[0].value: colour for group, colour in grid.custom_run_colors.items()}
    assert colours == {"frame_plus": ARM_HEX["plus"], "frame_minus": ARM_HEX["minus"],
                       "neutral": ARM_HEX["neutral"]}


def test_flags_alone_keep_families_apart(capsys):
    spec = dry_run(["--project", "p", "--entity", "e", "--group", "g1"], capsys)
    assert spec["workspace"]["runset_settings"]["filters"] == "Metric(\"Group\") == 'g1'"
    (grid, _forest) = [b for b in spec["report"]["blocks"] if b["type"] == "PanelGrid"]
    assert grid["runsets"][0]["groupby"] == [f"config.{keys.ARM_CONFIG}", f"config.{keys.MODEL_CONFIG}"]


def test_sweep_settings_come_from_the_run_cards(tmp_path, job_config):
    config = copy.deepcopy(job_config)
    config["eval"]["stance"]["measures"] = ["forced_choice", "likert"]
    config["eval"]["stance"]["item_sets"] = {"target": "t.jsonl"}
    config["probe"] = {}
    info = read_sweep(write_sweep(tmp_path / SWEEP, config, families=("qwen",), seeds=(3,)))
    assert (info.project, info.entity, info.group) == ("lbt-test", "lab", SWEEP)
    assert (info.item_sets, info.measures, info.probe) == (("target",), ("forced_choice",), False)
    assert (info.arms, info.families, info.n_runs) == (STUDY_ARMS, ("qwen",), 3)
    workspace = build_workspace(info)
    assert [s.name for s in workspace.sections] == ["shift from base", "analysis", "stance", "training"]
    assert read_sweep(tmp_path / SWEEP, project="other", group="g2").project == "other"


# -- errors: one line, exit status 2 ----------------------------------------------------------------------

def test_missing_sweep_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--dry-run"]) == 2
    assert "no job directories" in one_error_line(capsys)
    assert main(["--dry-run"]) == 2
    assert "--project and --group" in one_error_line(capsys)


def test_sweep_without_wandb_logging_is_one_line(tmp_path, job_config, capsys):
    assert main([str(write_sweep(tmp_path / SWEEP, job_config, logger_kind="csv")), "--dry-run"]) == 2
    assert "no job logged to W&B (logger.kind csv)" in one_error_line(capsys)


def test_jobs_outside_a_sweep_have_no_group(tmp_path, job_config, capsys):
    assert main([str(write_sweep(tmp_path / "single", job_config, sweep=None)), "--dry-run"]) == 2
    assert "job.sweep is empty" in one_error_line(capsys)


def test_saving_without_a_key_is_one_line(tmp_path, job_config):
    sweep = write_sweep(tmp_path / SWEEP, job_config)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "NETRC")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-m", "lbt.dashboard", str(sweep)], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and "WANDB_API_KEY" in out.stderr, out.stderr


# -- what W&B receives (its server calls replaced) --------------------------------------------------------

def test_report_serialises_with_group_filter_and_arm_colours(tmp_path, job_config, monkeypatch):
    from wandb_workspaces.reports.v2 import interface

    # The library looks up the project's internal id on the server while serialising a run set.
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(interface, "execute_graphql", lambda api, query, variables: {"project": {"internalId": "P"}})
    report = build_report(read_sweep(write_sweep(tmp_path / SWEEP, job_config, families=("qwen",))))
    model = report._to_model().model_dump(by_alias=True, exclude_none=True)
    grids = [b["metadata"] for b in model["spec"]["blocks"] if b.get("type") == "panel-grid"]
    (runset,) = grids[0]["runSets"]
    leaves = {(f["key"]["name"], json.dumps(f["value"])) for f in runset["filters"]["filters"]}
    # Filters name config keys as flattened (arm.name); grouping and colours insert W&B's `value` level.
    assert leaves == {("group", json.dumps(SWEEP)), ("arm.name", json.dumps(list(STUDY_ARMS))),
                      ("model.name", json.dumps("qwen"))}
    assert [(g["section"], g["name"]) for g in runset["grouping"]] == [("config", "arm.value.name")]
    assert grids[0]["customRunColors"] == {f"{runset['id']}-config:arm.value.name:{arm}": colour
                                           for arm, colour in ARM_HEX.items()}
    metrics = [p["config"]["metrics"] for p in grids[0]["panelBankSectionConfig"]["panels"]]
    assert metrics[0] == [keys.shift_vs_base("target", HEADLINE_MEASURES[0])]


def test_saving_uses_the_default_entity_and_prints_both_urls(tmp_path, monkeypatch, capsys):
    import wandb
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    saved = []

    def fake_save(self, *args, **kwargs):
        saved.append(self)
        return self

    class Api:
        default_entity = "me"

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.setattr(wandb, "Api", Api)
    for cls in (ws.Workspace, wr.Report):
        monkeypatch.setattr(cls, "save", fake_save)
        monkeypatch.setattr(cls, "url", property(lambda self: f"{type(self).__name__}:{self.entity}/{self.project}"))
    assert main(["--project", "p", "--group", "g1"]) == 0
    assert capsys.readouterr().out == "workspace: Workspace:me/p\nreport: Report:me/p\n"
    assert [(type(o).__name__, o.entity) for o in saved] == [("Workspace", "me"), ("Report", "me")]

    def refuse(self, *args, **kwargs):
        raise PermissionError("project p: no write access")

    monkeypatch.setattr(ws.Workspace, "save", refuse)
    assert main(["--project", "p", "--group", "g1"]) == 1
    assert "saving to W&B failed: PermissionError: project p: no write access" in one_error_line(capsys)
