"""The corpus's tokenizer, encoding the corpus on every core: a byte-level BPE trained on the corpus, or a
pretrained ``tokenizer.json`` (``data.tokenizer=pretrained``).

Training and ``encode_batch_fast`` run on tokenizers' Rust thread pool, one thread per core
(``TOKENIZERS_PARALLELISM=false`` keeps them to one). Both take the corpus in pieces, a long file cut
where a cut changes no token, so a corpus of one big file is spread over the cores as well as one of
many small files. The tokenizer and the token stream are the ones that training on and encoding each
file whole would give.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from orchestrator.data.tokens import MAX_VOCAB_SIZE, token_dtype
from orchestrator.errors import UserError, first_line
from orchestrator.fsutil import read_json_object

END_OF_TEXT = "<|endoftext|>"
# BPE training takes ~7 s on the 31 MB default corpus (Python 3.11 stdlib, 2 CPU cores), so it sees
# the whole default corpus. It grows with the corpus: above this many characters it trains on an
# evenly spaced subset of the files instead, keeping it under ~15 s; the whole corpus is still encoded.
TOKENIZER_TRAIN_MAX_CHARS = 64_000_000
# The corpus is encoded a batch of about this many characters at a time: a batch is spread over the
# cores, and its Encoding objects (~100 bytes a token, ~30 bytes a character of Python source) are freed
# before the next, so memory stays bounded whatever the corpus size.
ENCODE_BATCH_CHARS = 1 << 24
# Files longer than this are cut into pieces of about this size, so a corpus of a few big files keeps
# every core busy too. A cut goes where a printable ASCII character other than a space meets a space or
# a line break ("x| y", "x|\n"): the byte-level pre-tokenizer ends a word there whether the text is cut
# or not (its words never end in whitespace that follows other characters, and it never looks back),
# and BPE never merges across words, so the cut changes no token.
PIECE_CHARS = 1 << 18
_CUT = re.compile(r"[!-~](?=[ \n])")
# A pretrained tokenizer's pre-tokenizer may be another (Llama 3's regex keeps "!\n" together), so its cuts go
# only where a printable character meets a space: byte-level and whitespace pre-tokenizers alike end a word
# there. One that marks where its input starts (SentencePiece's "▁": a Metaspace pre-tokenizer, a Prepend
# normalizer) would see a word start at every cut, so its files are encoded whole.
_PRETRAINED_CUT = re.compile(r"[!-~](?= )")
_MARKS_INPUT_START = frozenset({"Metaspace", "Prepend"})
# save_pretrained's file names: the tokenizer, its settings (eos_token), and the model's (vocab_size).
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MODEL_CONFIG_FILE = "config.json"
# What a cache built with a pretrained tokenizer keeps a copy of, for an export to ship with the model.
PRETRAINED_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)


def train_and_encode(texts: list[str], *, vocab_size: int, tokenizer_path: Path) -> np.ndarray:
    """Train a byte-level BPE of ``vocab_size`` tokens on the texts, save it, and encode the texts with it.

    Returns:
        ``encode_corpus``'s stream, as ``token_dtype(vocab_size)`` ids.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stride = max(1, math.ceil(sum(len(text) for text in texts) / TOKENIZER_TRAIN_MAX_CHARS))
    # In pieces, like encoding: the trainer counts words on every core, a piece per thread at a time,
    # and the pieces hold the same words as the texts.
    pieces = (piece for text in texts[::stride] for piece, _ in _pieces(text))
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    tokenizer.save(str(tokenizer_path))
    return encode_corpus(tokenizer, texts, dtype=token_dtype(vocab_size))


