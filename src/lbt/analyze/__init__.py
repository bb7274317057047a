"""python -m lbt.analyze — a sweep's rows on disk → the study's answer (report.json, report.md, figures).

    python -m lbt.analyze prereg-lock [--items-dir data/eval] [--out prereg.lock.json]
    python -m lbt.analyze <sweep dir> [<sweep dir> ...] [--out DIR] [--exploratory] [--n-resamples N]
                          [--lock prereg.lock.json] [--items-dir data/eval] [--no-wandb]

Every directory holding a run.json under the given sweep directories is a job, read by `collect`
(job directories, item-set names, rows). A job without DONE (unfinished, incomplete
or failed) is read but flagged, with what its run card says is missing. The primary analysis
(`lbt.stats.primary_report`) uses phase `final` of the study arms; other arms (e.g. `base` from
`lbt.evaluate`), other item sets and other phases are summarised descriptively. Probe, capability and
summary JSON files feed the projection, dynamics, guardrail and measure-validity sections.

Scoring target items needs a preregistration lock whose settings and item-file hashes match (see
`lbt.stats.prereg`), unless `--exploratory`, which is stamped on every output. Outputs are written to a
new directory (default `<first sweep>/analysis`, or `analysis_2`, … if taken); nothing is overwritten.
An analysis run is logged to the sweep's W&B group (job_type "analysis"), offline without an API key.
"""

from lbt.analyze.cli import main
from lbt.analyze.collect import ITEM_SET_ROLES, load_job, load_rows

__all__ = ["ITEM_SET_ROLES", "load_job", "load_rows", "main"]
