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

CONFIG_CLASSES = {"opt": "OPTConfig", "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
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
