"""Compiled decoder layers share one inductor cache across a sweep's jobs (`hardware.fast.compile_cache`).

Each job is its own process, so the test runs two processes on one cache folder, each with its own empty
/tmp (as two nodes have): the first compiles and stores, the second loads every graph from the folder and
compiles none, and both train to the same loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lbt.model.load import load_model
from lbt.model.lora import compile_decoder_layers

# One process = one job: a tiny LoRA model with compiled layers, two training steps, then inductor's own
# counters of graphs compiled (miss) and loaded from the cache (hit).
JOB = r"""
import json, sys, torch
from omegaconf import OmegaConf
from lbt.model.load import load_model, load_tokenizer
from lbt.model.lora import compile_decoder_layers, wrap_lora
from lbt.model.module import supervised_token_loss

torch.set_num_threads(1)
model_cfg = OmegaConf.load(sys.argv[2])
tok = load_tokenizer(model_cfg)
torch.manual_seed(0)
model = wrap_lora(load_model(model_cfg, tok, torch.float32), OmegaConf.create(
    {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}))
compile_decoder_layers(model, sys.argv[1])
model.train()
ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(5))
batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
losses = []
for _ in range(2):
    loss, n = supervised_token_loss(model, batch)
    (loss / n).backward()
    losses.append(float(loss) / n)
from torch._dynamo.utils import counters
import os
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "losses": losses, "dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}))
"""


def run_job(cache: str, model: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", JOB, cache, str(model)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_job_loads_the_first_jobs_compilation(tmp_path, tiny_model):
    model = tmp_path / "model.yaml"
    model.write_text(OmegaConf.to_yaml(tiny_model[0].model))
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    cache = tmp_path / "cache" / "inductor"
    # Inductor's default folder lives in the node's /tmp: give each job its own, so only the shared one can hit.
    env["TMPDIR"] = str(tmp_path / "node1")
    Path(env["TMPDIR"]).mkdir()
    first = run_job(str(cache), model, env)
    assert first["dir"] == str(cache)
    assert first["miss"] > 0 and first["hit"] == 0
    assert any((cache / "fxgraph").rglob("*")), "nothing stored in the shared folder"
    env["TMPDIR"] = str(tmp_path / "node2")
    Path(env["TMPDIR"]).mkdir()
    second = run_job(str(cache), model, env)
    assert second["hit"] >= first["miss"] and second["miss"] == 0
    assert second["losses"] == first["losses"]


def test_a_folder_the_user_set_wins(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    cfg, tok, _ = tiny_model
    model = load_model(cfg.model, tok, torch.float32)  # compiled lazily: only the environment is under test
    compile_decoder_layers(model, tmp_path / "sweep")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    compile_decoder_layers(model, tmp_path / "sweep")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "sweep").resolve())


def test_a_jobs_forward_variants_stay_compiled(tiny_model, monkeypatch):
    """A job calls the compiled layers with a first layer whose input needs no grad and later ones whose input
    does, micro-batches of other lengths and sizes, padded and unpadded (no mask), and validation without
    grad: each is a recompile, more than dynamo's default limit of 8, past which it runs the layer eagerly."""
    import torch._dynamo

    from lbt.model.lora import wrap_lora
    from lbt.model.module import supervised_token_loss

    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    cfg, tok, _ = tiny_model
    torch.manual_seed(0)
    model = wrap_lora(load_model(cfg.model, tok, torch.float32), OmegaConf.create(
        {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}))
    compile_decoder_layers(model)
    generator = torch.Generator().manual_seed(5)
    for rows, length, padded in ((4, 40, True), (4, 36, True), (3, 52, True), (4, 40, False), (2, 31, False)):
        ids = torch.randint(3, 2000, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, : length // 3] = 0
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}
        for train in (True, False):
            model.train(train)
            with torch.set_grad_enabled(train):
                loss, n = supervised_token_loss(model, batch)
                if train:
                    (loss / n).backward()


