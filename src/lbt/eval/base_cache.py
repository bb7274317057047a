"""The `base` phase, evaluated once per sweep (`hardware.fast.share_base`).

LoRA B starts at zero, so at `base` every job of one model scores the same model: its rows, summaries,
capability record and probe projections are the same in every arm and seed. The first job to reach `base`
evaluates it and stores its files in a content-addressed entry, `<paths.cache_dir>/base/<key>/` (the job
directory's relative paths); every later job with the same key copies them into its own directory and
its evaluators are skipped at base. The copies are the stored files byte for
byte: a cached summary keeps the timing (`wall_s`, `seconds`) of the evaluation that produced it.

The key (`base_key`) covers everything that can change a base output: the model section (weights'
path or hub id and revision, or random_init's seed and architecture; tokenizer, chat template kwargs,
attention backend, dtype, quantization), the files behind the tokenizer and model when they are on disk,
the `eval`, `probe`, `directions`, `intervention` and `callbacks` sections (every evaluator setting,
resolved), the sha256 of every file those sections name, the LoRA settings (an init that is not zero at
base, or DoRA, changes the base model), the hardware's precision, evaluation batch size, ranks and fast
settings, the versions of torch, transformers, peft and lbt, and a hash of lbt's own source files.

Faults: parallel jobs of one key take an fcntl lock on `<key>.lock` (rank 0 alone, held while the base is
evaluated): the first evaluates, the others wait and copy. A cache file that is missing, does not parse or
holds the wrong rows makes its evaluator a miss: the bad file is set aside (never deleted) and the base
evaluated again, and its files stored. A job file that is already there and intact is never overwritten
(a resumed job's repair). Other ranks never touch the cache: they wait at the evaluators' own broadcasts
and barriers while rank 0 copies (or waits on the lock: within the process group's timeout, as for any
base evaluation). A job whose base was copied logs the base scalars, tables and plots from the copied
files (`Evaluator.log_written`), as if it had evaluated them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lbt.eval.session import Evaluator, Session
from lbt.runcard import installed_versions
from lbt.rundir import Expected, RunDir, atomic_save, atomic_write, file_problem, set_aside

log = logging.getLogger(__name__)

VERSION = 1  # bump when what a base phase writes changes: old entries are then never found
PACKAGES = ("torch", "transformers", "peft", "lbt")
SECTIONS = ("eval", "probe", "directions", "intervention", "callbacks")
SMALL_FILE = 64 << 20  # files of a model folder hashed for its identity (configs, tokenizer; not weights)


def _sha256(path: Path) -> str:
    from lbt.data.records import file_sha256

    return file_sha256(path)


def _named_files(value: Any) -> dict[str, str]:
    """{path: sha256} of every existing file a config value names (item files, corpora, judges' lists)."""
    found: dict[str, str] = {}
    if isinstance(value, Mapping):
        for item in value.values():
            found.update(_named_files(item))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found.update(_named_files(item))
    elif isinstance(value, str) and value and len(value) < 4096 and Path(value).is_file():
        found[value] = _sha256(Path(value))
    return found


def _folder_files(source: str | None) -> dict[str, str]:
    """{name: sha256} of a local model or tokenizer folder's small files (config, tokenizer, template);
    a hub id is identified by its name and revision instead."""
    if not source or not Path(source).is_dir():
        return {}
    return {str(p.relative_to(source)): _sha256(p) for p in sorted(Path(source).rglob("*"))
            if p.is_file() and p.stat().st_size < SMALL_FILE}


def _versions() -> dict[str, str | None]:
    """The versions of the packages the key covers (a test replaces this)."""
    return installed_versions(PACKAGES)


def code_identity(package: Path | None = None) -> str:
    """sha256 over lbt's own source files (path and bytes): a changed scorer, parser or prompt is a new key
    even when the version number stays (an editable install between two commits)."""
    root = Path(package) if package else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# `hardware.fast` settings that act on training alone (evaluation runs the decoder layers eagerly, see
# lora.eager_layers), or on the adapters alone (addmm_lora: the base phase runs with them disabled), so jobs
# that differ only in them share one base.
NOT_ON_BASE_FAST = frozenset({"share_base", "pack_tokens", "ce_chunk", "fused_ce", "freeze_heap", "compile_layers",
                              "compile_cache", "fold_lora", "addmm_lora"})


def base_material(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Everything the base phase's outputs depend on, as plain data (the key's input)."""
    from lbt.model.load import TOKENIZER_DIR

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    model, hardware = dict(data["model"]), dict(data["hardware"])
    fast = {k: v for k, v in (hardware.get("fast") or {}).items() if k not in NOT_ON_BASE_FAST}
    sections = {name: data.get(name) for name in SECTIONS}
    tokenizer = model.get("tokenizer") or model.get("path")
    return {
        "version": VERSION,
        "model": model,
        "model_files": _folder_files(model.get("path")),
        "tokenizer_files": _folder_files(tokenizer) if tokenizer else _folder_files(str(TOKENIZER_DIR)),
        "lora": (data.get("train") or {}).get("lora"),
        "hardware": {"accelerator": hardware.get("accelerator"), "devices": hardware.get("devices"),
                     "num_nodes": hardware.get("num_nodes"), "dtype": model.get("dtype") or hardware.get("dtype"),
                     "precision": hardware.get("precision"), "eval_batch_size": hardware.get("eval_batch_size"),
                     "fast": fast},
        "sections": sections,
        "files": _named_files(sections),
        "versions": _versions(),
        "lbt_code": code_identity(),
    }


def base_key(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The content address of a job's base phase: `<model name>-<sha256 of base_material, 24 hex>`."""
    material = base_material(cfg)
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{material['model'].get('name') or 'model'}-{digest}"


def problem(expected: Expected) -> str | None:
    """Why a file is not intact: file_problem for JSON and rows, a torch.load for a .pt file."""
    if expected.path.suffix != ".pt":
        return file_problem(expected)
    if not expected.path.is_file():
        return f"{expected.path}: missing"
    try:
        torch.load(expected.path, weights_only=False)
    except Exception as err:  # noqa: BLE001 -- truncated or foreign: not usable
        return f"{expected.path}: does not load ({type(err).__name__})"
    return None


def _copy(source: Path, target: Path) -> None:
    atomic_save(target, lambda tmp: shutil.copyfile(source, tmp))


@dataclass(frozen=True)
class BaseCache:
    """The cache entry of one job's base phase: `<cache_dir>/base/<key>/`."""

    cache_dir: Path
    key: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> BaseCache | None:
        """The job's base cache, or None when hardware.fast.share_base is off."""
        if not cfg.hardware.fast.get("share_base", False):
            return None
        return cls(Path(str(cfg.paths.cache_dir)), base_key(cfg))

    @property
    def entry(self) -> Path:
        return self.cache_dir / "base" / self.key

    def in_entry(self, run: RunDir, expected: Expected) -> Expected:
        return Expected(self.entry / expected.path.relative_to(run.root), expected.rows)

    def fetch(self, evaluator: Evaluator, run: RunDir) -> bool:
        """Copy the evaluator's base files from the entry into the job directory; False (nothing copied)
        when the entry lacks one of them or holds a bad one (set aside: the base is evaluated again)."""
        files = evaluator.base_files(run)
        stored = [self.in_entry(run, e) for e in files]
        bad = [(e, why) for e in stored if (why := problem(e))]
        for expected, why in bad:
            if expected.path.exists():
                set_aside(expected.path, why)
        if bad or not files:
            return False
        for own, cached in zip(files, stored):
            if own.path.exists():
                why = problem(own)
                if why is None:
                    continue  # an intact file of this job is never overwritten
                set_aside(own.path, why)
            _copy(cached.path, own.path)
        return True

    def store(self, evaluator: Evaluator, run: RunDir) -> None:
        """Keep the evaluator's base files in the entry (those it lacks), once they are all intact."""
        files = evaluator.base_files(run)
        if not files or any(problem(e) for e in files):
            return
        for own in files:
            cached = self.in_entry(run, own)
            if not cached.path.exists():
                _copy(own.path, cached.path)

    @contextmanager
    def shared(self, evaluators: Sequence[Evaluator], session: Session) -> Iterator[list[Evaluator]]:
        """Around the base phase's evaluation: rank 0 locks the key and copies what the entry holds; every
        rank gets the evaluators served so (rank 0's choice, broadcast), which are skipped at base. After the
        evaluation rank 0 stores what was evaluated. The other ranks never touch the cache."""
        if not session.is_zero:
            yield [evaluators[k] for k in session.broadcast(None)]
            return
        from lbt.probe.directions import file_lock

        with file_lock(self.entry.with_name(f"{self.key}.lock")):
            served = [e for e in evaluators if self.fetch(e, session.run)]
            log.info("base phase: %d of %d evaluators from the cache %s (%s)", len(served), len(evaluators),
                     self.entry, ", ".join(type(e).__name__ for e in served) or "none")
            session.broadcast([k for k, e in enumerate(evaluators) if e in served])
            yield served
            for evaluator in evaluators:
                if evaluator not in served:
                    self.store(evaluator, session.run)
            card = self.entry / "entry.json"
            if not card.exists() and self.entry.is_dir():
                atomic_write(card, json.dumps({"key": self.key}, indent=2) + "\n")
        for evaluator in served:
            evaluator.log_written("base", session)
