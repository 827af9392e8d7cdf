"""Engine-level decoding: sampling against the distribution transformers' logits define (nucleus set,
temperature, seeds), token-level stop sequences, end-of-text, finish reasons, num_completions.

Sampled frequencies are compared with binomial bounds of 5 standard deviations (a correct engine
fails one such check with probability ~1e-6); each test also checks that it has the power to see
the bug it guards (e.g. that a token kept past the nucleus would be drawn many times).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest
import torch
from reference import check_result, reference_logprobs
from test_parity_opt import DEVICES, LOGPROB_TOL, TIE_TOL
from transformers import AutoModelForCausalLM

from flexgen_core import Engine, Policy
from flexgen_core.testing import build_checkpoint, sample_prompts

NUM_SAMPLES = 400
POLICY = Policy(gpu_batch_size=100, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=50)


@pytest.fixture(scope="module", params=DEVICES)
def setup(tmp_path_factory, request):
    """Sampling, stops and finish reasons on the CPU and on the simulated GPU (its logits on the device,
    its random generators on the host)."""
    path = build_checkpoint("tiny")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine.from_pretrained(path, policy=POLICY, offload_dir=tmp_path_factory.mktemp("offload"),
                                    device=request.param)
    prompt = sample_prompts(path, 1, 12, 12, seed=11)[0]
    yield path, hf, engine, prompt
    engine.close()


def _next_token_probs(hf, prompt, temperature: float) -> torch.Tensor:
    """(V,) float64 next-token distribution at `temperature`, from transformers' logits."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)


def _sample_first_tokens(engine, prompt, **kwargs) -> list[int]:
    (result,) = engine.generate([prompt], max_new_tokens=1, num_completions=NUM_SAMPLES, seed=0, **kwargs)
    return [c.token_ids[0] for c in result.completions]


def _assert_frequencies(tokens: list[int], probs: dict[int, float]) -> None:
    counts = Counter(tokens)
    for token, p in probs.items():
        sigma = math.sqrt(NUM_SAMPLES * p * (1 - p))
        assert abs(counts[token] - NUM_SAMPLES * p) <= 5 * sigma + 1, (token, counts[token], NUM_SAMPLES * p)


def test_top_p_samples_exactly_the_nucleus(setup):
    """The nucleus is the smallest set of most likely tokens whose mass reaches top_p: every sample
    lies in it, with the renormalised probabilities, and the next token is never drawn."""
    _, hf, engine, prompt = setup
    # top-p acts on the distribution after temperature. The nucleus's size: the first from 2 whose next
    # token, were it kept, would be drawn ~20 times or more in NUM_SAMPLES (the test's power); the tiny
    # model's weights differ between torch builds, so take the first temperature of a few that gives one.
    for temperature in (1.5, 1.0, 2.0, 0.7, 3.0, 0.5):
        probs = _next_token_probs(hf, prompt, temperature)
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        size = next((k for k in range(2, 20) if NUM_SAMPLES * float(sorted_probs[k] / cumulative[k]) >= 20), None)
        if size is not None:
            break
    assert size is not None, "no temperature gives the test a nucleus it can tell from its next token"
    # Between the masses of the first size-1 and size tokens: the nucleus has exactly `size` tokens.
    top_p = float(cumulative[size - 1] - 0.3 * sorted_probs[size - 1])
    nucleus = {int(t): float(p / cumulative[size - 1]) for t, p in zip(order[:size], sorted_probs[:size])}

    tokens = _sample_first_tokens(engine, prompt, temperature=temperature, top_p=top_p)
    assert set(tokens) <= set(nucleus), f"sampled outside the nucleus: {set(tokens) - set(nucleus)}"
    _assert_frequencies(tokens, nucleus)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_the_distribution(setup, temperature):
    _, hf, engine, prompt = setup
    probs, plain = _next_token_probs(hf, prompt, temperature), _next_token_probs(hf, prompt, 1.0)
    top = [int(t) for t in probs.topk(5).indices]
    # Power: for the most likely token, temperature moves its probability by many standard deviations.
    sigma = math.sqrt(NUM_SAMPLES * probs[top[0]] * (1 - probs[top[0]]))
    assert NUM_SAMPLES * abs(probs[top[0]] - plain[top[0]]) > 8 * sigma
    tokens = _sample_first_tokens(engine, prompt, temperature=temperature)
    _assert_frequencies(tokens, {t: float(probs[t]) for t in top})


