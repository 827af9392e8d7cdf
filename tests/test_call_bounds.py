"""Bounds on one engine call: sizes refused up front with one clear line, before any block runs; an empty
call is an empty result; tiny sampling parameters act as their greedy limit and never give NaN."""

from __future__ import annotations

import pytest

from flexgen_core import Engine, Policy
from flexgen_core import engine as engine_module
from flexgen_core.testing import build_checkpoint, sample_prompts


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_checkpoint("odd")
    with Engine.from_pretrained(path, policy=Policy(), offload_dir=tmp_path_factory.mktemp("off"), device="cpu") as e:
        yield e


@pytest.fixture
def no_block_runs(engine, monkeypatch):
    """Any block that starts fails the test: a refusal must come before any work."""
    def run(*args, **kwargs):
        raise AssertionError("a block ran before the call was refused")
    monkeypatch.setattr(engine.runner, "run", run)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_billion_completions_are_refused_before_any_work(engine, no_block_runs, temperature):
    with pytest.raises(ValueError, match=r"holds 1,000,000,000 sequences \(1 prompt\(s\) x 1,000,000,000 "
                                         r"completion\(s\)\), more than the engine's limit of 65,536"):
        engine.generate([[2, 5, 7]], max_new_tokens=1, num_completions=10**9, temperature=temperature)


def test_a_million_prompts_are_refused_before_any_work(engine, no_block_runs):
    prompts = [[2, 5, 7]] * 10**6
    with pytest.raises(ValueError, match=r"1,000,000 sequences .* split the call, or raise the limit"):
        engine.generate(prompts, max_new_tokens=1)


def test_the_limit_is_the_engines_to_raise(engine):
    prompts = sample_prompts(engine.folder, 3, 4, 8, seed=0)
    engine.max_sequences = 2
    try:
        with pytest.raises(ValueError, match="more than the engine's limit of 2 per call"):
            engine.generate(prompts, max_new_tokens=1)
        assert len(engine.generate(prompts[:2], max_new_tokens=1)) == 2
    finally:
        del engine.max_sequences
    assert engine.max_sequences == Engine.max_sequences


def test_results_that_would_not_fit_in_ram_are_refused(engine, no_block_runs, monkeypatch):
    monkeypatch.setattr(engine_module, "mem_available", lambda: 64 << 20)
    with pytest.raises(ValueError, match=r"results need about .* GiB of RAM and 0.1 GiB are available"):
        engine.generate([[2, 5, 7]] * 100, max_new_tokens=1000, top_k_logprobs=5, num_completions=20,
                        temperature=1.0)


def test_an_empty_call_is_an_empty_result(engine, no_block_runs):
    assert engine.generate([], max_new_tokens=4) == []


@pytest.mark.parametrize("settings", [dict(temperature=1e-46), dict(temperature=5e-324),
                                      dict(temperature=1.0, top_p=1e-300), dict(temperature=0.7, top_p=5e-324)])
def test_tiny_temperature_or_top_p_is_greedy(engine, settings):
    prompts = sample_prompts(engine.folder, 2, 6, 10, seed=1)
    greedy = [r.completions[0].token_ids for r in engine.generate(prompts, max_new_tokens=5)]
    sampled = engine.generate(prompts, max_new_tokens=5, num_completions=3, seed=4, **settings)
    assert [[c.token_ids for c in r.completions] for r in sampled] == [[g] * 3 for g in greedy]


@pytest.mark.parametrize("settings, named", [(dict(temperature=float("nan")), "temperature"),
                                             (dict(temperature=float("inf")), "temperature"),
                                             (dict(temperature="hot"), "temperature"),
                                             (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p")])
def test_bad_sampling_values_are_named(engine, no_block_runs, settings, named):
    with pytest.raises(ValueError, match=named):
        engine.generate([[2, 5, 7]], max_new_tokens=2, **settings)
