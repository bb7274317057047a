"""Generate paired framed corpora with any OpenAI-compatible chat endpoint.

    python -m lbt.data.generate --out data/corpora/generated   # --config: default src/lbt/conf/generate/default.yaml

Paired mode: for every scenario (domain, archetype, topic) one user message is generated, then one answer
per arm (frame_plus = cautious, frame_minus = eager, neutral = balanced) for that same message. Every
draft goes through the validators' record-level checks (`lbt.data.validate.record_problems`: leakage,
120–220 words, refusals, format breaks); a rejected draft is retried up to `max_attempts` times and
logged to `rejects.jsonl`. Each domain gets n_per_domain × (1 + overage) complete scenarios so that the
corpus-level gates can later drop some and still leave n.

Endpoint settings come from the config file, then from the environment (a `.env` file in the working
directory is read first): LBT_LLM_BASE_URL, LBT_LLM_MODEL, LBT_LLM_API_KEY (the key only ever from the
environment). Nothing about the endpoint is built in.

Resumable and append-only: a finished scenario is appended to `<arm>.jsonl` at once (flush + fsync);
a re-run skips complete scenarios, finishes incomplete ones (some arms written, e.g. after a kill) from
their recorded user message, and never rewrites a finished line. Only an unterminated last line — a
write cut off mid-way — is dropped. Outputs in --out: the three arm files, `<arm>.meta.json`
(provenance: generator model, sampling, template version and hashes, runs), `scenarios.log.jsonl`
(one provenance line per scenario) and `rejects.jsonl` (rejected drafts: keep out of version control).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lbt.data.blocklist import default_blocklist
from lbt.data.corpora import SOURCE_DOMAINS
from lbt.data.records import file_sha256
from lbt.data.validate import Thresholds, anomalies, record_problems, text_hash
from lbt.env import load_env
from lbt.llm_client import ChatClient, LLMConfig, LLMError
from lbt.study import STUDY_ARMS as ARMS

DEFAULT_TEMPLATES = Path(__file__).with_name("prompt_templates.yaml")
ENV_BASE_URL, ENV_MODEL = "LBT_LLM_BASE_URL", "LBT_LLM_MODEL"
HOW_MADE = "generated with python -m lbt.data.generate (paired: one user message, one answer per arm)"


class GenerateError(RuntimeError):
    """Bad config, inconsistent output folder, or an endpoint that stopped answering."""


# ---------------------------------------------------------------- configuration


@dataclass
class GenerateConfig:
    base_url: str | None = None
    model: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    concurrency: int = 4
    user_sampling: dict = field(
        default_factory=lambda: {"temperature": 1.0, "top_p": 0.95, "max_tokens": 256}
    )
    answer_sampling: dict = field(
        default_factory=lambda: {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512}
    )
    templates: str | None = None
    n_per_domain: int = 375
    overage: float = 0.25
    domains: list = field(default_factory=lambda: list(SOURCE_DOMAINS))
    max_attempts: int = 3
    max_scenarios_factor: float = 2.0
    seed: int = 0
    min_words: int = 120
    max_words: int = 220

    @property
    def target_per_domain(self) -> int:
        return math.ceil(self.n_per_domain * (1 + self.overage))


def load_config(path: str | Path | None, overrides: dict | None = None) -> GenerateConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GenerateError(f"{path}: config file not found")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise GenerateError(f"{path}: expected a mapping of config keys")
    flat = {**(raw.get("endpoint") or {}), **raw}
    flat.pop("endpoint", None)
    sampling = flat.pop("sampling", {}) or {}
    known = {f for f in GenerateConfig.__dataclass_fields__}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise GenerateError(f"{path}: unknown config keys {unknown}")
    cfg = GenerateConfig(**flat)
    cfg.user_sampling = {**cfg.user_sampling, **(sampling.get("user") or {})}
    cfg.answer_sampling = {**cfg.answer_sampling, **(sampling.get("answer") or {})}
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, key, value)
    load_env()  # ./.env and $LBT_ROOT/.env; the shell's variables win
    cfg.base_url = cfg.base_url or os.environ.get(ENV_BASE_URL)
    cfg.model = cfg.model or os.environ.get(ENV_MODEL)
    if not cfg.base_url or not cfg.model:
        raise GenerateError(
            f"no endpoint: set endpoint.base_url/model in the config or {ENV_BASE_URL}/{ENV_MODEL} "
            "in the environment or .env"
        )
    bad = [d for d in cfg.domains if d not in SOURCE_DOMAINS]
    if bad:
        raise GenerateError(f"unknown domains {bad}; source domains are {list(SOURCE_DOMAINS)}")
    return cfg


# ---------------------------------------------------------------- templates


@dataclass
class Templates:
    raw: dict
    path: Path
    sha256: str

    @property
    def version(self) -> str:
        return str(self.raw["version"])

    @property
    def archetypes(self) -> list[str]:
        return list(self.raw["archetypes"])

    def scenario_plan(self, scenario_id: str, domain: str, index: int, seed: int) -> dict:
        """Archetype (round-robin, so every archetype is equally common) and topic (seeded) of a scenario."""
        archetype = self.archetypes[index % len(self.archetypes)]
        topic = random.Random(f"{seed}:{scenario_id}").choice(self.raw["domains"][domain]["topics"])
        return {"archetype": archetype, "topic": topic}

    def user_messages(self, domain: str, plan: dict) -> list[dict]:
        text = self.raw["user_message"]["template"].format(
            topic=plan["topic"],
            domain_label=self.raw["domains"][domain]["label"],
            situation=self.raw["archetypes"][plan["archetype"]]["situation"],
        )
        return [{"role": "system", "content": self.raw["system"]}, {"role": "user", "content": text}]

    def answer_template(self, domain: str, arm: str, archetype: str) -> str:
        """The (domain × framing × archetype) template, with only the user message left to fill."""
        override = (self.raw.get("overrides") or {}).get(f"{domain}/{arm}/{archetype}", "")
        return (
            self.raw["answer"]["template"]
            .format(
                user="{user}",
                domain_label=self.raw["domains"][domain]["label"],
                framing_instruction=self.raw["framings"][arm]["instruction"],
                angle=self.raw["archetypes"][archetype]["angle"],
                override=override,
            )
            .replace("\n\n\n", "\n\n")
        )

    def answer_messages(self, domain: str, arm: str, archetype: str, user: str) -> list[dict]:
        text = self.answer_template(domain, arm, archetype).replace("{user}", user)
        return [{"role": "system", "content": self.raw["system"]}, {"role": "user", "content": text}]

    def template_hash(self, domain: str, arm: str, archetype: str) -> str:
        return hashlib.sha256(self.answer_template(domain, arm, archetype).encode("utf-8")).hexdigest()[:16]


def load_templates(path: str | Path | None) -> Templates:
    path = Path(path) if path else DEFAULT_TEMPLATES
    if not path.is_file():
        raise GenerateError(f"{path}: prompt templates not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("version", "system", "user_message", "answer", "framings", "archetypes", "domains"):
        if key not in (raw or {}):
            raise GenerateError(f"{path}: key '{key}' is missing")
    missing = [a for a in ARMS if a not in raw["framings"]]
    if missing:
        raise GenerateError(f"{path}: framings {missing} are missing")
    return Templates(raw=raw, path=path, sha256=file_sha256(path))


# ---------------------------------------------------------------- output folder state


@dataclass
class OutputState:
    written: dict  # scenario_id -> {arm: record}
    rejected: set  # scenario ids given up on before anything was written
    users: set  # normalised hashes of user messages in use


def read_arm_file(path: Path) -> list[dict]:
    """Finished lines of an arm file. A final line without newline is a cut-off write: drop it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(
            f"warning: {path}: dropping an unterminated last line "
            f"({len(data) - cut} bytes, an interrupted write)",
            file=sys.stderr,
        )
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    records = []
    for line_no, raw in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            records.append({k: obj[k] for k in ("id", "domain", "scenario_id", "user", "assistant")})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GenerateError(
                f"{path}:{line_no}: not a corpus record; this folder was not written by "
                "lbt.data.generate or was edited by hand"
            ) from None
    return records


