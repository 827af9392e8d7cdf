"""What each tier can still hold, and the check that a policy's exact needs fit before any work."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from flexgen_core.placement import TIERS


class PolicyDoesNotFit(ValueError):
    """A policy needs more of a tier than this machine has free."""


def available_bytes(devices, offload_path) -> dict[str, int | None]:
    """Free bytes per tier now; None where unknown. On a CPU-only host "gpu" and "cpu" share RAM."""
    ram = mem_available()
    free = {"disk": shutil.disk_usage(offload_path).free, "cpu": ram, "gpu": ram}
    if devices.cuda:
        free["gpu"] = torch.cuda.mem_get_info(devices.compute)[0]
    return free


def mem_available() -> int | None:
    """RAM this process may still take: the host's MemAvailable, or less where the memory cgroup it
    runs in (a container, a Slurm job) sets a lower limit."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    limited = cgroup_available()
    if limited is None:
        return host
    return limited if host is None else min(host, limited)


NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def cgroup_available(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                     root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """Bytes the memory cgroups of this process still allow: for each level from its own cgroup up to
    the root that sets a limit, limit - usage + inactive file cache (reclaimable: the kernel drops it
    before it refuses memory); the smallest of them. cgroup v2 (memory.max) and v1
    (memory.limit_in_bytes), mounted at `root` (v2 also at `root`/unified on hybrid hosts). None when
    no level sets a limit or nothing can be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    hierarchies = []  # (mount point, cgroup path, limit file, usage file, inactive-file key of memory.stat)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            hierarchies += [(mount, path, "memory.max", "memory.current", "inactive_file")
                            for mount in (root, root / "unified")]
        elif "memory" in controllers.split(","):
            hierarchies.append((root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                "total_inactive_file"))
    smallest = None
    for mount, path, limit_file, usage_file, inactive_key in hierarchies:
        folder = mount / path.strip("/")
        while True:
            free = _cgroup_level_free(folder, limit_file, usage_file, inactive_key)
            if free is not None:
                smallest = free if smallest is None else min(smallest, free)
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
    return smallest


def _cgroup_level_free(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= NO_LIMIT:
            return None
        usage = int((folder / usage_file).read_text().strip())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return None
    return max(0, int(limit_text) - usage + int(stat.get(inactive_key, 0)))


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
