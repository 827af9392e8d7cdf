"""The engine against transformers' OPT on the same weights, for every kind of placement."""

import pytest
import torch
from reference import check_result, reference_logprobs
from transformers import AutoModelForCausalLM

from flexgen_core import Engine, Policy
from flexgen_core.placement import cache_segments
from flexgen_core.testing import build_checkpoint, sample_prompts

# "simulated": a GPU that CPU-only hosts can run (flexgen_core/runtime/simulated_cuda.py): CUDA's device
# rules and memory over real CPU values, every copy between the tiers asynchronous on a simulated stream,
# so the code paths of a GPU host run on this CPU (`pytest -m cuda_sim`). "cuda" where there is a GPU
# (`pytest -m gpu`): the same float32 suites on it.
DEVICES = ("cpu", "simulated") + (("cuda",) if torch.cuda.is_available() else ())
LOGPROB_TOL = 2e-4  # float32 on CPU: different matmul shapes (padding, batching) move logprobs ~1e-6
TIE_TOL = 2e-4

PLACEMENTS = {
    "all-on-device": Policy(gpu_batch_size=4),
    "weights-on-disk": Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0),
    "mixed-three-tiers": Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=20, w_cpu_percent=40,
                                cache_gpu_percent=25, cache_cpu_percent=50, act_gpu_percent=50, act_cpu_percent=0),
    "cache-on-disk": Policy(gpu_batch_size=3, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=0),
    "cache-cpu-attention": Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=0,
                                  cache_cpu_percent=100, cpu_cache_compute=True),
    "cache-split-cpu-attention": Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=50, w_cpu_percent=50,
                                        cache_gpu_percent=25, cache_cpu_percent=50, cpu_cache_compute=True),
    "activations-on-cpu": Policy(gpu_batch_size=2, num_gpu_batches=2, act_gpu_percent=0, act_cpu_percent=100),
    "everything-on-disk-no-overlap": Policy(gpu_batch_size=1, num_gpu_batches=4, w_gpu_percent=0, w_cpu_percent=0,
                                            cache_gpu_percent=0, cache_cpu_percent=0, act_gpu_percent=0,
                                            act_cpu_percent=0, overlap=False),
    "mixed-no-overlap": Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=25,
                               cache_gpu_percent=50, cache_cpu_percent=50, overlap=False),
}


def preset_models(presets: list[str]):
    """A module-scoped fixture over `presets`: each one's checkpoint and transformers' float32 model of it."""
    @pytest.fixture(scope="module", params=presets)
    def model(request):
        path = build_checkpoint(request.param)
        return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return model


model = preset_models(["tiny", "odd", "proj"])


def check_greedy_parity(model, policy: Policy, offload_dir, device: str = "cpu") -> None:
    """7 ragged prompts through the engine under `policy`, 8 greedy tokens with echo and top-3, each
    checked against transformers' forward pass on the same weights."""
    path, hf = model
    prompts = sample_prompts(path, 7, 3, 40, seed=1)  # ragged; 7 fills no block exactly
    with Engine.from_pretrained(path, policy=policy, offload_dir=offload_dir, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=8, echo_prompt=True, top_k_logprobs=3)
    for prompt, result in zip(prompts, results):
        assert len(result.completions[0].token_ids) == 8 or result.completions[0].finish_reason == "eos"
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=3)


def greedy_parity_test():
    """The greedy parity test over every placement and device, for the `model` fixture of the module that
    binds it (pytest resolves fixtures where it collects the test)."""
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("name", sorted(PLACEMENTS))
    def test_greedy_parity(model, name, device, tmp_path):
        check_greedy_parity(model, PLACEMENTS[name], tmp_path, device)

    return test_greedy_parity


test_greedy_parity = greedy_parity_test()


def test_sharded_checkpoint_matches_single(tmp_path):
    single, sharded = build_checkpoint("odd"), build_checkpoint("odd", sharded=True)
    prompts = sample_prompts(single, 3, 4, 20, seed=2)
    outs = []
    for path in (single, sharded):
        with Engine.from_pretrained(path, policy=PLACEMENTS["mixed-three-tiers"], offload_dir=tmp_path) as engine:
            outs.append(engine.generate(prompts, max_new_tokens=5))
    for a, b in zip(*outs):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert a.completions[0].logprobs == b.completions[0].logprobs


