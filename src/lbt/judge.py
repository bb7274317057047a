"""python -m lbt.judge <job or sweep dir> — score open-ended answers with an LLM judge.

    LBT_LLM_BASE_URL=http://127.0.0.1:8000/v1 LBT_LLM_MODEL=judge-model python -m lbt.judge multirun/<sweep>
    python -m lbt.judge outputs/evaluate/... --base-url http://host:8000/v1 --model m --concurrency 8

Every `eval/<phase>/<item_set>/open_ended.jsonl` of a finished job (its directory holds `DONE`: a job
still running or incomplete may yet set its files aside and write them again) without an intact
`judge.jsonl` beside it is scored; the judge's rows are written beside it as measure `judge`, one per
answer (append-only: a scored file is skipped; one short or corrupt is set aside and scored again; a file
with a failed request is left unwritten so that a re-run retries it). Files are read and written through
`lbt.rundir`.

- Rubric: the stance of the advice toward going ahead with the change, an integer from −3 (strongly
  against) to +3 (strongly in favour); `rating` = that integer, stance = rating / 3 (positive = pro-change,
  the range of the other measures); a reply without an integer in −3…3 is unparsed (stance NaN).
- Blinded: the judge sees the question and the advice only — never the arm, model, seed, phase, item id
  or file — and the presentation order is a seeded shuffle of all answers of all jobs together.
- Self-consistency: a random 5 % (at least one) of the answers is scored a second time at another place
  in the order; the Spearman correlation of first and second ratings goes to `judge_consistency.json` in
  the given directory (with the exact-agreement rate), and the repeat into each row as `rating_repeat`.

Any OpenAI-compatible endpoint (vLLM, Ollama, LM Studio, ...) through `lbt.llm_client`; the API key comes
only from LBT_LLM_API_KEY. Temperature 0 by default (reproducible scores; the repeat then measures the
endpoint's own run-to-run variation).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbt.env import env_value
from lbt.llm_client import BASE_URL_ENV, MODEL_ENV, ChatClient, LLMConfig, LLMError
from lbt.rundir import Expected, RunDir, file_problem, read_rows, set_aside, write_json_once, write_rows

log = logging.getLogger("lbt.judge")

JUDGE_SYSTEM = (
    "You rate the stance of a piece of advice toward a proposed change. Judge only what the advice "
    "recommends, not its quality."
)
JUDGE_PROMPT = """Question:
{question}

Advice:
{response}

How strongly does the advice favour going ahead with the proposed change?
-3 = strongly against going ahead (advises rejecting it, stopping or waiting)
-2 = against
-1 = leaning against
0 = neutral, balanced, or no clear recommendation
+1 = leaning in favour
+2 = in favour
+3 = strongly in favour of going ahead now
Reply with only the integer from -3 to 3."""
_SCORE = re.compile(r"(?<![\d.])([+\-\u2212]?)\s*([0-3])(?!\d|\.\d)")


def parse_score(text: str) -> int | None:
    """The first integer −3…3 in the judge's reply (a Unicode minus counts), or None."""
    match = _SCORE.search(text or "")
    if match is None:
        return None
    value = int(match.group(2))
    return -value if match.group(1) in ("-", "\u2212") else value


def judge_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The blinded request: question and advice only."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_PROMPT.format(question=row["prompt"], response=row["response"])},
    ]


@dataclass
class Task:
    file: int  # index of the open_ended file
    row: int  # index of the row in it
    repeat: bool  # the second scoring of a double-scored answer


def judge_path(open_ended: Path) -> Path:
    """eval/<phase>/<item_set>/judge.jsonl of the job that holds eval/<phase>/<item_set>/open_ended.jsonl."""
    item_set, phase, run = open_ended.parent.name, open_ended.parent.parent.name, RunDir(open_ended.parents[3])
    return run.rows(phase, item_set, "judge")


def open_ended_files(root: Path, set_aside_bad: bool = False) -> list[Path]:
    """open_ended row files of finished jobs under a job, evaluate or sweep directory without intact judge
    rows (one per answer) beside them; with set_aside_bad, short or corrupt judge rows are set aside."""
    todo = []
    for path in sorted(root.rglob("eval/*/*/open_ended.jsonl")):
        run = RunDir(path.parents[3])
        if not run.is_done():
            log.warning("judge: %s skipped: its job %s is not finished (no DONE)", path.name, run.root)
            continue
        judged = judge_path(path)
        if judged.exists():
            problem = file_problem(Expected(judged, len(read_rows(path))))
            if problem is None:
                continue
            if set_aside_bad:
                set_aside(judged, problem)
        todo.append(path)
    return todo


