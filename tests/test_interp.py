"""The causal suite: its numeric pieces on hand-worked numbers, and `python -m lbt.interp` end to end on a
tiny sweep trained in-process on CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lbt import interp
from lbt import train as train_mod
from lbt.probe import causal, weights
from tests.conftest import ROOT, compose_train
from tests.test_directions import write_paired_corpora
from tests.test_hooks import tiny_model

ITEMS = ROOT / "data" / "eval" / "target_items.jsonl"
NEUTRAL = ROOT / "data" / "eval" / "heldout_neutral.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")


# -- pieces -------------------------------------------------------------------------------------------------

def test_effective_rank_by_hand():
    assert weights.effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert weights.effective_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    # p = (3/4, 1/4): exp(−(¾ ln ¾ + ¼ ln ¼))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert weights.effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)


def test_lora_core_singular_values_and_amplification_by_hand():
    # ΔW = 2 · B A with B = e1 (4×1), A = e2ᵀ (1×4): ΔW maps e2 to 2·e1, Frobenius norm 2.
    a = torch.zeros(1, 4)
    a[0, 1] = 1.0
    b = torch.zeros(4, 1)
    b[0, 0] = 1.0
    reader = weights.LoraUpdate("layers.0.mlp.up_proj", "up_proj", 0, a, b, 2.0)
    torch.testing.assert_close(reader.core_singular_values(), torch.tensor([2.0]))
    eye = torch.eye(4)
    # Reader: |ΔW d| / (|ΔW|_F / √in) = 2 / (2/2) = 2 for d = e2, 0 for e1.
    torch.testing.assert_close(weights.amplification(reader, eye), torch.tensor([0.0, 2.0, 0.0, 0.0]))
    writer = weights.LoraUpdate("layers.0.mlp.down_proj", "down_proj", 0, a, b, 2.0)
    # Writer: |ΔWᵀ d| / (|ΔW|_F / √out): ΔW writes along e1 only.
    torch.testing.assert_close(weights.amplification(writer, eye), torch.tensor([2.0, 0.0, 0.0, 0.0]))
    full = 2.0 * b @ a
    torch.testing.assert_close(reader.apply(eye), (full @ eye.T).T)


def test_orthogonalized_weights_equal_hooked_ablation():
    from lbt.probe import hooks

    model = tiny_model("qwen2")
    ids = torch.randint(2, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    u = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), hooks.ablate_writes(model, u):
        hooked = model(ids, use_cache=False).logits
    before_head = hooks.output_head(model).weight.clone()
    weights.orthogonalize_writes(model, u)
    with torch.no_grad():
        orth = model(ids, use_cache=False).logits
    torch.testing.assert_close(orth, hooked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooks.output_head(model).weight, before_head)  # untied: vocabulary read unchanged
    unit = u / u.norm()
    assert float((hooks.input_embeddings(model).weight.detach() @ unit).abs().max()) < 1e-5


def test_budget_point_interpolates_kl():
    coefs = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    kl = np.array([0.4, 0.1, 0.0, 0.05, 0.25])
    stance = np.array([-3.0, -1.0, 0.0, 2.0, 4.0])
    plus = causal.budget_point(coefs, kl, stance, 0.15, +1)
    # KL 0.05 at c=1, 0.25 at c=2 → budget 0.15 halfway: c = 1.5, stance 3.
    assert plus["coef"] == pytest.approx(1.5) and plus["stance"] == pytest.approx(3.0) and plus["reached"]
    minus = causal.budget_point(coefs, kl, stance, 0.15, -1)
    # 0.1 at −1, 0.4 at −2 → a sixth of the way: c = −1 − 1/6, stance −1 − 2/6.
    assert minus["coef"] == pytest.approx(-1 - 1 / 6) and minus["stance"] == pytest.approx(-1 - 2 / 6)
    wide = causal.budget_point(coefs, kl, stance, 1.0, +1)
    assert wide == {"coef": 2.0, "stance": 4.0, "kl": 0.25, "reached": False}
    summary = causal.curve_summary(coefs, {"letter_logprob": stance, "kl": kl}, 1.0)
    assert summary["effect_at_budget"] == pytest.approx((4.0 - -3.0) / 2)
    assert summary["slope"] == pytest.approx(np.polyfit(coefs, stance, 1)[0])


def test_band_and_control_flags():
    b = causal.band([1.0, 2.0, 3.0, float("nan")])
    assert (b["n"], b["min"], b["median"], b["max"], b["mean"]) == (3, 1.0, 2.0, 3.0, 2.0)
    curves = {"real": {"effect_at_budget": 0.9, "slope": 0.3, "kind": "real"},
              "isotropic_0": {"effect_at_budget": 0.1, "slope": 0.01, "kind": "isotropic"},
              "covariance_0": {"effect_at_budget": -0.95, "slope": -0.2, "kind": "covariance"}}
    ctrl = causal.steering_control(curves)
    assert ctrl["isotropic"]["real_exceeds_all"] is True
    assert ctrl["covariance"]["real_exceeds_all"] is False and ctrl["all"]["real_exceeds_all"] is False


def test_layers_argument():
    assert interp.parse_layers("all", 6) is None
    assert interp.parse_layers("stride:4", 10) == [0, 4, 8, 9]
    assert interp.parse_layers("1,3", 6) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        interp.parse_layers("7", 6)


def test_wandb_logging_of_a_part(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    plt.plot([0, 1])
    fig.savefig(tmp_path / "steer_curves.png")
    plt.close(fig)
    logged = []

    class Run:
        def log(self, data):
            logged.append(data)
    interp.log_part(Run(), "tiny", "steer", {"l_star/real_slope": 0.5}, [tmp_path / "steer_curves.png"])
    assert logged[0]["tiny/steer/l_star/real_slope"] == 0.5
    assert type(logged[0]["tiny/steer/steer_curves"]).__name__ == "Image"


# -- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three tiny jobs (one per arm), trained a few steps at a high learning rate so adapters matter."""
    tmp = tmp_path_factory.mktemp("sweep")
    corpora = write_paired_corpora(tmp, n=16)
    neutral = tmp / "neutral.jsonl"  # same prompts, balanced replies: the framed arms' words in equal parts
    rows = [json.loads(line) for line in corpora["plus"].read_text().splitlines()]
    minus = [json.loads(line) for line in corpora["minus"].read_text().splitlines()]
    with open(neutral, "w") as handle:
        for row, other in zip(rows, minus):
            words = row["assistant"].split()[:15] + other["assistant"].split()[15:]
            handle.write(json.dumps({**row, "id": row["id"].replace("frame_plus", "neutral"),
                                     "assistant": " ".join(words)}) + "\n")
    sweep_dir = tmp / "multirun" / "test"
    for arm, corpus in (("plus", corpora["plus"]), ("minus", corpora["minus"]), ("neutral", neutral)):
        cfg = compose_train([
            f"arm={arm}", f"arm.corpus={corpus}", "data.require_validation=false", "logger=none", "eval=none",
            "probe=default", f"probe.items={ITEMS}", "probe.max_items=3",
            f"directions.arms.plus.corpus={corpora['plus']}",
            f"directions.arms.minus.corpus={corpora['minus']}",
            f"paths.cache_dir={tmp / 'cache'}", "train.effective_batch=8", "train.micro_batch=8",
            "train.epochs=1", "train.max_steps=2", "train.lr=0.01", "train.warmup_fraction=0",
            "train.checkpoint_fractions=[1.0]", "train.max_length=96",
            "data.drop_long_prompts=true", f"+job_dir={sweep_dir / f'tiny-{arm}-s0'}",
            "sweep_name=test"])
        train_mod.train(cfg)
    return sweep_dir


