"""Facts about this machine's GPUs (NVML), kept apart from the pure plan."""

from __future__ import annotations

import ctypes
import ctypes.util

from twllm.plan.placement import GpuInventory
from twllm.settings import GPUS_ENV


def detect_gpus() -> GpuInventory | None:
    """The GPUs NVML reports, or None when there is no NVIDIA driver."""
    name = ctypes.util.find_library("nvidia-ml") or "libnvidia-ml.so.1"
    try:
        nvml = ctypes.CDLL(name)
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            return None
        handle = ctypes.c_void_p()
        memory_gib = None
        if nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 0:

            class _Memory(ctypes.Structure):
                _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

            mem = _Memory()
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) == 0:
                memory_gib = round(mem.total / 2**30, 1)
        return GpuInventory(count=count.value, memory_gib=memory_gib, source="nvml")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - best effort on a foreign library
            pass


def inventory(
    flag_gpus: int | None, spec_gpus: int, spec_memory_gib: float | None, env_gpus: int | None = None
) -> GpuInventory:
    """--gpus wins, then NVML, then TWLLM_GPUS, then the spec's hardware section."""
    if flag_gpus is not None:
        return GpuInventory(flag_gpus, spec_memory_gib, "--gpus")
    found = detect_gpus()
    if found is not None:
        return found
    if env_gpus is not None:
        return GpuInventory(env_gpus, spec_memory_gib, GPUS_ENV)
    return GpuInventory(spec_gpus, spec_memory_gib, "spec hardware.gpus")