def test_sampled_logprobs_are_the_models_own(setup):
    """Whatever temperature and top-p chose a token, its logprob is the model's log-softmax."""
    _, hf, engine, prompt = setup
    (result,) = engine.generate([prompt], max_new_tokens=1, num_completions=20, temperature=2.0, top_p=0.9, seed=3)
    ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].detach().float(), dim=-1)
    for completion in result.completions:
        assert abs(completion.logprobs[0] - ref[completion.token_ids[0]].item()) <= LOGPROB_TOL


def test_seeds_make_samples_reproducible(setup):
    _, _, engine, prompt = setup
    other = sample_prompts(setup[0], 1, 7, 7, seed=12)[0]

    def sample(seed, prompts=(prompt,)):
        results = engine.generate(list(prompts), max_new_tokens=6, temperature=1.0, num_completions=3, seed=seed)
        return [[c.token_ids for c in r.completions] for r in results]

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first
    assert len({tuple(ids) for ids in first[0]}) > 1, "three completions came out identical"
    # Per-prompt seeds: the first prompt samples the same with another prompt beside it.
    assert sample([5, 9], (prompt, other))[0] == first[0]


def test_num_completions_each_scored_on_its_own_tokens(setup):
    path, hf, engine, prompt = setup
    prompts = sample_prompts(path, 3, 5, 20, seed=13)
    results = engine.generate(prompts, max_new_tokens=6, temperature=1.0, num_completions=4, seed=2,
                              echo_prompt=True)
    for prompt_ids, result in zip(prompts, results):
        assert len(result.completions) == 4
        assert len({tuple(c.token_ids) for c in result.completions}) > 1
        check_result(hf, prompt_ids, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, greedy=False, echo=True)


def test_greedy_num_completions_are_equal_copies(setup):
    _, _, engine, prompt = setup
    (result,) = engine.generate([prompt], max_new_tokens=5, num_completions=3)
    first = result.completions[0]
    for completion in result.completions[1:]:
        assert completion is not first
        assert (completion.token_ids, completion.logprobs) == (first.token_ids, first.logprobs)


# ---- stops and finish reasons ----------------------------------------------------------------------

def _greedy(engine, prompt, **kwargs):
    (result,) = engine.generate([prompt], max_new_tokens=10, **kwargs)
    return result.completions[0]


def test_stop_sequences_end_and_are_removed(setup):
    _, _, engine, prompt = setup
    full = _greedy(engine, prompt)
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    ids = full.token_ids
    # A two-token stop that first occurs at index 3, a one-token stop at its first occurrence.
    cut = next(i for i in range(3, 8) if all(ids[j:j + 2] != ids[i:i + 2] for j in range(i)))
    stopped = _greedy(engine, prompt, stop=[ids[cut:cut + 2]])
    assert stopped.token_ids == ids[:cut] and stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(full.logprobs[:cut], abs=1e-6)
    first = ids.index(ids[4])
    one = _greedy(engine, prompt, stop=[[ids[4]], [ids[0]] * 11])
    assert one.token_ids == ids[:first] and one.finish_reason == "stop"
    absent = next(t for t in range(10, 1000) if t not in ids)
    never = _greedy(engine, prompt, stop=[[absent]])
    assert never.token_ids == ids and never.finish_reason == "length"


def test_end_of_text_ends_and_is_kept(setup, tmp_path):
    """A model whose end-of-text id is a token greedy decoding reaches stops there, keeping the token."""
    path, _, engine, prompt = setup
    ids = _greedy(engine, prompt).token_ids
    eos = ids[3]
    edited = tmp_path / "eos-model"
    shutil.copytree(path, edited)
    config = json.loads((edited / "config.json").read_text())
    config["eos_token_id"] = eos
    (edited / "config.json").write_text(json.dumps(config))
    with Engine.from_pretrained(edited, policy=POLICY, offload_dir=tmp_path, device="cpu") as other:
        completion = _greedy(other, prompt)
    first = ids.index(eos)
    assert completion.token_ids == ids[:first + 1] and completion.finish_reason == "eos"


def test_prompt_logprobs_do_not_depend_on_sampling(setup):
    _, hf, engine, prompt = setup
    (result,) = engine.generate([prompt], max_new_tokens=2, temperature=1.5, echo_prompt=True, seed=1)
    ref = reference_logprobs(hf, prompt)
    assert result.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert abs(result.prompt_logprobs[i] - ref[i - 1, prompt[i]].item()) <= LOGPROB_TOL
