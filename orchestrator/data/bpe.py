"""The corpus's byte-level BPE: trained on the corpus, then encoding it on every core.

Training and ``encode_batch_fast`` run on tokenizers' Rust thread pool, one thread per core
(``TOKENIZERS_PARALLELISM=false`` keeps them to one). Both take the corpus in pieces, a long file cut
where a cut changes no token, so a corpus of one big file is spread over the cores as well as one of
many small files. The tokenizer and the token stream are the ones that training on and encoding each
file whole would give.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from orchestrator.data.tokens import token_dtype

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


def encode_corpus(tokenizer: Tokenizer, texts: list[str], *, dtype: np.dtype) -> np.ndarray:
    """Each text's token ids followed by the end-of-text id, all texts in order, as one ``dtype`` array.

    The same stream as ``tokenizer.encode(text)`` text by text, built on every core: the texts, long
    ones cut into pieces, go to ``encode_batch_fast`` (fast: no character offsets, which nothing here
    needs) a batch at a time, and while its Rust threads encode one batch, outside the GIL, this thread
    copies the previous batch's ids out.

    Args:
        tokenizer: A byte-level BPE tokenizer that knows ``END_OF_TEXT``.
        texts: The corpus files' contents.
        dtype: The ids' dtype; an id it cannot hold raises OverflowError.
    """
    end_of_text = np.array([tokenizer.token_to_id(END_OF_TEXT)], dtype=dtype)
    batches = _batches(texts)
    stream: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=1) as encoder:
        batch = next(batches)
        pending = encoder.submit(tokenizer.encode_batch_fast, [piece for piece, _ in batch])
        while batch:
            encodings = pending.result()
            next_batch = next(batches, [])
            if next_batch:
                pending = encoder.submit(tokenizer.encode_batch_fast, [piece for piece, _ in next_batch])
            for encoding, (_, ends_text) in zip(encodings, batch, strict=True):
                stream.append(np.array(encoding.ids, dtype=dtype))
                if ends_text:
                    stream.append(end_of_text)
            batch = next_batch
    return np.concatenate(stream)


def _batches(texts: list[str]) -> Iterator[list[tuple[str, bool]]]:
    """The texts' pieces, each with whether it ends its text, in batches of about ``ENCODE_BATCH_CHARS``,
    made as they are needed (a piece is a copy of part of a text)."""
    batch: list[tuple[str, bool]] = []
    batch_chars = 0
    for text in texts:
        for piece, ends_text in _pieces(text):
            batch.append((piece, ends_text))
            batch_chars += len(piece)
            if batch_chars >= ENCODE_BATCH_CHARS:
                yield batch
                batch, batch_chars = [], 0
    if batch:
        yield batch


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """``text`` cut into pieces of about ``PIECE_CHARS`` where a cut changes no token, each with whether
    it is the last."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        yield text[start : cut.end()], False
        start = cut.end()
    yield text[start:], True
