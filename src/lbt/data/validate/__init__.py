"""Validators that gate training on the three paired corpora, one module per concern.

    python -m lbt.data.validate [--corpora data/corpora] [--items data/eval] [--<threshold> VALUE ...]

Writes `validation_report.json` next to the corpora (every gate's figures and pass/fail, keyed by each
corpus's sha256) and exits non-zero when any gate fails. Gates, each in its module:

0. pairing (`pairing`) — every scenario_id is in all three arms exactly once, with the same domain and
   user message.
1. leakage (`record_checks`) — zero blocklist hits (lbt.data.blocklist) in any user or assistant turn;
   hits listed as file:line.
2. length (`record_checks`) — every assistant turn has min_words..max_words words (`text.words`).
3. surface_match (`surface`) — the arms' answers alike in length (pairwise KS, means) and MATTR.
4. framing_strength (`framing`) — a TF-IDF classifier separates FRAME+ from FRAME− and puts neutral
   between them.
5. dedup (`dedup`) — no exact and no near-duplicate training texts.
6. eval_isolation (`isolation`) — no eval item or held-out passage close to a training text.
7. anomalies (`record_checks`) — refusal-looking, empty or meta-commentary responses and format breaks
   (markdown headings, code fences, chat-role markers, text that ends without final punctuation).

`gate` holds the thresholds and the result shape every gate shares, `report` runs them all and writes the
report, `cli` is the command. `record_problems(user, assistant)` runs the record-level checks (leakage,
length, anomalies) for the generator; `check_corpus_validated(path)` (`training_gate`) is what training
calls before loading a model.
"""

from lbt.data.validate.cli import main
from lbt.data.validate.dedup import gate_dedup
from lbt.data.validate.framing import gate_framing_strength
from lbt.data.validate.gate import Thresholds
from lbt.data.validate.isolation import gate_eval_isolation, read_items
from lbt.data.validate.pairing import gate_pairing
from lbt.data.validate.record_checks import anomalies, gate_record_level, record_problems
from lbt.data.validate.report import GATES, REPORT_NAME, validate, write_report
from lbt.data.validate.surface import gate_surface_match
from lbt.data.validate.text import mattr, text_hash, word_count
from lbt.data.validate.training_gate import ValidationGateError, check_corpus_validated

__all__ = [
    "GATES",
    "REPORT_NAME",
    "Thresholds",
    "ValidationGateError",
    "anomalies",
    "check_corpus_validated",
    "gate_dedup",
    "gate_eval_isolation",
    "gate_framing_strength",
    "gate_pairing",
    "gate_record_level",
    "gate_surface_match",
    "main",
    "mattr",
    "read_items",
    "record_problems",
    "text_hash",
    "validate",
    "word_count",
    "write_report",
]
