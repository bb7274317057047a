"""What a command prints besides its results: user errors in one line, known library noise silenced.

- `user_errors(command)`: a mistake of the user's (a config value, a corpus line, a missing file, a
  held lock, ...) ends the command with one line naming it and exit code 2; `LBT_TRACEBACK=1` shows the
  traceback instead. Any other exception is a bug: it propagates with its traceback, as before.
- `deferred(module, name)`: a function of a heavy module, imported on its first call, so that a
  command's `--help`, `--cfg job` and tab completion answer in about a second.
- `quiet_libraries()`: the library warnings and tips every run printed, silenced one by one, each matched
  by its message (and category or logger), never by a blanket filter.

Light on purpose: the commands import it before torch or Lightning load.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lbt.env import env_value

TRACEBACK_ENV = "LBT_TRACEBACK"
USER_ERROR_EXIT = 2
# The user's mistakes, named (module.class) so that matching one imports nothing: the checks raise them
# before (or instead of) any work, with a message that names the key, file, line or field to fix.
USER_ERRORS = frozenset({
    "lbt.config.rules.ConfigError",                         # a config value that cannot run
    "lbt.data.records.CorpusError",                         # a corpus file/line/field
    "lbt.data.validate.training_gate.ValidationGateError",  # a corpus without a passing validation report
    "lbt.eval.items.ItemError",                             # an item file/line/field
    "lbt.eval.settings.MeasureError",                       # a measure the items cannot support
    "lbt.eval.scoring.OptionError",                         # option letters the tokenizer cannot express
    "lbt.model.load.ModelConfigError",                      # a model section that cannot load
    "lbt.evaluate.AdapterError",                            # adapter= is not a peft adapter directory
    "lbt.stats.prereg.LockError",                           # analysis without its preregistration lock
    "lbt.check.NoJobs",                                     # lbt.check given a folder that holds no job
    "lbt.rundir.ResumeMismatch",                            # a job folder resumed with other settings
    "lbt.rundir.CorruptFile",                               # a job file that does not parse (named)
    "builtins.FileNotFoundError",                           # a path given on the command line or in config
})


def is_user_error(err: BaseException) -> bool:
    return any(f"{module_name(cls)}.{cls.__qualname__}" in USER_ERRORS for cls in type(err).__mro__)


def module_name(cls: type) -> str:
    """The module a class was defined in, by its import name also when that module runs as the command
    (`python -m lbt.evaluate` defines its classes in `__main__`)."""
    if cls.__module__ == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            return spec.name
    return cls.__module__


def traceback_requested() -> bool:
    return (env_value(TRACEBACK_ENV) or "0").lower() not in ("0", "false", "no")


def one_line(err: BaseException) -> str:
    """The error's own message (a ConfigError's lines stay, one per problem), never a traceback."""
    return str(err).strip() or type(err).__name__


@contextmanager
def user_errors(command: str, reraise: bool = False) -> Iterator[None]:
    """Turn a user error into one logged line and exit code 2; anything else propagates untouched.
    `reraise` (a Hydra sweep's job): raise it as it is, so that the sweep records the job as failed and
    goes on with the next."""
    try:
        yield
    except Exception as err:
        if reraise or not is_user_error(err) or traceback_requested():
            raise
        logging.getLogger(command).error("%s  (%s=1 shows the traceback)", one_line(err), TRACEBACK_ENV)
        raise SystemExit(USER_ERROR_EXIT) from None


def deferred(module: str, name: str) -> Callable[..., Any]:
    """A stand-in for `module.name`, a function of a module that loads torch, Lightning or transformers:
    imported on its first call. The command module keeps the name as an attribute (tests replace it)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


# -- known library noise --------------------------------------------------------------------------------

# (category, message regex, module regex) of warnings a run printed though nothing is wrong:
WARNINGS = (
    # transformers 4.5x: peft's gradient-checkpointing probe calls the deprecated property name.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\."),
    # Lightning 2.6's pytree helper on torch >= 2.9 (a Lightning-internal deprecation; nothing of ours).
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"(lightning|torch)\."),
    # Lightning's hint to prepend `srun`: lbt starts SLURM jobs through its own launchers
    # (hydra/launcher=slurm), and a local run on a machine that has srun is meant to be local.
    (Warning, r"The `srun` command is available on your system but is not used", r"lightning\."),
)
# (logger, message regex) of log records that are tips or defaults, not news:
LOG_RECORDS = (
    # Lightning's advertisement for its cloud logger, once per Trainer.
    ("lightning.pytorch.utilities.rank_zero", r"Tip: .*litlogger"),
    # Lightning saving a resumable checkpoint without weights_only: lbt's checkpoints are full on purpose.
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", r"`weights_only` was not set"),
    # bitsandbytes (imported by peft when installed) looking for optional hub kernels: it falls back to its
    # own CPU kernel, and only model.quantization=4bit uses either.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries() -> None:
    """Install the filters above (idempotent: a second call adds nothing). Call it once Lightning is
    imported: the `lightning` package adds a console handler of its own at import ("INFO: ..."), and under
    Hydra's logging its records reach the root logger's handlers too, so every Lightning line showed twice.
    With a configured root logger, Lightning's own handler goes: its lines show once, and reach train.log."""
    lightning = sys.modules.get("lightning")
    own = getattr(lightning, "_console", None)
    if own is not None and logging.getLogger().hasHandlers():
        logging.getLogger("lightning").removeHandler(own)
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}", category=category, module=module)
    for name, message in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMessages(message))
