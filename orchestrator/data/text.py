"""data=text: local text files, tokenized once into cached token files (uint16 ids, uint32 past 65,536).

``prepare`` runs once in the driver: it finds the corpus, trains the tokenizer (bpe), opens a pretrained one
(``data.tokenizer_dir``'s tokenizer.json) or uses raw bytes, encodes the corpus and publishes
``<cache_dir>/text/<key>/`` with ``train.bin``, ``val.bin``, ``meta.json`` and the tokenizer's files (bpe's
``tokenizer.json``; a copy of a pretrained tokenizer's, for an export to ship). ``key`` hashes everything that
decides those bytes (the file list with sizes and mtimes, the tokenizer, a pretrained tokenizer file's content,
the split, the format version), so an edited corpus or tokenizer builds a new cache and an unchanged one is
reused in milliseconds. The cache is built under a temporary name and
renamed into place, so a killed or concurrent prepare never leaves a half-built cache under the key.

Tokenizing uses every core (``orchestrator.data.bpe``).

``load`` runs in every worker: it recomputes the key (one stat per file) and opens the token files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

import numpy as np

from orchestrator.config.paths import check_readable, expand_path
from orchestrator.config.schema import SampleKind, TextDataConfig, TokenizerKind
from orchestrator.data.base import DataBundle
from orchestrator.data.bpe import (
    END_OF_TEXT,
    PRETRAINED_TOKENIZER_FILES,
    TOKENIZER_FILE,
    PretrainedTokenizer,
    train_and_encode,
)
from orchestrator.data.spec import DataSpec
from orchestrator.data.tokens import (
    TokenDataset,
    count_tokens,
    recorded_dtype,
    require_windows,
    write_token_files,
)
from orchestrator.errors import UserError
from orchestrator.fsutil import fsync_path

# Bump when the bytes written for the same inputs change, so old caches are not trusted.
FORMAT_VERSION = 1
# The bytes tokenizer has no room for a special token (its 256 ids are the bytes), so a blank line
# marks where one file ends; so it does for a pretrained tokenizer without an end-of-text token.
BYTES_SEPARATOR = "\n\n"
# Installed packages sit inside the stdlib dir on many installs (and inside user projects, in
# virtualenvs); they are not the corpus anyone means.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages"})


def find_corpus_files(cfg: TextDataConfig) -> list[Path]:
    """The corpus files in sorted order, capped at ``data.max_bytes``.

    Folders are walked recursively for regular files with a suffix in ``data.suffixes``, skipping
    hidden folders and installed packages (site-packages, dist-packages); a file named directly is
    taken whatever its suffix. Empty ``data.paths`` means the standard library's own ``.py`` sources.

    Args:
        cfg: The text data config.
    """
    return _find_corpus(cfg)[0]


def _find_corpus(cfg: TextDataConfig) -> tuple[list[Path], list[Path]]:
    """``find_corpus_files(cfg)``, and the entries a folder walk left out because they are not regular
    files (a FIFO, which would block the read forever, a socket, a device, a broken link)."""
    files: set[Path] = set()
    skipped: list[Path] = []
    if cfg.paths:
        for entry in cfg.paths:
            path = expand_path(entry).absolute()
            check_readable(path, key=f"data.paths entry {entry!r}")
            if path.is_file():
                files.add(path)
            else:
                _walk(path, suffixes=cfg.suffixes, files=files, skipped=skipped)
        where = f"data.paths={list(cfg.paths)} with data.suffixes={list(cfg.suffixes)}"
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        _walk(stdlib, suffixes=[".py"], files=files, skipped=skipped)
        where = f"the standard library at {stdlib} (data.paths is empty)"
    if not files:
        raise UserError(f"no corpus files found in {where}: name files or folders that hold text")
    return _cap(sorted(files), max_bytes=cfg.max_bytes), sorted(skipped)


def _walk(root: Path, *, suffixes: list[str], files: set[Path], skipped: list[Path]) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
        for path in (Path(dirpath, name) for name in filenames if Path(name).suffix in suffixes):
            if path.is_file():
                files.add(path)
            else:
                skipped.append(path)


def _cap(files: list[Path], *, max_bytes: int) -> list[Path]:
    if not max_bytes:
        return files
    kept, total_bytes = [], 0
    for path in files:
        total_bytes += path.stat().st_size
        if total_bytes > max_bytes:
            break
        kept.append(path)
    if not kept:
        raise UserError(
            f"data.max_bytes={max_bytes} is smaller than the first corpus file {files[0]} "
            f"({files[0].stat().st_size} bytes): raise it, or 0 for no limit"
        )
    return kept


def cache_dir_for(cfg: TextDataConfig, files: list[Path]) -> Path:
    """``<data.cache_dir>/text/<key>``, ``key`` a hash of everything that decides the token files.

    Args:
        cfg: The text data config.
        files: ``find_corpus_files(cfg)``.
    """
    content = {
        "format_version": FORMAT_VERSION,
        "files": [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files],
        "tokenizer": cfg.tokenizer.value,
        "vocab_size": {TokenizerKind.bpe: cfg.vocab_size, TokenizerKind.bytes: 256}.get(cfg.tokenizer),
        "max_bytes": cfg.max_bytes,
        "val_fraction": cfg.val_fraction,
    }
    if cfg.tokenizer is TokenizerKind.pretrained:
        content["pretrained"] = pretrained_tokenizer(cfg).fingerprint()
    key = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:20]
    return expand_path(cfg.cache_dir) / "text" / key


def pretrained_tokenizer(cfg: TextDataConfig) -> PretrainedTokenizer:
    """``data.tokenizer_dir``'s tokenizer (``data.tokenizer=pretrained``); UserError when it has no tokenizer.json."""
    assert cfg.tokenizer_dir, "the schema requires data.tokenizer_dir with data.tokenizer=pretrained"
    return PretrainedTokenizer(cfg.tokenizer_dir, key=f"data.tokenizer_dir={cfg.tokenizer_dir}")


