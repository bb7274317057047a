"""Typed schemas of every config group, checked right after compose, before any corpus or model loads.

`check_config(cfg)` (conf/train.yaml, the first thing `lbt.train` does) and `check_evaluate_config(cfg)`
(conf/evaluate.yaml, `lbt.evaluate`) walk the composed config against the dataclasses of
`lbt.config.schema` (`lbt.config.rules` holds the walk): the type of every value, its range or allowed
values, unknown keys (a typo in a YAML file is an error, not a silently ignored key), then the checks
across keys of `lbt.config.checks` (checkpoint fractions end at 1.0, measure_phases name known measures,
hardware=gpu needs a visible CUDA GPU, ...). Every problem is one line naming the full key, the value and
what is allowed, e.g. `train.max_steps=0: must be null or an integer >= 1`; one `ConfigError` holds them
all, and Hydra prints it as its message alone, without a traceback.

Open mappings: `model.arch`, `model.chat_template_kwargs`, `extra`, and the keys of an evaluator or
callback entry whose `_target_` has no schema (`rules.ENTRY_SCHEMAS`), so test and user evaluators
(`+eval.<name>._target_=...`) and callbacks (`+callbacks.<name>._target_=...`) need none.
"""

from lbt.config.checks import check_config, check_evaluate_config
from lbt.config.rules import ConfigError, show

__all__ = ["ConfigError", "check_config", "check_evaluate_config", "show"]