def read_state(out: Path) -> OutputState:
    written: dict[str, dict] = {}
    for arm in ARMS:
        path = out / f"{arm}.jsonl"
        for rec in read_arm_file(path):
            arms = written.setdefault(rec["scenario_id"], {})
            if arm in arms:
                raise GenerateError(f"{path}: scenario {rec['scenario_id']!r} appears twice")
            other = next(iter(arms.values()), None)
            if other is not None and other["user"] != rec["user"]:
                raise GenerateError(
                    f"{path}: scenario {rec['scenario_id']!r} has a different user message than in "
                    "the other arms"
                )
            arms[arm] = rec
    rejected = set()
    rejects = out / "rejects.jsonl"
    if rejects.exists():
        for raw in rejects.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a cut-off log line only loses a log entry
            if entry.get("scenario_rejected"):
                rejected.add(entry["scenario_id"])
    users = {text_hash(next(iter(arms.values()))["user"]) for arms in written.values()}
    return OutputState(written=written, rejected=rejected - set(written), users=users)


# ---------------------------------------------------------------- generation


def clean_completion(text: str) -> str:
    """Strip whitespace, a reasoning model's <think>…</think> preamble and quotes around the whole text."""
    text = re.sub(r"^\s*<think>.*?</think>", "", text, flags=re.DOTALL).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