def test_results_do_not_depend_on_neighbours(tmp_path):
    path = build_checkpoint("tiny")
    prompts = sample_prompts(path, 6, 2, 30, seed=3)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=50)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as engine:
        together = engine.generate(prompts, max_new_tokens=6, echo_prompt=True)
        alone = [engine.generate([p], max_new_tokens=6, echo_prompt=True)[0] for p in prompts]
    for a, b in zip(together, alone):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        # Other neighbours mean other matmul shapes, so other kernels and summation orders: the float32
        # noise of the parity tests, whose size depends on the CPU's kernels (1.1e-5 seen with AVX2).
        assert max(abs(x - y) for x, y in zip(a.completions[0].logprobs, b.completions[0].logprobs)) <= LOGPROB_TOL
        assert max(abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])) <= LOGPROB_TOL


def test_scoring_only(tmp_path):
    path = build_checkpoint("odd")
    _, hf = path, AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = sample_prompts(path, 5, 2, 25, seed=4)
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=0,
                                                    cache_cpu_percent=0), offload_dir=tmp_path) as engine:
        results = engine.generate(prompts, max_new_tokens=0, echo_prompt=True)
    for prompt, result in zip(prompts, results):
        assert result.completions[0].token_ids == []
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True)


def test_forced_tokens_score_a_continuation(tmp_path):
    """Teacher forcing through the decode path gives transformers' logprobs of the given tokens."""
    path = build_checkpoint("odd")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = sample_prompts(path, 3, 20, 30, seed=8)
    prompts, continuations = [t[:8] for t in texts], [t[8:18] for t in texts]
    with Engine.from_pretrained(path, policy=PLACEMENTS["mixed-three-tiers"], offload_dir=tmp_path) as engine:
        results = engine.generate(prompts, max_new_tokens=10, forced_tokens=continuations)
    for prompt, cont, result in zip(prompts, continuations, results):
        assert result.completions[0].token_ids == cont
        ref = reference_logprobs(hf, prompt + cont)
        expected = [ref[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(cont)]
        assert max(abs(a - b) for a, b in zip(result.completions[0].logprobs, expected)) <= LOGPROB_TOL


@pytest.mark.cuda_sim
def test_simulated_device_takes_the_gpu_host_paths(tmp_path):
    """On "simulated", off-device weights and cache are staged on the compute tier by copies, and
    off-device cache attends on the CPU; on a plain CPU neither happens. So the simulated runs of
    the parity suite cover those paths."""
    path = build_checkpoint("tiny")
    policy = PLACEMENTS["cache-split-cpu-attention"]
    staging, attention = {}, {}
    for device in DEVICES:
        with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
            engine.generate(sample_prompts(path, 6, 5, 9, seed=0), max_new_tokens=2)
            staging[device] = engine.runner.last_allocated["weight_staging"]["gpu"]
            attention[device] = {seg.compute_on for seg in cache_segments(engine.config.num_kv_heads, policy,
                                                                          engine.devices.separate_device)}
    assert staging["cpu"] == 0 < staging["simulated"]
    assert attention["cpu"] == {"gpu"} and attention["simulated"] == {"gpu", "cpu"}


@pytest.mark.cuda_sim
def test_parity_under_long_copy_stalls(tmp_path, monkeypatch):
    """Every third simulated copy stalls for up to 50 ms, so copies land long after later work on the
    other stream: a staging slot reused before the store reading it has finished is overwritten."""
    from flexgen_core.runtime import streams

    monkeypatch.setattr(streams, "STALL_EVERY", 3)
    monkeypatch.setattr(streams, "STALL_S", 50e-3)
    path = build_checkpoint("tiny")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    check_greedy_parity((path, hf), PLACEMENTS["mixed-three-tiers"], tmp_path, "simulated")
