"""Do two runs of the same job give the same rows? Compares every phase's row files and summaries of job A
(the reference, e.g. decode=eager) with job B (e.g. hardware.fast.decode=graph).

    python benchmarks/compare_jobs.py <job dir or .tar.gz of A> <job dir or .tar.gz of B>

A tarball is the one `full_job_device.sh` writes (job/eval, job/probe, job/run.json inside).
Printed per phase, item set and measure:
  log-prob measures (letter_logprob, logprob): largest and median |Δ stance| over rows matched by
    (item, order, template), largest |Δ log p| of an option;
  generated measures (forced_choice, likert, open_ended): rows whose text differs, and for the parsed
    ones rows whose parsed answer differs (choice or rating, unparsed counted as an answer);
  summaries: |Δ mean_stance| of every measure.
Also the training loss histories' largest difference: `logprob` never decodes, so at a trained phase its
differences are the run-to-run noise of training on the GPU, the yardstick for the decode-dependent ones
(letter_logprob is read from forced choice's first decoding step).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tarfile
import tempfile
from pathlib import Path

LOGPROB_MEASURES = ("letter_logprob", "logprob")
ANSWER = {"forced_choice": "choice", "likert": "rating"}


def job_dir(path: Path, scratch: Path) -> Path:
    if path.is_dir():
        return path
    target = Path(tempfile.mkdtemp(dir=scratch))  # its own folder: two tarballs may share a name (A.eval.tar.gz)
    with tarfile.open(path) as tar:
        tar.extractall(target, filter="data")
    return target / "job"


def read_rows(path: Path) -> dict[tuple, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["item_id"], r.get("order"), r.get("template"))] = r
    return rows


def text(row: dict) -> str | None:
    """The generated text: `raw` for the parsed measures, `response` for open_ended."""
    return row.get("raw", row.get("response"))


def phase_key(name: str) -> tuple[int, int]:
    if name == "base":
        return (0, 0)
    return (1, int(name.split("_")[1])) if name.startswith("step_") else (2, 0)


def fin(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def compare(a: Path, b: Path) -> dict:
    out: dict = {"rows": [], "summaries": []}
    phases = sorted((p.name for p in (a / "eval").iterdir() if p.is_dir()), key=phase_key)
    for phase in phases:
        for set_dir in sorted(p for p in (a / "eval" / phase).iterdir() if p.is_dir()):
            for file in sorted(set_dir.glob("*.jsonl")):
                other = b / "eval" / phase / set_dir.name / file.name
                if not other.exists():
                    out["rows"].append({"phase": phase, "set": set_dir.name, "measure": file.stem, "missing_in_b": True})
                    continue
                ra, rb = read_rows(file), read_rows(other)
                common = sorted(set(ra) & set(rb), key=str)
                rec = {"phase": phase, "set": set_dir.name, "measure": file.stem, "n": len(common),
                       "unmatched": len(set(ra) ^ set(rb))}
                if file.stem in LOGPROB_MEASURES:
                    pairs = [(ra[k]["stance"], rb[k]["stance"]) for k in common]
                    d = [abs(x - y) for x, y in pairs if fin(x) and fin(y)]
                    dl = [abs(ra[k][f] - rb[k][f]) for k in common for f in ("logp_pro", "logp_anti")
                          if fin(ra[k].get(f)) and fin(rb[k].get(f))]
                    spread = [abs(x) for x, _ in pairs if fin(x)]
                    rec.update(max_d_stance=max(d, default=0.0), median_d_stance=statistics.median(d) if d else 0.0,
                               max_d_logp=max(dl, default=0.0), n_sign_flips=sum(
                                   1 for x, y in pairs if fin(x) and fin(y) and (x > 0) != (y > 0)),
                               median_abs_stance=statistics.median(spread) if spread else 0.0)
                else:
                    rec["text_differs"] = sum(1 for k in common if text(ra[k]) != text(rb[k]))
                    if file.stem in ANSWER:
                        f = ANSWER[file.stem]
                        rec["answer_differs"] = sum(1 for k in common if ra[k].get(f) != rb[k].get(f))
                        rec["parsed_a"] = sum(1 for k in common if ra[k].get("parsed"))
                        rec["parsed_b"] = sum(1 for k in common if rb[k].get("parsed"))
                out["rows"].append(rec)
        sa, sb = a / "eval" / phase / "summary.json", b / "eval" / phase / "summary.json"
        if sa.exists() and sb.exists():
            ja, jb = json.loads(sa.read_text()), json.loads(sb.read_text())
            for name, item_set in ja["item_sets"].items():
                for measure, stats in item_set["measures"].items():
                    other = jb["item_sets"][name]["measures"][measure]
                    x, y = stats["mean_stance"], other["mean_stance"]
                    out["summaries"].append({"phase": phase, "set": name, "measure": measure, "a": x, "b": y,
                                             "d": abs(x - y) if fin(x) and fin(y) else None})
    ca, cb = a / "run.json", b / "run.json"
    if ca.exists() and cb.exists():
        la = json.loads(ca.read_text()).get("loss_history") or []
        lb = json.loads(cb.read_text()).get("loss_history") or []
        diffs = [abs(x - y) for x, y in zip(la, lb)]
        out["loss"] = {"steps": len(diffs), "max_d": max(diffs, default=0.0),
                       "final_a": la[-1] if la else None, "final_b": lb[-1] if lb else None}
    return out


def report(res: dict) -> None:
    print(f"{'phase':<8} {'set':<7} {'measure':<15} {'n':>4}  comparison")
    for r in res["rows"]:
        head = f"{r['phase']:<8} {r['set']:<7} {r['measure']:<15} {r.get('n', 0):>4}  "
        if r.get("missing_in_b"):
            print(head + "missing in B")
        elif "max_d_stance" in r:
            print(head + f"|Δstance| max {r['max_d_stance']:.2e} median {r['median_d_stance']:.2e} "
                  f"(median |stance| {r['median_abs_stance']:.3f}), |Δlog p| max {r['max_d_logp']:.2e}, "
                  f"sign flips {r['n_sign_flips']}" + (f", unmatched {r['unmatched']}" if r["unmatched"] else ""))
        else:
            extra = (f", answer differs {r['answer_differs']}, parsed A {r['parsed_a']} B {r['parsed_b']}"
                     if "answer_differs" in r else "")
            print(head + f"text differs {r['text_differs']}/{r['n']}{extra}")
    ds = [s for s in res["summaries"] if s["d"] is not None]
    for measure in sorted({s["measure"] for s in ds}):
        worst = max((s for s in ds if s["measure"] == measure), key=lambda s: s["d"])
        print(f"summary mean_stance {measure}: largest |Δ| {worst['d']:.2e} ({worst['phase']} {worst['set']}: "
              f"{worst['a']:+.5f} vs {worst['b']:+.5f})")
    nulls = [s for s in res["summaries"] if s["d"] is None and (fin(s["a"]) or fin(s["b"]))]
    for s in nulls:
        print(f"summary mean_stance {s['measure']} {s['phase']} {s['set']}: {s['a']} vs {s['b']} (one not scored)")
    if "loss" in res:
        lo = res["loss"]
        print(f"training loss: {lo['steps']} steps, largest |Δ| {lo['max_d']:.2e}, final {lo['final_a']} vs {lo['final_b']}")
    lp = [r for r in res["rows"] if "max_d_stance" in r]
    for measure in LOGPROB_MEASURES:
        sel = [r for r in lp if r["measure"] == measure]
        if sel:
            worst = max(sel, key=lambda r: r["max_d_stance"])
            print(f"{measure}: largest row |Δstance| {worst['max_d_stance']:.2e} at {worst['phase']} {worst['set']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", type=Path, help="write the full comparison here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        res = compare(job_dir(args.a, Path(scratch)), job_dir(args.b, Path(scratch)))
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
