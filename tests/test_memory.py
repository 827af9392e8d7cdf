"""Exact per-tier accounting (memory.account) against what the engine really allocates, and the
bound on resident memory with weights on disk."""

import subprocess
import sys

import pytest

from flexgen_core import Engine, Policy
from flexgen_core.placement import TIERS, split_counts, weight_tiers
from flexgen_core.testing import build_checkpoint, sample_prompts

EXACT_TERMS = ("weights", "weight_staging", "cache", "cache_staging", "activations")

POLICIES = [
    Policy(gpu_batch_size=2, num_gpu_batches=2),
    Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=20, w_cpu_percent=40, cache_gpu_percent=25,
           cache_cpu_percent=50, act_gpu_percent=50, act_cpu_percent=0),
    Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
           cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0, overlap=False),
    Policy(gpu_batch_size=4, num_gpu_batches=1, w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=0,
           cache_cpu_percent=100, cpu_cache_compute=True, act_gpu_percent=0, act_cpu_percent=100),
    Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=40, cache_gpu_percent=40,
           cache_cpu_percent=20, compress_weight=True, compress_cache=True),
    Policy(gpu_batch_size=3, num_gpu_batches=1, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
           cache_cpu_percent=0, compress_weight=True, compress_cache=True, overlap=False),
]


def test_split_counts_cover_every_unit():
    for n in range(0, 13):
        for g in range(0, 101, 10):
            for c in range(0, 101 - g, 10):
                counts = split_counts(n, g, c)
                assert sum(counts) == n and min(counts) >= 0
    assert split_counts(5, 20, 40) == (1, 2, 2)


def test_weight_tiers_follow_byte_midpoints():
    # 4 equal weights: midpoints at 12.5%, 37.5%, 62.5%, 87.5%.
    assert weight_tiers([10, 10, 10, 10], 25, 50) == ["gpu", "cpu", "cpu", "disk"]
    assert weight_tiers([90, 10], 50, 0) == ["gpu", "disk"]
    assert weight_tiers([10, 10], 0, 0) == ["disk", "disk"]


@pytest.mark.parametrize("device", ["cpu", "simulated"])
@pytest.mark.parametrize("policy_idx", range(len(POLICIES)))
def test_accounting_equals_real_allocations(policy_idx, device, tmp_path):
    """On "simulated" the compute tier is its own pool, as on a GPU: staging buffers for every
    off-device share and CPU attention over off-device cache are allocated and counted."""
    policy = POLICIES[policy_idx]
    path = build_checkpoint("odd")
    prompts = sample_prompts(path, policy.block_size, 17, 17, seed=0)  # one full block, nothing shared
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
        engine.generate(prompts, max_new_tokens=5)
        real = engine.runner.last_allocated
        predicted = engine.memory(prompt_len=17, gen_len=5)
    for term in EXACT_TERMS:
        assert real[term] == getattr(predicted, term), term
    assert set(predicted.peak) == set(TIERS)


_MEASURE = r"""
import sys, threading, time
from flexgen_core import Engine, Policy
from flexgen_core.testing import sample_prompts

def rss_anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

path, offload = sys.argv[1], sys.argv[2]
prompts = sample_prompts(path, 4, 32, 64, seed=0)
base = rss_anon_kib()
peak, stop = [base], threading.Event()
def sample():
    while not stop.is_set():
        peak.append(rss_anon_kib())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0)
with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device="cpu") as engine:
    engine.generate(prompts, max_new_tokens=4)
stop.set()
sampler.join()
print((max(peak) - base) * 1024)
"""


def test_weights_on_disk_keep_resident_memory_small(tmp_path):
    """Generating from a several-hundred-MB checkpoint with every weight on disk grows anonymous
    memory (RssAnon, measured in a fresh process) by far less than a third of the checkpoint."""
    path = build_checkpoint("large")
    checkpoint_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert checkpoint_bytes > 200 * 2**20
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tmp_path)],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    print(f"checkpoint {checkpoint_bytes / 2**20:.0f} MiB, RssAnon growth {growth / 2**20:.0f} MiB")
    assert growth < checkpoint_bytes / 3