def encode_corpus(
    tokenizer: Tokenizer,
    texts: list[str],
    *,
    dtype: np.dtype,
    end_of_text_id: int | None = None,
    cut: re.Pattern[str] | None = _CUT,
) -> np.ndarray:
    """Each text's token ids followed by the end-of-text id, all texts in order, as one ``dtype`` array.

    The same stream as ``tokenizer.encode(text, add_special_tokens=False)`` text by text, built on every
    core: the texts, long ones cut into pieces, go to ``encode_batch_fast`` (fast: no character offsets,
    which nothing here needs) a batch at a time, and while its Rust threads encode one batch, outside the
    GIL, this thread copies the previous batch's ids out. No special tokens are added (a pretrained
    tokenizer's post-processor would begin every piece with BOS).

    Args:
        tokenizer: The tokenizer; a byte-level BPE that knows ``END_OF_TEXT`` unless ``end_of_text_id`` is given.
        texts: The corpus files' contents.
        dtype: The ids' dtype; an id it cannot hold raises OverflowError.
        end_of_text_id: The id after each text; None for ``END_OF_TEXT``'s, -1 for none.
        cut: Where a long text may be cut without changing a token (``_pieces``); None to encode texts whole.
    """
    if end_of_text_id is None:
        end_of_text_id = tokenizer.token_to_id(END_OF_TEXT)
        assert end_of_text_id is not None, f"the tokenizer has no {END_OF_TEXT}: pass end_of_text_id"
    end_of_text = np.array([end_of_text_id] if end_of_text_id >= 0 else [], dtype=dtype)
    batches = _batches(texts, cut=cut)
    stream: list[np.ndarray] = [np.array([], dtype=dtype)]

    def encode(batch: list[tuple[str, bool]]) -> list[Any]:
        return tokenizer.encode_batch_fast([piece for piece, _ in batch], add_special_tokens=False)

    with ThreadPoolExecutor(max_workers=1) as encoder:
        batch = next(batches, [])
        pending = encoder.submit(encode, batch)
        while batch:
            encodings = pending.result()
            next_batch = next(batches, [])
            if next_batch:
                pending = encoder.submit(encode, next_batch)
            for encoding, (_, ends_text) in zip(encodings, batch, strict=True):
                stream.append(np.array(encoding.ids, dtype=dtype))
                if ends_text:
                    stream.append(end_of_text)
            batch = next_batch
    return np.concatenate(stream)


