"""Generate paired framed corpora with any OpenAI-compatible chat endpoint.

    python -m lbt.data.generate --out data/corpora/generated  # --config src/lbt/conf/generate/default.yaml

Exits 0 when the run finished, 2 on a bad config, an inconsistent output folder or an endpoint that
stopped answering (finished scenarios are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import sys

from lbt.data.generate.config import DEFAULT_CONFIG, GenerateError, load_config
from lbt.data.generate.generator import generate
from lbt.llm_client import BASE_URL_ENV, MODEL_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbt.data.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", required=True, help="output folder (resumed if it has output already)")
    parser.add_argument(
        "--base-url", dest="base_url", default=None, help=f"overrides config and ${BASE_URL_ENV}"
    )
    parser.add_argument("--model", default=None, help=f"overrides config and ${MODEL_ENV}")
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
