"""Asynchronous checkpoints on 2 gloo ranks: a save written in the background while training goes on
holds exactly the state of the step it was taken at, byte for byte what a synchronous save writes."""

from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.checkpoints import manifest
from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import SampleKind
from orchestrator.data.spec import DataSpec
from orchestrator.distributed import DistContext
from orchestrator.models import build_model, model_blocks
from orchestrator.models.recipe import ModelRecipe
from orchestrator.strategies import build_strategy
from orchestrator.strategies.fsdp2.engine import read_dcp_metadata
from orchestrator.train.checkpoint import HOLD_ENV, Checkpointer
from orchestrator.train.optim import build_optimizer
from tests.distributed.ranks import run_ranks

STRATEGIES = ["ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3"]


def _train_and_save(dist: DistContext, strategy_name: str, root: str, hold_dir: str) -> list[str]:
    """Two steps, a synchronous save of step 2 (``sync/``) and a background one (``async/``), held after
    its model and optimizer files while two more steps run; returns the files the held writer created."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    config = to_config(
        compose(
            [
                "model=gpt_tiny",
                "model.n_embd=32",
                "model.vocab_size=128",
                "data=synthetic_tokens",
                "data.vocab_size=128",
                "data.seq_len=16",
                f"strategy={strategy_name}",
                "optim=adamw",
                "trainer.global_batch_size=8",
                "trainer.micro_batch_size=4",
                "scheduler.warmup_steps=0",
            ]
        )
    )
    spec = DataSpec(kind=SampleKind.tokens, vocab_size=128, seq_len=16)
    recipe = ModelRecipe(build=partial(build_model, config.model, spec), blocks=partial(model_blocks, config.model))
    torch.manual_seed(0)
    strategy = build_strategy(config, dist=dist)
    strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
    tokens = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(dist.rank))

    def step() -> None:
        with strategy.accumulate(sync=True):
            strategy.backward(
                F.cross_entropy(strategy.model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
            )
        assert strategy.step(lr=1e-2, max_norm=1.0, guard=math.isfinite).applied

    def checkpointer(name: str, *, background: bool) -> Checkpointer:
        return Checkpointer(
            Path(root) / name,
            dist=dist,
            strategy=strategy,
            strategy_name=strategy_name,
            keep=2,
            model_shapes={},
            background=background,
        )

    step()
    step()
    assert checkpointer("sync", background=False).save(2, {"step": 2}) is not None
    background = checkpointer("async", background=True)
    hold = Path(hold_dir) / manifest.step_dir_name(2)
    if dist.is_main:
        hold.touch()
    dist.barrier()
    assert background.save(2, {"step": 2}) is None
    step()  # the parameters and optimizer state change while the writer is held
    step()
    assert background.commit(wait=False) is None  # not written yet: nothing completes
    for rank in range(dist.world_size):
        while not hold.with_name(f"{hold.name}.rank-{rank}").exists():
            time.sleep(0.01)
    held = sorted(str(p.relative_to(root)) for p in (Path(root) / "async").rglob("*") if p.is_file())
    dist.barrier()
    if dist.is_main:
        hold.unlink()
    assert background.commit(wait=True) == Path(root) / "async" / manifest.step_dir_name(2)
    return held


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_background_save_holds_its_steps_state_byte_for_byte(
    strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    monkeypatch.setenv(HOLD_ENV, str(hold_dir))
    held = run_ranks(_train_and_save, strategy, str(tmp_path), str(hold_dir))[0]

    sync_dir, async_dir = (tmp_path / name / manifest.step_dir_name(2) for name in ("sync", "async"))
    # While held, the save was unfinished: a .tmp directory without a manifest or trainer state.
    assert held and all(".tmp/" in name for name in held)
    assert not any(name.endswith((manifest.MANIFEST, "trainer_state.json")) for name in held)
    manifest.verify(async_dir)
    sync_files = manifest.read_manifest(sync_dir).files
    async_files = manifest.read_manifest(async_dir).files
    assert sorted(async_files) == sorted(sync_files)
    # DCP's index names the save (a random id, the directory): the same tensors at the same places.
    index = "dcp/.metadata"
    assert {name: entry for name, entry in async_files.items() if name != index} == {
        name: entry for name, entry in sync_files.items() if name != index
    }
    if index in sync_files:
        sync_index, async_index = (read_dcp_metadata(d / "dcp") for d in (sync_dir, async_dir))
        assert async_index.state_dict_metadata == sync_index.state_dict_metadata
        assert async_index.storage_data == sync_index.storage_data
