"""The parity suite on CUDA in float16 (skipped without a GPU).

Tolerance: float16 keeps 11 significant bits, so each matmul output carries a relative error near
5e-4, and the engine and transformers order their reductions differently (different kernels,
padding and batch shapes). Through a few layers that moves logits by ~1e-2 on these models, whose
logits spread over several nats; logprobs are compared within 5e-2 and a greedy token may differ
from the reference's argmax only when the two are within 5e-2 (a tie at float16 precision).
"""

import pytest
import torch
from reference import check_result
from test_parity_opt import PLACEMENTS
from transformers import AutoModelForCausalLM

from flexgen_core import Engine
from flexgen_core.testing import build_checkpoint, sample_prompts

pytestmark = pytest.mark.gpu

FP16_TOL = 5e-2


@pytest.fixture(scope="module", params=["tiny", "odd", "proj", "llama", "llama3", "mistral", "qwen2"])
def model(request):
    path = build_checkpoint(request.param)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).to("cuda").eval()


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_greedy_parity_cuda_fp16(model, name, tmp_path):
    path, hf = model
    prompts = sample_prompts(path, 7, 3, 40, seed=1)
    with Engine.from_pretrained(path, policy=PLACEMENTS[name], offload_dir=tmp_path, device="cuda",
                                dtype="float16") as engine:
        results = engine.generate(prompts, max_new_tokens=8, echo_prompt=True, top_k_logprobs=3)
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=FP16_TOL, tie_tol=FP16_TOL, echo=True, top_k=3)
