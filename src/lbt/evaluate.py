"""python -m lbt.evaluate — the stance battery on any model, with or without a LoRA adapter, on any item file.

    python -m lbt.evaluate model=qwen items=[data/eval/target_items.jsonl]
    python -m lbt.evaluate model=qwen adapter=multirun/<sweep>/qwen-plus-s0/adapter \\
        items=[data/eval/target_items.jsonl,data/eval/source_items.jsonl]
    python -m lbt.evaluate model=llama hardware=gpu eval.stance.option_form=leading_space out_dir=outputs/llama-base
    python -m lbt.evaluate model=qwen '~items' \\
        '+items={target: data/eval/target_items.jsonl, seed: ../shared/reference/seed-eval/target_items.jsonl}'

The output directory is a job directory (`lbt.rundir`), so `lbt.analyze` and `lbt.judge` read it alike:
`eval/<phase>/<item_set>/<measure>.jsonl`, `eval/<phase>/summary.json`, `run.json` (job.arm = "base"
without an adapter, else the arm in the adapter's job run.json; status running / failed / interrupted /
incomplete / done) and `DONE`, written only once every planned rows file holds its rows and the summary
parses. The scoring is training's: the `eval.stance` entry builds the same `StanceEvaluator` that runs at
every phase of a training job, on the files given by `items` instead of `eval.stance.item_sets`. Item
sets are named as in training (the keys of `eval.stance.item_sets`): a file configured there takes its
set's name, any other file its stem without `_items` (`target_items.jsonl` → `target`), unless `items`
names them itself. Item files and the adapter directory are checked before any model loads (the model
loads only when something is left to score); rows files that are intact are read back, never
overwritten; a missing, short or corrupt one is set aside and scored again, so re-running the command
completes exactly what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lbt.config import check_evaluate_config
from lbt.config.entries import build
from lbt.console import deferred, quiet_libraries, user_errors
from lbt.data.records import file_sha256
from lbt.joblock import JobLock
from lbt.runcard import git_sha, package_versions, public_config, record_status
from lbt.rundir import RunDir, file_problem, incomplete_phases, read_json
from lbt.study import arm_name, is_phase, phase_kind

if TYPE_CHECKING:
    import torch

    from lbt.data.chat import ChatFormat
    from lbt.eval.evaluators import StanceEvaluator

log = logging.getLogger("lbt.evaluate")
# Functions of modules that load torch and transformers, imported on first call (lbt.console.deferred):
# `--help` and `--cfg job` answer before they load.
load_model = deferred("lbt.model.load", "load_model")
load_tokenizer = deferred("lbt.model.load", "load_tokenizer")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # inside the package: a wheel runs anywhere


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded; raised before any model loads."""


class IncompleteEvaluation(RuntimeError):
    """The evaluation ended but a planned file is missing or short (the run card lists them; no DONE)."""


def item_set_name(path: Path, configured: Mapping[str, Any] | None = None) -> str:
    """The item set's name in rows, as training names it: the key of `eval.stance.item_sets` whose
    file this is, else the file's stem without `_items` (target_items.jsonl → target)."""
    for name, other in (configured or {}).items():
        if other and Path(str(other)).resolve() == path.resolve():
            return str(name)
    stem = path.stem
    return stem[: -len("_items")] if stem.endswith("_items") and stem != "_items" else stem


def item_files(items: Sequence[Any] | Mapping[str, Any], configured: Mapping[str, Any] | None = None
               ) -> dict[str, Path]:
    """{item_set: file} from `items`: a mapping names its sets itself, a list is named by item_set_name."""
    if isinstance(items, Mapping):
        return {str(name): Path(str(path)) for name, path in items.items()}
    files: dict[str, Path] = {}
    for raw in items:
        path = Path(str(raw))
        name = item_set_name(path, configured)
        if name in files:
            raise ValueError(f"items: {files[name]} and {path} both make item set {name!r}; name them "
                             f"yourself: '~items' '+items={{{name}: {files[name]}, other: {path}}}'")
        files[name] = path
    return files


