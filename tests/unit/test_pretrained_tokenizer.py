"""data.tokenizer=pretrained: a text corpus tokenized with a save_pretrained directory's tokenizer.json, which
data=text takes from model.pretrained when it has one. Tokenizers are made here with the tokenizers library, since
nothing can be downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import TextDataConfig, TokenizerKind
from orchestrator.data import bpe, load_data, prepare_data
from orchestrator.data.text import cache_dir_for, find_corpus_files
from orchestrator.errors import UserError
from orchestrator.export.tokenizer import find_tokenizer
from tests.unit.test_data import write_corpus

# Llama 3's pre-tokenizer: tiktoken's regex, then bytes. It keeps punctuation and the line breaks after it together.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _trained(pre_tokenizer, *, texts: list[str], normalizer=None) -> Tokenizer:
    """A small BPE with BOS/EOS specials, trained on ``texts``, that adds BOS to every input it encodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer


def llama3_like(texts: list[str]) -> Tokenizer:
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
    return _trained(
        pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), texts=texts
    )


def save_pretrained(
    directory: Path, tokenizer: Tokenizer, *, eos_token: str | None = "</s>", model: dict | None = None
) -> Path:
    """``tokenizer`` as save_pretrained leaves it: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    and the model's config.json when ``model`` is given."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **({"eos_token": eos_token} if eos_token else {})}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos_token} if eos_token else {}))
    if model is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": "llama", **model}))
    return directory


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write_corpus(root)
    return root


def _texts(cfg: TextDataConfig) -> list[str]:
    return [path.read_bytes().decode("utf-8") for path in find_corpus_files(cfg)]


def _stream(cfg: TextDataConfig) -> list[int]:
    directory = cache_dir_for(cfg, find_corpus_files(cfg))
    dtype = json.loads((directory / "meta.json").read_text())["dtype"]
    return np.concatenate([np.fromfile(directory / f"{split}.bin", dtype=dtype) for split in ("train", "val")]).tolist()


def _config(tmp_path: Path, corpus: Path, directory: Path) -> TextDataConfig:
    return TextDataConfig(
        paths=[str(corpus)],
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
        tokenizer=TokenizerKind.pretrained,
        tokenizer_dir=str(directory),
    )


def test_data_text_takes_model_pretrained_tokenizer_unless_told_otherwise(tmp_path: Path, corpus: Path) -> None:
    with_tokenizer = save_pretrained(tmp_path / "model", llama3_like(["some text"]), model={"vocab_size": 1000})
    without = tmp_path / "bare"
    without.mkdir()
    common = ["model=hf", "data=text", f"data.paths=[{corpus}]"]

    data = to_config(compose([*common, f"model.pretrained={with_tokenizer}"])).data
    assert (data.tokenizer, data.tokenizer_dir) == (TokenizerKind.pretrained, str(with_tokenizer))
    for kind in ("bytes", "bpe"):  # the user's choice stands
        assert to_config(
            compose([*common, f"model.pretrained={with_tokenizer}", f"data.tokenizer={kind}"])
        ).data.tokenizer is TokenizerKind(kind)
    assert to_config(compose([*common, f"model.pretrained={without}"])).data.tokenizer is TokenizerKind.bpe
    assert to_config(compose(["model=gpt", "data=text", f"data.paths=[{corpus}]"])).data.tokenizer is TokenizerKind.bpe
    # Any model can train on another directory's tokenizer.
    other = ["model=gpt", "data=text", f"data.paths=[{corpus}]", f"data.tokenizer_dir={with_tokenizer}"]
    data = to_config(compose(other)).data
    assert (data.tokenizer, data.tokenizer_dir) == (TokenizerKind.pretrained, str(with_tokenizer))


def test_the_corpus_is_each_text_encoded_whole_and_ended_by_eos(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, corpus, tmp_path / "model")
    tokenizer = llama3_like(_texts(cfg))
    save_pretrained(tmp_path / "model", tokenizer, model={"vocab_size": 1000})
    # Long texts cut into hundreds of pieces, encoded dozens of batches at a time.
    monkeypatch.setattr(bpe, "PIECE_CHARS", 40)
    monkeypatch.setattr(bpe, "ENCODE_BATCH_CHARS", 2000)
    spec = prepare_data(cfg)

    eos = tokenizer.token_to_id("</s>")
    assert tokenizer.encode("x").ids[0] == tokenizer.token_to_id("<s>")  # its BOS is never added to the corpus
    whole = [tokenizer.encode(text, add_special_tokens=False).ids + [eos] for text in _texts(cfg)]
    assert _stream(cfg) == sum(whole, [])
    assert spec.vocab_size == load_data(cfg).spec.vocab_size == 1000  # the model's, not the tokenizer's 600
    directory = cache_dir_for(cfg, find_corpus_files(cfg))
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["tokenizer"], meta["end_of_text_id"], meta["corpus"]["separator"]) == ("pretrained", eos, "</s>")
    # BPE's cuts would not do here: this pre-tokenizer keeps "):\n" together, which a cut before "\n" splits.
    pieces = ["def f(x):", "\n    return x\n"]
    assert tokenizer.encode("".join(pieces), add_special_tokens=False).ids != sum(
        (tokenizer.encode(piece, add_special_tokens=False).ids for piece in pieces), []
    )


def test_a_tokenizer_that_marks_where_its_input_starts_gets_whole_texts(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama 2's normalizer puts "▁" before every input: a text cut before a space would get two."""
    cfg = _config(tmp_path, corpus, tmp_path / "model")
    llama2 = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer = _trained(None, texts=_texts(cfg), normalizer=llama2)
    save_pretrained(tmp_path / "model", tokenizer)
    monkeypatch.setattr(bpe, "PIECE_CHARS", 40)
    prepare_data(cfg)
    whole = [
        tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.token_to_id("</s>")] for text in _texts(cfg)
    ]
    assert _stream(cfg) == sum(whole, [])
    pieces = [piece for text in _texts(cfg) for piece, _ in bpe._pieces(text, cut=bpe._PRETRAINED_CUT)]
    assert len(pieces) > 100 and sum((tokenizer.encode(p, add_special_tokens=False).ids for p in pieces), []) != sum(
        (ids[:-1] for ids in whole), []
    )


