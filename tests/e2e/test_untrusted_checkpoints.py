"""A checkpoint is data, never code: real checkpoints of each format, each with one file replaced by
a pickle that runs a shell command when loaded (its manifest rewritten to match, as an attacker
would), loaded through every entry point. Nothing may run; each is refused naming the file and the
global it calls."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoints import manifest, unpickle
from orchestrator.strategies import check_checkpoint, read_model_weights
from tests.helpers import Payload, cli_in_process, tiny_job

STRATEGIES = ("ddp", "fsdp2", "zero3")


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _poison_torch_file(path: Path, marker: Path) -> None:
    state = torch.load(path, weights_only=False)  # a file this test's own run wrote
    state["extra"] = Payload(marker)
    torch.save(state, path)


def _poison_dcp_metadata(directory: Path, marker: Path) -> None:
    (directory / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _poison_dcp_item(directory: Path, marker: Path) -> None:
    """Points one non-tensor item (an optimizer hyperparameter) at a payload appended to a data file."""
    index_path = directory / "dcp" / ".metadata"
    metadata = pickle.loads(index_path.read_bytes())  # this test's own run wrote it
    key = next(k for k in metadata.storage_data if k.fqn.endswith("param_groups.0.lr"))
    info = metadata.storage_data[key]
    data_file = directory / "dcp" / info.relative_path
    payload = _torch_bytes(Payload(marker))
    info.offset, info.length = data_file.stat().st_size, len(payload)
    with open(data_file, "ab") as f:
        f.write(payload)
    index_path.write_bytes(pickle.dumps(metadata))


POISONS = {
    "ddp model.pt": ("ddp", lambda d, m: _poison_torch_file(d / "model.pt", m)),
    "fsdp2 dcp/.metadata": ("fsdp2", _poison_dcp_metadata),
    "fsdp2 dcp item": ("fsdp2", _poison_dcp_item),
    "zero3 model states": (
        "zero3",
        lambda d, m: _poison_torch_file(next((d / "ds").glob("*rank_0_mp_rank_00_model_states.pt")), m),
    ),
    "zero3 optimizer states": (
        "zero3",
        lambda d, m: _poison_torch_file(next((d / "ds").glob("*rank_1_mp_rank_00_optim_states.pt")), m),
    ),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """strategy -> a real 2-rank checkpoint of the tiny GPT job."""
    root = tmp_path_factory.mktemp("trained")
    found = {}
    for strategy in STRATEGIES:
        run_dir = root / strategy
        cli_in_process(
            "train",
            *tiny_job(cache_dir),
            f"strategy={strategy}",
            "trainer.max_steps=2",
            "trainer.checkpoint.every=2",
            "trainer.eval_every=0",
            "scheduler.warmup_steps=0",
            f"hydra.run.dir={run_dir}",
            cwd=root,
            check=True,
        )
        found[strategy] = run_dir / "checkpoints" / manifest.step_dir_name(2)
    return found


def _poisoned(trained: dict[str, Path], case: str, into: Path) -> tuple[Path, Path, str]:
    """A copy of a real checkpoint with one file poisoned and a manifest that matches it:
    (checkpoint dir, marker file the payload would create, strategy)."""
    strategy, poison = POISONS[case]
    directory = into / manifest.step_dir_name(2)
    shutil.copytree(trained[strategy], directory)
    marker = into / "pwned"
    poison(directory, marker)
    files = {
        str(p.relative_to(directory)): manifest.file_entry(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != manifest.MANIFEST
    }
    saved = manifest.read_manifest(directory)
    manifest.write_manifest(
        directory,
        files=files,
        step=2,
        world_size=saved.world_size,
        strategy=saved.strategy,
        model_shapes=saved.model_shapes,
    )
    return directory, marker, strategy


def test_the_real_checkpoints_pass(trained: dict[str, Path]) -> None:
    """The allow-lists admit everything the strategies write (else resuming would fail)."""
    for directory in trained.values():
        check_checkpoint(directory)


# The weights reader (trainer.init_from in the workers) reads the model's files only; an optimizer
# item is read by the strategy's own load, which the storage test below goes through.
@pytest.mark.parametrize("case", [case for case in POISONS if case != "fsdp2 dcp item"])
def test_every_weights_reader_refuses_a_poisoned_file(case: str, trained: dict[str, Path], tmp_path: Path) -> None:
    """The workers' own readers, without the driver's check."""
    directory, marker, strategy = _poisoned(trained, case, tmp_path)
    with pytest.raises((unpickle.UnsafeCheckpoint, pickle.UnpicklingError), match=r"posix\.system|GLOBAL posix.system"):
        read_model_weights(directory, written_by=strategy)
    with pytest.raises(unpickle.UnsafeCheckpoint, match=r"refused: loading it would call posix\.system"):
        check_checkpoint(directory)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["trainer.init_from", "trainer.resume", "run dir"])
@pytest.mark.parametrize("case", POISONS)
def test_the_driver_refuses_a_poisoned_checkpoint_in_one_line(
    case: str, entry: str, trained: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    into = run_dir / "checkpoints" if entry == "run dir" else tmp_path / "given"
    directory, marker, strategy = _poisoned(trained, case, into)
    args = [*tiny_job(cache_dir), f"strategy={strategy}", f"hydra.run.dir={run_dir}"]
    if entry != "run dir":
        args.append(f"{entry}={directory}")
    result = cli_in_process("train", *args, cwd=tmp_path)
    code, stderr = result.returncode, result.stderr
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and "refused: loading it would call posix.system" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("case", ["fsdp2 dcp/.metadata", "fsdp2 dcp item", "zero3 optimizer states"])
def test_workers_refuse_a_poisoned_checkpoint_fetched_from_storage(
    case: str, trained: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    """trainer.storage's newest checkpoint is fetched and loaded by the workers (as after a restart on a
    new machine), past the driver's check: the strategies' own loads refuse it."""
    store = tmp_path / "store"
    directory, marker, strategy = _poisoned(trained, case, store / "checkpoints")
    run_dir = tmp_path / "run"
    result = cli_in_process(
        "train",
        *tiny_job(cache_dir),
        f"strategy={strategy}",
        "trainer.max_steps=4",
        "scheduler.warmup_steps=0",
        f"trainer.storage=file://{store}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "refused: loading it would call posix.system" in result.stderr
    assert not marker.exists()
    assert (run_dir / "summary.json").exists()
