"""``orchestrator estimate``: the ZeRO paper's memory model against DeepSpeed's own estimators, and a 70B
model counted on the meta device in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import Precision
from orchestrator.experiments.estimate import ModelShape, activation_bytes, describe, estimate, model_states
from tests.helpers import run_cli

SHAPES = [
    ModelShape(
        num_params=124_000_000, largest_layer_params=38_000_000, largest_block_params=7_000_000, root_params=39_000_000
    ),
    ModelShape(
        num_params=70_553_706_496,
        largest_layer_params=1_050_673_152,
        largest_block_params=855_654_400,
        root_params=2_101_354_496,
    ),
]


@pytest.fixture(scope="module")
def deepspeed_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("shape", SHAPES, ids=["124M", "70B"])
@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("nodes", [1, 8])
def test_zero2_and_zero3_agree_with_deepspeeds_estimators(
    deepspeed_estimators, shape: ModelShape, gpus: int, nodes: int
) -> None:
    zero2, zero3 = deepspeed_estimators
    n = gpus * nodes
    psi, layer = shape.num_params, shape.largest_layer_params
    ours = {
        plan: model_states(*plan, Precision.bf16, shape, n)
        for plan in [
            ("zero2", "none"),
            ("zero2", "optimizer"),
            ("zero3", "none"),
            ("zero3", "optimizer"),
            ("zero3", "params+optimizer"),
        ]
    }
    # DeepSpeed returns (host bytes per node, device bytes per GPU); additional_buffer_factor=1 asks
    # for the tensors alone. Its host figure for ZeRO-1/2 offload is max(4 x GPUs, 16) bytes per
    # parameter per node whatever the number of nodes, ours 16/N per rank (each node holds its ranks'
    # partitions): the same on one node with at most 4 GPUs.
    host, device = zero2(psi, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=False, additional_buffer_factor=1)
    assert ours["zero2", "none"].device == device
    host, device = zero2(psi, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=True, additional_buffer_factor=1)
    assert ours["zero2", "optimizer"].device == device
    if nodes == 1:
        assert ours["zero2", "optimizer"].host * gpus == pytest.approx(host)
    for offload, params in (("none", False), ("optimizer", False), ("params+optimizer", True)):
        host, device, _ = zero3(
            psi,
            layer,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=offload != "none",
            cpu_offload_params=params,
            zero_init=True,
            additional_buffer_factor=1,
        )
        assert ours["zero3", offload].device == pytest.approx(device, abs=1), offload
        if offload != "none":
            assert ours["zero3", offload].host * gpus == pytest.approx(host), offload


def test_more_ranks_never_need_more_memory_and_offload_moves_states_to_the_host() -> None:
    shape = SHAPES[1]
    for precision in Precision:
        for plan in [("fsdp2", "none"), ("zero1", "none"), ("zero2", "none"), ("zero3", "none")]:
            sizes = [model_states(*plan, precision, shape, n).device for n in (1, 8, 64)]
            assert sizes == sorted(sizes, reverse=True), plan
        for strategy, offload in [("zero2", "optimizer"), ("zero3", "params+optimizer"), ("fsdp2", "params")]:
            moved = model_states(strategy, offload, precision, shape, 8)
            kept = model_states(strategy, "none", precision, shape, 8)
            assert moved.device < kept.device and moved.host > 0 and kept.host == 0


def test_activation_checkpointing_keeps_one_input_per_layer() -> None:
    shape = ModelShape(
        num_params=0,
        largest_layer_params=0,
        largest_block_params=0,
        root_params=0,
        layers=12,
        hidden=768,
        heads=12,
        vocab=50304,
    )
    full = activation_bytes(shape, micro_batch=8, seq_len=1024, precision=Precision.bf16, checkpointing=False)
    kept = activation_bytes(shape, micro_batch=8, seq_len=1024, precision=Precision.bf16, checkpointing=True)
    layer = 1024 * 8 * 768 * 34  # fused attention: no s x s scores kept
    logits = 8 * 1024 * 8 * 50304
    assert full == int(12 * layer + logits)
    assert kept == int(12 * 2 * 1024 * 8 * 768 + layer + logits)
    no_transformer = ModelShape(num_params=10, largest_layer_params=10, largest_block_params=10, root_params=0)
    assert (
        activation_bytes(no_transformer, micro_batch=8, seq_len=1, precision=Precision.fp32, checkpointing=False)
        is None
    )


def test_a_70b_model_is_counted_on_the_meta_device() -> None:
    config = to_config(compose(["job=llama3_70b_zero3", "estimate.world_sizes=[8,64]", "estimate.host_memory_gb=250"]))
    shape = describe(config)
    result = estimate(config)
    assert shape.num_params == 70_553_706_496  # Llama-3-70B's parameter count
    assert shape.largest_layer_params == 128256 * 8192  # the embedding (untied)
    assert (shape.layers, shape.hidden, shape.heads) == (80, 8192, 64)
    rows = {(r["strategy"], r["offload"], r["precision"]): r for r in result["rows"]}
    assert rows["ddp", "none", "bf16"]["smallest_world_size"] is None  # 16 bytes x 70B never fits in 80 GiB
    zero3 = rows["zero3", "none", "bf16"]
    assert not zero3["world_sizes"][8]["fits"] and zero3["world_sizes"][64]["fits"]
    assert zero3["smallest_world_size"] in (16, 32)
    # Offloaded: the device holds little, so host memory decides (18 bytes x 70.6B over N <= 250 GiB).
    offloaded = rows["zero3", "params+optimizer", "bf16"]
    assert offloaded["world_sizes"][8]["host_bytes"] == int(18 * shape.num_params / 8)
    assert offloaded["smallest_world_size"] == 8
    # Start-up: ZeRO-1/2 build the whole fp32 model in every rank's host memory first (282 GB > 250 GiB),
    # whatever N; ZeRO-3 and FSDP2 build only their shards, on the device.
    for plan in (("zero1", "optimizer", "bf16"), ("zero2", "optimizer", "bf16")):
        assert rows[plan]["world_sizes"][64]["host_bytes"] == 4 * shape.num_params
        assert rows[plan]["smallest_world_size"] is None
    assert rows["zero3", "none", "bf16"]["world_sizes"][64]["host_bytes"] == 0
    assert rows["fsdp2", "none", "bf16"]["world_sizes"][64]["host_bytes"] == 0


def test_estimate_command_prints_a_table_and_json(tmp_path: Path) -> None:
    table = run_cli("estimate", "estimate.world_sizes=[1,2]", cwd=tmp_path, check=True).stdout
    assert "| zero3 | params+optimizer | bf16 |" in table and "smallest N" in table
    result = json.loads(
        run_cli("estimate", "--json", "estimate.device_memory_gb=0.01", cwd=tmp_path, check=True).stdout
    )
    assert result["job"] == "default" and result["shape"]["num_params"] > 1_000_000
    assert {row["strategy"] for row in result["rows"]} == {"ddp", "fsdp2", "zero1", "zero2", "zero3"}
    ddp = next(row for row in result["rows"] if row["strategy"] == "ddp" and row["precision"] == "fp32")
    assert ddp["world_sizes"]["1"]["device_bytes"] > 16 * result["shape"]["num_params"]