def prepare(cfg: TextDataConfig) -> DataSpec:
    """Build the token cache unless a complete one exists, and return the spec.

    The last ``data.val_fraction`` of the token stream is the val split, the rest train (nanoGPT's
    split: val is a contiguous tail, so no val window shares text with a train window).

    Args:
        cfg: The text data config.
    """
    files, skipped = _find_corpus(cfg)
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        named = ", ".join(str(path) for path in skipped[:3]) + more
        print(
            f"warning: data.paths: skipping {len(skipped)} corpus file(s) that are not regular files "
            f"(a FIFO, socket, device or broken link): {named}",
            file=sys.stderr,
            flush=True,
        )
    directory = cache_dir_for(cfg, files)
    meta = _read_complete(directory)
    if meta is None:
        _build(cfg, files=files, directory=directory)
        meta = _read_complete(directory)
        assert meta is not None, f"the cache just built at {directory} is incomplete"
    where = f"the corpus from data.paths ({meta['corpus']['num_files']} files, {meta['corpus']['num_bytes']} bytes)"
    require_windows(meta["train_tokens"], seq_len=cfg.seq_len, where=f"the train split of {where}")
    require_windows(meta["val_tokens"], seq_len=cfg.seq_len, where=f"the val split of {where}")
    return DataSpec(kind=SampleKind.tokens, vocab_size=meta["vocab_size"], seq_len=cfg.seq_len)


def load(cfg: TextDataConfig) -> DataBundle:
    """Open the token cache that ``prepare`` built (never trains or encodes).

    Args:
        cfg: The text data config.
    """
    directory = cache_dir_for(cfg, find_corpus_files(cfg))
    meta = _read_complete(directory)
    if meta is None:
        raise UserError(
            f"data.cache_dir: no token cache at {directory}; either the corpus (or a pretrained tokenizer) "
            f"changed since prepare_data ran or data.cache_dir is not shared with this worker's machine"
        )
    dtype = recorded_dtype(meta)
    return DataBundle(
        spec=DataSpec(kind=SampleKind.tokens, vocab_size=meta["vocab_size"], seq_len=cfg.seq_len),
        train=TokenDataset(directory / "train.bin", seq_len=cfg.seq_len, dtype=dtype),
        val=TokenDataset(directory / "val.bin", seq_len=cfg.seq_len, dtype=dtype),
    )