class Generator:
    def __init__(self, cfg: GenerateConfig, templates: Templates, out: Path, client: ChatClient):
        self.cfg, self.templates, self.out, self.client = cfg, templates, out, client
        self.thresholds = Thresholds(min_words=cfg.min_words, max_words=cfg.max_words)
        self.blocklist = default_blocklist()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.added = {arm: 0 for arm in ARMS}
        self.n_rejected_drafts = 0

    # -- appends: one line per arm, flushed and synced before the next scenario is written
    def _append(self, path: Path, line: str) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _log_reject(self, entry: dict) -> None:
        with self.lock:
            self.n_rejected_drafts += 1 if "text" in entry else 0
            self._append(self.out / "rejects.jsonl", json.dumps(entry, ensure_ascii=False) + "\n")

    def user_problems(self, user: str, state: OutputState) -> list[str]:
        problems = [
            f"leakage: {h.match!r} matches {h.lemma!r} ({h.domain})" for h in self.blocklist.find_hits(user)
        ]
        problems += [p for p in anomalies(user) if not p.startswith("format: truncated")]
        if text_hash(user) in state.users:
            problems.append("duplicate user message")
        return problems

    def _draft(self, messages: list[dict], sampling: dict, check, scenario_id: str, what: str) -> str | None:
        for attempt in range(1, self.cfg.max_attempts + 1):
            if self.stop.is_set():
                return None
            text = clean_completion(self.client.chat(messages, **sampling))
            problems = check(text)
            if not problems:
                return text
            self._log_reject(
                {
                    "scenario_id": scenario_id,
                    "what": what,
                    "attempt": attempt,
                    "problems": problems,
                    "text": text,
                }
            )
        return None

    def run_scenario(self, scenario_id: str, domain: str, index: int, state: OutputState) -> bool:
        """Generate what the scenario lacks and append it; True when the scenario is complete."""
        plan = self.templates.scenario_plan(scenario_id, domain, index, self.cfg.seed)
        existing = state.written.get(scenario_id, {})
        user = next(iter(existing.values()))["user"] if existing else None
        if user is None:
            user = self._draft(
                self.templates.user_messages(domain, plan),
                self.cfg.user_sampling,
                lambda t: self.user_problems(t, state),
                scenario_id,
                "user",
            )
            if user is None:
                self._give_up(scenario_id, existing, "no acceptable user message", state)
                return False
            with self.lock:
                if text_hash(user) in state.users:  # another thread took the same message meanwhile
                    self._give_up(scenario_id, existing, "duplicate user message", state)
                    return False
                state.users.add(text_hash(user))
        answers = {}
        for arm in ARMS:
            if arm in existing:
                continue
            answer = self._draft(
                self.templates.answer_messages(domain, arm, plan["archetype"], user),
                self.cfg.answer_sampling,
                lambda t: record_problems(user, t, self.thresholds, self.blocklist),
                scenario_id,
                arm,
            )
            if answer is None:
                if not existing:  # nothing on disk yet: drop the scenario whole so the arms stay paired
                    self._give_up(scenario_id, existing, f"no acceptable {arm} answer", state)
                    return False
                continue
            answers[arm] = answer
        with self.lock:
            for arm in ARMS:
                if arm in answers:
                    record = {
                        "id": f"{arm}-{scenario_id}",
                        "domain": domain,
                        "scenario_id": scenario_id,
                        "user": user,
                        "assistant": answers[arm],
                    }
                    self._append(self.out / f"{arm}.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
                    state.written.setdefault(scenario_id, {})[arm] = record
                    self.added[arm] += 1
            complete = len(state.written.get(scenario_id, {})) == len(ARMS)
            if complete:
                self._append(
                    self.out / "scenarios.log.jsonl",
                    json.dumps(
                        {
                            "scenario_id": scenario_id,
                            "domain": domain,
                            **plan,
                            "model": self.cfg.model,
                            "template_version": self.templates.version,
                            "answer_templates": {
                                a: self.templates.template_hash(domain, a, plan["archetype"]) for a in ARMS
                            },
                            "finished_utc": _now(),
                        }
                    )
                    + "\n",
                )
        return complete

    def _give_up(self, scenario_id: str, existing: dict, reason: str, state: OutputState) -> None:
        if self.stop.is_set():
            return  # stopped by an endpoint error, not rejected: a re-run tries this scenario again
        if not existing:
            with self.lock:
                state.rejected.add(scenario_id)
        self._log_reject({"scenario_id": scenario_id, "scenario_rejected": not existing, "reason": reason})

    def plan_round(self, state: OutputState, tried: set[str]) -> list[tuple[str, str, int]]:
        """Incomplete scenarios not yet tried in this run, then new ids until each domain can reach target."""
        tasks = []
        cap = math.ceil(self.cfg.target_per_domain * self.cfg.max_scenarios_factor)
        for domain in self.cfg.domains:
            ids = [f"{domain}-{k:05d}" for k in range(cap)]
            done = sum(1 for sid in ids if len(state.written.get(sid, {})) == len(ARMS))
            pending = [
                (sid, domain, k)
                for k, sid in enumerate(ids)
                if 0 < len(state.written.get(sid, {})) < len(ARMS) and sid not in tried
            ]
            fresh = [
                (sid, domain, k)
                for k, sid in enumerate(ids)
                if sid not in state.written and sid not in state.rejected
            ]
            tasks += pending + fresh[: max(0, self.cfg.target_per_domain - done - len(pending))]
        return tasks

    def run(self, state: OutputState) -> None:
        tried: set[str] = set()  # incomplete scenarios get one try per run, then stay listed in the meta
        while not self.stop.is_set():
            tasks = self.plan_round(state, tried)
            if not tasks:
                return
            tried |= {sid for sid, *_ in tasks if sid in state.written}
            with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
                futures = [pool.submit(self.run_scenario, sid, domain, k, state) for sid, domain, k in tasks]
                try:
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:  # Ctrl-C: stop promptly instead of draining the queue
                    self._halt(pool)
                    raise
                error = next((f.exception() for f in done if f.exception() is not None), None)
                if error is not None:
                    self._halt(pool)
            if error is not None:
                raise error

    def _halt(self, pool: ThreadPoolExecutor) -> None:
        # Running scenarios end at their next request; queued ones never start. Written lines stay.
        self.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- provenance


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def generator_identity(cfg: GenerateConfig, templates: Templates) -> dict:
    return {"model": cfg.model, "template_version": templates.version, "templates_sha256": templates.sha256}


def check_provenance(out: Path, cfg: GenerateConfig, templates: Templates, allow_mixed: bool) -> None:
    meta_path = out / f"{ARMS[0]}.meta.json"
    if allow_mixed or not meta_path.exists():
        return
    previous = json.loads(meta_path.read_text(encoding="utf-8")).get("generator", {})
    current = generator_identity(cfg, templates)
    differs = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
    if differs:
        raise GenerateError(
            f"{out} was generated with different settings {differs}; mixing them in one corpus "
            "breaks its provenance. Use a new --out folder, or --allow-mixed-provenance."
        )


def write_meta(
    out: Path,
    cfg: GenerateConfig,
    templates: Templates,
    state: OutputState,
    run: dict,
    config_path: str | None,
) -> None:
    incomplete = sorted(sid for sid, arms in state.written.items() if len(arms) < len(ARMS))
    for arm in ARMS:
        path, meta_path = out / f"{arm}.jsonl", out / f"{arm}.meta.json"
        previous = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        counts: dict[str, int] = {}
        for arms in state.written.values():
            if arm in arms:
                counts[arms[arm]["domain"]] = counts.get(arms[arm]["domain"], 0) + 1
        meta = {
            "corpus": arm,
            "arm": arm,
            "how_made": HOW_MADE,
            "sha256": file_sha256(path) if path.exists() else None,
            "records": sum(counts.values()),
            "counts_per_domain": counts,
            "paired_with": [a for a in ARMS if a != arm],
            "incomplete_scenarios": incomplete,
            "generator": {
                **generator_identity(cfg, templates),
                "base_url": cfg.base_url,
                "sampling": {"user": cfg.user_sampling, "answer": cfg.answer_sampling},
                "templates_path": str(templates.path),
                "archetypes": templates.archetypes,
                "seed": cfg.seed,
                "config_path": config_path,
                "config_sha256": file_sha256(config_path)
                if config_path and Path(config_path).is_file()
                else None,
            },
            "target": {
                "n_per_domain": cfg.n_per_domain,
                "overage": cfg.overage,
                "target_per_domain": cfg.target_per_domain,
                "domains": cfg.domains,
            },
            "reject_filter": "lbt.data.validate.record_problems "
            f"(words {cfg.min_words}-{cfg.max_words}, leakage, anomalies), max_attempts per draft "
            f"{cfg.max_attempts}",
            "runs": [*previous.get("runs", []), run],
        }
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, meta_path)


