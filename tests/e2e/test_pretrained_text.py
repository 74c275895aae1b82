"""model=hf model.pretrained=DIR data=text: the corpus is tokenized with DIR's own tokenizer.json, with no other
setting. DIR is made here (nothing can be downloaded): a tiny Llama with Llama 3's 128,256-id vocabulary, random
weights, and a word-level tokenizer of as many ids, both saved with save_pretrained."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from orchestrator.config.compose import load_resolved
from orchestrator.data.text import cache_dir_for, find_corpus_files
from tests.e2e.test_pretrained import JOB
from tests.helpers import cli_in_process

transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 128_256
END_OF_TEXT = "<|end_of_text|>"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer (ids 0 to 128,255, the last its end-of-text token) in one directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("pretrained") / "llama"
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE - 2)} | {"[UNK]": VOCAB_SIZE - 2, END_OF_TEXT: VOCAB_SIZE - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([END_OF_TEXT])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, unk_token="[UNK]"
    ).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=VOCAB_SIZE - 1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(pretrained: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """Two steps of the tiny Llama on a corpus of words from all over its vocabulary, 2 ranks under ddp."""
    root = tmp_path_factory.mktemp("run")
    words = random.Random(0)
    for index in range(4):
        lines = (" ".join(f"w{words.randrange(VOCAB_SIZE - 2)}" for _ in range(20)) for _ in range(100))
        (root / "corpus" / f"{index}.txt").parent.mkdir(exist_ok=True)
        (root / "corpus" / f"{index}.txt").write_text("\n".join(lines) + "\n")
    cli_in_process(
        "train",
        *JOB,
        f"data.cache_dir={cache_dir}",
        f"model.pretrained={pretrained}",
        "data=text",
        f"data.paths=[{root / 'corpus'}]",
        "trainer.max_steps=2",
        "trainer.checkpoint.every=2",
        f"hydra.run.dir={root / 'run'}",
        cwd=root,
        check=True,
    )
    return root / "run"


def test_a_128k_tokenizer_from_model_pretrained_trains_end_to_end(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    data = load_resolved((run_dir / "config.yaml").read_text()).data
    assert data.tokenizer.value == "pretrained"  # what data=text chose, recorded in the run's config
    meta = json.loads((cache_dir_for(data, find_corpus_files(data)) / "meta.json").read_text())
    assert (meta["vocab_size"], meta["dtype"], meta["end_of_text_id"]) == (VOCAB_SIZE, "uint32", VOCAB_SIZE - 1)


def test_the_export_ships_the_pretrained_tokenizer(pretrained: Path, run_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    result = cli_in_process("export", str(run_dir), "-o", str(exported), cwd=tmp_path, check=True)
    assert f"tokenizer  pretrained, {VOCAB_SIZE} ids: {pretrained / 'tokenizer.json'}" in result.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).read_text() == (pretrained / name).read_text()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.eos_token == END_OF_TEXT and tokenizer("w70000 w3")["input_ids"] == [70_000, 3]
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == VOCAB_SIZE - 1
