"""The ``export`` command: arguments in, one summary out."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import NoReturn

from orchestrator.errors import UserError
from orchestrator.export.build import DTYPES, ExportResult, export_checkpoint
from orchestrator.logs import configure_logging
from orchestrator.tracking.console import format_bytes

DEFAULT_MAX_SHARD_SIZE = "5GB"
# transformers' size strings: GB is 10^9 bytes, GiB 2^30.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def export_command(args: list[str]) -> int:
    """``orchestrator export RUN_DIR_OR_CHECKPOINT -o DIR [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]
    [--merge-lora]``."""
    parser = _Parser(
        prog="orchestrator export",
        description="A checkpoint of any strategy as a transformers model directory: safetensors "
        "shards, config.json, the run's tokenizer.",
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint (RUN_DIR/checkpoints/step-N), a checkpoints dir or a run dir (its newest valid checkpoint)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the directory to write: new, empty, or an earlier export (replaced)",
    )
    parser.add_argument("--dtype", default="fp32", help=f"floating tensors as {' | '.join(DTYPES)} (default fp32)")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"the largest safetensors file, e.g. 5GB, 500MB, 2GiB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights they adapt")
    parsed = parser.parse_args(args)
    configure_logging()
    # Export reads on the CPU; told so, DeepSpeed (ZeRO checkpoints) does not warn that it found no GPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = export_checkpoint(
        parsed.checkpoint,
        output=parsed.output,
        dtype=parsed.dtype,
        max_shard_bytes=parse_size(parsed.max_shard_size, key="--max-shard-size"),
        merge_lora=parsed.merge_lora,
    )
    print(format_result(result))
    return 0


def parse_size(text: str, *, key: str) -> int:
    """Bytes in a size string as transformers writes them (``5GB`` = 5 x 10^9, ``2GiB`` = 2 x 2^30, ``100``)."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{key}={text}: not a size; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_result(result: ExportResult) -> str:
    """The command's summary: what was read, what was written, how to load it."""
    if not result.files:
        weights = "none: the adapters' base is the pretrained directory"
    else:
        files = result.files[0] if len(result.files) == 1 else f"{result.files[0]} ... {result.files[-1]} + index"
        weights = (
            f"{result.dtype}, {len(result.files)} file{'s' if len(result.files) > 1 else ''}, "
            f"{format_bytes(result.num_bytes)}: {files}"
        )
    return "\n".join(
        [
            f"exported {result.checkpoint} (step {result.step}, strategy={result.strategy}, "
            f"{result.world_size} rank{'s' if result.world_size > 1 else ''})",
            f"  model      model={result.model} as {result.architecture}"
            + (f", {result.num_params:,} parameters" if result.files else ""),
            f"  weights    {weights}",
            f"  tokenizer  {result.tokenizer}",
            *([f"  LoRA       {result.lora}"] if result.lora else []),
            f"  output     {result.output}",
            f'  load with  transformers.AutoModelForCausalLM.from_pretrained("{result.output}")'
            + ("  (with peft installed)" if result.lora and "merged" not in result.lora else ""),
        ]
    )