# ---------------------------------------------------------------- CLI


def generate(
    cfg: GenerateConfig,
    out: str | Path,
    templates: Templates | None = None,
    config_path: str | None = None,
    allow_mixed: bool = False,
) -> dict:
    """Run (or resume) generation into `out`; returns the run summary recorded in the meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    templates = templates or load_templates(cfg.templates)
    unknown = [d for d in cfg.domains if d not in templates.raw["domains"]]
    if unknown:
        raise GenerateError(f"{templates.path}: no templates for domains {unknown}")
    check_provenance(out, cfg, templates, allow_mixed)
    state = read_state(out)
    client = ChatClient(
        LLMConfig(
            base_url=cfg.base_url,
            model=cfg.model,
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff=cfg.backoff_s,
            backoff_max=cfg.backoff_max_s,
        )
    )
    generator = Generator(cfg, templates, out, client)
    run = {"started_utc": _now(), "model": cfg.model, "template_version": templates.version}
    error: Exception | None = None
    status = "interrupted"
    try:
        generator.run(state)
        status = "done"
    except LLMError as err:
        error, status = err, "failed"
    finally:
        run.update(
            finished_utc=_now(),
            added=generator.added,
            rejected_drafts=generator.n_rejected_drafts,
            status=status,
        )
        write_meta(out, cfg, templates, state, run, config_path)
    if error is not None:
        raise GenerateError(
            f"endpoint error, generation stopped (finished scenarios are kept; re-run the same "
            f"command to resume): {error}"
        ) from error
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbt.data.generate", description=__doc__.split("\n")[0])
    default_config = Path(__file__).resolve().parents[1] / "conf" / "generate" / "default.yaml"
    parser.add_argument("--config", default=str(default_config))
    parser.add_argument("--out", required=True, help="output folder (resumed if it has output already)")
    parser.add_argument(
        "--base-url", dest="base_url", default=None, help=f"overrides config and ${ENV_BASE_URL}"
    )
    parser.add_argument("--model", default=None, help=f"overrides config and ${ENV_MODEL}")
    parser.add_argument("--n-per-domain", dest="n_per_domain", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--domains", nargs="+", default=None)
    parser.add_argument("--allow-mixed-provenance", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(
            args.config,
            {k: getattr(args, k) for k in ("base_url", "model", "n_per_domain", "concurrency", "domains")},
        )
        run = generate(cfg, args.out, config_path=args.config, allow_mixed=args.allow_mixed_provenance)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: added {run['added']} records, {run['rejected_drafts']} drafts rejected -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
