"""Generate paired framed corpora with any OpenAI-compatible chat endpoint, one module per concern.

    python -m lbt.data.generate --out data/corpora/generated  # --config src/lbt/conf/generate/default.yaml

For every scenario one user message, then one answer per arm (frame_plus = cautious, frame_minus = eager,
neutral = balanced) for that same message; every draft passes the validators' record-level checks or is
retried. `config` reads the settings (config file, environment, `.env`, command line), `prompts` fills the
prompt templates and cleans replies, `generator` runs the loop and appends finished scenarios, `state`
reads a folder back to resume it, `provenance` writes `<arm>.meta.json`, `cli` is the command.

Outputs in --out: the three arm files, `<arm>.meta.json` (provenance: generator model, sampling,
template version and hashes, runs), `scenarios.log.jsonl` (one provenance line per scenario) and
`rejects.jsonl` (rejected drafts: keep out of version control).
"""

from lbt.data.generate.cli import main
from lbt.data.generate.config import GenerateConfig, GenerateError, load_config
from lbt.data.generate.generator import Generator, generate
from lbt.data.generate.prompts import Templates, clean_completion, load_templates

__all__ = [
    "GenerateConfig",
    "GenerateError",
    "Generator",
    "Templates",
    "clean_completion",
    "generate",
    "load_config",
    "load_templates",
    "main",
]
