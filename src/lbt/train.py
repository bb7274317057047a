"""python -m lbt.train — one LoRA fine-tuning job (model × arm × seed), or a sweep with -m.

compose → check data → evaluators → load model → fit (the evaluators run at every phase) → adapter, run card, DONE.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lbt import runcard
from lbt.config import check_config
from lbt.config.entries import build
from lbt.console import deferred, is_user_error, quiet_libraries, user_errors
from lbt.data.records import CorpusError, file_sha256, load_corpus
from lbt.env import env_value
from lbt.joblock import JobLock, JobLocked
from lbt.runcard import git_sha, host_info, package_versions, process_age_s, public_config, public_overrides
from lbt.rundir import (
    CorruptFile,
    RunDir,
    finished_folder,
    read_json,
    refuse_changed_resume,
    set_aside,
)

if TYPE_CHECKING:
    import lightning as L

    from lbt.cluster import GracefulStop
    from lbt.data.chat import ChatFormat
    from lbt.eval.session import Evaluator

log = logging.getLogger("lbt.train")
# Mid-epoch resume is exact here (data.datamodule.ResumeSampler continues the plan at the restored step, and
# LoRAModule.training_step checks every batch's step): Lightning's generic warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # inside the package: a wheel runs anywhere


# Functions of modules that load torch, Lightning or transformers, imported on first call (lbt.console.deferred).
load_model = deferred("lbt.model.load", "load_model")
load_tokenizer = deferred("lbt.model.load", "load_tokenizer")
wrap_lora = deferred("lbt.model.lora", "wrap_lora")
finish_wandb = deferred("lbt.loggers", "finish_wandb")


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
    root = env_value("LBT_ROOT")
    if root and not path.is_file() and str(path).startswith(root):
        raise CorpusError(f"{path}: corpus file not found, under paths.root={root} from the environment "
                          f"variable LBT_ROOT (set LBT_ROOT to the project folder, or arm.corpus to the file)")
    records = load_corpus(path)
    info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path), "records": len(records),
                            "validation": "skipped (data.require_validation=false)"}
    if cfg.data.require_validation:
        from lbt.data.validate import check_corpus_validated

        check_corpus_validated(path, cfg.data.get("validation_report"))
        info["validation"] = "passed"
    return info


def job_evaluators(cfg: DictConfig, chat: ChatFormat) -> list[Evaluator]:
    """What runs at every phase: the eval group's evaluators ({name: entry}; a null entry is switched off)
    and the probe group's one (probe=none: none). Item files are read and checked here."""
    specs = [spec for spec in (cfg.eval or {}).values() if spec is not None]
    specs += [cfg.probe] if cfg.probe else []
    evaluators = [build(spec, chat=chat, base_model=cfg.model) for spec in specs]
    log.info("evaluators: %s", ", ".join(type(e).__name__ for e in evaluators) or "none")
    return evaluators


def job_callbacks(cfg: DictConfig, chat: ChatFormat) -> list[L.Callback]:
    """Lightning callbacks besides the phases: the intervention group's (intervention=none: none) and the
    `callbacks` entries ({name: {_target_: ...}}; a null entry is switched off)."""
    specs = [cfg.intervention] if cfg.intervention else []
    specs += [spec for spec in (cfg.get("callbacks") or {}).values() if spec is not None]
    return [build(spec, chat=chat, base_model=cfg.model) for spec in specs]


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    from lbt.cluster import slurm_plugins

    hw = cfg.hardware
    kwargs: dict[str, Any] = {"accelerator": hw.accelerator, "devices": hw.devices, "num_nodes": hw.num_nodes,
                              "strategy": hw.strategy, "precision": hw.precision}
    # Under SLURM (one GPU or several) SLURM starts the ranks, and GracefulStop/submitit requeue: Lightning's
    # own auto-requeue is switched off so that the two do not fight.
    plugins = slurm_plugins()
    if plugins:
        kwargs["plugins"] = plugins
    return kwargs


def resume_checkpoint(run: RunDir) -> Path | None:
    """The newest resumable checkpoint that loads (last.ckpt, else prev.ckpt); corrupt ones are set aside
    with a clear message, so a re-run never stays stuck on a file that cannot be read."""
    import torch

    for path in (run.last_ckpt, run.prev_ckpt):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "global_step" not in state or "state_dict" not in state:
                raise ValueError("not a Lightning checkpoint (no global_step / state_dict)")
        except Exception as err:  # noqa: BLE001 -- any unreadable checkpoint is set aside, not trusted
            log.error("checkpoint %s is corrupt (%s: %s); set aside, trying the one before it", path,
                      type(err).__name__, err)
            set_aside(path, f"{type(err).__name__}: {err}")
            continue
        return path
    return None


