"""The package installs anywhere: a real wheel carries its config tree and data files, and its console
script runs a job from a directory that is not the project's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_toy_corpus

SHIPPED = ["lbt/conf/train.yaml", "lbt/conf/evaluate.yaml", "lbt/conf/hardware/gpu.yaml",
           "lbt/conf/hydra/launcher/slurm.yaml", "lbt/data/prompt_templates.yaml",
           "hydra_plugins/lbt_launchers/launchers.py", "lbt/assets/tiny_tokenizer/tokenizer.json"]
SCRIPTS = ["lbt-train", "lbt-evaluate", "lbt-analyze", "lbt-interp", "lbt-judge", "lbt-plan", "lbt-dashboard",
           "lbt-check"]


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, check=False,
                         **kwargs)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_wheel_installs_and_its_console_script_runs_a_job_elsewhere(tmp_path):
    # Built from a copy: setuptools leaves a build/ folder in the source tree (and reuses it).
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source])
    [wheel] = (tmp_path / "dist").glob("lbt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert not [n for n in SHIPPED if n not in names]
    assert all(f"{script} = " in entry_points for script in SCRIPTS)

    # A fresh install of the wheel alone; its dependencies come from this interpreter, and the installed
    # copy comes first on the path (not the checkout).
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LBT_ROOT", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), WANDB_MODE="offline")
    where = run([sys.executable, "-c", "import lbt; print(lbt.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site))

    corpus = write_toy_corpus(elsewhere / "toy.jsonl", n=12)
    run([site / "bin" / "lbt-train", f"arm.corpus={corpus}", "data.require_validation=false", "eval=none",
         "probe=none", "logger=csv", "train.effective_batch=4", "train.micro_batch=4", "train.epochs=1",
         "train.max_length=96", "data.drop_long_prompts=true", "run_name=elsewhere"], cwd=elsewhere, env=env)
    job = elsewhere / "outputs" / "runs" / "elsewhere"
    card = json.loads((job / "run.json").read_text())
    assert (job / "DONE").exists() and card["status"] == "done" and (job / "adapter").is_dir()
    assert Path(card["config"]["arm"]["corpus"]) == corpus
    # The installed check agrees with the DONE it finds.
    checked = run([site / "bin" / "lbt-check", job.parent], cwd=elsewhere, env=env)
    assert checked.stdout.splitlines() == [f"complete: {job}", "1 job(s): 1 complete"]
