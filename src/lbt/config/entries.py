"""Objects from config entries: `{_target_: dotted.path, key: value, ...}` (evaluators, callbacks).

The entry's own keys are the constructor's arguments (no re-mapping layer); what config cannot hold
(the model's chat format, bound to the loaded tokenizer) is `provided` by the caller and passed to the
constructors that take it. The constructor is called directly, so its errors (an item file not found,
with file and line) reach the user as they are, not wrapped in Hydra's instantiation error.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf


def build(spec: Mapping[str, Any] | DictConfig, **provided: Any) -> Any:
    """The object of one entry, given those of `provided` its constructor takes (all, with **kwargs)."""
    args = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    target = get_object(str(args.pop("_target_")))
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return target(**args, **{k: v for k, v in provided.items() if takes_any or k in parameters})
