"""``orchestrator estimate``: will the job fit, under which strategy, on how many devices.

The model is built on the meta device (a 70B config in seconds, nothing allocated) to count its
parameters Ψ and its largest layer. Per-rank memory is then the ZeRO paper's model-state model
(Rajbhandari et al. 2020), with the terms DeepSpeed's implementation adds where it adds them (measured, and the same as DeepSpeed's own
estimators). Host memory counts start-up too: a plan that builds the whole model on every rank before
it shards or moves it (ddp, zero0-2, fsdp2 below ``META_INIT_MIN_PARAMS``) needs 4Ψ bytes of host
memory per rank then; ZeRO-3 and FSDP2's meta-device build need only their shards, on the device:

| strategy (offload) | mixed precision (bf16/fp16) | fp32 |
|---|---|---|
| ddp | 16Ψ | 16Ψ |
| fsdp2 | 16Ψ/N + working | 16Ψ/N + working |
| zero1 | 4Ψ + 16Ψ/N (bf16: 8Ψ + 12Ψ/N) | 8Ψ + 12Ψ/N |
| zero2 | 2Ψ + 18Ψ/N | 4Ψ + 16Ψ/N |
| zero3 | 18Ψ/N + 4·largest layer | 20Ψ/N + 4·largest layer |

The paper's ZeRO-1/2/3 figures (4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N in mixed precision) leave out two
tensors DeepSpeed keeps on the device: an fp32 partition of the gradients (+4Ψ/N, mixed precision)
and an fp32 master copy of the parameter partition even in fp32 training (+4Ψ/N); ZeRO-1 in bf16
runs DeepSpeed's BF16_Optimizer, which accumulates gradients in an unpartitioned fp32 buffer
(+4Ψ, beside the bf16 gradients, +2Ψ). Each strategy's package holds its numbers (its spec's
``memory``, ``orchestrator/strategies/<package>/__init__.py``). Offloading moves
the sharded terms to host memory. Transformers add activations per micro-batch (Korthikanti et al.
2022: 34·s·b·h bytes per layer in 16-bit, twice that in fp32; their 5·a·s²·b term for the attention
scores drops because the models use fused SDPA attention, which never stores the s×s matrix; with
activation checkpointing each layer keeps only its input, 2·s·b·h, and one layer is recomputed at
a time) plus the fp32 logits and their gradient (8·s·b·V).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import Config, GPTConfig, HFConfig, Precision
from orchestrator.data import describe_data
from orchestrator.strategies import strategy_names, strategy_spec
from orchestrator.strategies.spec import ModelShape, ModelStates

GIB = 2**30
SEARCH_WORLD_SIZES = [2**k for k in range(17)]  # up to 65,536 ranks


def plans() -> list[tuple[str, str]]:
    """Every (strategy, offload) the estimate compares, as each strategy's spec lists them."""
    return [(name, offload) for name in strategy_names() for offload in strategy_spec(name).plans(name)]


def model_states(strategy: str, offload: str, precision: Precision, shape: ModelShape, world_size: int) -> ModelStates:
    """Per-rank bytes of one plan: the strategy's own memory model (its spec's ``memory``)."""
    return strategy_spec(strategy).memory(strategy, offload, precision, shape, world_size)


def activation_bytes(
    shape: ModelShape, *, micro_batch: int, seq_len: int, precision: Precision, checkpointing: bool
) -> int | None:
    """Activation memory of one micro-batch on one rank (transformers only; None for other models)."""
    if shape.layers is None:
        return None
    assert shape.hidden is not None and shape.vocab is not None  # describe() sets the transformer shape whole
    s, b, h = seq_len, micro_batch, shape.hidden
    width = 1 if precision is not Precision.fp32 else 2  # the formula counts 16-bit tensors
    one_layer = s * b * h * 34 * width
    logits = 8 * s * b * shape.vocab
    if checkpointing:
        return int(shape.layers * 2 * s * b * h * width + one_layer + logits)
    return int(shape.layers * one_layer + logits)


