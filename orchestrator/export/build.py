"""``orchestrator export``: a checkpoint of any strategy and world size as a transformers model directory.

The checkpoint is verified (manifest) and checked (every pickle through the allow-list) like any checkpoint
a run resumes from; the model's settings come from its run dir's ``config.yaml``. The directory is written
under a temporary sibling name and renamed into place at the end: a failed or killed export leaves the
target as it was (a killed one leaves ``.NAME.export-PID`` beside it, which can be deleted).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from orchestrator import __version__
from orchestrator.checkpoints import manifest
from orchestrator.config.compose import load_resolved
from orchestrator.config.schema import Config
from orchestrator.errors import UserError
from orchestrator.export.layouts import EXPORTS, ModelExport
from orchestrator.export.safetensors_files import OutTensor, index_json, plan_shards, write_safetensors
from orchestrator.export.tokenizer import PRETRAINED_TOKENIZER_FILES, RunTokenizer, find_tokenizer
from orchestrator.fsutil import fsync_path
from orchestrator.models.lora import LoRA, MergedWeights, lora_for
from orchestrator.models.pretrained import CONFIG_FILE as MODEL_CONFIG_FILE
from orchestrator.models.pretrained import INDEX_FILE, SINGLE_FILE
from orchestrator.models.recipe import WeightSource
from orchestrator.rundir import CONFIG_FILE
from orchestrator.strategies import check_checkpoint, weights_problem
from orchestrator.strategies.weights import CheckpointWeights

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Where the export came from (checkpoint, step, strategy, dtype). It also marks the directory as an export,
# which a later export may replace.
RECORD_FILE = "orchestrator_export.json"
# PEFT's names for a LoRA adapter's files.
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_EXPORT_FILES = frozenset(
    {
        MODEL_CONFIG_FILE,
        SINGLE_FILE,
        INDEX_FILE,
        *PRETRAINED_TOKENIZER_FILES,
        RECORD_FILE,
        ADAPTER_FILE,
        ADAPTER_CONFIG_FILE,
    }
)
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What ``export_checkpoint`` wrote, for the command's summary."""

    output: Path
    checkpoint: Path
    step: int
    strategy: str
    world_size: int
    model: str  # the run's model=NAME
    architecture: str  # the transformers class that loads it
    num_params: int  # in the files (a tied weight once)
    dtype: str
    files: list[str]  # the safetensors files
    num_bytes: int  # of the tensors
    tokenizer: str  # one line about the tokenizer
    lora: str | None = None  # one line about LoRA adapters: merged, or written in PEFT's format


def export_checkpoint(path: Path, *, output: Path, dtype: str, max_shard_bytes: int, merge_lora: bool) -> ExportResult:
    """Writes the model of the checkpoint ``path`` (a checkpoint, a ``checkpoints/`` dir or a run dir) to
    ``output`` as safetensors shards, ``config.json`` and the run's tokenizer.

    Args:
        path: what to export; of a run dir, its newest checkpoint that verifies.
        output: a new or empty directory, or an earlier export, which is replaced.
        dtype: ``fp32``, ``bf16`` or ``fp16``: floating tensors are cast to it.
        max_shard_bytes: the largest safetensors file (a larger tensor gets a file of its own).
        merge_lora: fold LoRA adapters into the weights they adapt.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: choose one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise UserError(f"--max-shard-size: must be positive, got {max_shard_bytes} bytes")
    _check_output(output)
    directory = manifest.resolve_checkpoint(path, key="checkpoint")
    check_checkpoint(directory)
    saved = manifest.read_manifest(directory)
    problem = weights_problem(written_by=saved.strategy)
    if problem is not None:
        raise UserError(f"checkpoint={path}: cannot export {directory.name}: {problem}")
    config = _run_config(directory)
    export = EXPORTS.get(config.model.name)
    if export is None:
        raise UserError(
            f"checkpoint={path}: model={config.model.name} has no transformers form; export writes "
            f"model={' and model='.join(EXPORTS)}"
        )
    lora = lora_for(config.model)
    if merge_lora and lora is None:
        raise UserError(f"--merge-lora: {path} has no LoRA adapters (its run's model.lora.rank is 0)")
    # Reads no tensor yet (ZeRO-0/1/2 excepted: DeepSpeed joins the ranks' fp32 partitions here).
    weights: WeightSource = CheckpointWeights(directory, written_by=saved.strategy, key=f"checkpoint={path}")
    if lora is not None:
        weights = MergedWeights(weights, scale=lora.scale, merge=merge_lora)
    model = export(config, weights, source=str(directory))
    tokenizer = find_tokenizer(config.data)
    if tokenizer.warning:
        log.warning("%s", tokenizer.warning)
    target = DTYPES[dtype]
    record = {
        "checkpoint": str(directory.resolve()),
        "step": saved.step,
        "strategy": saved.strategy,
        "world_size": saved.world_size,
        "model": config.model.name,
        "dtype": dtype,
        "orchestrator_version": __version__,
    }
    texts = {RECORD_FILE: json.dumps(record, indent=1) + "\n"}
    tensors = [_cast(tensor, target) for tensor in model.tensors]
    adapters = None
    if lora is not None and isinstance(weights, MergedWeights) and not merge_lora:
        # The adapters in PEFT's format, over the pretrained directory they were trained on, or over the base
        # weights written here when the run had none.
        pretrained = getattr(config.model, "pretrained", None)
        base = str(Path(pretrained).expanduser().resolve()) if pretrained else str(output.resolve())
        adapter_tensors, texts[ADAPTER_CONFIG_FILE] = _adapters(lora, weights, model, base=base)
        adapters = AdapterFiles(tensors=[_cast(tensor, target) for tensor in adapter_tensors], base=base)
        if pretrained:
            tensors = []
    shards = plan_shards(tensors, max_shard_bytes=max_shard_bytes) if tensors else {}
    if shards:
        texts[MODEL_CONFIG_FILE] = json.dumps(_model_config(model, tokenizer, target), indent=2) + "\n"
    if len(shards) > 1:
        texts[INDEX_FILE] = index_json(shards)
    if adapters is not None:
        shards[ADAPTER_FILE] = adapters.tensors
    texts.update(tokenizer.texts(model_max_length=model.max_length))
    _write_directory(output, files=shards, texts=texts)
    return ExportResult(
        output=output,
        checkpoint=directory,
        step=saved.step,
        strategy=saved.strategy,
        world_size=saved.world_size,
        model=config.model.name,
        architecture=model.architecture,
        num_params=sum(math.prod(t.shape) for t in tensors),
        dtype=dtype,
        files=[name for name in shards if name != ADAPTER_FILE],
        num_bytes=sum(t.num_bytes for t in tensors),
        tokenizer=tokenizer.note,
        lora=_lora_note(lora, weights, adapters),
    )


@dataclass(frozen=True, kw_only=True)
class AdapterFiles:
    tensors: list[OutTensor]
    base: str  # the directory of the weights they adapt


def _adapters(lora: LoRA, weights: MergedWeights, model: ModelExport, *, base: str) -> tuple[list[OutTensor], str]:
    """The adapters as ``PeftModel.save_pretrained`` writes them: ``base_model.model.<module>.lora_A.weight``
    under transformers' module names, and ``adapter_config.json``."""
    from peft import LoraConfig

    shapes, dtypes = weights.source.shapes(), weights.source.dtypes()
    tensors, targets = [], []
    for module, stored in sorted(weights.adapters().items()):
        name = model.module_names[module]
        targets.append(name)
        for kind, stored_name in zip(("lora_A", "lora_B"), stored):
            tensors.append(
                OutTensor(
                    name=f"base_model.model.{name}.{kind}.weight",
                    shape=tuple(shapes[stored_name]),
                    dtype=dtypes[stored_name],
                    read=partial(weights.source.read, stored_name),
                )
            )
    config = LoraConfig(
        r=lora.cfg.rank,
        lora_alpha=lora.cfg.alpha,
        lora_dropout=lora.cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.conv1d,
        base_model_name_or_path=base,
        inference_mode=True,
    )
    settings = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return tensors, json.dumps(settings, indent=2, sort_keys=True) + "\n"


