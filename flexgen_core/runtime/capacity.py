"""What each tier can still hold, and the check that a policy's exact needs fit before any work."""

from __future__ import annotations

import shutil

import torch

from flexgen_core.memory import TIERS


class PolicyDoesNotFit(ValueError):
    """A policy needs more of a tier than this machine has free."""


def available_bytes(devices, offload_path) -> dict[str, int | None]:
    """Free bytes per tier now; None where unknown. On a CPU-only host "gpu" and "cpu" share RAM."""
    ram = _mem_available()
    free = {"disk": shutil.disk_usage(offload_path).free, "cpu": ram, "gpu": ram}
    if devices.cuda:
        free["gpu"] = torch.cuda.mem_get_info(devices.compute)[0]
    return free


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(needs: dict[str, int], devices, offload_path, policy, what: str) -> None:
    """Raise PolicyDoesNotFit naming the tier and the shortfall when `needs` (bytes per tier) exceed
    what is free. On a CPU-only host the compute tier and the CPU tier draw on the same RAM."""
    free = available_bytes(devices, offload_path)
    needs = dict(needs)
    if not devices.cuda:
        needs = {"gpu": 0, "cpu": needs.get("gpu", 0) + needs.get("cpu", 0), "disk": needs.get("disk", 0)}
    names = {"gpu": "GPU memory", "cpu": "CPU memory" if devices.cuda else "RAM", "disk": "disk"}
    for tier in TIERS:
        if free[tier] is not None and needs.get(tier, 0) > free[tier]:
            short = needs[tier] - free[tier]
            raise PolicyDoesNotFit(
                f"policy {policy.percent} (batch {policy.gpu_batch_size}x{policy.num_gpu_batches}) needs "
                f"{needs[tier] / 2**30:.2f} GiB of {names[tier]} for {what}, {free[tier] / 2**30:.2f} GiB is free "
                f"(short by {short / 2**30:.2f} GiB); move that share to another tier, lower the batch size, "
                "or let `flexgen plan` choose a policy"
            )


def out_of_memory_error(policy, error: BaseException) -> PolicyDoesNotFit:
    return PolicyDoesNotFit(
        f"CUDA ran out of memory with policy {policy.percent} (batch {policy.gpu_batch_size}x"
        f"{policy.num_gpu_batches}): {str(error).splitlines()[0]}; buffers were released. Lower the GPU "
        "percentages or the batch size, or let `flexgen plan` choose a policy"
    )