def train(cfg: DictConfig) -> dict[str, Any]:
    """One job, start to DONE; records a failure in the run card, and refuses a directory in use."""
    check_config(cfg)  # types, ranges, allowed values, GPU: before anything is written or loaded
    from lbt.cluster import env_rank

    quiet_libraries()
    run = RunDir(job_directory(cfg))
    finished = finished_folder(run.root)
    if finished is not None:
        earlier = "" if finished == run.root else \
            f", under the arm's earlier name; not trained again as {run.root}"
        log.info("skip: %s already finished (DONE present%s); nothing is overwritten. To train this job "
                 "again, give it another folder (run_name=<name>, or hydra.run.dir=<dir>)", finished, earlier)
        try:
            return read_json(RunDir(finished).card)
        except CorruptFile as err:
            raise CorruptFile(f"{finished} holds DONE but its run card is damaged ({err}); nothing was "
                              f"touched: python -m lbt.check {finished} lists what else is") from None
    run.root.mkdir(parents=True, exist_ok=True)
    lock = JobLock(run) if env_rank() == 0 else None   # the other ranks of a DDP job share rank 0's lock
    if lock is not None:
        lock.acquire()  # JobLocked: another live process owns the folder; nothing was touched
    try:
        refuse_changed_resume(run, public_config(cfg))  # ResumeMismatch (every rank): nothing touched either
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    card: dict[str, Any] = {"job": job_identity(cfg), "status": "running"}
    try:
        return run_job(cfg, run, card)
    except IncompleteJob:
        raise  # recorded as incomplete, with what is missing
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and card.get("status") == "interrupted":
            raise  # a requeue/exit after a recorded interruption
        code = stop.code if isinstance(stop, SystemExit) else None
        step = stopped_at(card, "interrupted_at_step")
        record_status(run, card, "interrupted", error=stop, **step, reason=(
            f"stopped by Ctrl-C or an exit (code {code}) in the middle of a step; the last checkpoint is "
            f"kept: run the same command again to resume"))
        raise
    except BaseException as err:
        if is_user_error(err):   # its one line is the command's to print (lbt.console.user_errors)
            log.debug("job failed: %s", run.root, exc_info=True)
        else:
            log.exception("job failed: %s", run.root)
        record_status(run, card, "failed", error=err, **stopped_at(card, "failed_at_step"))
        raise
    finally:
        if lock is not None:
            lock.release()


def stopped_at(card: dict[str, Any], field: str) -> dict[str, int]:
    """{field: step} where training stopped inside trainer.fit (run_job notes it), else nothing."""
    step = card.pop("stopped_at_step", None)
    return {} if step is None else {field: int(step)}


def record_status(run: RunDir, card: dict[str, Any], status: str, error: BaseException | None = None,
                  **fields: Any) -> None:
    """lbt.runcard.record_status, written by rank 0 alone (the other ranks keep the card in memory)."""
    from lbt.cluster import env_rank

    runcard.record_status(run, card, status, error, write=env_rank() == 0, **fields)


_JOBS_IN_PROCESS = 0


def startup_seconds() -> float | None:
    """For the first job of a process, the seconds from the process's start to the job's: Python, the
    imports, Hydra's compose, the config check and any wait for a GPU lock (None for a later job of the same
    process, e.g. Hydra's sequential launcher, or where the process's age cannot be read)."""
    global _JOBS_IN_PROCESS
    _JOBS_IN_PROCESS += 1
    age = process_age_s() if _JOBS_IN_PROCESS == 1 else None
    return None if age is None else round(age, 2)