def describe(config: Config) -> ModelShape:
    """Builds the job's model on the meta device and measures what memory depends on."""

    from orchestrator.models import build_model, describe_model, meta_device, model_blocks  # lazy: imports torch
    from orchestrator.models.lora import lora_for  # lazy: imports torch and peft

    spec = describe_data(config.data)
    lora = lora_for(config.model)
    with meta_device():
        model = build_model(config.model, spec)
        blocks = model_blocks(config.model, model)
        if lora is not None:
            lora.add(model, blocks=blocks)
    info = describe_model(config.model, spec, model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    largest_block = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layers = hidden = heads = vocab = None
    if isinstance(config.model, GPTConfig):
        layers, hidden, heads = config.model.n_layer, config.model.n_embd, config.model.n_head
        vocab = spec.vocab_size
    elif isinstance(config.model, HFConfig):
        hf = model.model.config
        layers, hidden, heads, vocab = hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.vocab_size
    lora_shape = (
        {}
        if lora is None
        else dict(
            trainable_params=info.num_trainable_params,
            frozen_param_bytes=2 if lora.cfg.base_dtype is Precision.bf16 else 4,
        )
    )
    return ModelShape(
        num_params=info.num_params,
        largest_layer_params=largest_layer,
        largest_block_params=largest_block,
        root_params=outside,
        **lora_shape,
        layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=vocab,
    )


def estimate(config: Config) -> dict[str, Any]:
    """Every strategy x offload x precision: per-rank bytes at each world size, and the smallest that fits."""
    shape = describe(config)
    settings = config.estimate
    checkpointing = config.strategy.activation_checkpointing
    precisions = [Precision.fp32, Precision.bf16] + (
        [Precision.fp16] if config.trainer.precision is Precision.fp16 else []
    )
    activations = {
        precision: {
            ac: activation_bytes(
                shape,
                micro_batch=config.trainer.micro_batch_size,
                seq_len=config.data.seq_len_or_none or 1,
                precision=precision,
                checkpointing=ac,
            )
            for ac in (False, True)
        }
        for precision in precisions
    }
    budget = _Budget(
        device=settings.device_memory_gb * GIB,
        host=float("inf") if settings.host_memory_gb is None else settings.host_memory_gb * GIB,
    )
    rows = []
    for precision in precisions:
        for strategy, offload in plans():

            def per_rank(
                n: int, ac: bool, plan: tuple[str, str, Precision] = (strategy, offload, precision)
            ) -> tuple[int, int]:
                states = model_states(*plan, shape, n)
                return states.device + (activations[plan[2]][ac] or 0), max(states.host, states.startup_host)

            at = {n: per_rank(n, checkpointing) for n in settings.world_sizes}
            rows.append(
                {
                    "strategy": strategy,
                    "offload": offload,
                    "precision": precision.value,
                    "world_sizes": {
                        n: {"device_bytes": device, "host_bytes": host, "fits": budget.fits(device, host)}
                        for n, (device, host) in at.items()
                    },
                    "smallest_world_size": budget.smallest(lambda n: per_rank(n, checkpointing)),
                    "smallest_world_size_with_checkpointing": budget.smallest(lambda n: per_rank(n, True)),
                }
            )
    return {
        "model": config.model.name,
        "shape": asdict(shape),
        "micro_batch_size": config.trainer.micro_batch_size,
        "seq_len": config.data.seq_len_or_none,
        "device_memory_gib": settings.device_memory_gb,
        "host_memory_gib": settings.host_memory_gb,
        "activation_checkpointing": checkpointing,
        "activation_bytes": {
            precision.value: {"without_checkpointing": by_ac[False], "with_checkpointing": by_ac[True]}
            for precision, by_ac in activations.items()
        },
        "rows": rows,
    }


@dataclass(frozen=True)
class _Budget:
    """Per-rank memory limits, device and host, in bytes."""

    device: float
    host: float

    def fits(self, device: int, host: int) -> bool:
        return device <= self.device and host <= self.host

    def smallest(self, per_rank: Callable[[int], tuple[int, int]]) -> int | None:
        """The smallest power-of-two world size at which ``per_rank(n)`` fits."""
        return next((n for n in SEARCH_WORLD_SIZES if self.fits(*per_rank(n))), None)


def format_table(result: dict[str, Any], *, job: str) -> str:
    shape = result["shape"]
    world_sizes = list(result["rows"][0]["world_sizes"])
    lines = [
        f"estimate: job={job}, model={result['model']}, {_count(shape['num_params'])} parameters "
        + (f"({_count(shape['trainable_params'])} trainable, LoRA) " if shape["trainable_params"] is not None else "")
        + f"(largest layer {_count(shape['largest_layer_params'])}), micro-batch {result['micro_batch_size']}"
        + (f" x {result['seq_len']} tokens" if result["seq_len"] else "")
        + f", {result['device_memory_gib']:g} GiB per device"
        + (
            f", {result['host_memory_gib']:g} GiB host memory per rank"
            if result["host_memory_gib"]
            else " (host memory not checked: estimate.host_memory_gb)"
        ),
    ]
    for precision, acts in result["activation_bytes"].items():
        if acts["without_checkpointing"] is not None:
            lines.append(
                f"activations per rank ({precision}): {acts['without_checkpointing'] / GIB:.2f} GiB, "
                f"{acts['with_checkpointing'] / GIB:.2f} GiB with activation checkpointing"
            )
    ac = "on" if result["activation_checkpointing"] else "off"
    lines += [
        "",
        f"per rank: device GiB (host GiB: offloaded state, or the whole model built in host memory at "
        f"start-up); activation checkpointing {ac} as in the job",
        "",
        "| strategy | offload | precision | "
        + " | ".join(f"N={n}" for n in world_sizes)
        + " | smallest N | with checkpointing |",
        "|---|---|---|" + "---:|" * len(world_sizes) + "---:|---:|",
    ]
    for row in result["rows"]:
        cells = []
        for n in world_sizes:
            cell = row["world_sizes"][n]
            host = f" ({cell['host_bytes'] / GIB:.1f})" if cell["host_bytes"] else ""
            cells.append(f"{cell['device_bytes'] / GIB:.1f}{host} {'fits' if cell['fits'] else 'no'}")
        smallest = row["smallest_world_size"] or "-"
        with_ac = row["smallest_world_size_with_checkpointing"] or "-"
        lines.append(
            f"| {row['strategy']} | {row['offload']} | {row['precision']} | "
            + " | ".join(cells)
            + f" | {smallest} | {with_ac} |"
        )
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def estimate_command(args: list[str]) -> int:
    """``orchestrator estimate [--json] [overrides]``."""
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    config = to_config(compose(overrides))
    result = estimate(config)
    job = next((o.split("=", 1)[1] for o in overrides if o.startswith("job=")), "default")
    if as_json:
        json.dump({"job": job, **result}, sys.stdout, indent=1)
        print()
    else:
        print(format_table(result, job=job))
    return 0
