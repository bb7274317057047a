"""python -m lbt.train — one LoRA fine-tuning job (model × arm × seed), or a sweep with -m.

compose → check data → load model → fit (evaluation phases run as callbacks) → adapter, run card, DONE.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lbt.cluster import GracefulStop, RNGState, env_local_rank, env_rank, lock_local_gpus, slurm_plugins
from lbt.data.datamodule import CorpusDataModule
from lbt.data.records import file_sha256, load_corpus
from lbt.loggers import build_logger, finish_wandb, mark_wandb_preempting
from lbt.model.load import load_model, load_tokenizer, resolve_dtype
from lbt.model.lora import compile_decoder_layers, wrap_lora
from lbt.model.module import LoRAModule
from lbt.phases import CheckpointPhases, PhaseContext
from lbt.runcard import git_sha, package_versions, public_config, read_json, write_json_atomic

log = logging.getLogger("lbt.train")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

load_dotenv(override=False)


def job_identity(cfg: DictConfig) -> dict[str, Any]:
    experiment = None
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    if choices:
        experiment = choices.get("experiment")
    sweep = str(cfg.sweep_name) if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN" \
        else None
    return {"model": str(cfg.model.name), "arm": str(cfg.arm.name), "seed": int(cfg.seed),
            "experiment": experiment, "sweep": sweep}


def job_directory(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("job_dir") or "outputs/job")


def check_corpus(cfg: DictConfig) -> dict[str, Any]:
    """Read the corpus (errors name file, line, field) and its validation gate, before any model loads."""
    path = Path(str(cfg.arm.corpus))
    records = load_corpus(path)
    info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path), "records": len(records),
                            "validation": "skipped (data.require_validation=false)"}
    if cfg.data.require_validation:
        from lbt.data.validate import check_corpus_validated

        check_corpus_validated(path, cfg.data.get("validation_report"))
        info["validation"] = "passed"
    return info


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks of the eval and probe groups: dicts of {_target_: ...}; a null entry is switched off."""
    callbacks = []
    for group in ("eval", "probe"):
        entries = (cfg.get(group) or {}).get("callbacks") or {}
        for name, spec in entries.items():
            if spec is not None:
                callbacks.append(instantiate(spec))
                log.info("callback %s.%s: %s", group, name, spec._target_)
    return callbacks


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    hw = cfg.hardware
    kwargs: dict[str, Any] = {"accelerator": hw.accelerator, "devices": hw.devices, "num_nodes": hw.num_nodes,
                              "strategy": hw.strategy, "precision": hw.precision}
    if hw.accelerator != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"hardware={hw.accelerator}: no CUDA GPU visible; use hardware=cpu")
    # Under SLURM (one GPU or several) SLURM starts the ranks, and GracefulStop/submitit requeue: Lightning's
    # own auto-requeue is switched off so that the two do not fight.
    plugins = slurm_plugins()
    if plugins:
        kwargs["plugins"] = plugins
    return kwargs


