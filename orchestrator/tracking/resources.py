"""What one worker process uses: CPU, memory, and its GPU where there is one."""

from __future__ import annotations

import resource
import sys
from typing import Any

import psutil
import torch


class ResourceSampler:
    """Samples this process's resource use; ``cpu_pct`` is the average since the previous sample."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.process = psutil.Process()
        self.process.cpu_percent()  # starts the interval the first sample measures
        self._nvml_handle = _nvml_handle(device)

    def sample(self) -> dict[str, Any]:
        memory = self.process.memory_info()
        record: dict[str, Any] = {
            "cpu_pct": self.process.cpu_percent(),
            "rss_bytes": memory.rss,
            "rss_peak_bytes": peak_rss_bytes(),
        }
        if self.device.type == "cuda":
            record["gpu_mem_bytes"] = torch.cuda.memory_allocated(self.device)
            record["gpu_mem_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            record["gpu_mem_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            record.update(_nvml_sample(self._nvml_handle))
        return record


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    On Linux, VmHWM of /proc/self/status: ``ru_maxrss`` would count the parent's memory at fork
    time, which for a spawned worker is the driver's, tokenizer and all.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (macOS): fall back to getrusage
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def peak_memory_bytes(device: torch.device) -> int:
    """The figure a user compares against the device: peak allocated GPU memory, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def _nvml_handle(device: torch.device) -> Any:
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        # By UUID: CUDA's device index counts only CUDA_VISIBLE_DEVICES, and NVML ignores that variable.
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # NVML missing or refusing: GPU utilization is optional, training is not
        return None


def _nvml_sample(handle: Any) -> dict[str, Any]:
    if handle is None:
        return {}
    import pynvml

    record: dict[str, Any] = {}
    try:
        record["gpu_util_pct"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        record["gpu_mem_used_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        record["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    except pynvml.NVMLError:  # a GPU that stops answering: keep what was read
        pass
    return record
