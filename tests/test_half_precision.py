"""Float16 held to a float32 truth: for each preset, the engine in float16 and transformers in float16
are both compared with transformers in float32 on the same weights. The engine's logprob error (the mean
absolute difference from float32 over every logprob it reports: prompt tokens, chosen tokens, top-k
alternatives) may be no larger than transformers' own float16 error on the same tokens (within 1.25x
plus 1e-3). The mean, not the maximum: one rounding-sensitive position decides a maximum.

Two float16 runs are not compared with each other: they round differently (kernels, reduction order,
padding), and each may stand on either side of the truth. Runs on the CPU, on the simulated GPU and,
where there is one, on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_parity_opt import DEVICES, PLACEMENTS
from transformers import AutoModelForCausalLM

from flexgen_core import Engine
from flexgen_core.testing import build_checkpoint, sample_prompts

PRESETS = ["tiny", "odd", "proj", "llama", "llama3", "mistral", "qwen2", "gemma2", "gemma3", "mixtral"]
RATIO, SLACK = 1.25, 1e-3
TOP_K = 3


def _logprobs(model, ids: list[int], device) -> torch.Tensor:
    """(len(ids), V) float32 log-softmax of a model's logits for one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@pytest.fixture(scope="module", params=PRESETS)
def models(request):
    path = build_checkpoint(request.param)
    truth = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, truth


def _half_transformers(path, device: str):
    hf_device = "cuda" if device == "cuda" else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).to(hf_device).eval(), hf_device


@pytest.mark.parametrize("device", DEVICES)
def test_float16_error_is_no_larger_than_transformers(models, device, tmp_path):
    path, truth = models
    half, hf_device = _half_transformers(path, device)
    prompts = sample_prompts(path, 5, 3, 30, seed=2)
    with Engine.from_pretrained(path, policy=PLACEMENTS["mixed-three-tiers"], offload_dir=tmp_path, device=device,
                                dtype="float16") as engine:
        results = engine.generate(prompts, max_new_tokens=6, echo_prompt=True, top_k_logprobs=TOP_K)
    engine_errors, transformers_errors = [], []
    for prompt, result in zip(prompts, results):
        completion = result.completions[0]
        ids = list(prompt) + list(completion.token_ids)
        exact = _logprobs(truth, ids, "cpu")
        rounded = _logprobs(half, ids, hf_device)
        # Every logprob the engine reports: prompt tokens, chosen tokens and their top-k alternatives.
        for pos in range(1, len(prompt)):
            engine_errors.append(abs(result.prompt_logprobs[pos] - exact[pos - 1, prompt[pos]].item()))
        for step, token in enumerate(completion.token_ids):
            row = len(prompt) - 1 + step
            engine_errors.append(abs(completion.logprobs[step] - exact[row, token].item()))
            for alt, lp in completion.top_logprobs[step].items():
                engine_errors.append(abs(lp - exact[row, alt].item()))
        # transformers' float16 on the very same positions and tokens.
        for pos in range(len(ids) - 1):
            tokens = [ids[pos + 1]]
            if pos >= len(prompt) - 1:
                tokens += list(completion.top_logprobs[pos - len(prompt) + 1])
            transformers_errors += [abs(rounded[pos, token].item() - exact[pos, token].item()) for token in tokens]
    engine_error = sum(engine_errors) / len(engine_errors)
    transformers_error = sum(transformers_errors) / len(transformers_errors)
    assert len(engine_errors) == len(transformers_errors)
    print(f"{device}: engine float16 error {engine_error:.4g}, transformers float16 error {transformers_error:.4g}")
    assert engine_error <= RATIO * transformers_error + SLACK, (
        f"engine's float16 logprobs are {engine_error:.4g} from float32's, transformers' {transformers_error:.4g}")


def test_the_check_sees_a_wrong_half_precision_engine(models, tmp_path, monkeypatch):
    """The bound has the power to see a real error: an engine whose float16 attention scores are 5%
    too sharp fails it."""
    import flexgen_core.models.layers as layers

    path, truth = models
    original = layers.attend

    def too_sharp(q, k, v, allowed, scores=layers.STANDARD_SCORES):
        return original(q * 1.05, k, v, allowed, scores)

    monkeypatch.setattr(layers, "attend", too_sharp)
    prompts = sample_prompts(path, 3, 8, 20, seed=2)
    with Engine.from_pretrained(path, policy=PLACEMENTS["all-on-device"], offload_dir=tmp_path, device="cpu",
                                dtype="float16") as engine:
        results = engine.generate(prompts, max_new_tokens=4, echo_prompt=True)
    half, _ = _half_transformers(path, "cpu")
    engine_errors, transformers_errors = [], []
    for prompt, result in zip(prompts, results):
        ids = list(prompt) + list(result.completions[0].token_ids)
        exact, rounded = _logprobs(truth, ids, "cpu"), _logprobs(half, ids, "cpu")
        lps = list(result.prompt_logprobs[1:]) + list(result.completions[0].logprobs)
        for pos, lp in enumerate(lps):
            engine_errors.append(abs(lp - exact[pos, ids[pos + 1]].item()))
            transformers_errors.append(abs(rounded[pos, ids[pos + 1]].item() - exact[pos, ids[pos + 1]].item()))
    engine_error = sum(engine_errors) / len(engine_errors)
    transformers_error = sum(transformers_errors) / len(transformers_errors)
    assert engine_error > RATIO * transformers_error + SLACK
