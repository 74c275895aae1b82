"""The run's tokenizer, for an export: the BPE that ``data=text`` trained, from the data cache it left it in.

The cache is keyed by the corpus files' names, sizes and mtimes (``data.text.cache_dir_for``): the tokenizer
is found when the corpus is unchanged and ``data.cache_dir`` is this machine's, as when the run trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.schema import DataConfig, TextDataConfig, TokenizerKind
from orchestrator.data.text import END_OF_TEXT, cache_dir_for, find_corpus_files
from orchestrator.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True, kw_only=True)
class RunTokenizer:
    """What an export says about the run's tokenizer, and the file to copy where there is one."""

    path: Path | None  # a tokenizers ``tokenizer.json``
    end_of_text_id: int | None  # the id that separated documents in training: bos and eos for generation
    note: str  # one line for the summary
    warning: str | None = None  # one line for stderr: a tokenizer the run had but that cannot be found


def find_tokenizer(data: DataConfig) -> RunTokenizer:
    """The tokenizer a run with these data settings trained (``data=text`` with ``data.tokenizer=bpe``)."""
    if not isinstance(data, TextDataConfig):
        return RunTokenizer(path=None, end_of_text_id=None, note=f"none (data={data.name} brings its own token ids)")
    if data.tokenizer is not TokenizerKind.bpe:
        return RunTokenizer(path=None, end_of_text_id=None,
                            note=f"none (data.tokenizer={data.tokenizer.value}: the token ids are UTF-8 bytes)")
    try:
        path = cache_dir_for(data, find_corpus_files(data)) / TOKENIZER_FILE
    except UserError as exc:
        return _missing(f"the corpus cannot be read ({exc})")
    if not path.is_file():
        return _missing(f"no {path} (the corpus changed since the run, or data.cache_dir={data.cache_dir} "
                        f"is another machine's)")
    return RunTokenizer(path=path, end_of_text_id=_token_id(path, END_OF_TEXT), note=f"BPE, {data.vocab_size} tokens")


def tokenizer_config(*, model_max_length: int) -> str:
    """``tokenizer_config.json`` for the trained BPE: transformers' fast tokenizer over ``tokenizer.json``."""
    return json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n"


def _missing(reason: str) -> RunTokenizer:
    return RunTokenizer(path=None, end_of_text_id=None, note="not found",
                        warning=f"the run's BPE tokenizer is not exported: {reason}")


def _token_id(path: Path, token: str) -> int | None:
    try:
        added = json.loads(path.read_text())["added_tokens"]
        return next((int(entry["id"]) for entry in added if entry["content"] == token), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None
