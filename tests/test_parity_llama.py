"""The engine against transformers' Llama, Mistral and Qwen2 on the same weights, for every kind of
placement; KV accounting under grouped-query attention; config parsing and its errors.

Presets (flexgen_core.testing.llama): `llama` GQA 6/2 heads, vocabulary 1001, untied head; `llama3`
RoPE scaling of type llama3, tied head; `mistral` sliding window 16 (shorter than the prompts), 3 KV
heads, head_dim != hidden / heads; `qwen2` q/k/v biases.
"""

import json

import pytest
import torch
from reference import reference_logprobs
from test_parity_opt import LOGPROB_TOL, greedy_parity_test, preset_models
from transformers import AutoModelForCausalLM

from flexgen_core import Engine, Policy
from flexgen_core.placement import TIERS
from flexgen_core.models import llama
from flexgen_core.models.base import LayerKind
from flexgen_core.models.registry import family_for, supported
from flexgen_core.testing import PRESETS, build_checkpoint, sample_prompts

LLAMA_PRESETS = ["llama", "llama3", "mistral", "qwen2"]

model = preset_models(LLAMA_PRESETS)
test_greedy_parity = greedy_parity_test()


def test_presets_exercise_what_they_claim():
    assert all(PRESETS[n].kv_heads < PRESETS[n].heads for n in LLAMA_PRESETS)  # GQA everywhere
    assert PRESETS["llama"].vocab % 2 == 1 and not PRESETS["llama"].tie_word_embeddings
    assert PRESETS["llama3"].tie_word_embeddings and PRESETS["llama3"].rope_scaling["rope_type"] == "llama3"
    # The window must bite: the parity prompts (up to 40 tokens) plus 8 new ones are longer than it.
    assert PRESETS["mistral"].sliding_window < 40
    assert PRESETS["mistral"].q_width != PRESETS["mistral"].hidden


def test_sliding_window_changes_the_result(tmp_path):
    """Without its window the Mistral preset no longer matches transformers: the window is exercised."""
    path = build_checkpoint("mistral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = sample_prompts(path, 1, 40, 40, seed=5)[0]
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=1), offload_dir=tmp_path, device="cpu") as engine:
        for layer in engine.layers:
            if layer.kind is LayerKind.ATTENTION:
                layer.sliding_window = None
        result = engine.generate([prompt], max_new_tokens=0, echo_prompt=True)[0]
    ref = reference_logprobs(hf, prompt)
    worst = max(abs(result.prompt_logprobs[i] - ref[i - 1, prompt[i]].item()) for i in range(1, len(prompt)))
    assert worst > 100 * LOGPROB_TOL


# --- GQA memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["llama", "mistral"])
def test_kv_cache_bytes_follow_the_kv_heads(preset, tmp_path):
    """Cache bytes = layers x batches x 2 (K, V) x total_len x B x kv_heads x head_dim x itemsize, as
    predicted and as allocated; the query heads never enter."""
    spec = PRESETS[preset]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=25, cache_cpu_percent=50)
    prompt_len, gen_len = 13, 4
    path = build_checkpoint(preset)
    prompts = sample_prompts(path, policy.block_size, prompt_len, prompt_len, seed=0)  # nothing shared
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device="cpu") as engine:
        assert (engine.config.num_kv_heads, engine.config.head_dim) == (spec.kv_heads, spec.resolved_head_dim)
        engine.generate(prompts, max_new_tokens=gen_len)
        real = engine.runner.last_allocated
        predicted = engine.memory(prompt_len=prompt_len, gen_len=gen_len)
        itemsize = engine.dtype.itemsize
    expected = (spec.layers * policy.num_gpu_batches * 2 * (prompt_len + gen_len) * policy.gpu_batch_size
                * spec.kv_heads * spec.resolved_head_dim * itemsize)
    assert sum(predicted.cache.values()) == expected
    assert real["cache"] == predicted.cache
    assert real["cache_staging"] == predicted.cache_staging
    assert real["weights"] == predicted.weights
    assert sum(1 for tier in TIERS if predicted.cache[tier]) >= 2  # the split is by KV heads, across tiers


# --- configs and errors -----------------------------------------------------------------------------

def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}
    with pytest.raises(ValueError) as info:
        family_for(gpt2)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "OPTForCausalLM"):
        assert arch in str(info.value)
    assert "GPT2LMHeadModel" in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ValueError, match="supported architectures: .*LlamaForCausalLM"):
        Engine.from_pretrained(tmp_path, device="cpu")
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(supported())


def test_families_are_chosen_by_architecture_or_model_type():
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    assert family_for({**base, "architectures": ["MistralForCausalLM"]}).name == "mistral"
    cfg = family_for({**base, "model_type": "qwen2"}).config_from_hf(base)
    assert (cfg.family, cfg.qkv_bias, cfg.o_bias, cfg.num_kv_heads, cfg.kv_width) == ("qwen2", True, False, 2, 32)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
])
def test_rope_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=256, rope_parameters=dict(rope))
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
    ours = llama.LlamaConfig.from_hf(hf_config.to_dict())
    got = llama.rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    assert torch.equal(got, expected)
    assert not torch.equal(got, llama.rope_inv_freq(ours.head_dim, ours.rope_theta, None))


def test_transformers_4_config_layout_is_read():
    hf = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
              vocab_size=100, max_position_embeddings=4096, rope_theta=500000.0, eos_token_id=[7, 9],
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 1024})
    cfg = llama.LlamaConfig.from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.kind == "llama3"
    assert cfg.rope_scaling.original_max_positions == 1024
    assert cfg.num_kv_heads == cfg.num_heads == 4  # no num_key_value_heads: plain multi-head attention
    assert cfg.eos_token_id == 7
    linear = llama.LlamaConfig.from_hf({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling.kind == "linear" and linear.rope_scaling.factor == 2.0


def test_sliding_windows_per_variant():
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=128, vocab_size=100,
                max_position_embeddings=4096, sliding_window=512)
    assert llama.LlamaConfig.from_hf(base, "mistral").sliding_windows == (512,) * 4
    assert llama.LlamaConfig.from_hf({**base, "sliding_window": 4096}, "mistral").sliding_windows == (None,) * 4
    assert llama.LlamaConfig.from_hf(base, "qwen2").sliding_windows == (None,) * 4  # use_sliding_window off
    qwen = llama.LlamaConfig.from_hf({**base, "use_sliding_window": True, "max_window_layers": 2}, "qwen2")
    assert qwen.sliding_windows == (None, None, 512, 512)


@pytest.mark.parametrize("bad, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'.*llama3"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"hidden_act": "swish2"}, "unsupported activation 'swish2'"),
])
def test_unsupported_configs_fail_clearly(bad, match):
    hf = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
              vocab_size=100, max_position_embeddings=64)
    with pytest.raises(ValueError, match=match):
        llama.build_layers(llama.LlamaConfig.from_hf({**hf, **bad}))


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    """An untied model never silently falls back to the input embedding for its output head."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = build_checkpoint("llama")
    folder = tmp_path / "no-head"
    shutil.copytree(src, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="output_embed.lm_head"):
        Engine.from_pretrained(folder, offload_dir=tmp_path / "offload", device="cpu")
