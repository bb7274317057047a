"""The generation loop: scenarios drafted in parallel, each draft checked, finished scenarios appended.

Paired mode: for every scenario (domain, archetype, topic) one user message is generated, then one answer
per arm for that same message. Every draft goes through the validators' record-level checks
(`lbt.data.validate.record_problems`: leakage, length in words, refusals, format breaks); a rejected draft
is retried up to `max_attempts` times and logged to `rejects.jsonl`. Each domain gets
n_per_domain × (1 + overage) complete scenarios so that the corpus-level gates can later drop some and
still leave n.

Resumable and append-only: a finished scenario is appended to `<arm>.jsonl` at once (flush + fsync); a
re-run skips complete scenarios, finishes incomplete ones (some arms written, e.g. after a kill) from
their recorded user message, and never rewrites a finished line.
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from lbt.data.blocklist import default_blocklist
from lbt.data.corpora import corpus_path
from lbt.data.generate.config import GenerateConfig, GenerateError
from lbt.data.generate.prompts import Templates, clean_completion, load_templates
from lbt.data.generate.provenance import check_provenance, now_utc, write_meta
from lbt.data.generate.state import REJECTS_FILE, SCENARIO_LOG, OutputState, read_state
from lbt.data.validate.gate import Thresholds
from lbt.data.validate.record_checks import anomalies, record_problems
from lbt.data.validate.text import text_hash
from lbt.llm_client import ChatClient, LLMConfig, LLMError
from lbt.study import CORPUS_NAMES


class Generator:
    """Drafts scenarios on `cfg.concurrency` threads; one lock guards the appends and the shared state."""

    def __init__(self, cfg: GenerateConfig, templates: Templates, out: Path, client: ChatClient):
        self.cfg, self.templates, self.out, self.client = cfg, templates, out, client
        self.thresholds = Thresholds(min_words=cfg.min_words, max_words=cfg.max_words)
        self.blocklist = default_blocklist()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.added = {arm: 0 for arm in CORPUS_NAMES}
        self.n_rejected_drafts = 0

    # -- appends: one line at a time, flushed and synced before the next is written
    def _append(self, path: Path, entry: dict, ensure_ascii: bool = False) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=ensure_ascii) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _log_reject(self, entry: dict) -> None:
        with self.lock:
            self.n_rejected_drafts += 1 if "text" in entry else 0
            self._append(self.out / REJECTS_FILE, entry)

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
        user = self._user_message(scenario_id, domain, plan, existing, state)
        if user is None:
            return False
        answers = {}
        for arm in CORPUS_NAMES:
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
            self._write(scenario_id, domain, user, answers, state)
            complete = len(state.written.get(scenario_id, {})) == len(CORPUS_NAMES)
            if complete:
                entry = self._log_entry(scenario_id, domain, plan)
                self._append(self.out / SCENARIO_LOG, entry, ensure_ascii=True)  # as the log always was
        return complete

    def _user_message(
        self, scenario_id: str, domain: str, plan: dict, existing: dict, state: OutputState
    ) -> str | None:
        """The user message already on disk for this scenario, else a new one; None when none passed."""
        if existing:
            return next(iter(existing.values()))["user"]
        user = self._draft(
            self.templates.user_messages(domain, plan),
            self.cfg.user_sampling,
            lambda t: self.user_problems(t, state),
            scenario_id,
            "user",
        )
        if user is None:
            self._give_up(scenario_id, existing, "no acceptable user message", state)
            return None
        with self.lock:
            duplicate = text_hash(user) in state.users  # another thread took the same message meanwhile
            if not duplicate:
                state.users.add(text_hash(user))
        if duplicate:  # given up outside the lock: giving up takes the lock itself
            self._give_up(scenario_id, existing, "duplicate user message", state)
            return None
        return user

    def _write(self, scenario_id: str, domain: str, user: str, answers: dict, state: OutputState) -> None:
        """Append the new answers, one line per arm, in the study's arm order; call with the lock held."""
        for arm in CORPUS_NAMES:
            if arm in answers:
                record = {
                    "id": f"{arm}-{scenario_id}",
                    "domain": domain,
                    "scenario_id": scenario_id,
                    "user": user,
                    "assistant": answers[arm],
                }
                self._append(corpus_path(self.out, arm), record)
                state.written.setdefault(scenario_id, {})[arm] = record
                self.added[arm] += 1

    def _log_entry(self, scenario_id: str, domain: str, plan: dict) -> dict:
        """The scenario log's provenance line: plan, model, template version and each arm's template hash."""
        return {
            "scenario_id": scenario_id,
            "domain": domain,
            **plan,
            "model": self.cfg.model,
            "template_version": self.templates.version,
            "answer_templates": {
                arm: self.templates.template_hash(domain, arm, plan["archetype"]) for arm in CORPUS_NAMES
            },
            "finished_utc": now_utc(),
        }

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
            done = sum(1 for sid in ids if len(state.written.get(sid, {})) == len(CORPUS_NAMES))
            pending = [
                (sid, domain, k)
                for k, sid in enumerate(ids)
                if 0 < len(state.written.get(sid, {})) < len(CORPUS_NAMES) and sid not in tried
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
    run = {"started_utc": now_utc(), "model": cfg.model, "template_version": templates.version}
    error: Exception | None = None
    status = "interrupted"
    try:
        generator.run(state)
        status = "done"
    except LLMError as err:
        error, status = err, "failed"
    finally:
        run.update(
            finished_utc=now_utc(),
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