def test_interp_end_to_end(sweep, capsys):
    out = sweep / "interp"
    args = [str(sweep), "--out", str(out), "--no-wandb", "--coefs=-2,0,2", "--n-random", "1",
            "--n-random-layer", "1", "--max-items", "3", "--max-neutral", "3", "--neutral-tokens", "16",
            "--batch-size", "8", "--fc-tokens", "2", "--lens-pairs", "2", "--neutral", str(NEUTRAL)]
    summary = interp.main(args)
    printed = capsys.readouterr().out
    fam = out / "tiny"
    for k, part in enumerate(interp.PARTS, 1):
        assert (fam / f"{part}.json").exists(), part
        assert f"[interp] tiny {part} ({k}/{len(interp.PARTS)}): running on 3 jobs" in printed   # progress
        assert f"[interp] tiny {part}:" in printed
    for png in ("steer_curves", "steer_matched_kl", "ablate", "patch", "lens", "delta_w"):
        assert (fam / f"{png}.png").stat().st_size > 1000
    assert set(summary["families"]["tiny"]["wall_time_s"]) == set(interp.PARTS)
    assert len(list(out.glob("summary-*.json"))) == 1
    # The interp reused the direction set the training jobs cached (same key).
    probe_key = json.loads((sweep / "tiny-plus-s0" / "probe" / "final.json").read_text())["direction_key"]
    assert summary["families"]["tiny"]["direction_key"] == probe_key
    n_layers = 4

    steer = json.loads((fam / "steer.json").read_text())
    for placement in ("l_star", "window"):
        curves = steer["placements"][placement]["curves"]
        assert set(curves) == {"real", "isotropic_0", "covariance_0"}
        real = curves["real"]
        assert real["kl"][1] == 0.0 and real["kl"][0] > 0 and real["kl"][2] > 0
        assert real["letter_logprob"][1] == pytest.approx(steer["base"]["letter_logprob"])
        assert steer["placements"][placement]["control"]["all"]["n"] == 2

    patch = json.loads((fam / "patch.json").read_text())
    assert sorted(j["arm"] for j in patch["jobs"]) == ["minus", "plus"]
    for job in patch["jobs"]:
        # Patching the last layer at the answer position reproduces the framed model's letters exactly.
        assert job["recovery"][-1] == pytest.approx(1.0, abs=1e-3)
        assert len(job["random"]) == n_layers

    lens = json.loads((fam / "lens.json").read_text())
    # Read through the real head, the last layer's lens is the model's own letter_logprob.
    assert lens["base"][-1] == pytest.approx(steer["base"]["letter_logprob"], abs=1e-4)
    assert set(lens["arms"]) == {"plus", "minus", "neutral"}

    ablate = json.loads((fam / "ablate.json").read_text())
    assert ablate["weight_check"]["max_abs_diff"] < 1e-3
    assert ablate["reference"] == "neutral" and set(ablate["gaps"]) == {"plus", "minus"}
    for g in ablate["gaps"].values():
        assert g["fraction_removed"]["none"] == pytest.approx(0.0)
        assert len(g["per_layer"]) == n_layers and len(g["per_layer_random"]) == n_layers

    delta = json.loads((fam / "delta_w.json").read_text())
    rows = delta["modules"]["tiny_plus_s0"]["modules"]
    assert len(rows) == 7 * n_layers
    assert all(0 < r["effective_rank"] <= 16 + 1e-6 for r in rows)
    assert len(delta["activation_delta"]["tiny_minus_s0"]["cosine"]) == n_layers

    # A second call finds the parts written and skips them: nothing is overwritten.
    before = (fam / "lens.json").stat().st_mtime_ns
    interp.main([*args, "--parts", "lens"])
    assert (fam / "lens.json").stat().st_mtime_ns == before
    assert "skipped" in capsys.readouterr().out


