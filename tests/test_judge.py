"""python -m lbt.judge against a loopback OpenAI-compatible server started here: blinded requests in a
seeded random order across jobs, scores parsed and written beside the open_ended rows as measure `judge`,
a double-scored sample with its Spearman correlation, append-only, failures left for a re-run."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from lbt import judge as judge_mod
from lbt.eval.rows import read_rows, write_rows
from lbt.llm_client import ChatClient, LLMConfig

# The fake judge reads the advice and answers from this table (a word in the advice decides its score).
SCORES = {"eagerly": "+3", "gladly": "2", "hesitantly": "-1", "never": "−3", "dunno": "I cannot say"}


class FakeJudge(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict]] = []
    fail_on: ClassVar[str | None] = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        advice = prompt.split("Advice:\n", 1)[1].split("\n\nHow strongly", 1)[0]
        if FakeJudge.fail_on and FakeJudge.fail_on in advice:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad request"}')
            return
        word = next((w for w in SCORES if w in advice), None)
        reply = {
            "choices": [{"message": {"content": SCORES.get(word, "0")}, "finish_reason": "stop"}],
            "model": body["model"],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeJudge.bodies, FakeJudge.fail_on = [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


ADVICE = [
    "I would eagerly go ahead.",
    "I would gladly try it.",
    "Proceed hesitantly, if at all.",
    "You should never do this.",
    "dunno",
    "Weigh it up.",
]


def make_job(sweep: Path, arm: str, n: int = 6, done: bool = True) -> Path:
    job = sweep / f"tiny-{arm}-s0"
    rows = [
        {
            "measure": "open_ended",
            "phase": "final",
            "item_set": "target",
            "item_id": f"{arm}-item-{k}",
            "base_item": f"b{k}",
            "domain": "park_rules",
            "order": "original",
            "stance": math.nan,
            "prompt": f"Scenario {k}: should the park allow e-bikes?",
            "response": ADVICE[k % len(ADVICE)],
        }
        for k in range(n)
    ]
    write_rows(job / "eval/final/target/open_ended.jsonl", rows)
    (job / "run.json").write_text(json.dumps({"job": {"model": "tiny", "arm": arm, "seed": 0}}))
    if done:
        (job / "DONE").write_text("done\n")
    return job


def client(url: str, **kwargs) -> ChatClient:
    return ChatClient(
        LLMConfig(base_url=url, model="judge-x", temperature=0.0, max_retries=0, backoff=0.0, **kwargs)
    )


@pytest.mark.parametrize(
    "reply,score",
    [
        ("2", 2),
        ("+3", 3),
        ("-1", -1),
        ("−3", -3),
        ("Score: 0", 0),
        ("I'd say -2.", -2),
        ("4", None),
        ("1.5", None),
        ("", None),
    ],
)
def test_parse_score(reply, score):
    assert judge_mod.parse_score(reply) == score


def test_sweep_is_judged_blind_shuffled_and_double_scored(server, tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [make_job(sweep, arm, n=20) for arm in ("plus", "minus")]
    report = judge_mod.run_judge(sweep, client(server), seed=1, double_fraction=0.1, concurrency=1)
    assert report["n_answers"] == 40 and report["failed_files"] == []
    assert len(FakeJudge.bodies) == 40 + 4  # 10 % double-scored
    sent = json.dumps(FakeJudge.bodies)
    for secret in ("plus", "minus", "tiny", "item-", "final", "park_rules", str(tmp_path)):
        assert secret not in sent  # blinded: no arm, model, id, phase, domain or path
    asked = [b["messages"][-1]["content"].split("Scenario ")[1].split(":")[0] for b in FakeJudge.bodies]
    assert asked[:40] != sorted(asked[:40], key=int)  # not presented in file order
    for job in jobs:
        rows = read_rows(job / "eval/final/target/judge.jsonl")
        assert len(rows) == 20 and {r["measure"] for r in rows} == {"judge"}
        for k, row in enumerate(rows):
            word = next((w for w in SCORES if w in ADVICE[k % len(ADVICE)]), None)
            expected = judge_mod.parse_score(SCORES.get(word, "0"))
            assert row["rating"] == expected and row["item_id"].endswith(f"item-{k}")
            assert (
                math.isnan(row["stance"])
                if expected is None
                else row["stance"] == pytest.approx(expected / 3)
            )
    consistency = json.loads((sweep / "judge_consistency.json").read_text())
    assert consistency["n_pairs"] <= 4 and consistency["exact_agreement"] == 1.0
    assert consistency["judge_model"] == "judge-x"
    repeats = [
        r for job in jobs for r in read_rows(job / "eval/final/target/judge.jsonl") if "rating_repeat" in r
    ]
    assert len(repeats) == 4


def test_spearman_of_the_double_scored_pairs():
    assert judge_mod.consistency([(1, 1), (2, 3), (-3, -2), (0, 0)])["spearman"] == pytest.approx(1.0)
    assert judge_mod.consistency([(1, 3), (2, 2), (3, 1)])["spearman"] == pytest.approx(-1.0)
    assert judge_mod.consistency([(1, 1)])["spearman"] is None


def test_judged_files_are_skipped_and_failures_left_for_a_rerun(server, tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "neutral")
    failing = make_job(sweep, "plus", n=3)
    rows = read_rows(failing / "eval/final/target/open_ended.jsonl")
    rows[1]["response"] = "poison pill"
    (failing / "eval/final/target/open_ended.jsonl").unlink()
    write_rows(failing / "eval/final/target/open_ended.jsonl", rows)
    FakeJudge.fail_on = "poison"
    report = judge_mod.run_judge(sweep, client(server), double_fraction=0.0)
    assert len(report["failed_files"]) == 1 and not (failing / "eval/final/target/judge.jsonl").exists()
    FakeJudge.bodies, FakeJudge.fail_on = [], None
    second = judge_mod.run_judge(sweep, client(server), double_fraction=0.0)
    assert second["n_answers"] == 3 and len(FakeJudge.bodies) == 3  # only the unwritten file again
    assert (sweep / "judge_consistency_1.json").exists()


def test_cli_reports_nothing_to_do(tmp_path, capsys):
    assert judge_mod.main([str(tmp_path)]) == 0
    assert "nothing to judge" in capsys.readouterr().out


def test_cli_runs_against_the_server(server, tmp_path, capsys):
    job = make_job(tmp_path / "sweep", "neutral", n=2)
    assert judge_mod.main([str(job), "--base-url", server, "--model", "judge-y"]) == 0
    assert json.loads(capsys.readouterr().out)["n_answers"] == 2
    assert {r["judge_model"] for r in read_rows(job / "eval/final/target/judge.jsonl")} == {"judge-y"}


def test_unfinished_jobs_are_left_alone_and_short_judge_rows_are_judged_again(server, tmp_path):
    sweep = tmp_path / "sweep"
    finished = make_job(sweep, "neutral", n=4)
    running = make_job(sweep, "plus", n=3, done=False)
    report = judge_mod.run_judge(sweep, client(server), double_fraction=0.0)
    assert report["n_answers"] == 4 and not (running / "eval/final/target/judge.jsonl").exists()
    judged = finished / "eval/final/target/judge.jsonl"
    intact = read_rows(judged)
    judged.write_text("".join(json.dumps(r) + "\n" for r in intact[:2]))  # a short judge file
    assert judge_mod.open_ended_files(sweep) == [finished / "eval/final/target/open_ended.jsonl"]
    FakeJudge.bodies = []
    again = judge_mod.run_judge(sweep, client(server), double_fraction=0.0)
    assert again["n_answers"] == 4 and len(FakeJudge.bodies) == 4
    assert [r["rating"] for r in read_rows(judged)] == [r["rating"] for r in intact]
    assert len(list(judged.parent.glob("judge.jsonl.corrupt-*"))) == 1  # set aside, not deleted
    assert judge_mod.open_ended_files(sweep) == []

