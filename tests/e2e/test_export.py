"""``orchestrator export``: real 2-rank checkpoints of every checkpoint format, exported through the console
script and loaded by transformers, which must compute the same logits as this project's own model loaded from
the same checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from orchestrator.checkpoints import manifest
from orchestrator.config.compose import compose, load_resolved, without_hydra
from orchestrator.data import prepare_data
from orchestrator.export import export_checkpoint
from orchestrator.models import build_model
from orchestrator.strategies import read_model_weights
from tests.e2e.test_untrusted_checkpoints import POISONS
from tests.helpers import cli_in_process, tiny_job

transformers = pytest.importorskip("transformers")

GPT_STRATEGIES = ("ddp", "fsdp2", "zero3")
SHORT_RUN = ["trainer.max_steps=2", "trainer.checkpoint.every=2", "trainer.eval_every=0", "scheduler.warmup_steps=0"]
BATCH = torch.tensor([[3, 17, 200, 5, 99, 42, 7, 128, 64, 1, 250, 33], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """name -> run dir: the tiny GPT under each GPT strategy, and a tiny Llama (model=hf) with a trained BPE."""
    root = tmp_path_factory.mktemp("runs")
    found = {}
    for strategy in GPT_STRATEGIES:
        found[strategy] = root / strategy
        cli_in_process(
            "train",
            *tiny_job(cache_dir),
            f"strategy={strategy}",
            *SHORT_RUN,
            f"hydra.run.dir={root / strategy}",
            cwd=root,
            check=True,
        )
    found["llama"] = root / "llama"
    cli_in_process(
        "train",
        "job=llama_tiny_cpu",
        "launcher=local",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.vocab_size=512",
        "data.seq_len=32",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
        "logger.progress=false",
        *SHORT_RUN,
        f"hydra.run.dir={root / 'llama'}",
        cwd=root,
        check=True,
    )
    return found


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> the export of that run (its run dir given: the newest checkpoint)."""
    root = tmp_path_factory.mktemp("exports")
    for name, run_dir in runs.items():
        result = cli_in_process("export", str(run_dir), "-o", str(root / name), cwd=root, check=True)
        assert f"exported {run_dir}/checkpoints/step-00000002 (step 2" in result.stdout, result.stdout
        assert result.stderr == "", result.stderr
    return {name: root / name for name in runs}


def _own_logits(run_dir: Path) -> torch.Tensor:
    """This project's model, built from the run's config and loaded from its checkpoint."""
    config = load_resolved((run_dir / "config.yaml").read_text())
    checkpoint = manifest.resolve_checkpoint(run_dir, key="test")
    model = build_model(config.model, prepare_data(config.data))
    model.load_state_dict(read_model_weights(checkpoint, written_by=manifest.read_manifest(checkpoint).strategy))
    with torch.no_grad():
        return model.eval()(BATCH)


def _hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=BATCH).logits


def _loaded(directory: Path, cls: type) -> torch.nn.Module:
    """The export loaded by transformers, asserting that every tensor was used and none is missing."""
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("strategy", GPT_STRATEGIES)
def test_a_gpt_exports_as_gpt2_with_the_same_logits(
    strategy: str, runs: dict[str, Path], exports: dict[str, Path]
) -> None:
    directory = exports[strategy]
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "model.safetensors",
        "orchestrator_export.json",
    ]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    gpt2 = _loaded(directory, transformers.GPT2LMHeadModel)
    assert type(_loaded(directory, transformers.AutoModelForCausalLM)) is transformers.GPT2LMHeadModel
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied, as model=gpt's head is
    torch.testing.assert_close(_hf_logits(gpt2), _own_logits(runs[strategy]), rtol=0, atol=1e-5)


