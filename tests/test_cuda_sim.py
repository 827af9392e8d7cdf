"""The simulated GPU itself: CUDA's device rules, and its memory held to the engine's accounting.

The parity suites run on it through their "simulated" device parameter (`pytest -m cuda_sim`). Here:
that it raises where CUDA raises (the device mix an H200 found in the prompt pass of CPU attention,
and a query moved to the host inside the attention math), that it counts what CUDA's allocator would
hand out, and that for every placement of the parity suites the peak bytes of its live tensors,
compute transients included, stay within what `memory.account` (and so the planner) says.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from reference import check_result
from test_parity_opt import LOGPROB_TOL, PLACEMENTS, TIE_TOL
from transformers import AutoModelForCausalLM

from flexgen_core import Engine, memory
from flexgen_core.runtime.simulated_cuda import ALLOCATION_BLOCK_BYTES, MEMORY, simulated_cuda
from flexgen_core.testing import build_checkpoint, sample_prompts

pytestmark = pytest.mark.cuda_sim


def test_tensors_report_cuda_and_keep_their_values():
    values = torch.randn(3, 5)
    with simulated_cuda():
        on_device = values.to("cuda")
        made = torch.arange(4, device="cuda")
        assert on_device.device == torch.device("cuda", 0) and on_device.is_cuda and made.is_cuda
        assert torch.equal((on_device * 2).cpu(), values * 2)
        assert type((on_device * 2).cpu()) is torch.Tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_in_float32_out_softmaxes_run_as_on_cuda(dtype):
    """softmax(x, dtype=float32) of a half tensor is one CUDA kernel (`half_to_float`) that the CPU lacks:
    it runs, as on CUDA, with the values of softmax over the upcast input (an MoE router's, models/moe.py)."""
    values = torch.randn(4, 7).to(dtype)
    with simulated_cuda():
        on_device = values.to("cuda")
        probs = torch.softmax(on_device, dim=-1, dtype=torch.float32)
        logprobs = torch.log_softmax(on_device, dim=-1, dtype=torch.float32)
        assert probs.is_cuda and probs.dtype == torch.float32
    assert torch.equal(probs.cpu(), torch.softmax(values.float(), dim=-1))
    assert torch.equal(logprobs.cpu(), torch.log_softmax(values.float(), dim=-1))


def test_mixing_devices_raises_as_cuda_does():
    with simulated_cuda():
        q, k, v = (torch.randn(1, 2, 4, 8, device="cuda") for _ in range(3))
        with pytest.raises(RuntimeError, match="Expected query, key, and value to have the same device type"):
            F.scaled_dot_product_attention(q.cpu(), k, v)  # the H200's error, word for word
        with pytest.raises(RuntimeError, match="same device"):
            q + torch.randn(1, 2, 4, 8)
        with pytest.raises(RuntimeError, match="same device"):
            q.flatten().index_select(0, torch.tensor([0, 1]))
        with pytest.raises(RuntimeError, match="generator"):
            torch.multinomial(torch.ones(3, device="cuda"), 1, generator=torch.Generator())
        # What CUDA allows: 0-dim host tensors as scalars, copies both ways, host indices.
        assert (q * torch.tensor(2.0)).is_cuda
        host = torch.empty(1, 2, 4, 8)
        host.copy_(q)
        assert torch.equal(host, q.cpu())
        assert q[torch.tensor([0])].is_cuda


def test_memory_counts_storages_in_allocator_blocks():
    gc.collect()
    with simulated_cuda():
        base = MEMORY.live_bytes
        buffer = torch.empty(1000, dtype=torch.uint8, device="cuda")
        assert MEMORY.live_bytes - base == 1024  # rounded up to 512-byte blocks
        view = buffer[10:20].view(torch.int16)  # views share the storage: nothing more
        assert MEMORY.live_bytes - base == 1024
        del buffer
        assert MEMORY.live_bytes - base == 1024  # the view keeps it alive
        del view
        gc.collect()
        assert MEMORY.live_bytes == base
        with MEMORY.limited(base + 4 * ALLOCATION_BLOCK_BYTES):
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(5 * ALLOCATION_BLOCK_BYTES, dtype=torch.uint8, device="cuda")


def test_attention_scores_are_counted():
    """Attention on the simulated device runs the math path: its (queries x keys) scores are live
    tensors, so a prompt pass that materialises them shows in the peak."""
    gc.collect()
    with simulated_cuda():
        q, k, v = (torch.randn(2, 4, 256, 16, device="cuda") for _ in range(3))
        MEMORY.reset_peak()
        base = MEMORY.live_bytes
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = 2 * 4 * 256 * 256 * 4
        assert MEMORY.peak_bytes - base >= scores


GPU_DEVICES = ("simulated",) + (("cuda",) if torch.cuda.is_available() else ())


def _peak_on_gpu(device: str, path, policy, prompts, gen_len, offload_dir, results=None) -> tuple[int, int]:
    """(peak bytes allocated on the GPU over loading and generating, the accounted GPU peak): the
    simulated GPU's live tensors, or CUDA's own counter. The generated results go to `results`."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        MEMORY.reset_peak()
        base = MEMORY.live_bytes
    with Engine.from_pretrained(path, policy=policy, offload_dir=offload_dir, device=device) as engine:
        out = engine.generate(prompts, max_new_tokens=gen_len, echo_prompt=True, top_k_logprobs=3)
        accounted = engine.memory(max(map(len, prompts)), gen_len, echo_prompt=True).peak["gpu"]
    if results is not None:
        results.extend(out)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else MEMORY.peak_bytes
    return peak - base, accounted


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("preset", ["odd", "llama"])
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_peak_is_within_the_accounting(preset, name, device, tmp_path):
    path = build_checkpoint(preset)
    prompts = sample_prompts(path, 7, 3, 40, seed=1)
    peak, accounted = _peak_on_gpu(device, path, PLACEMENTS[name], prompts, 8, tmp_path)
    assert 0 < peak <= accounted, f"{device} GPU peak {peak} B > accounted {accounted} B"


@pytest.mark.parametrize("name", ["mixed-three-tiers", "cache-split-cpu-attention"])
@pytest.mark.parametrize("preset", ["odd", "llama"])
def test_chunked_attention_and_mlp(preset, name, tmp_path, monkeypatch):
    """With chunks of a few KiB, attention runs query chunk by query chunk and the MLP position chunk
    by position chunk (as they do at full size on a GPU): the results still match transformers, and the
    peak stays within the accounting, which counts one chunk."""
    monkeypatch.setattr(memory, "ATTENTION_CHUNK_BYTES", 4096)
    monkeypatch.setattr(memory, "MLP_CHUNK_BYTES", 4096)
    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = sample_prompts(path, 5, 12, 40, seed=3)
    results = []
    peak, accounted = _peak_on_gpu("simulated", path, PLACEMENTS[name], prompts, 6, tmp_path, results)
    assert 0 < peak <= accounted
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=3)


def test_chunks_are_taken_where_the_bound_says():
    assert memory.query_chunk(48, 32, 512, 512) == 21  # 3 MiB of float32 scores a query: 21 in 64 MiB
    assert memory.token_chunk(48, 512, 16384, 2) == 42  # 1.5 MiB of fp16 FFN activations a position
    assert memory.query_chunk(2, 4, 1, 40) == 1 and memory.token_chunk(2, 40, 64, 4) == 40
