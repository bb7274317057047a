"""`python -m lbt.data.validate`: run the gates, write the report, print one line per gate.

    python -m lbt.data.validate [--corpora data/corpora] [--items data/eval] [--<threshold> VALUE ...]

Exits 0 when every gate passes, 1 when one fails, 2 when the input cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lbt.data.blocklist import DEFAULT_BLOCKLIST, load_blocklist
from lbt.data.records import CorpusError
from lbt.data.validate.gate import Thresholds
from lbt.data.validate.report import REPORT_NAME, validate, write_report
from lbt.study import CORPUS_NAMES


def _summary_lines(report: dict) -> list[str]:
    g = report["gates"]
    fs, sm, dd, ei = g["framing_strength"], g["surface_match"], g["dedup"], g["eval_isolation"]
    lines = [f"{name:17s} {res['status'].upper()}" for name, res in g.items()]
    lines[1] += f"  hits={g['leakage']['n_hits']}"
    lines[2] += (
        f"  words {g['length']['min_words']}-{g['length']['max_words']}, "
        f"out of bounds={g['length']['n_out_of_bounds']}"
    )
    if "ks_statistic" in sm:
        lines[3] += (
            f"  KS max={max(sm['ks_statistic'].values()):.3f}, mean dev max="
            f"{max(abs(v) for v in sm['mean_words_rel_dev'].values()):.3f}, MATTR dev max="
            f"{max(abs(v) for v in sm['mattr_rel_dev'].values()):.3f}"
        )
    if "cv_auc_mean" in fs:
        lines[4] += f"  AUC={fs['cv_auc_mean']:.3f}, neutral P(FRAME-)={fs['neutral_mean_p_frame_minus']:.3f}"
    lines[5] += (
        f"  exact={dd['n_exact']}, near={dd['n_near']}, "
        f"max cos A={dd['max_cosine_assistant']:.3f} U={dd['max_cosine_user']:.3f}"
    )
    if ei["status"] != "skipped":
        lines[6] += (
            f"  {ei['method']} max cos={ei['max_cosine']:.3f} (threshold {ei['threshold']}), "
            f"texts={ei['n_items']}"
        )
    lines[7] += f"  n={g['anomalies']['n_anomalies']}"
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lbt.data.validate",
        description="Run the corpus gates and write validation_report.json.",
    )
    parser.add_argument(
        "--corpora", default="data/corpora", help=f"folder with {'/'.join(CORPUS_NAMES)}.jsonl"
    )
    parser.add_argument(
        "--items", default=None, help="folder with *_items.jsonl (default: <corpora>/../eval)"
    )
    parser.add_argument("--report", default=None, help=f"report path (default: <corpora>/{REPORT_NAME})")
    parser.add_argument("--blocklist", default=str(DEFAULT_BLOCKLIST))
    for field in dataclasses.fields(Thresholds):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
            help=f"threshold (default {field.default})",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    thresholds = Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)})
    corpora_dir = Path(args.corpora)
    try:
        report = validate(corpora_dir, args.items, thresholds, load_blocklist(args.blocklist))
    except (CorpusError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report_path = Path(args.report) if args.report else corpora_dir / REPORT_NAME
    write_report(report, report_path)
    print("\n".join(_summary_lines(report)))
    print(
        f"{'PASSED' if report['passed'] else 'FAILED: ' + ', '.join(report['failed_gates'])} -> {report_path}"
    )
    return 0 if report["passed"] else 1
