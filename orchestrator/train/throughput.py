"""Throughput and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices). Achieved FLOP/s = training FLOPs
per token (the model registry's figure: 6 x non-embedding params + 12 x layers x heads x head_dim x
seq_len for transformers) x tokens per second. Peak figures are dense (no sparsity) from the vendors'
data sheets; ``trainer.peak_tflops`` overrides the table (and is the only source on CPUs).
"""

from __future__ import annotations

import torch

from orchestrator.config.schema import Precision

# Dense TFLOP/s by (device-name fragment, precision). Longest matching fragment wins; fp16 = bf16 on these.
_PEAK_TFLOPS: dict[str, dict[Precision, float]] = {
    "H200": {Precision.bf16: 989.0, Precision.fp32: 67.0},
    "H100 NVL": {Precision.bf16: 835.0, Precision.fp32: 60.0},
    "H100 PCIe": {Precision.bf16: 756.0, Precision.fp32: 51.0},
    "H100": {Precision.bf16: 989.0, Precision.fp32: 67.0},  # SXM
    "A100": {Precision.bf16: 312.0, Precision.fp32: 19.5},
    "L40S": {Precision.bf16: 362.0, Precision.fp32: 91.6},
    "L4": {Precision.bf16: 121.0, Precision.fp32: 30.3},
    "A10G": {Precision.bf16: 70.0, Precision.fp32: 31.2},
    "V100": {Precision.fp16: 125.0, Precision.fp32: 15.7},
}


def peak_flops_per_device(device: torch.device, precision: Precision, *, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device at ``precision``, or None when unknown (then MFU is not reported)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision)


def peak_flops_for_name(name: str, precision: Precision) -> float | None:
    matches = [fragment for fragment in _PEAK_TFLOPS if fragment in name]
    if not matches:
        return None
    table = _PEAK_TFLOPS[max(matches, key=len)]
    lookup = Precision.bf16 if precision is Precision.fp16 and Precision.fp16 not in table else precision
    tflops = table.get(lookup)
    return tflops * 1e12 if tflops is not None else None


def mfu(*, flops_per_token: float, tokens_per_s: float, peak_flops: float | None, num_devices: int) -> float | None:
    """Model FLOPs utilization in [0, 1], or None without a peak figure."""
    if peak_flops is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * num_devices)
