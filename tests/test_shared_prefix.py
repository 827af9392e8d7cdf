"""Shared-prefix execution: prompts that start with the same tokens (HELM's instructions and in-context
examples) have that prefix computed once, its K/V stored once, and every GPU batch attends over it.

Checked against transformers' forward pass on the full prompts (sharing is invisible to the model):
every placement of the parity suite on both devices, an OPT and a sliding-window Llama-family model,
echo and top-k logprobs; equality with `share_prefix=False`; reuse across calls and when it is not
used; the exact bytes it holds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexgen_core import Engine, Policy, memory
from flexgen_core.placement import TIERS
from flexgen_core.prefix import SHARED_PREFIX_MIN_TOKENS
from flexgen_core.runtime.schedule import BlockRunner
from flexgen_core.testing import build_checkpoint, sample_prompts
from reference import check_result
from test_compression_engine import CacheRecorder, check_compressed_cache
from test_parity_opt import DEVICES, LOGPROB_TOL, PLACEMENTS, TIE_TOL

PREFIX_LEN = 40


def _prompts(path, n: int = 7, prefix_len: int = PREFIX_LEN, seed: int = 4) -> list[list[int]]:
    """`n` prompts: one shared `prefix_len`-token prefix, then 2-11 tokens of their own."""
    prefix = sample_prompts(path, 1, prefix_len, prefix_len, seed=3)[0]
    return [prefix + tail[1:] for tail in sample_prompts(path, n, 3, 12, seed=seed)]


@pytest.fixture(scope="module", params=["odd", "mistral"])
def model(request):
    path = build_checkpoint(request.param)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class PrefixCounter:
    """Counts the prefix passes the engine runs (it still runs them)."""

    def __init__(self, monkeypatch):
        self.lengths: list[int] = []
        run_prefix = BlockRunner.run_prefix

        def counting(runner, token_ids):
            self.lengths.append(len(token_ids))
            return run_prefix(runner, token_ids)

        monkeypatch.setattr(BlockRunner, "run_prefix", counting)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_shared_prefix_parity(model, name, device, tmp_path, monkeypatch):
    path, hf = model
    prompts = _prompts(path)
    counter = PrefixCounter(monkeypatch)
    with Engine.from_pretrained(path, policy=PLACEMENTS[name], offload_dir=tmp_path, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=8, echo_prompt=True, top_k_logprobs=3)
    assert counter.lengths == [PREFIX_LEN]  # computed once, for every block
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=3)


def _outputs(results):
    return [[(c.token_ids, c.finish_reason) for c in r.completions] for r in results]


def _assert_close(a, b):
    for x, y in zip(a, b):
        for cx, cy in zip(x.completions, y.completions):
            assert max(abs(p - q) for p, q in zip(cx.logprobs, cy.logprobs)) <= LOGPROB_TOL
        if x.prompt_logprobs is not None:
            assert max(abs(p - q) for p, q in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:])) <= LOGPROB_TOL


@pytest.mark.cuda_sim
def test_results_do_not_depend_on_sharing(tmp_path):
    """Greedy, stops, echo and seeded sampling with several completions: the same with sharing off.
    (With compress_cache, decode reads 4-bit rows quantised from K/V computed in other batch shapes, so
    a rare rounding-boundary flip may differ: that case is checked against the quantised reference in
    test_compressed_shared_prefix_matches_quantised_reference.)"""
    path = build_checkpoint("tiny")
    prompts = _prompts(path)
    policy = PLACEMENTS["mixed-three-tiers"]
    runs = {}
    for share in (True, False):
        with Engine.from_pretrained(path, policy=policy.replace(share_prefix=share), offload_dir=tmp_path,
                                    device="simulated") as engine:
            greedy = engine.generate(prompts, max_new_tokens=6, echo_prompt=True)
            stop = [greedy[0].completions[0].token_ids[2:4]]
            stopped = engine.generate(prompts, max_new_tokens=6, stop=stop)
            sampled = engine.generate(prompts, max_new_tokens=5, temperature=1.0, num_completions=3, seed=7)
            runs[share] = (greedy, stopped, sampled)
    for shared, plain in zip(runs[True], runs[False]):
        assert _outputs(shared) == _outputs(plain)
        _assert_close(shared, plain)


def test_prefix_is_kept_across_calls_and_dropped_when_unused(tmp_path, monkeypatch):
    path = build_checkpoint("tiny")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(path, n=9)
    counter = PrefixCounter(monkeypatch)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=50)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as engine:
        first = engine.generate(prompts[:4], max_new_tokens=4)
        # Later calls of the same run (HELM sends its requests in blocks) reuse it, also one alone.
        second = engine.generate(prompts[4:], max_new_tokens=4)
        alone = engine.generate(prompts[8:], max_new_tokens=4)
        assert counter.lengths == [PREFIX_LEN]
        # Prompts that share less than the kept prefix: a new, shorter prefix replaces it.
        other = [p[:30] + [(t + i + 1) % 100 + 5 for t in p[30:]] for i, p in enumerate(prompts[:4])]
        engine.generate(other, max_new_tokens=4)
        assert counter.lengths == [PREFIX_LEN, 30]
        # The first prefix is still kept (the engine keeps a few): back to it, nothing is recomputed.
        again = engine.generate(prompts[:4], max_new_tokens=4)
        assert counter.lengths == [PREFIX_LEN, 30] and engine.stats.prefixes_reused == 3
        # No common prefix, or one too short: nothing is shared.
        engine.generate(sample_prompts(path, 4, 20, 30, seed=11), max_new_tokens=2)
        # (each sampled prompt starts with BOS: one more common token)
        short = [prompts[0][:SHARED_PREFIX_MIN_TOKENS - 2] + p for p in sample_prompts(path, 3, 5, 9, seed=12)]
        engine.generate(short, max_new_tokens=2)
        assert counter.lengths == [PREFIX_LEN, 30]
    asked = prompts[:4] + prompts[4:] + prompts[8:] + prompts[:4]
    results = first + second + alone + again
    assert len(asked) == len(results)
    for prompt, result in zip(asked, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL)


def test_only_the_most_recent_prefixes_are_kept(tmp_path, monkeypatch):
    """Prefixes of MAX_KEPT_PREFIXES + 1 run entries in turn: the least recently used one is freed
    (its files go) and computed again when its prompts come back."""
    from flexgen_core.prefix import MAX_KEPT_PREFIXES

    path = build_checkpoint("tiny")
    counter = PrefixCounter(monkeypatch)
    groups = [[[5 + g] * 20 + tail[1:] for tail in sample_prompts(path, 3, 3, 6, seed=g)]
              for g in range(MAX_KEPT_PREFIXES + 1)]
    policy = Policy(gpu_batch_size=3, cache_gpu_percent=0, cache_cpu_percent=0)  # prefixes on disk
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as engine:
        for group in groups:
            engine.generate(group, max_new_tokens=2)
        held = {f.name.split("-")[0] for f in engine.offload.path.iterdir() if f.name.startswith("prefix")}
        assert held == {f"prefix{n}" for n in range(2, MAX_KEPT_PREFIXES + 2)}  # the first one's files went
        assert len(engine.prefixes) == MAX_KEPT_PREFIXES
        engine.generate(groups[-1], max_new_tokens=2)  # kept
        engine.generate(groups[0], max_new_tokens=2)  # the oldest: dropped, computed again
    assert counter.lengths == [20] * (MAX_KEPT_PREFIXES + 2)


def test_kept_prefixes_are_let_go_when_a_block_needs_their_room(tmp_path, monkeypatch):
    """A block that fits only without the prefixes kept from earlier calls frees them and runs; one that
    does not fit with none kept is refused."""
    from flexgen_core import engine as engine_module
    from flexgen_core.runtime.capacity import PolicyDoesNotFit

    path = build_checkpoint("tiny")
    prompts = _prompts(path, n=4)
    fits = engine_module.check_fits
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=2), offload_dir=tmp_path) as engine:
        engine.generate(prompts, max_new_tokens=2)
        assert len(engine.prefixes) == 1
        tight = {"calls": 0}

        def fits_once_freed(terms, *args):  # the first check of a block fails, as if the kept K/V were in its way
            tight["calls"] += 1
            if tight["calls"] == 1:
                raise PolicyDoesNotFit("no room beside the kept prefixes")
            return fits(terms, *args)

        monkeypatch.setattr(engine_module, "check_fits", fits_once_freed)
        own = sample_prompts(path, 2, 5, 9, seed=13)  # nothing shared: the kept prefix is not used
        assert len(engine.generate(own, max_new_tokens=2)) == 2
        assert len(engine.prefixes) == 0
        tight["calls"] = 0
        with pytest.raises(PolicyDoesNotFit, match="no room"):
            engine.generate(own, max_new_tokens=2)


def test_a_prompt_that_is_the_prefix_keeps_one_token_of_its_own(tmp_path, monkeypatch):
    path = build_checkpoint("tiny")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(path, n=3)
    prompts.append(prompts[0][:PREFIX_LEN])  # all of it is shared with the others
    counter = PrefixCounter(monkeypatch)
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=2, num_gpu_batches=2), offload_dir=tmp_path) as engine:
        results = engine.generate(prompts, max_new_tokens=5, echo_prompt=True)
    assert counter.lengths == [PREFIX_LEN - 1]
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_bytes_are_exact_and_freed(tmp_path, device):
    """The prefix holds the KV cache of one sequence of its length (with its staging), exact and, with
    compress_cache, compressed, on the policy's tiers: what memory.add_shared_prefix_terms says; its
    files go when the engine closes."""
    path = build_checkpoint("odd")
    policy = dataclasses.replace(PLACEMENTS["mixed-three-tiers"], compress_cache=True)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
        engine.generate(_prompts(path, n=policy.block_size), max_new_tokens=3)
        held = engine.runner.last_allocated["shared_prefix"]
        expected = memory.MemoryReport()
        memory.add_shared_prefix_terms(expected, engine.layers, engine.config, policy, PREFIX_LEN,
                                       engine.dtype.itemsize, engine.devices.separate_device)
        assert held == {t: expected.cache[t] + expected.cache_staging[t] for t in TIERS}
        assert held["disk"] > 0
        folder = engine.offload.path
        assert any(f.name.startswith("prefix") for f in folder.iterdir())
    assert not folder.exists()


def test_finished_batches_cost_nothing_more(tmp_path, monkeypatch):
    """Sequences that stop early: a GPU batch whose sequences have all finished is not computed in
    later steps, and every result still matches transformers."""
    from flexgen_core.runtime import schedule

    path = build_checkpoint("tiny")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = sample_prompts(path, 6, 5, 20, seed=21)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, cache_gpu_percent=50, cache_cpu_percent=50)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as engine:
        full = engine.generate(prompts, max_new_tokens=10)
        # Stop every sequence of the batch holding the longest prompts at its second token.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        stops = [full[i].completions[0].token_ids[1:2] for i in order[:2]]
        computed = []
        compute = schedule._BlockPass._compute

        def counting(self, step, layer_idx, batch_idx, weights):
            computed.append((step, batch_idx))
            return compute(self, step, layer_idx, batch_idx, weights)

        monkeypatch.setattr(schedule._BlockPass, "_compute", counting)
        stopped = engine.generate(prompts, max_new_tokens=10, stop=stops)
    first_batch = [results.completions[0] for results in (stopped[order[0]], stopped[order[1]])]
    assert all(c.finish_reason == "stop" for c in first_batch)
    last_step = max(len(c.token_ids) for c in first_batch) + len(stops[0])
    assert not [u for u in computed if u[1] == 0 and u[0] > last_step]
    assert max(step for step, _ in computed) == 9  # the other batches ran to the end
    for prompt, result in zip(prompts, stopped):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mixed-three-tiers", "cache-on-disk", "cache-split-cpu-attention"])
def test_compressed_shared_prefix_matches_quantised_reference(model, name, device, tmp_path, monkeypatch):
    """With compress_cache: prompt passes attend over the prefix's exact K/V, decode steps over its
    4-bit copy (stored bit-exact), as tests/test_compression_engine.py checks an unshared cache."""
    path, hf = model
    prompts = _prompts(path, n=5)
    recorder = CacheRecorder(monkeypatch)
    policy = PLACEMENTS[name].replace(compress_cache=True)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=6)
    assert sum(block["batches"] is None for block in recorder.blocks) == 1  # one prefix, compressed once
    check_compressed_cache(recorder, hf, prompts, results, prefix_len=PREFIX_LEN)