def run_job(cfg: DictConfig, run: RunDir, card: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lbt.cluster import GracefulStop, RNGState, env_local_rank, env_rank
    from lbt.data.chat import ChatFormat
    from lbt.data.datamodule import CorpusDataModule
    from lbt.eval.base_cache import BaseCache
    from lbt.eval.battery import apply_fast_settings
    from lbt.heap import FrozenHeap
    from lbt.loggers import build_logger
    from lbt.model.folded_lora import fold_lora
    from lbt.model.load import resolve_dtype
    from lbt.model.lora import compile_decoder_layers
    from lbt.model.module import LoRAModule
    from lbt.phases import CheckpointPhases
    from lbt.progress import Progress

    started = time.time()
    job_dir = run.root
    rank_zero = env_rank() == 0  # in a multi-process job only rank 0 writes the run card
    if rank_zero and run.card.exists():
        try:
            previous = read_json(run.card)
            if not isinstance(previous, dict):
                raise CorruptFile(f"{run.card}: not a JSON object")
        except CorruptFile as err:
            set_aside(run.card, str(err))
            previous = {}
        card["previous_attempts"] = int(previous.get("previous_attempts", 0)) + 1
        card["attempts"] = [*previous.get("attempts", []),
                            {k: previous.get(k) for k in ("status", "started", "host", "startup_s",
                                                          "interrupted_at_step", "failed_at_step", "error")
                             if previous.get(k) is not None}]
    # Rank 0 alone writes the card, so it alone asks for the GPUs' names (which starts CUDA in the process:
    # another rank of a multi-GPU job would start it on a GPU that is not its own).
    record_status(run, card, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  host=host_info() if rank_zero else None, startup_s=startup_seconds())
    corpus = check_corpus(cfg)

    if cfg.hardware.get("cpu_threads"):
        torch.set_num_threads(int(cfg.hardware.cpu_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dtype = resolve_dtype(cfg.model.dtype or cfg.hardware.dtype)
    tokenizer = load_tokenizer(cfg.model)
    chat = ChatFormat.of(tokenizer, cfg.model)
    # Evaluators read and check their item files now, so bad eval input also fails before the model loads.
    evaluators = job_evaluators(cfg, chat)
    callbacks = job_callbacks(cfg, chat)
    fast = cfg.hardware.fast
    apply_fast_settings(fast)  # how evaluation decodes, shares prompt openings and pools its engine calls
    data = CorpusDataModule(
        corpus["path"], chat, seed=int(cfg.seed), max_length=int(cfg.train.max_length),
        effective_batch=int(cfg.train.effective_batch), micro_batch=int(cfg.train.micro_batch),
        epochs=int(cfg.train.epochs), max_steps=cfg.train.max_steps, val_fraction=float(cfg.data.val_fraction),
        pack_tokens=int(fast.pack_tokens), fill_rows=bool(fast.compile_layers),
        num_workers=int(cfg.hardware.num_workers), drop_long_prompts=bool(cfg.data.drop_long_prompts))
    config = public_config(cfg)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    card.update(config=config, overrides=public_overrides(overrides), git_sha=git_sha(Path(__file__).parent),
                versions=package_versions(), corpus=corpus, data=vars(data.stats))
    record_status(run, card, "running")
    total = data.stats.total_steps
    trainer_args = trainer_kwargs(cfg)
    resume = resume_checkpoint(run) if rank_zero else (run.last_ckpt if run.last_ckpt.exists() else None)

    # Each rank of a multi-GPU job builds its model on its own GPU (not all on cuda:0).
    device = f"cuda:{env_local_rank()}" if cfg.hardware.accelerator == "gpu" else "cpu"
    model = load_model(cfg.model, tokenizer, dtype, device=device)
    model = wrap_lora(model, cfg.train.lora, adapters=str(fast.adapters))
    if fast.get("fold_lora"):
        log.info("fold_lora: %d LoRA layers wider out than in compute their B product inside the base GEMM",
                 fold_lora(model))
    if fast.compile_layers:
        inductor_dir = Path(str(cfg.paths.cache_dir)) / "inductor" if fast.get("compile_cache") else None
        compile_decoder_layers(model, inductor_dir)
    phases = CheckpointPhases(job_dir, total, list(cfg.train.checkpoint_fractions),
                              int(cfg.train.resume_every_steps or 0), evaluators, BaseCache.from_config(cfg))
    module = LoRAModule(model, cfg.train, total_steps=total, ce_chunk=int(fast.ce_chunk),
                        fused_ce=bool(fast.get("fused_ce")),
                        val_batches=data.val_micro_batches(), validation_steps=phases.steps)
    logger = build_logger(cfg.logger, job_dir, card["job"], config, rank_zero=rank_zero)
    # GracefulStop last: its preemption checkpoint is taken after every other callback's step-end work.
    stop = GracefulStop(phases.save_resumable)
    heap = [FrozenHeap(phases.steps)] if fast.get("freeze_heap") else []  # after phases: it settles after each
    trainer = L.Trainer(
        **trainer_args, max_epochs=1, max_steps=total, logger=logger,
        callbacks=[phases, *heap, *callbacks, RNGState(), Progress(cfg.train.get("log_every_steps")), stop],
        enable_checkpointing=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(job_dir), deterministic=False)
    if resume is not None:
        log.info("resume: %s", resume)
    stop.install()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    except SIGTERMException:
        # A SIGTERM that reached Lightning's handler too (before training started): ours saw it as well.
        if not stop.requested:
            raise
    except BaseException:
        card["stopped_at_step"] = trainer.global_step  # Ctrl-C or an error: the card says where (train())
        raise
    finally:
        stop.uninstall()
    if stop.requested and trainer.global_step < total:
        return interrupted(card, run, trainer, stop)

    fields = {"trained_steps": trainer.global_step, "wall_time_s": round(time.time() - started, 3),
                  "tokens_per_s": round(module.tokens_per_second, 1),
                  "final_loss": module.loss_history[-1] if module.loss_history else None,
                  "loss_history": module.loss_history,
                  "val_loss": [{"step": s, "loss": v} for s, v in module.val_history]}
    if trainer.is_global_zero:
        check = phases.completeness(trainer.global_step)
        if not check.ok:
            record_status(run, card, "incomplete", missing=check.missing, **fields)
            lost = [m for m in check.missing if m.startswith("checkpoint of ")]
            advice = ("a lost step adapter cannot be made again without training again: start a fresh "
                      "folder (run_name=<name>)" if lost else "re-run the same command to complete it")
            raise IncompleteJob(f"{run.root} is incomplete; {advice}:\n  - " + "\n  - ".join(check.missing))
        record_status(run, card, "done", **fields)
        run.done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n", encoding="utf-8")
        log.info("done: %s (%.1f s, %.0f tokens/s, final loss %.4f)", job_dir, card["wall_time_s"],
                 card["tokens_per_s"], card["final_loss"] or float("nan"))
    trainer.strategy.barrier()
    return card


class IncompleteJob(RuntimeError):
    """Training ended but the completeness check behind DONE failed (the run card lists what is missing)."""


def interrupted(card: dict[str, Any], run: RunDir, trainer: L.Trainer, stop: GracefulStop) -> dict[str, Any]:
    """A stop signal ended training early: record it, then requeue or exit (never returns)."""
    from lbt.loggers import mark_wandb_preempting

    if trainer.is_global_zero:
        record_status(run, card, "interrupted", interrupted_at_step=trainer.global_step)
    how = ("requeued jobs resume by themselves; otherwise run the same sweep command again (same sweep_name)"
           if in_sweep() else f"run the same command again (it finds this folder), or: {resume_command(run)}")
    log.warning("interrupted at step %d of %d; checkpoint %s. To resume, %s", trainer.global_step,
                trainer.max_steps, run.last_ckpt, how)
    mark_wandb_preempting()
    stop.exit_for_requeue()
    return card


def resume_command(run: RunDir) -> str:
    """The exact command line that continues this job in its folder."""
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    return " ".join(["python -m lbt.train", *map(shlex.quote, args), shlex.quote(f"hydra.run.dir={run.root}")])


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors("lbt.train", reraise=in_sweep()):   # a sweep's failed job is Hydra's to record
        check_config(cfg)  # before torch loads: a config error answers in a second
        from lbt.cluster import lock_local_gpus

        lock_local_gpus(cfg.hardware)  # hydra/launcher=local_gpus: no other sweep's job on this job's GPU
        run_command(cfg)


def run_command(cfg: DictConfig) -> None:
    """train(), its refusals as exit codes: 3 for a folder in use, 4 for an incomplete job."""
    exit_code = 1
    try:
        train(cfg)
        exit_code = 0
    except JobLocked as err:
        # To stderr only: the log file belongs to the process that holds the folder.
        print(f"lbt.train: {err}", file=sys.stderr)
        if in_sweep():
            raise  # Hydra records the job as failed and the sweep goes on
        raise SystemExit(3) from None
    except IncompleteJob as err:
        log.error("%s", err)
        if in_sweep():
            raise
        raise SystemExit(4) from None
    finally:
        finish_wandb(exit_code=exit_code)


if __name__ == "__main__":
    main()
