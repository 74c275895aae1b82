"""The run's tokenizer, for an export: the BPE that ``data=text`` trained, or the pretrained tokenizer it used
(``data.tokenizer=pretrained``), from the data cache that keeps a copy of its files.

The cache is keyed by the corpus files' names, sizes and mtimes and a pretrained tokenizer file's content
(``data.text.cache_dir_for``): the tokenizer is found when those are unchanged and ``data.cache_dir`` is this
machine's, as when the run trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.schema import DataConfig, TextDataConfig, TokenizerKind
from orchestrator.data.bpe import (
    PRETRAINED_TOKENIZER_FILES,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)
from orchestrator.data.text import END_OF_TEXT, cache_dir_for, find_corpus_files
from orchestrator.errors import UserError

__all__ = [
    "PRETRAINED_TOKENIZER_FILES",
    "SPECIAL_TOKENS_MAP_FILE",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "RunTokenizer",
    "find_tokenizer",
    "tokenizer_config",
]


@dataclass(frozen=True, kw_only=True)
class RunTokenizer:
    """What an export says about the run's tokenizer, and the file to copy where there is one."""

    path: Path | None  # a tokenizers ``tokenizer.json``
    end_of_text_id: int | None  # the id that separated documents in training: bos and eos for generation
    note: str  # one line for the summary
    warning: str | None = None  # one line for stderr: a tokenizer the run had but that cannot be found
    pretrained: bool = False  # its files (tokenizer_config.json, ...) are beside ``path``, copied as they are

    def texts(self, *, model_max_length: int) -> dict[str, str]:
        """The tokenizer's files for the export, by name: a pretrained tokenizer's own, or the trained BPE's
        ``tokenizer.json`` with a ``tokenizer_config.json`` for it; none without a tokenizer."""
        if self.path is None:
            return {}
        if self.pretrained:
            return {
                name: (self.path.parent / name).read_text()
                for name in PRETRAINED_TOKENIZER_FILES
                if (self.path.parent / name).is_file()
            }
        return {
            TOKENIZER_FILE: self.path.read_text(),
            TOKENIZER_CONFIG_FILE: tokenizer_config(model_max_length=model_max_length),
        }


def find_tokenizer(data: DataConfig) -> RunTokenizer:
    """The tokenizer a run with these data settings tokenized with (``data=text`` with ``data.tokenizer=bpe`` or
    ``pretrained``)."""
    if not isinstance(data, TextDataConfig):
        return RunTokenizer(path=None, end_of_text_id=None, note=f"none (data={data.name} brings its own token ids)")
    if data.tokenizer is TokenizerKind.bytes:
        return RunTokenizer(
            path=None,
            end_of_text_id=None,
            note=f"none (data.tokenizer={data.tokenizer.value}: the token ids are UTF-8 bytes)",
        )
    what = "BPE" if data.tokenizer is TokenizerKind.bpe else "pretrained"
    try:
        path = cache_dir_for(data, find_corpus_files(data)) / TOKENIZER_FILE
    except UserError as exc:
        return _missing(what, f"the corpus or the tokenizer cannot be read ({exc})")
    if not path.is_file():
        return _missing(
            what,
            f"no {path} (the corpus or the tokenizer changed since the run, or "
            f"data.cache_dir={data.cache_dir} is another machine's)",
        )
    if data.tokenizer is TokenizerKind.bpe:
        return RunTokenizer(
            path=path, end_of_text_id=_token_id(path, END_OF_TEXT), note=f"BPE, {data.vocab_size} tokens"
        )
    meta = json.loads((path.parent / "meta.json").read_text())
    return RunTokenizer(
        path=path,
        end_of_text_id=meta.get("end_of_text_id"),
        pretrained=True,
        note=f"pretrained, {meta['vocab_size']} ids: {Path(data.tokenizer_dir or '') / TOKENIZER_FILE}",
    )


def tokenizer_config(*, model_max_length: int) -> str:
    """``tokenizer_config.json`` for the trained BPE: transformers' fast tokenizer over ``tokenizer.json``."""
    return (
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": END_OF_TEXT,
                "eos_token": END_OF_TEXT,
                "unk_token": END_OF_TEXT,
                "model_max_length": model_max_length,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )


def _missing(what: str, reason: str) -> RunTokenizer:
    return RunTokenizer(
        path=None,
        end_of_text_id=None,
        note="not found",
        warning=f"the run's {what} tokenizer is not exported: {reason}",
    )


def _token_id(path: Path, token: str) -> int | None:
    try:
        added = json.loads(path.read_text())["added_tokens"]
        return next((int(entry["id"]) for entry in added if entry["content"] == token), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None