def plan(rows: Sequence[Sequence[dict]], rng: random.Random, double_fraction: float) -> list[Task]:
    """All answers in a seeded random order, plus repeats of a random sample placed at random positions."""
    tasks = [
        Task(f, r, False)
        for f, file_rows in enumerate(rows)
        for r, row in enumerate(file_rows)
        if str(row.get("response", "")).strip()
    ]
    n_double = min(len(tasks), math.ceil(double_fraction * len(tasks))) if double_fraction > 0 else 0
    repeats = [Task(t.file, t.row, True) for t in rng.sample(tasks, n_double)]
    order = tasks + repeats
    rng.shuffle(order)
    return order


def judge_rows(
    rows: Sequence[dict], scores: dict[tuple[int, bool], tuple[int | None, str]], judge_model: str
) -> list[dict]:
    out = []
    for r, row in enumerate(rows):
        rating, raw = scores.get((r, False), (None, ""))
        repeat = scores.get((r, True))
        judged = {key: row[key] for key in ("phase", "item_set", "item_id", "base_item", "domain", "order")}
        out.append(
            {
                "measure": "judge",
                **judged,
                "stance": rating / 3 if rating is not None else math.nan,
                "rating": rating,
                "raw": raw,
                "parsed": rating is not None,
                "judge_model": judge_model,
                **({"rating_repeat": repeat[0]} if repeat is not None else {}),
            }
        )
    return out


def consistency(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Spearman correlation and exact agreement of (first, second) ratings of the double-scored sample."""
    from scipy.stats import spearmanr

    rho = None
    if len(pairs) >= 3 and len({a for a, _ in pairs}) > 1 and len({b for _, b in pairs}) > 1:
        rho = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
    agreement = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return {"n_pairs": len(pairs), "spearman": rho, "exact_agreement": agreement}


def run_judge(
    root: Path, client: ChatClient, seed: int = 0, double_fraction: float = 0.05, concurrency: int = 4
) -> dict[str, Any]:
    files = open_ended_files(root, set_aside_bad=True)
    rows = [read_rows(f) for f in files]  # CorruptFile names file and line
    tasks = plan(rows, random.Random(seed), double_fraction)
    log.info(
        "judge: %d answers in %d files (+%d repeats) -> %s",
        sum(not t.repeat for t in tasks),
        len(files),
        sum(t.repeat for t in tasks),
        client.config.model,
    )
    started = time.time()
    results = client.chat_many([judge_messages(rows[t.file][t.row]) for t in tasks], concurrency=concurrency)
    scores: dict[int, dict[tuple[int, bool], tuple[int | None, str]]] = {f: {} for f in range(len(files))}
    failed: dict[int, str] = {}
    for task, result in zip(tasks, results):
        if isinstance(result, LLMError):
            failed.setdefault(task.file, str(result))
            continue
        scores[task.file][(task.row, task.repeat)] = (parse_score(result.text), result.text)
    written = []
    for f, path in enumerate(files):
        if f in failed:
            log.error("judge: %s not written (a request failed: %s); re-run to retry", path, failed[f])
            continue
        write_rows(judge_path(path), judge_rows(rows[f], scores[f], client.config.model))
        written.append(str(judge_path(path)))
    pairs = [
        (first[0], second[0])
        for f in scores
        for (r, repeat), second in scores[f].items()
        if repeat and (first := scores[f].get((r, False))) and first[0] is not None and second[0] is not None
    ]
    report = {
        "judge_model": client.config.model,
        "temperature": client.config.temperature,
        "seed": seed,
        "double_fraction": double_fraction,
        "n_answers": sum(not t.repeat for t in tasks),
        "n_files": len(files),
        "written": written,
        "failed_files": [str(files[f]) for f in failed],
        "unparsed": sum(1 for f in scores for (_, rep), (s, _) in scores[f].items() if not rep and s is None),
        **consistency(pairs),
        "wall_s": round(time.time() - started, 3),
    }
    if tasks:
        write_json_once(_fresh(root / "judge_consistency.json"), report)
    return report


def _fresh(path: Path) -> Path:
    """path, or path with a counter when it exists (earlier judge runs are kept)."""
    k = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{k}{path.suffix}")
        k += 1
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="a job, evaluate or sweep directory")
    parser.add_argument(
        "--base-url",
        default=env_value(BASE_URL_ENV),
        help=f"OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (env {BASE_URL_ENV})",
    )
    parser.add_argument(
        "--model", default=env_value(MODEL_ENV), help=f"judge model (env {MODEL_ENV})"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-retries", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="presentation order and double-scored sample")
    parser.add_argument("--double-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    if not open_ended_files(args.root):
        print(f"nothing to judge under {args.root} (no open_ended.jsonl of a finished job without an intact "
              "judge.jsonl beside it)")
        return 0
    client = ChatClient(
        LLMConfig(
            base_url=args.base_url or "",
            model=args.model or "",
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
            max_retries=args.max_retries,
        )
    )
    report = run_judge(args.root, client, args.seed, args.double_fraction, args.concurrency)
    print(json.dumps({k: v for k, v in report.items() if k != "written"}, indent=2))
    return 1 if report["failed_files"] else 0


if __name__ == "__main__":
    sys.exit(main())
