"""Echo with generation (echo_prompt and max_tokens > 0) against HELM's own HuggingFaceClient, on both
tokenizer styles: OPT's byte-level BPE and a Llama-style tokenizer, which drops a word's leading space
when a token list is decoded on its own (so the echoed text must be decoded whole).

HELM's client reports 0.0 for every token in this mode; ours reports the real logprobs (see
flexgen_helm/client.py), so logprobs are checked against transformers instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from helm.benchmark.config_registry import (
    register_builtin_configs_from_helm_package,
    register_configs_from_directory,
)
from helm.clients.auto_client import AutoClient
from helm.clients.huggingface_client import HuggingFaceServerFactory
from helm.common.cache_backend_config import BlackHoleCacheBackendConfig
from helm.common.request import Request
from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
from helm_support import FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, TEST_MODEL, write_prod_env
from reference import reference_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm import client as client_module

LOGPROB_TOLERANCE = 2e-4
PROMPTS = ["the bird", "The river and the stone were", "import os", "a b c", "Paper, window: yellow light",
           "def parse(self, text):", "one two three four", "class Garden:", "for index, value in", "x = 1"]
PREFIX_TOKENS = {"tiny": "</s>", "llama": "<s>"}


@pytest.fixture(scope="module", params=sorted(PREFIX_TOKENS))
def clients(request, tmp_path_factory):
    preset = request.param
    root = tmp_path_factory.mktemp(f"helm_echo_{preset}")
    checkpoint = build_checkpoint(preset, seed=0)
    prod_env = write_prod_env(root / "prod_env", checkpoint, PRESETS[preset].max_positions,
                              prefix_token=PREFIX_TOKENS[preset])
    os.environ["HF_HUB_OFFLINE"] = "1"
    _forget_helm_models()  # HELM caches tokenizers and HF servers by name; both presets use one name
    register_builtin_configs_from_helm_package()
    register_configs_from_directory(str(prod_env))
    auto = AutoClient({}, str(root / "files"), BlackHoleCacheBackendConfig())
    yield preset, checkpoint, auto._get_client(FLEXGEN_DEPLOYMENT), auto._get_client(HF_DEPLOYMENT)
    client_module.ENGINES.close_all()
    _forget_helm_models()


def _forget_helm_models():
    HuggingFaceTokenizer._tokenizers.clear()
    HuggingFaceServerFactory._servers.clear()


def test_echo_with_generation_matches_hf_client(clients):
    preset, checkpoint, flexgen, hf = clients
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    spaced = 0
    for prompt in PROMPTS:
        fields = dict(model=TEST_MODEL, prompt=prompt, temperature=0.0, max_tokens=4, echo_prompt=True)
        (ours,) = flexgen.make_request(Request(model_deployment=FLEXGEN_DEPLOYMENT, **fields)).completions
        (theirs,) = hf.make_request(Request(model_deployment=HF_DEPLOYMENT, **fields)).completions
        assert ours.text == theirs.text
        assert [t.text for t in ours.tokens] == [t.text for t in theirs.tokens]
        # Logprobs: HELM's client reports 0.0 for every token in this mode; ours are transformers'.
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False)[0].tolist()
        assert [tokenizer.decode([i]) for i in ids] == [t.text for t in ours.tokens]
        ref = reference_logprobs(model, ids)
        assert ours.tokens[0].logprob == 0.0
        for i in range(1, len(ids)):
            assert ours.tokens[i].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=LOGPROB_TOLERANCE)
        # Count the prompts where decoding prompt and completion apart gives another text.
        spaced += tokenizer.decode(ids[:len(prompt_ids)]) + tokenizer.decode(ids[len(prompt_ids):]) != tokenizer.decode(ids)
    if preset == "llama":
        assert spaced > 0, "no prompt exercised the leading-space case"
