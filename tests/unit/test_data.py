"""Data sources: what prepare_data caches, what load_data serves, and the errors a user sees."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config.schema import (
    DiabetesDataConfig,
    DigitsDataConfig,
    MemmapDataConfig,
    NpzDataConfig,
    SampleKind,
    SyntheticDataConfig,
    TargetKind,
    TextDataConfig,
    TokenizerKind,
)
from orchestrator.data import bpe, check_data_paths, load_data, prepare_data, text
from orchestrator.data.text import END_OF_TEXT, cache_dir_for, find_corpus_files
from orchestrator.data.tokens import token_dtype, write_token_files
from orchestrator.errors import UserError

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ text


def write_corpus(root: Path) -> dict[str, str]:
    """A small corpus of made-up Python and prose; returns the files it should find, by relative path."""
    files = {
        "a.py": "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300)),
        "notes/b.txt": "".join(f"line {i}: the quick brown fox jumps over {i % 13} lazy dogs\n" for i in range(300)),
        "notes/deep/c.md": "# Title\n\nSome *markdown* with unicode: caf\u00e9, \u00fcber, \u2603.\n" * 20,
    }
    skipped = {"image.bin": "not text", ".git/d.py": "x = 1\n", "venv/lib/site-packages/e.py": "y = 2\n"}
    for name, content in {**files, **skipped}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return files


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "corpus"
    return root, write_corpus(root)


def text_config(tmp_path: Path, root: Path, **overrides) -> TextDataConfig:
    values = dict(paths=[str(root)], cache_dir=str(tmp_path / "cache"), vocab_size=512, seq_len=32)
    return TextDataConfig(**{**values, **overrides})


def decode(cfg: TextDataConfig, tokens: np.ndarray, directory: Path) -> str:
    if cfg.tokenizer is TokenizerKind.bytes:
        return bytes(tokens.astype(np.uint8)).decode("utf-8")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).decode(tokens.tolist(), skip_special_tokens=False)


def test_corpus_discovery_walks_folders_filters_suffixes_and_skips_packages(tmp_path, corpus, monkeypatch):
    root, files = corpus
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = text_config(tmp_path, root, paths=["~/corpus", str(root / "image.bin")])
    found = find_corpus_files(cfg)
    # A file named directly is taken whatever its suffix; hidden folders and site-packages are not walked.
    assert [p.relative_to(root).as_posix() for p in found] == sorted([*files, "image.bin"])


@pytest.mark.timeout(120)  # opening the FIFO used to block prepare forever
def test_fifos_sockets_and_broken_links_in_a_corpus_folder_are_skipped_with_a_warning(
    tmp_path, corpus, monkeypatch, capfd
):
    root, files = corpus
    os.mkfifo(root / "notes" / "pipe.txt")
    (root / "gone.md").symlink_to(root / "nowhere.md")
    monkeypatch.chdir(root)  # a relative name: a socket's path has a length limit that tmp_path may exceed
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("server.py")
        cfg = text_config(tmp_path, root, tokenizer=TokenizerKind.bytes)
        spec = prepare_data(cfg)

        assert spec.vocab_size == 256
        warning = capfd.readouterr().err
        assert warning.startswith("warning: data.paths: skipping 3 corpus file(s) that are not regular files")
        assert all(str(root / name) in warning for name in ("notes/pipe.txt", "gone.md", "server.py"))
        assert [p.relative_to(root).as_posix() for p in find_corpus_files(cfg)] == sorted(files)
        assert len(load_data(cfg).train) > 0  # the workers' walk finds the same files, so the same cache


def test_a_fifo_named_as_the_corpus_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    cfg = text_config(tmp_path, tmp_path / "pipe.txt")
    for check in (check_data_paths, prepare_data):
        with pytest.raises(UserError, match=r"data\.paths entry .*pipe\.txt is not a regular file or a directory"):
            check(cfg)


def test_max_bytes_keeps_whole_files_in_sorted_order(tmp_path, corpus):
    root, files = corpus
    first_size = (root / "a.py").stat().st_size
    found = find_corpus_files(text_config(tmp_path, root, max_bytes=first_size + 10))
    assert [p.name for p in found] == ["a.py"]


def test_stdlib_is_the_default_corpus():
    found = find_corpus_files(TextDataConfig())
    names = {p.name for p in found}
    assert "os.py" in names and "functools.py" in names
    assert all(p.suffix == ".py" for p in found)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in found)
    assert found == sorted(found)


def test_stdlib_corpus_prepares_with_max_bytes(tmp_path):
    cfg = TextDataConfig(cache_dir=str(tmp_path), tokenizer=TokenizerKind.bytes, max_bytes=200_000, seq_len=64)
    spec = prepare_data(cfg)
    assert (spec.vocab_size, spec.seq_len) == (256, 64)
    meta = json.loads((cache_dir_for(cfg, find_corpus_files(cfg)) / "meta.json").read_text())
    assert 0 < meta["corpus"]["num_bytes"] <= 200_000


@pytest.mark.parametrize("tokenizer", [TokenizerKind.bytes, TokenizerKind.bpe])
def test_text_prepare_caches_and_round_trips(tmp_path, corpus, tokenizer):
    root, files = corpus
    cfg = text_config(tmp_path, root, tokenizer=tokenizer)
    spec = prepare_data(cfg)
    assert spec.kind is SampleKind.tokens and spec.seq_len == 32
    assert spec.vocab_size == (256 if tokenizer is TokenizerKind.bytes else 512)
    (directory,) = (tmp_path / "cache" / "text").iterdir()
    written = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    assert prepare_data(cfg) == spec  # from the cache: nothing below is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == written

    # The token stream decodes back to the corpus: files in sorted order, each followed by the separator.
    separator = END_OF_TEXT if tokenizer is TokenizerKind.bpe else "\n\n"
    text = "".join(files[name] + separator for name in sorted(files))
    train = np.fromfile(directory / "train.bin", dtype=np.uint16)
    val = np.fromfile(directory / "val.bin", dtype=np.uint16)
    assert decode(cfg, np.concatenate([train, val]), directory) == text
    val_text = decode(cfg, val, directory)
    assert text.endswith(val_text) and len(val_text) > 0
    assert len(val) == int((len(train) + len(val)) * cfg.val_fraction)

    bundle = load_data(cfg)
    assert bundle.spec == spec
    assert len(bundle.train) == (len(train) - 1) // 32 and len(bundle.val) == (len(val) - 1) // 32
    inputs, targets = bundle.val.get_batch(np.array([len(bundle.val) - 1]))
    assert decode(cfg, inputs[0].numpy(), directory) in val_text
    assert torch.equal(inputs[0, 1:], targets[0, :-1])


# Line ends and starts the pre-tokenizer treats differently: trailing spaces, CRLF, blank lines,
# indentation, contractions, digits, non-ASCII letters, the end-of-text marker written out in a file.
TRICKY_TEXT = "".join(
    f"def f{i}(x):  \n    return x*{i}\r\n's{i}\n\n\ncaf\u00e9\n\u00fcber {i}\t\nx\n y\n<|endoftext|>\n{i % 10}\n"
    for i in range(400)
)


def test_bpe_on_every_core_builds_the_cache_of_one_core_and_whole_files(tmp_path, corpus, monkeypatch):
    root, files = corpus
    (root / "tricky.txt").write_text(TRICKY_TEXT, encoding="utf-8")
    (root / "long_line.txt").write_text("word " * 2000, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    monkeypatch.setattr(bpe, "ENCODE_BATCH_CHARS", 2000)  # dozens of batches, crossing files
    caches = {}
    # tokenizers' thread pool on both cores, then on one; files cut at hundreds of places, then whole.
    for parallelism, piece_chars in (("true", 50), ("false", 50), ("true", 10**9)):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
        monkeypatch.setattr(bpe, "PIECE_CHARS", piece_chars)
        cfg = text_config(tmp_path, root, cache_dir=str(tmp_path / f"{parallelism}-{piece_chars}"))
        prepare_data(cfg)
        directory = cache_dir_for(cfg, find_corpus_files(cfg))
        caches[parallelism, piece_chars] = {
            name: (directory / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")
        }
    parallel = caches["true", 50]
    assert caches["false", 50] == parallel and caches["true", 10**9] == parallel

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(parallel["tokenizer.json"].decode())
    whole = [
        tokenizer.encode(path.read_bytes().decode("utf-8")).ids + [tokenizer.token_to_id(END_OF_TEXT)]
        for path in find_corpus_files(cfg)
    ]
    assert parallel["train.bin"] + parallel["val.bin"] == np.concatenate(whole).astype(np.uint16).tobytes()


def test_the_stdlib_cut_into_pieces_encodes_as_each_file_whole(tmp_path, monkeypatch):
    cfg = TextDataConfig(cache_dir=str(tmp_path), max_bytes=300_000, vocab_size=1024)
    prepare_data(cfg)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(cache_dir_for(cfg, find_corpus_files(cfg)) / "tokenizer.json"))
    texts = [path.read_bytes().decode("utf-8", errors="replace") for path in find_corpus_files(cfg)]
    monkeypatch.setattr(bpe, "PIECE_CHARS", 100)
    assert sum(len(list(bpe._pieces(text))) for text in texts) > 500
    whole = [tokenizer.encode(text).ids + [tokenizer.token_to_id(END_OF_TEXT)] for text in texts]
    assert bpe.encode_corpus(tokenizer, texts, dtype=np.dtype(np.uint16)).tolist() == sum(whole, [])


def test_a_vocabulary_past_65536_ids_is_encoded_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A made-up word-level vocabulary as large as Llama 3's: training a BPE that large takes minutes.
    vocab_size = 128_256
    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, END_OF_TEXT: vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = ["w65535 w65536 w100000\nw3", "w128253 w7"]

    dtype = token_dtype(vocab_size)
    stream = bpe.encode_corpus(tokenizer, texts, dtype=dtype)
    assert stream.dtype == np.uint32
    assert stream.tolist() == [65_535, 65_536, 100_000, 3, 128_255, 128_253, 7, 128_255]
    with pytest.raises(OverflowError):  # never wrapped into uint16
        bpe.encode_corpus(tokenizer, texts, dtype=np.dtype(np.uint16))
    write_token_files(tmp_path, train=stream, val=stream, vocab_size=vocab_size)
    assert np.array_equal(np.fromfile(tmp_path / "train.bin", dtype=np.uint32), stream)


def test_a_cache_written_before_meta_json_named_its_dtype_is_read_as_uint16(tmp_path, corpus):
    root, _ = corpus
    cfg = text_config(tmp_path, root, tokenizer=TokenizerKind.bytes)
    prepare_data(cfg)
    directory = cache_dir_for(cfg, find_corpus_files(cfg))
    meta = json.loads((directory / "meta.json").read_text())
    assert meta.pop("dtype") == "uint16"
    (directory / "meta.json").write_text(json.dumps(meta))
    written = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    prepare_data(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == written  # reused, not rebuilt
    train = np.fromfile(directory / "train.bin", dtype=np.uint16)
    assert load_data(cfg).train.get_batch(np.array([0]))[0][0].tolist() == train[:32].tolist()


def test_changed_corpus_builds_a_new_cache(tmp_path, corpus):
    root, _ = corpus
    cfg = text_config(tmp_path, root, tokenizer=TokenizerKind.bytes)
    prepare_data(cfg)
    (root / "new.txt").write_text("more text\n" * 10)
    prepare_data(cfg)
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2


def test_killed_prepare_leftovers_are_not_trusted(tmp_path, corpus):
    root, _ = corpus
    cfg = text_config(tmp_path, root, tokenizer=TokenizerKind.bytes)
    directory = cache_dir_for(cfg, find_corpus_files(cfg))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A prepare killed mid-build leaves its temporary dir: half a train.bin, no meta.json.
    stray = directory.with_name(f".tmp-{directory.name}-{socket.gethostname()}-{dead.pid}")
    stray.mkdir(parents=True)
    (stray / "train.bin").write_bytes(b"\0" * 100)
    # And a cache dir under the key that is damaged (here: truncated) must be rebuilt, not served.
    directory.mkdir()
    (directory / "train.bin").write_bytes(b"\0" * 100)
    (directory / "val.bin").write_bytes(b"\0" * 100)
    (directory / "meta.json").write_text(json.dumps({"vocab_size": 256, "train_tokens": 9999, "val_tokens": 50}))

    prepare_data(cfg)
    assert not stray.exists()
    meta = json.loads((directory / "meta.json").read_text())
    assert (directory / "train.bin").stat().st_size == 2 * meta["train_tokens"] > 100
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]


# Prepares the corpus at argv[1] into the cache at argv[2] with tokenizer argv[3], in a separate process.
PREPARE_SCRIPT = (
    "import sys; from orchestrator.config.schema import TextDataConfig, TokenizerKind; "
    "from orchestrator.data import prepare_data; "
    "print(prepare_data(TextDataConfig(paths=[sys.argv[1]], cache_dir=sys.argv[2], "
    "tokenizer=TokenizerKind(sys.argv[3]), vocab_size=512, seq_len=32)))"
)


def run_prepare(cfg: TextDataConfig, **popen_args) -> subprocess.Popen:
    command = [sys.executable, "-c", PREPARE_SCRIPT, cfg.paths[0], cfg.cache_dir, cfg.tokenizer.value]
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, **popen_args)


def test_concurrent_prepares_publish_one_valid_cache(tmp_path, corpus):
    root, _ = corpus
    cfg = text_config(tmp_path, root)
    procs = [run_prepare(cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    (directory,) = (tmp_path / "cache" / "text").iterdir()  # no temporary dirs left behind
    assert directory == cache_dir_for(cfg, find_corpus_files(cfg))
    assert len(load_data(cfg).train) > 0


def test_prepare_that_loses_the_race_keeps_the_published_cache(tmp_path, corpus, monkeypatch):
    root, _ = corpus
    cfg = text_config(tmp_path, root, tokenizer=TokenizerKind.bytes)
    published = {}
    encode = text._byte_tokens

    def encode_while_another_prepare_publishes(texts):
        assert run_prepare(cfg).wait(timeout=120) == 0
        directory = cache_dir_for(cfg, find_corpus_files(cfg))
        published.update({p.name: p.stat().st_ino for p in directory.iterdir()})
        return encode(texts)

    monkeypatch.setattr(text, "_byte_tokens", encode_while_another_prepare_publishes)
    spec = prepare_data(cfg)
    (directory,) = (tmp_path / "cache" / "text").iterdir()
    assert {p.name: p.stat().st_ino for p in directory.iterdir()} == published
    assert load_data(cfg).spec == spec


def test_text_errors_name_the_key(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(UserError, match=r"data\.paths entry .*does not exist"):
        prepare_data(text_config(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"data\.paths entry"):
        check_data_paths(text_config(tmp_path, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no corpus files found in data\.paths"):
        prepare_data(text_config(tmp_path, tmp_path / "empty"))
    with pytest.raises(UserError, match=r"data\.seq_len=100000 needs at least 100001 tokens"):
        prepare_data(text_config(tmp_path, root, tokenizer=TokenizerKind.bytes, seq_len=100_000))
    with pytest.raises(UserError, match=r"data\.max_bytes=10 is smaller than the first corpus file"):
        prepare_data(text_config(tmp_path, root, max_bytes=10))


def test_check_data_paths_is_light():
    code = (
        "import sys, orchestrator.config.paths; "
        "heavy = {'torch', 'numpy', 'tokenizers', 'sklearn'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


# ---------------------------------------------------------------------------------------------- memmap


def test_memmap_windows_have_targets_shifted_by_one(tmp_path):
    write_token_files(tmp_path, train=np.arange(100) % 50, val=np.arange(40), vocab_size=50, source="test")
    cfg = MemmapDataConfig(path=str(tmp_path), seq_len=8)
    check_data_paths(cfg)
    spec = prepare_data(cfg)
    assert (spec.vocab_size, spec.seq_len, spec.tokens_per_sample) == (50, 8, 8)
    assert json.loads((tmp_path / "meta.json").read_text())["source"] == "test"
    bundle = load_data(cfg)
    assert len(bundle.train) == 99 // 8 and len(bundle.val) == 39 // 8
    inputs, targets = bundle.train.get_batch(np.array([0, 2]))
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (2, 8)
    assert inputs.tolist() == [list(range(0, 8)), list(range(16, 24))]
    assert targets.tolist() == [list(range(1, 9)), list(range(17, 25))]


def test_memmap_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"data\.path: .* does not exist"):
        check_data_paths(MemmapDataConfig(path=str(tmp_path / "nowhere")))
    write_token_files(tmp_path, train=np.arange(100), val=np.arange(10), vocab_size=100)
    with pytest.raises(UserError, match=r"data\.seq_len=16 needs at least 17 tokens"):
        prepare_data(MemmapDataConfig(path=str(tmp_path), seq_len=16))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50}))
    with pytest.raises(
        UserError,
        match=r"data\.path: .*train\.bin holds token id 50 at position 50 \(counting "
        r"tokens from 0\), not below vocab_size=50 from meta\.json",
    ):
        prepare_data(MemmapDataConfig(path=str(tmp_path), seq_len=4))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 2**32 + 1, "dtype": "uint32"}))
    with pytest.raises(UserError, match=r"vocab_size in \[1, 4294967296\]"):
        prepare_data(MemmapDataConfig(path=str(tmp_path), seq_len=4))
    with pytest.raises(ValueError, match="uint32"):
        write_token_files(tmp_path, train=np.arange(10), val=np.arange(10), vocab_size=2**32 + 1)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_ids_are_checked_in_full_chunk_by_chunk(tmp_path, monkeypatch, dtype):
    from orchestrator.data import memmap

    monkeypatch.setattr(memmap, "_CHUNK_TOKENS", 1 << 20)
    vocab_size = 1000 if dtype == "uint16" else 128_256
    # 3 Mi tokens, one bad id past the first 2 Mi (the old check read only the first and last 1 Mi).
    train = np.arange(3 << 20) % vocab_size
    train[(2 << 20) + 12345] = vocab_size
    (tmp_path / "train.bin").write_bytes(train.astype(dtype).tobytes())
    (tmp_path / "val.bin").write_bytes(np.arange(100).astype(dtype).tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": dtype}))
    with pytest.raises(UserError) as raised:
        prepare_data(MemmapDataConfig(path=str(tmp_path), seq_len=8))
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "train.bin") in message
    assert f"token id {vocab_size} at position {(2 << 20) + 12345}" in message and f"vocab_size={vocab_size}" in message

    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab_size + 1, "dtype": dtype}))
    assert prepare_data(MemmapDataConfig(path=str(tmp_path), seq_len=8)).vocab_size == vocab_size + 1


def test_token_files_hold_uint16_ids_up_to_65536_and_uint32_past(tmp_path):
    for vocab_size, dtype in ((65_536, np.uint16), (65_537, np.uint32)):
        ids = np.array([0, 1, 65_535, vocab_size - 1] * 10)
        write_token_files(tmp_path / str(vocab_size), train=ids, val=ids, vocab_size=vocab_size)
        assert json.loads((tmp_path / str(vocab_size) / "meta.json").read_text())["dtype"] == np.dtype(dtype).name
        assert np.array_equal(np.fromfile(tmp_path / str(vocab_size) / "train.bin", dtype=dtype), ids)


def test_memmap_serves_uint32_ids_past_65535_intact(tmp_path):
    # Llama 3's vocabulary: ids up to 128,255, which uint16 would wrap (128,255 -> 62,719).
    seq_len, vocab_size = 4, 128_256
    train = np.array([65_535, 65_536, 100_000, 128_255, 7, 70_000, 1, 99_999, 65_537, 128_000, 3, 5, 2])
    train.astype(np.uint32).tofile(tmp_path / "train.bin")
    train[::-1].astype(np.uint32).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": "uint32"}))
    cfg = MemmapDataConfig(path=str(tmp_path), seq_len=seq_len)

    assert prepare_data(cfg).vocab_size == vocab_size
    bundle = load_data(cfg)
    assert len(bundle.train) == (len(train) - 1) // seq_len
    inputs, targets = bundle.train.get_batch(np.arange(len(bundle.train)))
    windows = [train[i * seq_len : i * seq_len + seq_len + 1] for i in range(len(bundle.train))]
    assert inputs.tolist() == [list(w[:-1]) for w in windows] and targets.tolist() == [list(w[1:]) for w in windows]
    inputs, _ = bundle.val.get_batch(np.array([0]))
    assert inputs[0].tolist() == list(train[::-1][:seq_len])


def test_memmap_dtype_comes_from_meta_json_and_defaults_to_uint16(tmp_path):
    cfg = MemmapDataConfig(path=str(tmp_path), seq_len=4)
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50}))  # nanoGPT's meta.json: no dtype
    assert prepare_data(cfg).vocab_size == 50
    assert load_data(cfg).train.get_batch(np.array([1]))[0].tolist() == [[4, 5, 6, 7]]

    meta = tmp_path / "meta.json"
    named = rf"^data\.path: {re.escape(str(meta))}"
    for content, error in [
        (
            {"vocab_size": 50, "dtype": "int64"},
            rf"{named} has dtype 'int64'; allowed: uint16, uint32 \(none means "
            rf"uint16\)$",
        ),
        (
            {"vocab_size": 128_256},
            rf"{named} has vocab_size=128256 and no dtype, which means uint16, too narrow for "
            rf"ids past 65535: add \"dtype\": \"uint32\" if",
        ),
        (
            {"vocab_size": 50, "dtype": "uint32"},
            r"^data\.path: .*train\.bin has 42 bytes, not a whole number of "
            r"uint32 tokens",
        ),
    ]:
        meta.write_text(json.dumps(content))
        (tmp_path / "train.bin").write_bytes(b"\0" * (42 if content.get("dtype") == "uint32" else 40))
        with pytest.raises(UserError, match=error) as raised:
            prepare_data(cfg)
        assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------- images


def test_digits_are_normalized_and_split_independently_of_the_seed():
    cfg = DigitsDataConfig()
    spec = prepare_data(cfg)
    assert (spec.kind, spec.input_shape, spec.num_classes) == (SampleKind.images, (1, 8, 8), 10)
    first, second = load_data(cfg), load_data(cfg)
    assert len(first.train) + len(first.val) == 1797 and len(first.val) == round(1797 * 0.2)
    train_inputs, _ = first.train.get_batch(np.arange(len(first.train)))
    assert abs(train_inputs.mean().item()) < 1e-4 and abs(train_inputs.std().item() - 1) < 1e-2
    inputs, labels = first.val.get_batch(np.array([0, 1, 2]))
    assert inputs.shape == (3, 1, 8, 8) and inputs.dtype == torch.float32 and labels.dtype == torch.int64
    all_ids = np.arange(len(first.val))
    assert all(torch.equal(a, b) for a, b in zip(first.val.get_batch(all_ids), second.val.get_batch(all_ids)))


def test_npz_round_trip(tmp_path):
    num_samples = 50
    inputs = np.random.default_rng(0).normal(size=(num_samples, 3))
    inputs[:, 0] = np.arange(num_samples)  # a sample id, to match rows after the split
    labels = np.arange(num_samples) % 4
    np.savez(tmp_path / "d.npz", features=inputs, classes=labels)
    cfg = NpzDataConfig(path=str(tmp_path / "d.npz"), x_key="features", y_key="classes")
    spec = prepare_data(cfg)
    assert (spec.input_shape, spec.num_classes) == ((3,), 4)
    bundle = load_data(cfg)
    assert len(bundle.val) == 5
    rows, classes = [], []
    for split in (bundle.train, bundle.val):
        x, y = split.get_batch(np.arange(len(split)))
        rows.append(x), classes.append(y)
    x, y = torch.cat(rows), torch.cat(classes)
    ids = x[:, 0].long()
    assert sorted(ids.tolist()) == list(range(num_samples))
    assert torch.allclose(x, torch.from_numpy(inputs[ids.numpy()]).float()) and torch.equal(y, ids % 4)


def test_npz_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"data\.path: .* does not exist"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "nowhere.npz")))
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2)), labels=np.zeros(10, dtype=int))
    with pytest.raises(UserError, match=r"data\.y_key='y': .* has no such array; it holds \['labels', 'x'\]"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "d.npz")))
    np.savez(tmp_path / "e.npz", x=np.zeros((10, 2)), y=np.zeros(9, dtype=int))
    with pytest.raises(UserError, match=r"data\.y_key='y': .* shaped \(N,\) with N=10"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "e.npz")))


def test_npz_float_targets_for_regression_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(40, 5)).astype(np.float32)
    np.savez(tmp_path / "r.npz", x=inputs, y=inputs.sum(axis=1), multi=rng.integers(0, 2, size=(40, 3)) * 1.0)
    spec = prepare_data(NpzDataConfig(path=str(tmp_path / "r.npz"), targets=TargetKind.values))
    assert (spec.targets, spec.target_dim, spec.num_classes, spec.num_outputs) == (TargetKind.values, 1, None, 1)
    bundle = load_data(NpzDataConfig(path=str(tmp_path / "r.npz"), targets=TargetKind.values))
    x, y = bundle.train.get_batch(np.arange(3))
    assert y.shape == (3, 1) and y.dtype == torch.float32 and torch.allclose(y[:, 0], x.sum(dim=1), atol=1e-5)

    labels = NpzDataConfig(path=str(tmp_path / "r.npz"), y_key="multi", targets=TargetKind.probabilities)
    assert prepare_data(labels).target_dim == 3
    assert load_data(labels).val.get_batch(np.arange(2))[1].shape == (2, 3)


def test_npz_targets_must_be_what_data_targets_says(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((10, 2)), y=np.linspace(-2, 2, 10), bad=np.array([np.nan] * 10))
    with pytest.raises(
        UserError,
        match=r"data\.y_key='y': .* must be integers .* got float64 \(10,\); float targets "
        r"need data\.targets=values",
    ):
        prepare_data(NpzDataConfig(path=str(tmp_path / "f.npz")))
    with pytest.raises(UserError, match=r"data\.targets=probabilities needs targets in \[0, 1\], .* \[-2, 2\]"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "f.npz"), targets=TargetKind.probabilities))
    with pytest.raises(UserError, match=r"data\.y_key='bad': .* holds NaN or infinite targets"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "f.npz"), y_key="bad", targets=TargetKind.values))
    np.savez(tmp_path / "g.npz", x=np.zeros((10, 2)), y=np.zeros((10, 2, 2)))
    with pytest.raises(UserError, match=r"with data\.targets=values .* shaped \(N,\) or \(N, k\) with N=10"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "g.npz"), targets=TargetKind.values))


def test_diabetes_is_standardized_on_the_train_split():
    cfg = DiabetesDataConfig()
    spec = prepare_data(cfg)
    assert (spec.kind, spec.input_shape) == (SampleKind.images, (10,))
    assert (spec.targets, spec.target_dim) == (TargetKind.values, 1)
    bundle = load_data(cfg)
    assert len(bundle.train) + len(bundle.val) == 442 and len(bundle.val) == 88
    x, y = bundle.train.get_batch(np.arange(len(bundle.train)))
    assert x.shape == (354, 10) and y.shape == (354, 1) and y.dtype == torch.float32
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5) and torch.allclose(x.std(0), torch.ones(10), atol=1e-2)
    assert abs(y.mean().item()) < 1e-5 and abs(y.std().item() - 1) < 1e-2
    assert bundle.augment is None


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_tokens_are_deterministic_per_sample():
    cfg = SyntheticDataConfig(num_samples=10**12, seq_len=16, vocab_size=100)  # lazy: no memory per sample
    spec = prepare_data(cfg)
    assert (spec.kind, spec.vocab_size, spec.seq_len) == (SampleKind.tokens, 100, 16)
    bundle, again = load_data(cfg), load_data(cfg)
    inputs, targets = bundle.train.get_batch(np.array([5, 10**12 - 1]))
    assert inputs.shape == targets.shape == (2, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and 0 <= inputs.min() and inputs.max() < 100
    # The same sample whichever batch, rank or run asks for it.
    assert torch.equal(again.train.get_batch(np.array([10**12 - 1]))[0][0], inputs[1])
    assert not torch.equal(bundle.val.get_batch(np.array([5]))[0][0], inputs[0])
    assert len(bundle.val) == 256


def test_synthetic_images():
    cfg = SyntheticDataConfig(kind=SampleKind.images, num_samples=100, image_shape=[3, 4, 5], num_classes=7)
    spec = prepare_data(cfg)
    assert (spec.kind, spec.input_shape, spec.num_classes) == (SampleKind.images, (3, 4, 5), 7)
    bundle = load_data(cfg)
    images, labels = bundle.train.get_batch(np.arange(100))
    assert images.shape == (100, 3, 4, 5) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 7 and len(labels.unique()) > 1
    assert torch.equal(load_data(cfg).train.get_batch(np.arange(100))[0], images)
    assert len(bundle.val) == 100