def test_an_hf_model_exports_as_itself_with_its_tokenizer(
    runs: dict[str, Path], exports: dict[str, Path], cache_dir: Path
) -> None:
    from tokenizers import Tokenizer

    from orchestrator.data.text import END_OF_TEXT, cache_dir_for, find_corpus_files

    directory = exports["llama"]
    llama = _loaded(directory, transformers.AutoModelForCausalLM)
    assert type(llama) is transformers.LlamaForCausalLM and llama.config.vocab_size == 512
    torch.testing.assert_close(_hf_logits(llama), _own_logits(runs["llama"]), rtol=0, atol=1e-5)

    data = load_resolved((runs["llama"] / "config.yaml").read_text()).data
    trained = Tokenizer.from_file(str(cache_dir_for(data, find_corpus_files(data)) / "tokenizer.json"))
    exported = transformers.AutoTokenizer.from_pretrained(directory)
    text = "def export(path):\n    return path.read_text()  # ünïcode\n"
    assert exported(text)["input_ids"] == trained.encode(text).ids
    assert exported.decode(trained.encode(text).ids) == text
    assert llama.config.eos_token_id == llama.config.bos_token_id == trained.token_to_id(END_OF_TEXT)


def test_small_shards_with_an_index(runs: dict[str, Path], exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    cli_in_process("export", str(runs["ddp"]), "-o", str(out), "--max-shard-size", "100KB", cwd=tmp_path, check=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    single = _tensors(exports["ddp"] / "model.safetensors")
    sharded = {}
    for shard in shards:
        tensors = _tensors(out / shard)
        assert (out / shard).stat().st_size <= 100_000 + 4096 or len(tensors) == 1  # the header is extra
        sharded.update(tensors)
    assert single.keys() == sharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(single[name], sharded[name]) for name in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    gpt2 = _loaded(out, transformers.GPT2LMHeadModel)
    torch.testing.assert_close(
        _hf_logits(gpt2), _hf_logits(_loaded(exports["ddp"], transformers.GPT2LMHeadModel)), rtol=0, atol=0
    )


def test_bf16_is_the_fp32_weights_cast(runs: dict[str, Path], exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    checkpoint = runs["zero3"] / "checkpoints" / manifest.step_dir_name(2)  # a checkpoint named directly
    result = cli_in_process("export", str(checkpoint), "-o", str(out), "--dtype", "bf16", cwd=tmp_path, check=True)
    assert "bf16, 1 file" in result.stdout
    fp32 = _tensors(exports["zero3"] / "model.safetensors")
    bf16 = _tensors(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in fp32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = _loaded(out, transformers.GPT2LMHeadModel)
    assert model.dtype == torch.bfloat16


def test_an_earlier_export_is_replaced_and_nothing_else_is(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model"
    cli_in_process("export", str(runs["ddp"]), "-o", str(out), "--max-shard-size", "100KB", cwd=tmp_path, check=True)
    cli_in_process("export", str(runs["fsdp2"]), "-o", str(out), cwd=tmp_path, check=True)
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-*"))
    assert json.loads((out / "orchestrator_export.json").read_text())["strategy"] == "fsdp2"
    (out / "notes.txt").write_text("mine")
    result = cli_in_process("export", str(runs["ddp"]), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "holds notes.txt, which export does not write" in result.stderr
    assert (out / "notes.txt").exists() and list(tmp_path.iterdir()) == [out]


def test_a_failed_export_leaves_the_target_as_it_was(
    runs: dict[str, Path], exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while the shards are written (here: at the second) leaves neither a partial directory nor a
    temporary one, and an earlier export there untouched."""
    from orchestrator.export import build

    written = []

    def write_then_fail(path: Path, tensors: list) -> None:
        if written:
            raise OSError("disk full")
        written.append(path)
        real_write(path, tensors)

    real_write = build.write_safetensors
    monkeypatch.setattr(build, "write_safetensors", write_then_fail)
    out = tmp_path / "model"
    for earlier in (None, exports["ddp"]):
        written.clear()
        if earlier is not None:
            shutil.copytree(earlier, out)
        with pytest.raises(OSError, match="disk full"):
            export_checkpoint(runs["ddp"], output=out, dtype="fp32", max_shard_bytes=100_000, merge_lora=False)
        assert written and list(tmp_path.iterdir()) == ([out] if earlier else [])
        if earlier is not None:
            assert _tensors(out / "model.safetensors").keys() == _tensors(earlier / "model.safetensors").keys()


@pytest.mark.parametrize("case", POISONS)
def test_a_poisoned_checkpoint_is_refused_and_nothing_runs(case: str, runs: dict[str, Path], tmp_path: Path) -> None:
    """Each file kind of each format, holding a pickle that would run a shell command, its manifest rewritten
    to match: export reads it as data or not at all."""
    strategy, poison = POISONS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(runs[strategy], run_dir)
    checkpoint = run_dir / "checkpoints" / manifest.step_dir_name(2)
    marker = tmp_path / "pwned"
    poison(checkpoint, marker)
    saved = manifest.read_manifest(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): manifest.file_entry(p)
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != manifest.MANIFEST
    }
    manifest.write_manifest(
        checkpoint,
        files=files,
        step=2,
        world_size=saved.world_size,
        strategy=saved.strategy,
        model_shapes=saved.model_shapes,
    )
    result = cli_in_process("export", str(run_dir), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "refused: loading it would call posix.system" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


def _lstm_run(runs: dict[str, Path], tmp: Path) -> Path:
    """A copy of a run whose config.yaml says model=lstm (as an LSTM run's would)."""
    run_dir = tmp / "lstm-run"
    shutil.copytree(runs["ddp"], run_dir)
    lstm = without_hydra(compose(["job=lstm_stdlib_cpu"]))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(lstm, resolve=True))
    return run_dir


def _damaged(runs: dict[str, Path], tmp: Path) -> Path:
    run_dir = tmp / "damaged-run"
    shutil.copytree(runs["ddp"], run_dir)
    checkpoint = run_dir / "checkpoints" / manifest.step_dir_name(2)
    (checkpoint / "model.pt").write_bytes(b"not what the manifest says")
    return checkpoint


def _not_empty(tmp: Path) -> Path:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "weights.bin").write_bytes(b"someone's")
    return tmp / "taken"


# case -> (path, extra arguments, what the one line says); callables get the runs and a temp dir.
BAD = {
    "missing path": (lambda runs, tmp: tmp / "no-such-run", [], "checkpoint={}: no such file or directory"),
    "damaged checkpoint": (_damaged, [], "damaged checkpoint"),
    "not a checkpoint (an export)": (lambda runs, tmp: runs["exports"]["ddp"], [], "holds no checkpoint"),
    "unknown dtype": (lambda runs, tmp: runs["ddp"], ["--dtype", "fp8"], "--dtype=fp8: choose one of fp32, bf16, fp16"),
    "bad shard size": (lambda runs, tmp: runs["ddp"], ["--max-shard-size", "5XB"], "--max-shard-size=5XB: not a size"),
    "output not empty": (lambda runs, tmp: runs["ddp"], ["-o", "{taken}"], "-o {taken}: exists and is not empty"),
    "model that does not export": (
        _lstm_run,
        [],
        "model=lstm has no transformers form; export writes model=gpt and model=hf",
    ),
    "merge-lora without adapters": (
        lambda runs, tmp: runs["ddp"],
        ["--merge-lora"],
        "--merge-lora: {} has no LoRA adapters (its run's model.lora.rank is 0)",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(
    case: str, runs: dict[str, Path], exports: dict[str, Path], tmp_path: Path
) -> None:
    make_path, extra, expected = BAD[case]
    path = make_path({**runs, "exports": exports}, tmp_path)
    taken = _not_empty(tmp_path)
    extra = [arg.format(taken=taken) for arg in extra]
    out = [] if "-o" in extra else ["-o", str(tmp_path / "out")]
    result = cli_in_process("export", str(path), *out, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected.format(path, taken=taken) in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert [p.name for p in taken.iterdir()] == ["weights.bin"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as stream:
        return {name: stream.get_tensor(name) for name in stream.keys()}
