"""The planner sees the bytes the engine allocates: for every test preset, plan-time weight bytes
(flexgen_core.plan.shapes -> memory.account) equal the engine's real allocations; for every model of
the packaged table, the planned parameters equal transformers' own count of the same config (built on
the meta device, so no weights), biases included."""

from __future__ import annotations

import pytest
import torch
import transformers

from flexgen_core import Engine, Policy, memory
from flexgen_core.plan.shapes import hf_config_from_entry, known_models, load_model
from flexgen_core.testing import PRESETS, build_checkpoint

CONFIG_CLASSES = {"opt": "OPTConfig", "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "mixtral": "MixtralConfig", "olmoe": "OlmoeConfig",
                  "qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig", "phi3": "Phi3Config",
                  "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}
POLICY = Policy(gpu_batch_size=2, num_gpu_batches=1, w_gpu_percent=30, w_cpu_percent=30)


@pytest.mark.parametrize("preset", sorted(name for name in PRESETS if name not in ("large", "opt-100m")))
def test_plan_time_weight_bytes_equal_engine_allocations(preset, tmp_path):
    path = build_checkpoint(preset)
    planned = memory.account(load_model(path).layers, load_model(path).shape, POLICY, 8, 2, 4, separate_device=False)
    with Engine.from_pretrained(path, policy=POLICY, offload_dir=tmp_path, device="cpu") as engine:
        engine.generate([[1, 2, 3]], max_new_tokens=2)
        real = engine.runner.last_allocated
    assert real["weights"] == planned.weights
    assert real["weight_staging"] == planned.weight_staging


@pytest.mark.parametrize("name", sorted(known_models()))
def test_known_models_plan_transformers_parameter_count(name):
    entry = known_models()[name]
    hf_config = hf_config_from_entry(entry)
    config = getattr(transformers, CONFIG_CLASSES[entry["family"]])(**hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    unique = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The engine stores a tied output embedding a second time, in the output layer.
    expected = unique + (model.get_output_embeddings().weight.numel() if tied else 0)
    assert load_model(name).num_params == expected


@pytest.mark.parametrize("name, published", [
    ("mistralai/Mixtral-8x7B-v0.1", 46.7e9),  # Mistral AI's announcement: 46.7B total, 12.9B per token
    ("allenai/OLMoE-1B-7B-0125-Instruct", 6.9e9),  # "1B active, 7B total" (6.9B in the OLMoE paper)
    ("Qwen/Qwen3-30B-A3B", 30.5e9),  # Qwen3's model card: 30.5B total, 3.3B activated
    ("Qwen/Qwen1.5-MoE-A2.7B", 14.3e9),  # its model card: 14.3B total, 2.7B activated
    ("microsoft/Phi-3-mini-4k-instruct", 3.8e9),  # the Phi-3 report: 3.8B
    ("microsoft/Phi-3-medium-4k-instruct", 14e9),  # the Phi-3 report: 14B
    ("google/gemma-2-2b-it", 2.61e9),  # the Gemma 2 report's parameter table: 2.6B, 9.2B and 27.2B
    ("google/gemma-2-9b-it", 9.24e9),
    ("google/gemma-2-27b-it", 27.2e9),
    ("google/gemma-3-1b-it", 1.0e9),  # the Gemma 3 report: 1B (698M non-embedding + 302M embedding)
])
def test_new_table_models_have_their_published_sizes(name, published):
    """An independent check of the table's MoE, Phi-3 and Gemma fields: the totals their authors publish (a
    tied head, which the engine stores twice, counted once)."""
    model = load_model(name)
    tied = model.shape.vocab_size * model.shape.hidden_size if getattr(model.shape, "tie_word_embeddings", False) else 0
    assert model.num_params - tied == pytest.approx(published, rel=0.01)


def test_mixtral_plans_cpu_attention_and_a_large_block():
    """Per token Mixtral reads a quarter of its experts' weights but stores all of them: on the paper's T4
    machine the planner keeps the weights on the host and amortises each layer's load over a large block,
    with attention over a host-resident cache on the CPU (as MoE-Lightning and FlexGen do)."""
    from flexgen_core.plan.hardware import load_profile
    from flexgen_core.plan.search import plan
    from flexgen_core.plan.workload import Workload

    result = plan(load_model("mistralai/Mixtral-8x7B-v0.1"), Workload(512, 32), load_profile("t4-gcp"), 2)
    policy = result.policy
    assert policy.cpu_cache_compute and policy.cache_gpu_percent == 0
    assert policy.block_size >= 256 and policy.w_gpu_percent < 20