def adapter_job(adapter: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The training job an adapter came from: run.json beside it, or one or two folders up
    (<job>/adapter, <job>/checkpoints/adapter_step_<n>)."""
    for folder in (adapter, adapter.parent, adapter.parent.parent):
        card = RunDir(folder).card
        if card.is_file():
            return read_json(card).get("job"), folder
    return None, None


def infer_phase(adapter: Path | None) -> str:
    """The phase an adapter evaluates: base without one, step_<n> for <job>/checkpoints/adapter_step_<n>
    (lbt.rundir's layout), final for any other adapter folder."""
    if adapter is None:
        return "base"
    name = adapter.name.removeprefix("adapter_")
    return name if is_phase(name) and phase_kind(name) == "step" else "final"


def check_adapter(adapter: str | None) -> Path | None:
    if not adapter:
        return None
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(
            f"adapter={path}: no adapter_config.json there (expected a peft save_pretrained "
            "directory such as <job>/adapter or <job>/checkpoints/adapter_step_<n>)"
        )
    return path


def output_directory(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/evaluate")


def load_evaluated_model(cfg: DictConfig, tokenizer, adapter: Path | None) -> torch.nn.Module:
    from lbt.eval.battery import apply_fast_settings
    from lbt.model.load import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype or cfg.hardware.dtype)
    device = "cuda" if cfg.hardware.accelerator == "gpu" else "cpu"
    apply_fast_settings(cfg.hardware.fast)  # how evaluation decodes, shares prompt openings and pools calls
    model = load_model(cfg.model, tokenizer, dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model.eval()


def stance_evaluator(cfg: DictConfig, chat: ChatFormat) -> StanceEvaluator:
    """Training's stance evaluator (`eval.stance`) on the files of `items`, every listed measure whatever the
    phase (measure_phases schedules a training job's phases). Item files and the options the tokenizer
    must express are checked here, before the model loads."""
    spec = cfg.eval.stance
    files = item_files(OmegaConf.to_container(cfg["items"], resolve=True),  # cfg.items is a method
                       OmegaConf.to_container(spec.item_sets, resolve=True))
    args = OmegaConf.to_container(spec, resolve=True)
    args.update(item_sets={name: str(path) for name, path in files.items()}, measure_phases=None)
    return build(args, chat=chat)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the configured item files; returns the phase summary (also written to summary.json)."""
    check_evaluate_config(cfg)  # types, ranges, allowed values, GPU: before any file or model is read
    from lbt.data.chat import ChatFormat
    from lbt.eval.session import Session

    quiet_libraries()
    started = time.time()
    adapter = check_adapter(cfg.get("adapter"))
    chat = ChatFormat.of(load_tokenizer(cfg.model), cfg.model)
    evaluator = stance_evaluator(cfg, chat)
    item_sets = list(evaluator.item_sets.values())
    job, source_job = adapter_job(adapter) if adapter is not None else (None, None)
    if job and job.get("model") not in (None, str(cfg.model.name)):
        log.warning(
            "adapter %s was trained on model=%s but model=%s is loaded", adapter, job["model"], cfg.model.name
        )
    phase = str(cfg.phase) if cfg.get("phase") else infer_phase(adapter)
    run = RunDir(output_directory(cfg))
    planned = evaluator.planned_files(run, phase)
    if run.is_done() and not any(file_problem(e) for e in planned):
        log.info("skip: %s is done (DONE, and every file of phase %s intact); nothing is overwritten",
                 run.root, phase)
        return read_json(run.summary(phase))

    run.root.mkdir(parents=True, exist_ok=True)
    with JobLock(run):  # JobLocked: another live process evaluates into this directory; nothing touched
        run.done.unlink(missing_ok=True)  # files are about to change: DONE comes back after the check
        card = run_card(cfg, job, source_job, adapter, phase, item_sets)
        record_status(run, card, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        incomplete_phases({phase: planned})  # a short or corrupt file is set aside (with the summary)
        try:
            # The model loads only when a rows file is left to score.
            todo = any(evaluator.missing(run, phase).values())
            model = load_evaluated_model(cfg, chat.tokenizer, adapter) if todo else None
            evaluator.evaluate(model, phase, Session(run))
        except (KeyboardInterrupt, SystemExit) as stop:
            record_status(run, card, "interrupted", error=stop)
            raise
        except BaseException as err:
            record_status(run, card, "failed", error=err)
            raise
        missing = [problem for e in planned if (problem := file_problem(e))]
        fields = {"wall_time_s": round(time.time() - started, 3)}
        if missing:
            record_status(run, card, "incomplete", missing=missing, **fields)
            raise IncompleteEvaluation(f"{run.root} is incomplete; re-run the same command to complete it:\n"
                                       "  - " + "\n  - ".join(missing))
        record_status(run, card, "done", **fields)
        run.done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n", encoding="utf-8")
    log.info(
        "evaluated %s (%s) on %s in %.1f s -> %s",
        cfg.model.name,
        (job or {}).get("arm", "base"),
        list(evaluator.item_sets),
        time.time() - started,
        run.root,
    )
    return read_json(run.summary(phase))


def run_card(
    cfg: DictConfig,
    job: dict[str, Any] | None,
    source_job: Path | None,
    adapter: Path | None,
    phase: str,
    item_sets,
) -> dict[str, Any]:
    # A job trained before issue 16 names its arm frame_plus/frame_minus: this card says today's name.
    arm = "base" if adapter is None else arm_name((job or {}).get("arm")) or "unknown"
    if adapter is not None and job is None:
        log.warning("adapter %s: no run.json found beside it or above; job.arm = 'unknown'", adapter)
    card = {
        "job": {
            "model": str(cfg.model.name),
            "arm": arm,
            "seed": (job or {}).get("seed"),
            "experiment": (job or {}).get("experiment"),
            "sweep": (job or {}).get("sweep"),
        },
        "kind": "evaluate",
        "phase": phase,
        "adapter": str(adapter) if adapter else None,
        "source_job": str(source_job) if source_job else None,
        "items": [
            {"item_set": s.name, "path": str(s.path), "sha256": file_sha256(s.path), "n_items": len(s)}
            for s in item_sets
        ],
        "config": public_config(cfg),
        "git_sha": git_sha(Path(__file__).parent),
        "versions": package_versions(),
    }
    return card


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors("lbt.evaluate"):   # a user's mistake: one line and exit code 2
        evaluate(cfg)


if __name__ == "__main__":
    main()
