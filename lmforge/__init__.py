"""lmforge: pretrain, fine-tune, search, compress and serve BERT- and GPT-style language models.

Public API re-exports only; the command line is ``lmforge`` (``lmforge/cli.py``).
"""

from lmforge.data.builtin import load_builtin
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import build_model, load_model, save_model
from lmforge.models.sizes import SIZES, model_size

__version__ = "0.1.0"
__all__ = [
    "GPT",
    "SIZES",
    "Bert",
    "BertConfig",
    "GPTConfig",
    "LMTokenizer",
    "build_model",
    "load_builtin",
    "load_model",
    "load_tokenizer",
    "model_size",
    "save_model",
    "save_tokenizer",
    "train_tokenizer",
]
