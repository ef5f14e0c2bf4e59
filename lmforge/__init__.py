"""lmforge: pretrain, fine-tune, search, compress and serve BERT- and GPT-style language models.

Public API re-exports only, resolved on first use (PEP 562), so that importing a torch-free part of
the package (the command line, the configs) does not import torch. The command line is ``lmforge``
(``lmforge/cli.py``); the layout is described in ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "GPT": "lmforge.models.gpt",
    "GPTConfig": "lmforge.models.gpt",
    "Bert": "lmforge.models.bert",
    "BertConfig": "lmforge.models.bert",
    "SIZES": "lmforge.models.sizes",
    "model_size": "lmforge.models.sizes",
    "build_model": "lmforge.models.registry",
    "load_model": "lmforge.models.registry",
    "save_model": "lmforge.models.registry",
    "LMTokenizer": "lmforge.data.tokenizer",
    "load_tokenizer": "lmforge.data.tokenizer",
    "save_tokenizer": "lmforge.data.tokenizer",
    "train_tokenizer": "lmforge.data.tokenizer",
    "load_builtin": "lmforge.data.builtin",
    "load_run": "lmforge.rundir",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