def train(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    job_dir = job_directory(cfg)
    job = job_identity(cfg)
    if (job_dir / "DONE").exists():
        log.info("skip: %s already finished (DONE present); nothing is overwritten", job_dir)
        return read_json(job_dir / "run.json")
    job_dir.mkdir(parents=True, exist_ok=True)
    corpus = check_corpus(cfg)
    rank_zero = env_rank() == 0  # in a multi-process job only rank 0 writes the run card

    if cfg.hardware.get("cpu_threads"):
        torch.set_num_threads(int(cfg.hardware.cpu_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    # Callbacks read and check their item files now, so bad eval input also fails before the model loads.
    callbacks = instantiate_callbacks(cfg)
    dtype = resolve_dtype(cfg.model.dtype or cfg.hardware.dtype)
    tokenizer = load_tokenizer(cfg.model)
    fast = cfg.hardware.fast
    data = CorpusDataModule(
        corpus["path"], tokenizer, seed=int(cfg.seed), max_length=int(cfg.train.max_length),
        effective_batch=int(cfg.train.effective_batch), micro_batch=int(cfg.train.micro_batch),
        epochs=int(cfg.train.epochs), max_steps=cfg.train.max_steps, val_fraction=float(cfg.data.val_fraction),
        template_kwargs=OmegaConf.to_container(cfg.model.chat_template_kwargs, resolve=True),
        pack_tokens=int(fast.pack_tokens),
        num_workers=int(cfg.hardware.num_workers))
    config = public_config(cfg)
    card: dict[str, Any] = {"job": job, "config": config, "git_sha": git_sha(Path(CONF_DIR).parent),
                            "versions": package_versions(), "corpus": corpus, "data": vars(data.stats),
                            "status": "running"}
    resume = job_dir / "checkpoints" / "last.ckpt"
    if rank_zero:
        if (job_dir / "run.json").exists():
            card["previous_attempts"] = read_json(job_dir / "run.json").get("previous_attempts", 0) + 1
        write_json_atomic(job_dir / "run.json", card)

    # Each rank of a multi-GPU job builds its model on its own GPU (not all on cuda:0).
    device = f"cuda:{env_local_rank()}" if cfg.hardware.accelerator == "gpu" else "cpu"
    model = load_model(cfg.model, tokenizer, dtype, device=device)
    model = wrap_lora(model, cfg.train.lora, adapters=str(fast.adapters))
    if fast.compile_layers:
        compile_decoder_layers(model)
    module = LoRAModule(model, cfg.train, total_steps=data.stats.total_steps, ce_chunk=int(fast.ce_chunk))
    context = PhaseContext(job_dir=job_dir, tokenizer=tokenizer, cfg=cfg, extra={"data": data})
    phases = CheckpointPhases(job_dir, data.stats.total_steps, list(cfg.train.checkpoint_fractions),
                              int(cfg.train.resume_every_steps or 0), data.val_micro_batches(), context)
    logger = build_logger(cfg.logger, job_dir, job, config, rank_zero=rank_zero)
    # GracefulStop last: its preemption checkpoint is taken after every other callback's step-end work.
    stop = GracefulStop(phases.save_resumable)
    trainer = L.Trainer(
        **trainer_kwargs(cfg), max_epochs=1, max_steps=data.stats.total_steps, logger=logger,
        callbacks=[phases, *callbacks, RNGState(), stop], enable_checkpointing=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(job_dir), deterministic=False)
    if resume.exists():
        log.info("resume: %s", resume)
    stop.install()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume.exists() else None)
    except SIGTERMException:
        # A SIGTERM that reached Lightning's handler too (before training started): ours saw it as well.
        if not stop.requested:
            raise
    finally:
        stop.uninstall()
    if stop.requested and trainer.global_step < data.stats.total_steps:
        return interrupted(card, job_dir, trainer, stop)

    if trainer.is_global_zero:
        card.update(status="done", wall_time_s=round(time.time() - started, 3),
                    tokens_per_s=round(module.tokens_per_second, 1),
                    final_loss=module.loss_history[-1] if module.loss_history else None,
                    loss_history=module.loss_history,
                    val_loss=[{"step": s, "loss": v} for s, v in getattr(module, "val_history", [])])
        write_json_atomic(job_dir / "run.json", card)
        (job_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n", encoding="utf-8")
        log.info("done: %s (%.1f s, %.0f tokens/s, final loss %.4f)", job_dir, card["wall_time_s"],
                 card["tokens_per_s"], card["final_loss"] or float("nan"))
    return card


def interrupted(card: dict[str, Any], job_dir: Path, trainer: L.Trainer, stop: GracefulStop) -> dict[str, Any]:
    """A stop signal ended training early: record it, then requeue or exit (never returns)."""
    if trainer.is_global_zero:
        card.update(status="interrupted", interrupted_at_step=trainer.global_step)
        write_json_atomic(job_dir / "run.json", card)
    log.warning("interrupted at step %d of %d; re-launch the same command to resume from %s",
                trainer.global_step, trainer.max_steps, job_dir / "checkpoints" / "last.ckpt")
    mark_wandb_preempting()
    stop.exit_for_requeue()
    return card


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    lock_local_gpus(cfg.hardware)  # hydra/launcher=local_gpus: no other sweep's job on this job's GPU
    try:
        train(cfg)
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