def _train_graphs(model, dynamic: bool | None, compiled: bool = True,
                  symbolic_length: bool = True) -> tuple[list[int], list[float]]:
    """Train steps over micro-batches of other lengths and sizes (as a job's length-sorted micro-batches and
    an epoch's short last step give): dynamo's graph count after each, and each step's loss."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lbt.model.module import supervised_token_loss

    torch._dynamo.reset()
    counters.clear()
    if compiled:
        compile_decoder_layers(model, dynamic=dynamic, symbolic_length=symbolic_length)
    model.train()
    generator = torch.Generator().manual_seed(5)
    graphs, losses = [], []
    for rows, length in ((4, 40), (4, 36), (3, 52), (4, 44)):
        ids = torch.randint(3, 2000, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, : length // 3] = 0
        loss, n = supervised_token_loss(model, {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask})
        (loss / n).backward()
        graphs.append(int(counters["stats"]["unique_graphs"]))
        losses.append(float(loss / n))
    return graphs, losses


def test_dynamic_layers_compile_once_for_every_micro_batch(tiny_model):
    """`compile_decoder_layers(dynamic=True)`: the first step compiles graphs that serve every later length and
    batch size. What a job uses (symbolic_length) serves every length too, and compiles again only for a new
    batch size (which a job's filled micro-batches never bring). Torch's own default compiles again when the
    length changes as well. Same losses as the eager layers."""
    from lbt.model.lora import wrap_lora

    cfg, tok, _ = tiny_model
    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]})

    def fresh():
        torch.manual_seed(0)
        return wrap_lora(load_model(cfg.model, tok, torch.float32), lora)

    _, eager = _train_graphs(fresh(), None, compiled=False)
    job_graphs, job = _train_graphs(fresh(), None)
    torch_graphs, _ = _train_graphs(fresh(), None, symbolic_length=False)
    dynamic_graphs, dynamic = _train_graphs(fresh(), True)
    assert dynamic_graphs[0] > 0 and dynamic_graphs == [dynamic_graphs[0]] * 4
    assert job_graphs[1] == job_graphs[0] and job_graphs[2] > job_graphs[1] and job_graphs[3] == job_graphs[2]
    assert torch_graphs[1] > torch_graphs[0] and torch_graphs[2] > torch_graphs[1]
    assert dynamic == pytest.approx(eager, rel=1e-5)
    assert job == pytest.approx(eager, rel=1e-5)


def test_filled_rows_and_eager_validation_compile_no_graph_of_their_own(tiny_model):
    """A job with compiled layers fills its short micro-batches (`micro_batches(fill_rows=True)`) and reads
    its validation loss eagerly (`LoRAModule.validation_loss`): after the first step (the length is a
    symbol from the first call), neither a longer step, nor a short last step, nor a validation compiles
    another graph. Unfilled, the short step does; the validation loss equals the eager model's and training
    mode comes back."""
    from torch._dynamo.utils import counters

    from lbt.data.chat import ChatFormat
    from lbt.data.datamodule import micro_batches
    from lbt.model.lora import wrap_lora
    from lbt.model.module import LoRAModule, supervised_token_loss

    cfg, tok, _ = tiny_model
    chat = ChatFormat(tok)
    steps = [[chat.example(f"{s}-{i}", f"Question {s} {i}?", "word and more " * (3 + 2 * s + i), 256)
              for i in range(n)] for s, n in enumerate((4, 4, 3))]
    val = [chat.example(f"v{i}", f"Held out {i}?", "more words " * (4 + i), 256) for i in range(5)]

    def graphs_after_each_step(fill: bool) -> tuple[list[int], LoRAModule]:
        torch.manual_seed(0)
        model = wrap_lora(load_model(cfg.model, tok, torch.float32), OmegaConf.create(
            {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}))
        torch._dynamo.reset()
        counters.clear()
        compile_decoder_layers(model)
        module = LoRAModule(model, OmegaConf.create({}), total_steps=3,
                            val_batches=micro_batches(val, 4, tok.pad_token_id))
        model.train()
        graphs = []
        for examples in steps:
            for micro in micro_batches(examples, 4, tok.pad_token_id, fill_rows=fill):
                loss, n = supervised_token_loss(model, micro)
                (loss / n).backward()
            graphs.append(int(counters["stats"]["unique_graphs"]))
        return graphs, module

    unfilled, _ = graphs_after_each_step(False)
    assert unfilled[2] > unfilled[1]
    filled, module = graphs_after_each_step(True)
    assert filled[0] > 0 and filled == [filled[0]] * 3
    val_loss = module.validation_loss(module.val_batches)
    assert int(counters["stats"]["unique_graphs"]) == filled[2]
    assert module.model.training
    with torch.no_grad():
        module.model.eval()
        sums = [supervised_token_loss(module.model, micro) for micro in module.val_batches]
    assert val_loss == pytest.approx(sum(float(s) for s, _ in sums) / sum(n for _, n in sums), rel=1e-6)
