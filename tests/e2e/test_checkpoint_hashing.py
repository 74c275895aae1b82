"""Checkpoints hashed while written: the manifest's sha256 of every file equals the file read back,
for every kind of file that ddp, fsdp2 and zero3 write, through a real 2-rank run."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.checkpoints import manifest
from tests.helpers import cli_in_process

# A name of each kind of file a strategy's checkpoint holds (beside the trainer state and one RNG file per rank).
KINDS = {
    "ddp": ["model.pt", "optimizer.pt"],
    "fsdp2": ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"],
    "zero3": [
        "ds/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_to_fp32.py",
    ],
}


@pytest.mark.parametrize("strategy", sorted(KINDS))
def test_every_file_hashed_while_written_matches_its_bytes_on_disk(
    strategy: str, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        "train", *tiny_overrides, f"strategy={strategy}", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True
    )
    checkpoints = manifest.checkpoint_dirs(run_dir / "checkpoints")
    assert [manifest.step_of(c) for c in checkpoints] == [20, 10]
    for checkpoint in checkpoints:
        files = manifest.read_manifest(checkpoint).files
        assert {"trainer_state.json", "rng/rank-00000.pt", "rng/rank-00001.pt", *KINDS[strategy]} <= set(files)
        for name, entry in files.items():
            assert manifest.file_entry(checkpoint / name) == entry, f"{checkpoint.name}/{name}"
        manifest.verify(checkpoint)