def test_a_128k_vocabulary_is_stored_as_uint32(tmp_path: Path, corpus: Path) -> None:
    vocab_size = 128_256
    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, "<|end_of_text|>": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|end_of_text|>"])
    words = " ".join(f"w{i}" for i in range(0, vocab_size - 2, 1009))
    (corpus / "words.txt").write_text(f"{words}\n" * 20)
    save_pretrained(tmp_path / "model", tokenizer, eos_token="<|end_of_text|>", model={"vocab_size": vocab_size})
    cfg = _config(tmp_path, corpus / "words.txt", tmp_path / "model")
    assert prepare_data(cfg).vocab_size == vocab_size
    assert json.loads((cache_dir_for(cfg, find_corpus_files(cfg)) / "meta.json").read_text())["dtype"] == "uint32"
    assert _stream(cfg) == tokenizer.encode(f"{words}\n" * 20).ids + [vocab_size - 1]
    assert max(_stream(cfg)[:-1]) == 127 * 1009 > 65_535  # kept whole, not wrapped into 16 bits


def test_without_an_end_of_text_token_texts_end_with_a_blank_line(tmp_path: Path, corpus: Path) -> None:
    cfg = _config(tmp_path, corpus, tmp_path / "model")
    tokenizer = llama3_like(_texts(cfg))
    save_pretrained(tmp_path / "model", tokenizer, eos_token=None)
    prepare_data(cfg)
    meta = json.loads((cache_dir_for(cfg, find_corpus_files(cfg)) / "meta.json").read_text())
    # No eos_token in tokenizer_config.json, no config.json: "</s>" is a special token, but nothing says it ends texts.
    assert meta["end_of_text_id"] is None and meta["corpus"]["separator"] == "\n\n"
    assert meta["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    whole = [tokenizer.encode(text + "\n\n", add_special_tokens=False).ids for text in _texts(cfg)]
    assert _stream(cfg) == sum(whole, [])


def test_a_different_tokenizer_never_reuses_token_files(tmp_path: Path, corpus: Path) -> None:
    cfg = _config(tmp_path, corpus, tmp_path / "model")
    save_pretrained(tmp_path / "model", llama3_like(_texts(cfg)))
    prepare_data(cfg)
    first = cache_dir_for(cfg, find_corpus_files(cfg))
    save_pretrained(tmp_path / "model", llama3_like(_texts(cfg)))  # the same bytes again
    assert cache_dir_for(cfg, find_corpus_files(cfg)) == first
    save_pretrained(tmp_path / "model", llama3_like(_texts(cfg)[:1]))  # trained on less: other merges
    second = cache_dir_for(cfg, find_corpus_files(cfg))
    assert second != first
    prepare_data(cfg)
    assert (second / "tokenizer.json").read_bytes() == (tmp_path / "model" / "tokenizer.json").read_bytes()
    assert (first / "tokenizer.json").read_bytes() != (second / "tokenizer.json").read_bytes()


def test_the_export_ships_the_pretrained_tokenizers_own_files(tmp_path: Path, corpus: Path) -> None:
    cfg = _config(tmp_path, corpus, tmp_path / "model")
    save_pretrained(tmp_path / "model", llama3_like(_texts(cfg)), model={"vocab_size": 1000, "eos_token_id": 1})
    prepare_data(cfg)
    found = find_tokenizer(cfg)
    assert found.warning is None and found.end_of_text_id == 1 and found.note.startswith("pretrained, 1000 ids")
    texts = found.texts(model_max_length=16)
    assert texts == {
        name: (tmp_path / "model" / name).read_text()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no tokenizer.json", r"^data.tokenizer_dir=.*/model: no tokenizer.json there"),
        (
            "not a tokenizer",
            r"^data.tokenizer_dir=.*/model: .*/model/tokenizer.json is not a tokenizer tokenizers "
            r"can read",
        ),
        (
            "past the vocabulary",
            r"^data.tokenizer_dir=.*/model: .*/model/tokenizer.json has ids up to 599, past the "
            r"model's vocab_size=512 \(.*/model/config.json\): not this model's tokenizer$",
        ),
        ("bad config.json", r"^data.tokenizer_dir=.*/model: .*/model/config.json is not readable JSON"),
    ],
)
def test_bad_pretrained_tokenizers_are_one_line_naming_the_file(
    case: str, message: str, tmp_path: Path, corpus: Path
) -> None:
    cfg = _config(tmp_path, corpus, tmp_path / "model")
    save_pretrained(tmp_path / "model", llama3_like(_texts(cfg)), model={"vocab_size": 512})
    if case == "no tokenizer.json":
        (tmp_path / "model" / "tokenizer.json").unlink()
    elif case == "not a tokenizer":
        (tmp_path / "model" / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    elif case == "bad config.json":
        (tmp_path / "model" / "config.json").write_text("{")
    with pytest.raises(UserError, match=message):
        prepare_data(cfg)
    assert not any((tmp_path / "cache").rglob("train.bin"))


def test_pretrained_without_a_directory_is_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match=r"data.tokenizer=pretrained needs data.tokenizer_dir=DIR"):
        TextDataConfig(tokenizer=TokenizerKind.pretrained)
