"""Rows computed only where needed. Finished sequences leave the compute: between decode steps, a GPU
batch whose finished sequences make up a quarter of its rows or more is packed to its live rows (their
KV cache on every tier, compressed or not, and their hidden-state homes), so later steps compute only
what is still generating. And sampled completions of one prompt share its prompt pass: the batch runs
it on its distinct prompts, then forks each prompt's K/V rows out to its completions.

Sequences are made to finish at different steps with stop tokens taken from an unstopped run, then
every result is checked against transformers (greedy, tie-aware; sampled logprobs too): every
placement of the parity suite on both devices, with and without a shared prefix, and a compressed
cache against the independent quantised reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexgen_core import Engine, Policy
from flexgen_core.runtime import schedule
from flexgen_core.testing import build_checkpoint, sample_prompts
from reference import check_result
from test_compression_engine import CacheRecorder, check_compressed_cache
from test_parity_opt import DEVICES, LOGPROB_TOL, PLACEMENTS, TIE_TOL

MAX_NEW = 9


@pytest.fixture(scope="module")
def model():
    path = build_checkpoint("odd")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(path, shared: bool) -> list[list[int]]:
    own = sample_prompts(path, 8, 3, 14, seed=31)
    if not shared:
        return own
    prefix = sample_prompts(path, 1, 24, 24, seed=32)[0]
    return [prefix + tail[1:] for tail in own]


def _staggered_stops(results) -> list[list[int]]:
    """One stop token per sequence, taken from its own unstopped completion at steps 1, 2, 3, ...:
    with all of them active, the sequences finish at different steps."""
    return [[r.completions[0].token_ids[1 + i % (MAX_NEW - 2)]] for i, r in enumerate(results)]


def _wide(policy: Policy) -> Policy:
    """The placement with GPU batches of 4 rows, so that a batch can be packed."""
    return dataclasses.replace(policy, gpu_batch_size=4, num_gpu_batches=2)


@pytest.mark.parametrize("shared", [False, True], ids=["own-prompts", "shared-prefix"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_packed_batches_match_transformers(model, name, device, shared, tmp_path):
    path, hf = model
    prompts = _prompts(path, shared)
    with Engine.from_pretrained(path, policy=_wide(PLACEMENTS[name]), offload_dir=tmp_path, device=device) as engine:
        stops = _staggered_stops(engine.generate(prompts, max_new_tokens=MAX_NEW))
        before = engine.stats.compactions, engine.stats.decode_rows
        results = engine.generate(prompts, max_new_tokens=MAX_NEW, stop=stops, echo_prompt=True, top_k_logprobs=2)
        compactions, decode_rows = (now - then for now, then in zip((engine.stats.compactions,
                                                                     engine.stats.decode_rows), before))
    lengths = {len(r.completions[0].token_ids) for r in results}
    assert len(lengths) >= 3, f"the sequences should finish at different steps, got lengths {lengths}"
    assert compactions > 0
    assert decode_rows < len(prompts) * (MAX_NEW - 1)  # finished rows were not computed
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=2)


def test_decode_computes_little_more_than_the_live_rows(model, tmp_path, monkeypatch):
    """At every decode step, more than COMPACT_LIVE_FRACTION of the rows a GPU batch computes are
    still generating, and its rows only ever leave."""
    path, _ = model
    prompts = _prompts(path, False)
    rows_per_step: list[int] = []
    compute = schedule._BlockPass._compute

    def counting(self, step, layer_idx, batch_idx, weights):
        if layer_idx == 0 and step > 0:
            seqs = self.batches[batch_idx].seqs
            assert sum(not s.done for s in seqs) > schedule.COMPACT_LIVE_FRACTION * len(seqs)
            rows_per_step.append(len(seqs))
        return compute(self, step, layer_idx, batch_idx, weights)

    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=8), offload_dir=tmp_path) as engine:
        stops = _staggered_stops(engine.generate(prompts, max_new_tokens=MAX_NEW))
        monkeypatch.setattr(schedule._BlockPass, "_compute", counting)
        engine.generate(prompts, max_new_tokens=MAX_NEW, stop=stops)
    assert rows_per_step[0] == len(prompts) and rows_per_step[-1] < len(prompts) / 2
    assert rows_per_step == sorted(rows_per_step, reverse=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mixed-three-tiers", "cache-on-disk", "cache-split-cpu-attention"])
def test_packed_compressed_cache_matches_quantised_reference(model, name, device, tmp_path, monkeypatch):
    """Packing moves 4-bit codes, scales and mins as they are: the rows each sequence reads afterwards
    are still the quantisation of what the engine computed for it (tests/test_compression_engine.py)."""
    path, hf = model
    prompts = _prompts(path, False)
    policy = dataclasses.replace(_wide(PLACEMENTS[name]), compress_cache=True)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path / "a", device=device) as engine:
        stops = _staggered_stops(engine.generate(prompts, max_new_tokens=MAX_NEW))
    recorder = CacheRecorder(monkeypatch)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path / "b", device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=MAX_NEW, stop=stops)
        assert engine.stats.compactions > 0
    check_compressed_cache(recorder, hf, prompts, results)


def test_sampled_completions_survive_packing(model, tmp_path):
    """Seeded sampling with several completions per prompt, some finishing early: each sampled token's
    logprob is transformers' for that sequence, whichever rows were packed away around it."""
    path, hf = model
    prompts = _prompts(path, True)[:4]
    stop_ids = range(3, hf.config.vocab_size, 4)  # a quarter of the vocabulary: sequences stop at random steps
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=6, num_gpu_batches=2), offload_dir=tmp_path) as engine:
        results = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, num_completions=3, seed=5,
                                  stop=[[t] for t in stop_ids])
        assert engine.stats.compactions > 0
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, greedy=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_sampled_completions_share_their_prompt_pass(model, name, device, tmp_path, monkeypatch):
    """Three sampled completions per prompt: each GPU batch's prompt pass computes its distinct
    prompts once, then every completion decodes on its own (their logprobs are transformers' for
    what each sampled), echo included."""
    path, hf = model
    prompts = _prompts(path, True)[:4]
    seen = []
    compute = schedule._BlockPass._compute

    def counting(self, step, layer_idx, batch_idx, weights):
        if step == 0 and layer_idx == 0:
            batch = self.batches[batch_idx]
            seen.append((len(batch.pads), len({tuple(s.prompt) for s in batch.members}), len(batch.members)))
        return compute(self, step, layer_idx, batch_idx, weights)

    monkeypatch.setattr(schedule._BlockPass, "_compute", counting)
    with Engine.from_pretrained(path, policy=_wide(PLACEMENTS[name]), offload_dir=tmp_path, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=6, temperature=1.0, num_completions=3, seed=7,
                                  echo_prompt=True)
    assert all(rows == distinct for rows, distinct, _ in seen) and any(members > rows for rows, _, members in seen)
    for prompt, result in zip(prompts, results):
        assert len(result.completions) == 3
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, greedy=False, echo=True)
    firsts = [c.token_ids[:2] for r in results for c in r.completions]
    assert len({tuple(f) for f in firsts}) > len(prompts)  # the completions of a prompt were sampled apart


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["all-on-device", "mixed-three-tiers", "cache-split-cpu-attention"])
def test_repeated_prompts_each_get_their_own_results(model, name, device, tmp_path):
    """The same prompt sent twice in one call (HELM can repeat one) is computed once, and each copy
    still gets its echoed prompt logprobs and its completion, as transformers gives them."""
    path, hf = model
    prompts = _prompts(path, False)[:3]
    prompts = [prompts[0], prompts[1], list(prompts[0]), prompts[2], list(prompts[1])]
    with Engine.from_pretrained(path, policy=_wide(PLACEMENTS[name]), offload_dir=tmp_path, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=4, echo_prompt=True, top_k_logprobs=2)
        scored = engine.generate(prompts, max_new_tokens=0, echo_prompt=True)
    for prompt, result, score in zip(prompts, results, scored):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=2)
        assert score.prompt_logprobs[0] is None
        assert score.prompt_logprobs[1:] == pytest.approx(result.prompt_logprobs[1:], abs=LOGPROB_TOL)