def _read_complete(directory: Path) -> dict | None:
    """The cache's meta.json if every file is there with the size it records, else None.

    Caches written before meta.json named a dtype hold uint16 ids, which is what no dtype means.
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
        dtype = recorded_dtype(meta)
        complete = all(
            count_tokens(directory / f"{s}.bin", dtype=dtype) == meta[f"{s}_tokens"] for s in ("train", "val")
        )
        if meta["tokenizer"] != TokenizerKind.bytes.value:
            complete = complete and (directory / TOKENIZER_FILE).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def _build(cfg: TextDataConfig, *, files: list[Path], directory: Path) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir()
    try:
        texts = [_read_text(path) for path in files]
        extra: dict = {}
        if cfg.tokenizer is TokenizerKind.bpe:
            stream = train_and_encode(texts, vocab_size=cfg.vocab_size, tokenizer_path=tmp / TOKENIZER_FILE)
            vocab_size, separator = cfg.vocab_size, END_OF_TEXT
        elif cfg.tokenizer is TokenizerKind.pretrained:
            pretrained = pretrained_tokenizer(cfg)
            stream, vocab_size, end_of_text_id, separator = pretrained.encode(texts, blank_line=BYTES_SEPARATOR)
            for name in PRETRAINED_TOKENIZER_FILES:  # the tokenizer that made these ids, for an export to ship
                if (pretrained.directory / name).is_file():
                    shutil.copyfile(pretrained.directory / name, tmp / name)
            extra = {"end_of_text_id": end_of_text_id, "tokenizer_dir": str(pretrained.directory)}
        else:
            stream = _byte_tokens(texts)
            vocab_size, separator = 256, BYTES_SEPARATOR
        num_val = int(len(stream) * cfg.val_fraction)
        corpus = {
            "paths": list(cfg.paths) or [sysconfig.get_paths()["stdlib"]],
            "num_files": len(files),
            "num_bytes": sum(path.stat().st_size for path in files),
            "separator": separator,
        }
        write_token_files(
            tmp,
            train=stream[: len(stream) - num_val],
            val=stream[len(stream) - num_val :],
            vocab_size=vocab_size,
            tokenizer=cfg.tokenizer.value,
            corpus=corpus,
            format_version=FORMAT_VERSION,
            **extra,
        )
        _publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_text(path: Path) -> str:
    try:
        # Bytes, not read_text: newline translation would make the cache differ from the files.
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"data.paths: cannot read {path} ({err.strerror})") from None


def _byte_tokens(texts: list[str]) -> np.ndarray:
    data = "".join(text + BYTES_SEPARATOR for text in texts).encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def _publish(tmp: Path, directory: Path) -> None:
    """Rename the finished ``tmp`` to ``directory``; if another prepare got there first, keep theirs."""
    for _ in range(3):
        try:
            os.rename(tmp, directory)
            fsync_path(directory.parent)
            return
        except OSError:
            # The name is taken: a concurrent prepare's complete cache (keep it), or a damaged one
            # (a disk fault, a hand edit), which is moved aside and replaced.
            if _read_complete(directory) is not None:
                return
            aside = directory.with_name(f".tmp-{directory.name}-{socket.gethostname()}-{os.getpid()}-old")
            try:
                os.rename(directory, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not publish the token cache at {directory}: it keeps being replaced")


def _remove_abandoned(directory: Path) -> None:
    """Delete temporary dirs of prepares on this machine that were killed before they finished."""
    pattern = re.compile(rf"\.tmp-{directory.name}-{re.escape(socket.gethostname())}-(\d+)(-old)?")
    for entry in directory.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _is_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process builds one cache at a time, so its own leftovers are abandoned
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
