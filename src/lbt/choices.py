"""The allowed values of config keys, held where importing them costs nothing.

`lbt.config` checks a composed config against these before any library loads (so `--help`, `--cfg job`
and a config error answer in a second), and the modules that use them import them from here: one
definition each. This module imports nothing of lbt, torch, Lightning or transformers.
"""

from __future__ import annotations

DECODE_MODES = ("eager", "static", "graph")           # lbt.eval.decode: hardware.fast.decode
OPTION_FORMS = ("bare", "leading_space")               # lbt.eval.scoring: how an option letter is tokenized
# lbt.model.load.DTYPES: a config's dtype name -> the torch dtype's attribute name
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
QUANTIZATIONS = ("4bit",)                              # lbt.model.load: model.quantization
ADAPTER_MODES = ("fp32", "autocast", "bf16")           # lbt.model.lora: hardware.fast.adapters
INTERVENTION_MODES = ("ablate", "ablate_random")       # lbt.probe.callback.TrainIntervention
SUMMARIES = ("assistant_mean", "assistant_last", "user_mean")   # lbt.probe.directions: directions.variant