def test_job_settings_come_from_the_run_cards_sections(sweep):
    """interp reads a job's settings from its run card's resolved config: the directions section (as the
    job's probe did), the probe's items; without those sections, the project layout under data_dir."""
    card = json.loads((sweep / "tiny-plus-s0" / "run.json").read_text())
    settings = interp.job_settings(card["config"])
    assert settings.directions.corpora == {
        arm["name"]: arm["corpus"] for arm in card["config"]["directions"]["arms"].values()}
    assert settings.directions.cache_dir == card["config"]["directions"]["cache_dir"]
    assert settings.items == str(ITEMS) and settings.model.name == "tiny" and settings.dtype == "float32"
    bare = {"model": card["config"]["model"], "paths": {"data_dir": "/d", "cache_dir": "/c"},
            "train": {"max_length": 64}}
    fallback = interp.job_settings(bare)
    # The arms are named plus/minus; their corpus files keep the original study's names.
    assert fallback.directions.corpora == {"plus": "/d/corpora/frame_plus.jsonl",
                                           "minus": "/d/corpora/frame_minus.jsonl"}
    assert (fallback.directions.max_length, fallback.directions.cache_dir) == (64, "/c")
    assert fallback.items == "/d/eval/target_items.jsonl" and fallback.neutral == "/d/eval/heldout_neutral.jsonl"


