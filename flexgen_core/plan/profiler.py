"""Measure this machine's hardware profile with the engine's own I/O paths and kernels.

- memory: the compute device's total memory, host RAM, free space under the offload dir;
- host<->device copies: pinned host slots (`storage.Devices.empty`) to and from device buffers with
  `copy_(non_blocking=True)`, as weights, cache and hidden states move; on a CPU-only host, a host
  `copy_` (the memcpy of hidden states and prompt cache rows into their homes);
- disk: an offload file (`storage.DiskFile`) written and read in layer-sized pieces: through the page
  cache (`*_cached`) and, after `fsync` and dropping the file's pages, from the device itself;
- compute, in the profile's dtype: `models.layers.linear` at row counts from 1 to a prompt pass, kept
  as a table of seconds per weight parameter (and read as the roofline's flop rates and device memory
  bandwidth), `models.layers.attend` at prompt and decode shapes, on the device and, with CUDA, on
  the CPU, and `compression.decompress` of a 4-bit weight;
- fixed cost per layer and GPU batch: the engine's block schedule (`schedule.BlockRunner`) decoding
  with a small random OPT, less what the rates above predict for it (calibrated last);
- on a CPU-only host, how much a disk read on a background thread overlaps matmuls on the main thread
  (`io_overlap`): there both compete for the same cores and memory bandwidth.

On a CPU-only host the "GPU" is the CPU: its memory is host RAM and the CPU-attention rate is the
device's decode-attention rate. Times are medians of a few repetitions after a warm-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from flexgen_core.models import layers as L
from flexgen_core.plan.hardware import HardwareProfile, load_profile
from flexgen_core.runtime.storage import TORCH_DTYPES, Devices, OffloadDir

log = logging.getLogger(__name__)
MiB = 2**20
CALIBRATION_PROMPT_LEN = 16


def _timed(fn: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after a warm-up: on a shared host, the typical speed
    under the load of the moment, as a long generation run sees it (the fastest run would be optimistic)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Bench:
    def __init__(self, devices: Devices, dtype: torch.dtype, quick: bool):
        self.devices = devices
        self.dtype = dtype
        self.quick = quick
        self.repeats = 3 if quick else 5
        self.calibration_steps = 16 if quick else 32  # decode steps of the engine runs that calibrate
        self.sync = (lambda: torch.cuda.synchronize(devices.compute)) if devices.cuda else (lambda: None)

    # ---- copies ---------------------------------------------------------------------------------
    def copies(self) -> dict[str, float]:
        nbytes = (64 if self.quick else 256) * MiB
        host = self.devices.empty("cpu", nbytes)
        host.fill_(1)
        if self.devices.cuda:
            device = self.devices.empty("gpu", nbytes)
            to_device = nbytes / _timed(lambda: device.copy_(host, non_blocking=True), self.sync, self.repeats)
            to_host = nbytes / _timed(lambda: host.copy_(device, non_blocking=True), self.sync, self.repeats)
            return {"cpu_to_gpu": to_device, "gpu_to_cpu": to_host}
        other = torch.empty_like(host)
        rate = nbytes / _timed(lambda: other.copy_(host), self.sync, self.repeats)
        return {"cpu_to_gpu": rate, "gpu_to_cpu": rate}

    # ---- disk -----------------------------------------------------------------------------------
    def disk(self, offload_dir) -> dict[str, float]:
        total = (256 if self.quick else 1024) * MiB
        piece = 64 * MiB  # about one large layer's disk share
        offload = OffloadDir(offload_dir)
        try:
            f = offload.file("profile.bin", total)
            buf = self.devices.empty("cpu", piece, pin=False)
            buf.fill_(7)

            def write_all():
                for offset in range(0, total, piece):
                    f.write(offset, buf)

            def read_all():
                for offset in range(0, total, piece):
                    f.read_into(offset, buf)

            start = time.perf_counter()
            write_all()
            cached_write = total / (time.perf_counter() - start)
            fd = os.open(f.path, os.O_RDONLY)
            try:
                os.fsync(fd)
                start = time.perf_counter()
                write_all()
                os.fsync(fd)
                durable_write = total / (time.perf_counter() - start)
                read_all()
                start = time.perf_counter()
                read_all()
                cached_read = total / (time.perf_counter() - start)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop this file's pages: read the device
                start = time.perf_counter()
                read_all()
                device_read = total / (time.perf_counter() - start)
            finally:
                os.close(fd)
            free = shutil.disk_usage(offload.path).free + total
        finally:
            offload.close()
        return {"disk_to_cpu": device_read, "cpu_to_disk": durable_write, "disk_to_cpu_cached": cached_read,
                "cpu_to_disk_cached": cached_write, "disk_bytes": free}

    # ---- compute --------------------------------------------------------------------------------
    def _tensor(self, *shape, device=None) -> torch.Tensor:
        return torch.randn(*shape, dtype=self.dtype, device=device or self.devices.compute) * 0.1

    def matmul(self) -> dict[str, Any]:
        """`models.layers.linear` timed at row counts from one token to a prompt pass, as seconds per
        weight parameter (the profile's `matmul_s_per_param` table), and the roofline figures read off
        it: the flop rate of the largest rows (prefill), the best flop rate up to 128 rows (decode), and
        the weight bytes per second of one row (device memory bandwidth)."""
        cuda = self.devices.cuda
        hidden = (4096 if cuda else 1024) if not self.quick else (2048 if cuda else 768)
        if self.quick:
            row_counts = (1, 4, 16, 64, 256, 1024) + ((4096,) if cuda else ())
        else:
            row_counts = tuple(2**i for i in range(12)) + ((4096, 8192) if cuda else ())
        # Few rows: many distinct weights, more bytes than any cache holds, as a decode step streams a
        # model's layers. Many rows (compute-bound): as many of them as keep a call near `flop_budget`.
        total = (128 if self.quick else 512) * MiB if not cuda else 2048 * MiB
        count = max(1, total // (4 * hidden * hidden * self.dtype.itemsize))
        weights = [self._tensor(4 * hidden, hidden) for _ in range(count)]
        params_each = weights[0].numel()
        flop_budget = 2e12 if cuda else (5e9 if self.quick else 2e10)
        table = {}
        for rows in row_counts:
            used = weights[:max(1, min(count, round(flop_budget / (2 * rows * params_each))))]
            x = self._tensor(rows, hidden)
            repeats = self.repeats if rows <= 128 else 3
            seconds = _timed(lambda: [L.linear(x, w) for w in used], self.sync, repeats)
            table[rows] = seconds / (len(used) * params_each)
        decode_rows = [r for r in row_counts if r <= 128]
        return {
            "matmul_s_per_param": table,
            "gpu_matmul_prefill": 2 * row_counts[-1] / table[row_counts[-1]],
            "gpu_matmul_decode": max(2 * rows / table[rows] for rows in decode_rows),
            "gpu_memory": self.dtype.itemsize / table[1],
        }

    def decompress(self) -> dict[str, float]:
        """Dense bytes per second of `compression.decompress` on a 4-bit weight (the engine's weight
        config), into a reused output buffer as the engine does."""
        from flexgen_core.compression import compress, decompress
        from flexgen_core.memory import WEIGHT_COMPRESSION

        hidden = (4096 if self.devices.cuda else 1024) if not self.quick else (2048 if self.devices.cuda else 768)
        weight = self._tensor(4 * hidden, hidden)
        packed = compress(weight, WEIGHT_COMPRESSION)
        out = torch.empty_like(weight)
        seconds = _timed(lambda: decompress(packed, out=out), self.sync, self.repeats)
        return {"decompress": weight.numel() * weight.element_size() / seconds}

    def _attention_rate(self, batch: int, q_len: int, key_len: int, heads: int, head_dim: int, device) -> float:
        q = self._tensor(batch, q_len, heads, head_dim, device=device)        # (B, s, nh, hd)
        kv = self._tensor(key_len, 2, batch, heads, head_dim, device=device)  # the cache layout (s, 2, B, nh, hd)
        query = torch.arange(key_len - q_len, key_len, device=device)[:, None]
        allowed = (torch.arange(key_len, device=device)[None, :] <= query)[None, None].expand(batch, 1, q_len, key_len)
        sync = self.sync if torch.device(device).type == "cuda" else (lambda: None)
        t = _timed(lambda: L.attend(q, kv[:, 0], kv[:, 1], allowed), sync, self.repeats)
        return 4 * batch * q_len * key_len * heads * head_dim / t

    def attention(self) -> dict[str, float]:
        heads, head_dim = (32, 128) if self.devices.cuda else (12, 64)
        prompt = 512 if not self.quick else 256
        prefill = self._attention_rate(4 if self.devices.cuda else 1, prompt, prompt, heads, head_dim,
                                       self.devices.compute)
        decode = self._attention_rate(16, 1, 1024, heads, head_dim, self.devices.compute)
        cpu = self._attention_rate(16, 1, 1024, heads, head_dim, "cpu") if self.devices.cuda else decode
        return {"gpu_batched_matmul_prefill": prefill, "gpu_batched_matmul_decode": decode, "cpu": cpu}

    def _decode_step_s(self, offload_dir, hidden: int, policy) -> tuple[float, Any]:
        """Seconds per decode step of the engine's own block schedule (`schedule.BlockRunner`) on a
        4-layer random OPT of width `hidden` under `policy`, and that model's plan shape."""
        from flexgen_core.models import opt
        from flexgen_core.plan.shapes import PlanModel
        from flexgen_core.runtime.decoding import DecodeSettings, SequenceState
        from flexgen_core.runtime.batch import Batch
        from flexgen_core.runtime.schedule import BlockRunner, RunContext
        from flexgen_core.runtime.weights import WeightStore

        cfg = opt.OPTConfig.from_hf({"hidden_size": hidden, "num_attention_heads": hidden // 64,
                                     "num_hidden_layers": 4, "ffn_dim": 4 * hidden, "vocab_size": 1024,
                                     "max_position_embeddings": 256})
        layers = opt.build_layers(cfg)
        steps = self.calibration_steps
        prompt_len = CALIBRATION_PROMPT_LEN
        offload = OffloadDir(offload_dir)
        runner = None
        try:
            weights = WeightStore(layers, policy, self.devices, self.dtype, offload)
            for layer_idx, layer in enumerate(layers):
                for spec in layer.specs:
                    weights.put(layer_idx, spec.name, torch.randn(spec.shape) * 0.02)
            runner = BlockRunner(RunContext(layers, weights, cfg, policy, self.devices, self.dtype, offload))

            def generate(new_tokens: int) -> None:
                batch = policy.gpu_batch_size
                seqs = [SequenceState([5] * prompt_len, None) for _ in range(batch)]
                ids = torch.full((batch, prompt_len), 5, dtype=torch.long, device=self.devices.compute)
                runner.run([Batch(ids, [0] * batch, seqs)], DecodeSettings(new_tokens, 0.0, 1.0, 0, (), None), False)

            short = _timed(lambda: generate(1), self.sync, self.repeats)
            long = _timed(lambda: generate(1 + steps), self.sync, self.repeats)
        finally:
            if runner is not None:
                runner.close()
            offload.close()
        return (long - short) / steps, PlanModel("profile-opt", cfg, layers, "profile")

    def layer_overhead(self, offload_dir, profile: HardwareProfile) -> float:
        """Seconds per layer and GPU batch that the engine spends beside what the rates account for
        (Python, small ops, masks, token choice, and waiting on its I/O threads' futures, which on a busy
        host costs a scheduler slice): a small random OPT decodes with every tensor on the device, and
        the measured time per decode step, less the cost model's prediction from `profile` (the rates
        measured above, no overhead), is divided by the step's (layer, batch) units."""
        from flexgen_core.plan.cost_model import CostModel
        from flexgen_core.plan.workload import Workload
        from flexgen_core.policy import Policy

        policy = Policy(gpu_batch_size=8)
        per_step, model = self._decode_step_s(offload_dir, 1024 if self.devices.cuda else 512, policy)
        workload = Workload(CALIBRATION_PROMPT_LEN, 1 + self.calibration_steps)
        predicted = CostModel(model, workload, profile, self.dtype.itemsize).estimate(policy)
        return max(0.0, per_step - predicted.decode_token_s) / (len(model.layers) * policy.num_gpu_batches)

    def io_overlap(self, offload_dir) -> float:
        """How much a disk read on a background thread (the engine's load thread) overlaps decode matmuls
        on the main thread: (t_read + t_compute - t_both) / min(t_read, t_compute), in [0, 1]."""
        total, piece = (64 if self.quick else 256) * MiB, 8 * MiB
        hidden = 1024
        x, big = self._tensor(8, hidden), self._tensor(4 * hidden, hidden)
        offload = OffloadDir(offload_dir)
        pool = ThreadPoolExecutor(1)
        try:
            f = offload.file("overlap.bin", total)
            buf = self.devices.empty("cpu", piece, pin=False)
            for offset in range(0, total, piece):
                f.write(offset, buf)

            def read_all():
                for offset in range(0, total, piece):
                    f.read_into(offset, buf)

            read_all()  # in the page cache, as a model's offload files are after loading
            t_read = _timed(read_all, self.sync, 2)
            t_one = _timed(lambda: L.linear(x, big), self.sync, 5)
            repeats = max(1, round(t_read / t_one))

            def compute():
                for _ in range(repeats):
                    L.linear(x, big)
                self.sync()

            t_compute = _timed(compute, self.sync, 2)
            estimates = []
            for _ in range(3):
                start = time.perf_counter()
                job = pool.submit(read_all)
                compute()
                job.result()
                t_both = time.perf_counter() - start
                estimates.append((t_read + t_compute - t_both) / min(t_read, t_compute))
            return min(1.0, max(0.0, statistics.median(estimates)))
        finally:
            pool.shutdown()
            offload.close()


def measure(device: str = "auto", offload_dir: str | os.PathLike | None = None, quick: bool = False,
            dtype: str | None = None, progress: bool = True, name: str | None = None) -> HardwareProfile:
    """This machine's profile. `quick` uses smaller sizes (about 10-20 s on a CPU host)."""
    from tqdm import tqdm

    devices = Devices(device)
    dtype = dtype or ("float16" if devices.cuda else "float32")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    bench = _Bench(devices, TORCH_DTYPES[dtype], quick)
    results: dict[str, Any] = {}
    steps = [("host<->device copies", bench.copies), ("disk", lambda: bench.disk(offload_dir)),
             ("matmul", bench.matmul), ("attention", bench.attention), ("decompression", bench.decompress)]
    if not devices.cuda:  # on CUDA hosts copies run on their own engines and disks beside the GPU
        steps.append(("I/O-compute overlap", lambda: {"io_overlap": bench.io_overlap(offload_dir)}))
    bar = tqdm(total=len(steps) + 1, desc="profiling", unit="step", disable=not progress)
    with torch.no_grad():
        for label, step in steps:
            bar.set_postfix_str(label)
            log.info("measuring %s", label)
            results |= step()
            bar.update()
        profile = _profile(devices, dtype, quick, name, results)
        # Last: the engine's own overhead, calibrated against the rates just measured.
        bar.set_postfix_str("engine overhead per layer")
        profile = dataclasses.replace(profile, layer_overhead_s=bench.layer_overhead(offload_dir, profile))
        bar.update()
    bar.close()
    return profile


def _profile(devices: Devices, dtype: str, quick: bool, name: str | None, results: dict[str, Any]) -> HardwareProfile:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_properties(devices.compute).total_memory if devices.cuda else ram
    host = socket.gethostname()
    what = torch.cuda.get_device_name(devices.compute) if devices.cuda else f"{os.cpu_count()}-core CPU"
    return HardwareProfile(
        name=name or f"{host}-{devices.compute.type}",
        description=f"measured on {host} ({what}) by `flexgen profile`{' --quick' if quick else ''}",
        compute_device=devices.compute.type,
        dtype=dtype,
        gpu_bytes=int(gpu),
        cpu_bytes=int(ram),
        disk_bytes=int(results["disk_bytes"]),
        cpu_to_gpu=results["cpu_to_gpu"],
        gpu_to_cpu_cache=results["gpu_to_cpu"],
        gpu_to_cpu_hidden=results["gpu_to_cpu"],
        disk_to_cpu=results["disk_to_cpu"],
        cpu_to_disk_cache_prefill=results["cpu_to_disk"],
        cpu_to_disk_hidden_prefill=results["cpu_to_disk"],
        cpu_to_disk_decode=results["cpu_to_disk"],
        gpu_matmul_prefill=results["gpu_matmul_prefill"],
        gpu_matmul_decode=results["gpu_matmul_decode"],
        gpu_batched_matmul_prefill=results["gpu_batched_matmul_prefill"],
        gpu_batched_matmul_decode=results["gpu_batched_matmul_decode"],
        cpu_attention=results["cpu"],
        gpu_memory=results["gpu_memory"],
        decompress=results["decompress"],
        disk_to_cpu_cached=results["disk_to_cpu_cached"],
        cpu_to_disk_cached=results["cpu_to_disk_cached"],
        io_overlap=results.get("io_overlap", 1.0),
        matmul_s_per_param=tuple(sorted(results["matmul_s_per_param"].items())),
    )


# ---- the profile of this machine --------------------------------------------------------------------

def measured_profile_path(device: str) -> Path:
    """Where a measured profile of this host and device kind is kept: `$FLEXGEN_PROFILE_DIR` or
    `~/.cache/flexgen-helm/profiles`."""
    root = Path(os.environ.get("FLEXGEN_PROFILE_DIR", "~/.cache/flexgen-helm/profiles")).expanduser()
    return root / f"{socket.gethostname()}-{device}.json"


def resolve(hardware: "HardwareProfile | str | os.PathLike | None", device: str,
            offload_dir: str | os.PathLike | None = None) -> HardwareProfile:
    """The profile to plan with: the one given (object, built-in name or file); else `$FLEXGEN_HARDWARE`;
    else this host's measured profile, measured once (quick mode) and kept for next time."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    if hardware is None:
        hardware = os.environ.get("FLEXGEN_HARDWARE") or None
    if hardware is not None:
        return load_profile(hardware)
    path = measured_profile_path(device)
    if path.is_file():
        log.info("using the measured hardware profile %s", path)
        return load_profile(path)
    log.info("no hardware profile given: measuring this machine (quick mode); kept in %s", path)
    profile = measure(device=device, offload_dir=offload_dir, quick=True)
    profile.save(path)
    return profile
