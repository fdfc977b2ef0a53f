"""GPU placement: whole GPUs for every vLLM replica, packed so tensor-parallel groups stay aligned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twllm.errors import PlanError
from twllm.spec.resolve import ResolvedModel

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs the plan may use, and where that number came from."""

    count: int
    memory_gib: float | None = None
    source: str = "spec"
    """nvml | flag | spec."""


def place_replicas(models: Sequence[ResolvedModel], inventory: GpuInventory) -> dict[tuple[str, int], tuple[int, ...]]:
    """Map (model name, replica) to GPU indices; raise PlanError when the fleet does not fit.

    Largest groups go first; a group of n GPUs starts at a multiple of n (first fit), which keeps
    tensor-parallel peers on neighbouring devices.
    """
    _check_memory(models, inventory)
    wanted = [(m, r) for m in models for r in range(m.spec.replicas) if m.gpus_per_replica > 0]
    total = sum(m.gpus_per_replica for m, _ in wanted)
    if total > inventory.count:
        raise PlanError(_does_not_fit(models, inventory, total))
    free = [True] * inventory.count
    placed: dict[tuple[str, int], tuple[int, ...]] = {}
    order = sorted(range(len(wanted)), key=lambda i: -wanted[i][0].gpus_per_replica)
    for i in order:
        model, replica = wanted[i]
        n = model.gpus_per_replica
        start = _first_fit(free, n)
        if start is None:
            raise PlanError(_does_not_fit(models, inventory, total, fragmented=True))
        for g in range(start, start + n):
            free[g] = False
        placed[(model.name, replica)] = tuple(range(start, start + n))
    return placed


def _first_fit(free: list[bool], n: int) -> int | None:
    for step in (n, 1):  # aligned blocks first, any contiguous block second
        for start in range(0, len(free) - n + 1, step):
            if all(free[start : start + n]):
                return start
    return None


def _does_not_fit(
    models: Sequence[ResolvedModel], inventory: GpuInventory, total: int, fragmented: bool = False
) -> str:
    lines = [
        f"the models need {total} GPU(s) but {inventory.count} are available ({inventory.source})"
        if not fragmented
        else f"the models' GPU groups cannot be packed onto {inventory.count} GPU(s)"
    ]
    for m in models:
        if m.gpus_per_replica:
            lines.append(
                f"  {m.name}: {m.spec.replicas} replica(s) × {m.gpus_per_replica} GPU(s) = "
                f"{m.spec.replicas * m.gpus_per_replica}"
            )
    lines.append("lower replicas or tensor_parallel, or plan for more GPUs with --gpus N")
    return "\n".join(lines)


def _check_memory(models: Sequence[ResolvedModel], inventory: GpuInventory) -> None:
    if inventory.memory_gib is None:
        return
    for m in models:
        n = m.gpus_per_replica
        weights = m.weight_gib()
        if not n or weights is None:
            continue
        util = m.spec.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        usable = inventory.memory_gib * util
        if weights / n > usable:
            need = -(-weights // usable)
            raise PlanError(
                f"{m.name}: about {weights:.1f} GiB of weights across {n} GPU(s) is "
                f"{weights / n:.1f} GiB per GPU, more than the {usable:.1f} GiB usable "
                f"({inventory.memory_gib:g} GiB × {util:g})",
                hint=f"set tensor_parallel: {_next_pow2(int(need))} or more, or a quantization",
            )


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