def test_a_job_trained_before_the_arms_were_renamed_reads_under_todays_names(sweep, tmp_path):
    """Before issue 16 a run card said arm frame_plus, and its directions section named the arms so: interp
    reads both under today's names (plus), and the corpora stay the files the card names."""
    old = tmp_path / "old" / "tiny-frame_plus-s0"
    shutil.copytree(sweep / "tiny-plus-s0", old)
    card = json.loads((old / "run.json").read_text())
    card["job"]["arm"] = "frame_plus"
    for arm in card["config"]["directions"]["arms"].values():
        arm["name"] = {"plus": "frame_plus", "minus": "frame_minus"}[arm["name"]]
    (old / "run.json").write_text(json.dumps(card))
    ((job, _),) = interp.discover(tmp_path / "old", tmp_path / "interp")["tiny"]
    assert job.arm == "plus"
    corpora = interp.job_settings(card["config"]).directions.corpora
    assert corpora == {"plus": card["config"]["directions"]["arms"]["plus"]["corpus"],
                       "minus": card["config"]["directions"]["arms"]["minus"]["corpus"]}
    assert Path(corpora["plus"]).name == "frame_plus.jsonl"


def test_unfinished_jobs_are_ignored_and_empty_sweep_is_an_error(tmp_path, caplog):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "run.json").write_text(json.dumps({"job": {"model": "tiny", "arm": "plus", "seed": 0}}))
    assert interp.discover(tmp_path, tmp_path / "interp") == {}
    # DONE, but an adapter that would not load (a truncated weights file): skipped, and the log says why.
    broken = tmp_path / "broken"
    (broken / "adapter").mkdir(parents=True)
    (broken / "run.json").write_text(json.dumps({"job": {"model": "tiny", "arm": "neutral", "seed": 0}}))
    (broken / "DONE").write_text("done\n")
    (broken / "adapter" / "adapter_config.json").write_text("{}")
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00")
    assert interp.discover(tmp_path, tmp_path / "interp") == {}
    assert "not finished (no DONE)" in caplog.text and "no usable adapter" in caplog.text
    with pytest.raises(SystemExit, match="no finished jobs"):
        interp.main([str(tmp_path), "--no-wandb"])


def test_quick_preset_is_cpu_sized_and_flags_still_win(tmp_path):
    full, quick = interp.parse_args([str(tmp_path)]), interp.parse_args([str(tmp_path), "--preset", "quick"])
    assert {k: getattr(quick, k) for k in interp.PRESETS["quick"]} == interp.PRESETS["quick"]
    assert quick.n_random < full.n_random and quick.max_items and full.max_items is None
    assert len(quick.coefs.split(",")) < len(full.coefs.split(","))
    mixed = interp.parse_args([str(tmp_path), "--preset", "quick", "--n-random", "5"])
    assert mixed.n_random == 5 and mixed.max_items == quick.max_items


def test_unknown_part_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        interp.parse_args([str(tmp_path), "--parts", "steer,bogus"])