def _lora_note(lora: LoRA | None, weights: WeightSource, adapters: AdapterFiles | None) -> str | None:
    if lora is None:
        return None
    assert isinstance(weights, MergedWeights)  # export_checkpoint wraps a LoRA run's weights
    count = len(weights.adapters())
    if adapters is None:
        return f"rank {lora.cfg.rank} on {count} modules, merged into the weights"
    return f"rank {lora.cfg.rank} on {count} modules, {ADAPTER_FILE} over {adapters.base}"


def _run_config(directory: Path) -> Config:
    """The config of the run that wrote a checkpoint (``RUN_DIR/checkpoints/step-N/``)."""
    config_file = directory.parent.parent / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(
            f"checkpoint={directory}: no {config_file}: export reads the model's settings from "
            f"the run dir of the checkpoint (RUN_DIR/checkpoints/step-N)"
        )
    try:
        return load_resolved(config_file.read_text())
    except UserError as exc:
        raise UserError(f"{config_file}: {exc}") from None


def _cast(tensor: OutTensor, dtype: torch.dtype) -> OutTensor:
    if not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor

    def read() -> torch.Tensor:
        return tensor.read().to(dtype)

    return OutTensor(name=tensor.name, shape=tensor.shape, dtype=dtype, read=read)


def _model_config(model: ModelExport, tokenizer: RunTokenizer, dtype: torch.dtype) -> dict:
    config = dict(model.config)
    config["dtype"] = str(dtype).removeprefix("torch.")
    for key in ("bos_token_id", "eos_token_id"):  # the token that separated documents in training
        if config.get(key) is None:
            config[key] = tokenizer.end_of_text_id
    return dict(sorted(config.items()))


def _check_output(output: Path) -> None:
    """A new or empty directory, or an earlier export holding only what an export writes."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UserError(f"-o {output}: exists and is not a directory")
    if not output.exists() or not any(output.iterdir()):
        return
    if not (output / RECORD_FILE).is_file():
        raise UserError(
            f"-o {output}: exists and is not empty; choose a new or empty directory "
            f"(an earlier export there is replaced)"
        )
    foreign = sorted(
        entry.name
        for entry in output.iterdir()
        if not (entry.is_file() and (entry.name in _EXPORT_FILES or _SHARD_FILE.fullmatch(entry.name)))
    )
    if foreign:
        raise UserError(
            f"-o {output}: an earlier export, but it also holds {', '.join(foreign[:3])}, which export "
            f"does not write and would delete; move them or choose another directory"
        )


def _write_directory(output: Path, *, files: dict[str, list[OutTensor]], texts: dict[str, str]) -> None:
    """Every safetensors file and text into a temporary sibling, then renamed to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, tensors in files.items():
            write_safetensors(tmp / name, tensors)
        for name, text in texts.items():
            with open(tmp / name, "x") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
        fsync_path(tmp)
        _publish(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, output: Path) -> None:
    """Renames ``tmp`` to ``output``; an earlier export there is moved aside first and deleted last."""
    _check_output(output)  # again: something may have appeared there while the weights were written
    aside = None
    if output.exists() and any(output.iterdir()):
        aside = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        os.rename(output, aside)
    os.rename(tmp, output)  # over an empty directory, if there is one
    fsync_path(output.parent)
    if aside is not None:
        shutil.rmtree(aside)