class PretrainedTokenizer:
    """``data.tokenizer=pretrained``: the ``tokenizer.json`` of a ``save_pretrained`` directory, with what the
    directory says around it: the model's ``vocab_size`` (config.json) and the end-of-text token
    (tokenizer_config.json's ``eos_token``, else config.json's ``eos_token_id``, else GPT-2's ``<|endoftext|>``).

    Args:
        directory: ``data.tokenizer_dir``.
        key: the setting named in errors.
    """

    def __init__(self, directory: str, *, key: str = "data.tokenizer_dir") -> None:
        self.directory = Path(directory).expanduser()
        self.key = key
        self.path = self.directory / TOKENIZER_FILE
        if not self.path.is_file():
            raise UserError(
                f"{key}={directory}: no {TOKENIZER_FILE} there (data.tokenizer=pretrained tokenizes with "
                f"the one save_pretrained writes; or use data.tokenizer=bpe or bytes)"
            )
        self.model_config = self._json(MODEL_CONFIG_FILE)
        self.tokenizer_config = self._json(TOKENIZER_CONFIG_FILE)
        vocab_size = self.model_config.get("vocab_size")
        # The model's vocabulary, when the directory holds a model: every id must be below it.
        self.model_vocab_size = vocab_size if isinstance(vocab_size, int) and 0 < vocab_size <= MAX_VOCAB_SIZE else None

    def _json(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        return read_json_object(path, key=self.key) if path.is_file() else {}

    def fingerprint(self) -> dict[str, Any]:
        """What decides the token ids, for the cache key: the tokenizer file's content and the settings read."""
        return {
            "tokenizer_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "vocab_size": self.model_vocab_size,
            "eos_token": self.tokenizer_config.get("eos_token"),
            "eos_token_id": self.model_config.get("eos_token_id"),
        }

    def encode(self, texts: list[str], *, blank_line: str) -> tuple[np.ndarray, int, int | None, str]:
        """``encode_corpus``'s stream of the texts, the vocabulary its ids index, the end-of-text id (None
        without one) and what ends each text: the end-of-text token, or ``blank_line`` where there is none.

        Raises:
            UserError: tokenizers cannot read the file, or its ids go past the model's vocabulary.
        """
        tokenizer, vocab_size, end_of_text_id, cut = self._open()
        if end_of_text_id is None:
            texts = [text + blank_line for text in texts]
        stream = encode_corpus(
            tokenizer,
            texts,
            dtype=token_dtype(vocab_size),
            cut=cut,
            end_of_text_id=-1 if end_of_text_id is None else end_of_text_id,
        )
        separator = blank_line if end_of_text_id is None else tokenizer.id_to_token(end_of_text_id)
        assert separator is not None  # _end_of_text_id returns only ids the tokenizer has
        return stream, vocab_size, end_of_text_id, separator

    def _open(self) -> tuple[Tokenizer, int, int | None, re.Pattern[str] | None]:
        """The tokenizer, the vocabulary its ids index (every id below it), its end-of-text id (None without
        one), and where its texts may be cut."""
        text = self.path.read_text()
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
            raise UserError(
                f"{self.key}: {self.path} is not a tokenizer tokenizers can read ({first_line(exc)})"
            ) from None
        last_id = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        if self.model_vocab_size is not None and last_id >= self.model_vocab_size:
            raise UserError(
                f"{self.key}: {self.path} has ids up to {last_id}, past the model's vocab_size="
                f"{self.model_vocab_size} ({self.directory / MODEL_CONFIG_FILE}): not this model's "
                f"tokenizer"
            )
        if self.model_vocab_size is None and last_id >= MAX_VOCAB_SIZE:
            raise UserError(
                f"{self.key}: {self.path} has ids up to {last_id}, more than token files hold ({MAX_VOCAB_SIZE})"
            )
        spec = json.loads(text)
        marks_start = any(_mentions(spec.get(part), _MARKS_INPUT_START) for part in ("normalizer", "pre_tokenizer"))
        cut = None if marks_start else _PRETRAINED_CUT
        return tokenizer, self.model_vocab_size or last_id + 1, self._end_of_text_id(tokenizer), cut

    def _end_of_text_id(self, tokenizer: Tokenizer) -> int | None:
        eos = self.tokenizer_config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return tokenizer.token_to_id(eos)
        eos_id = self.model_config.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int) and tokenizer.id_to_token(eos_id) is not None:
            return eos_id
        return tokenizer.token_to_id(END_OF_TEXT)


def _mentions(node: Any, types: frozenset[str]) -> bool:
    """Whether a tokenizer.json node, or any node inside it, has one of these ``type``s."""
    if isinstance(node, dict):
        return node.get("type") in types or any(_mentions(value, types) for value in node.values())
    if isinstance(node, list):
        return any(_mentions(value, types) for value in node)
    return False


def _batches(texts: list[str], *, cut: re.Pattern[str] | None) -> Iterator[list[tuple[str, bool]]]:
    """The texts' pieces, each with whether it ends its text, in batches of about ``ENCODE_BATCH_CHARS``,
    made as they are needed (a piece is a copy of part of a text)."""
    batch: list[tuple[str, bool]] = []
    batch_chars = 0
    for text in texts:
        for piece, ends_text in _pieces(text, cut=cut):
            batch.append((piece, ends_text))
            batch_chars += len(piece)
            if batch_chars >= ENCODE_BATCH_CHARS:
                yield batch
                batch, batch_chars = [], 0
    if batch:
        yield batch


def _pieces(text: str, *, cut: re.Pattern[str] | None = _CUT) -> Iterator[tuple[str, bool]]:
    """``text`` cut into pieces of about ``PIECE_CHARS`` where ``cut`` matches (a cut that changes no token),
    each with whether it is the last; whole with no ``cut``."""
    start = 0
    while cut is not None and len(text) - start > PIECE_CHARS:
        found = cut.search(text, start + PIECE_CHARS)
        if found is None:
            break
        yield text[start : found.end()], False
        start = found.end()
    yield text[start:], True
