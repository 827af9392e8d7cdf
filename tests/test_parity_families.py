"""The engine against transformers' Qwen3, Phi-3, Gemma 2, Gemma 3, Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE on the
same weights, for
every kind of placement, on the CPU and on the simulated GPU; routing ties; MoE memory accounting and
parameter counts; 4-bit experts against the independent quantiser.

Presets (flexgen_core.testing.llama): `qwen3` per-head q/k norms, head_dim != hidden / heads; `phi3` fused
qkv and gate_up projections, a sliding window; `gemma2` scaled embedding, (1 + w) norms after attention and
MLP too, GeGLU, scores scaled by query_pre_attn_scalar, soft caps on scores and logits, a local and a global
layer; `gemma3` q/k norms and a RoPE base per layer kind; `mixtral`
top-2 of 4 renormalised, a sliding window; `qwen2_moe` a shared expert and a dense second layer;
`qwen3_moe` top-2 of 8 renormalised, q/k norms; `olmoe` top-2 of 8 not renormalised, q/k norms over the
projections, clip_qkv.
"""

import json

import pytest
import torch
from quant_reference import quantised_weights_model
from reference import check_result
from test_parity_opt import DEVICES, LOGPROB_TOL, PLACEMENTS, TIE_TOL, check_greedy_parity, greedy_parity_test, preset_models
from transformers import AutoConfig, AutoModelForCausalLM

from flexgen_core import Engine, Policy, memory
from flexgen_core.models.base import LayerKind
from flexgen_core.models.moe import SparseMoE
from flexgen_core.models.registry import family_for, supported
from flexgen_core.plan.shapes import load_model, matrix_params
from flexgen_core.testing import PRESETS, build_checkpoint, sample_prompts

NEW_PRESETS = ["qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
MOE_PRESETS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
GEMMA_PRESETS = ["gemma2", "gemma3"]

model = preset_models(NEW_PRESETS)
test_greedy_parity = greedy_parity_test()


def test_registry_knows_the_new_families():
    for arch in ("Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                 "OlmoeForCausalLM"):
        assert arch in supported()


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_planned_parameters_are_transformers_parameters(preset):
    """The layers the planner and the accounting see hold exactly the parameters transformers builds (a tied
    head twice)."""
    path = build_checkpoint(preset)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    planned = load_model(str(path))
    # The engine stores a tied output embedding a second time, in the output layer (Gemma's).
    tied = hf.get_output_embeddings().weight.numel() if PRESETS[preset].tie_word_embeddings else 0
    assert sum(spec.numel for layer in planned.layers for spec in layer.specs) - tied == \
        sum(p.numel() for p in hf.parameters()) == PRESETS[preset].num_params


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_presets_route_tokens_to_every_expert(preset):
    """Each MoE layer sends the prompts' tokens to all its experts (so each expert's matmul is checked),
    and no expert takes every token."""
    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = sample_prompts(path, 4, 20, 30, seed=1)
    routers = [m for name, m in hf.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]
    assert routers, "no router found"
    seen = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append(out[2])) for r in routers]
    with torch.no_grad():
        for prompt in prompts:
            hf(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    experts = PRESETS[preset].experts
    for layer in range(len(routers)):
        chosen = torch.cat(seen[layer::len(routers)])  # (tokens, k) over all prompts
        counts = torch.bincount(chosen.flatten(), minlength=experts)
        assert (counts > 0).all() and counts.max() < chosen.shape[0], counts


def test_olmoe_preset_clips_and_mixtral_windows_bite():
    """The q/k/v clip of the OLMoE preset changes its result (values exceed it), as the Mixtral preset's
    window does (the parity prompts are longer than it)."""
    assert PRESETS["mixtral"].sliding_window < 40
    path = build_checkpoint("olmoe")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = sample_prompts(path, 1, 30, 30, seed=2)[0]
    with torch.no_grad():
        clipped = hf(torch.tensor([prompt])).logits
        hf.config.clip_qkv = None
        for layer in hf.model.layers:
            layer.self_attn.config.clip_qkv = None
        unclipped = hf(torch.tensor([prompt])).logits
    assert (clipped - unclipped).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_tied_router_logits_break_as_transformers_does(device, tmp_path):
    """Two experts with the same router row get the same probability for every token: the top-k must
    pick between them as transformers' torch.topk does, on the same float32 probabilities."""
    source = build_checkpoint("qwen3_moe")
    tied = tmp_path / "tied"
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            router = layer.mlp.gate.weight
            router[3].copy_(router[1])  # experts 1 and 3 tie everywhere
            router[5].copy_(router[1])  # and 5: three-way ties
    hf.save_pretrained(tied)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tied / name).write_bytes((source / name).read_bytes())
    hf = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval()
    check_greedy_parity((tied, hf), PLACEMENTS["mixed-three-tiers"], tmp_path / "offload", device)


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_moe_accounting_is_the_engines_allocation(preset, tmp_path):
    """memory.account's bytes per tier for an MoE model are what the engine allocates, experts included,
    for a placement that splits each MoE layer's experts over the three tiers."""
    path = build_checkpoint(preset)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=30, w_cpu_percent=40, cache_gpu_percent=50,
                    cache_cpu_percent=50)
    prompts = sample_prompts(path, 4, 12, 12, seed=3)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device="simulated") as engine:
        engine.generate(prompts, max_new_tokens=4)
        real = engine.runner.last_allocated
        planned = memory.account(engine.layers, engine.config, policy, 12, 4, engine.dtype.itemsize, True)
        moe_layers = [layer for layer in engine.layers if isinstance(layer, SparseMoE)]
        tiers = {p.tier for layer in moe_layers
                 for p in memory.place_layer_weights(layer.specs, policy, engine.dtype.itemsize)}
    assert tiers == {"gpu", "cpu", "disk"}
    for term in ("weights", "weight_staging", "cache", "cache_staging"):
        assert real[term] == getattr(planned, term), term


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_cost_model_charges_experts_to_their_share_of_tokens(preset):
    """Per token, an MoE layer multiplies by its router, k of its E experts and any shared expert."""
    path = build_checkpoint(preset)
    spec = PRESETS[preset]
    layers = [layer for layer in load_model(str(path)).layers if layer.kind is LayerKind.MLP]
    h = spec.hidden
    routed = spec.experts * h + spec.experts_per_token * 3 * h * spec.expert_ffn
    shared = 3 * h * spec.shared_expert_ffn + h if spec.shared_expert_ffn else 0
    expected = [3 * h * spec.ffn if i in spec.dense_layers else routed + shared for i in range(spec.layers)]
    assert [matrix_params(layer) for layer in layers] == expected


@pytest.mark.parametrize("preset", ["mixtral", "olmoe"])
def test_compressed_experts_match_a_dequantised_reference(preset, tmp_path):
    """With compress_weight, every expert is stored 4-bit; the engine's greedy run equals transformers'
    on the weights the independent quantiser (tests/quant_reference.py) rounds them to."""
    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=50, compress_weight=True)
    prompts = sample_prompts(path, 3, 10, 20, seed=4)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device="simulated") as engine:
        compressed = {spec.name for layer in engine.layers if isinstance(layer, SparseMoE) for spec in layer.specs
                      if spec.compress_group_dim is not None}
        assert any(name.startswith("e") and name.endswith(".down") for name in compressed)
        results = engine.generate(prompts, max_new_tokens=4, echo_prompt=True)
    reference = quantised_weights_model(hf)
    for prompt, result in zip(prompts, results):
        check_result(reference, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True)


def test_config_errors_name_the_field():
    hf = json.loads((build_checkpoint("qwen3_moe") / "config.json").read_text())
    hf["num_experts_per_tok"] = hf.get("num_local_experts") or hf["num_experts"]
    hf["num_experts_per_tok"] += 1
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        family_for(hf).config_from_hf(hf)


# ---- shared prefix, packing, the simulated GPU's memory --------------------------------------------

SHARED_PLACEMENTS = ["mixed-three-tiers", "cache-split-cpu-attention", "everything-on-disk-no-overlap"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SHARED_PLACEMENTS)
@pytest.mark.parametrize("preset", ["mixtral", "qwen2_moe", *GEMMA_PRESETS])
def test_shared_prefix_parity(preset, name, device, tmp_path, monkeypatch):
    from test_shared_prefix import PREFIX_LEN, PrefixCounter, _prompts

    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(path)
    counter = PrefixCounter(monkeypatch)
    with Engine.from_pretrained(path, policy=PLACEMENTS[name], offload_dir=tmp_path, device=device) as engine:
        results = engine.generate(prompts, max_new_tokens=6, echo_prompt=True, top_k_logprobs=3)
    assert counter.lengths == [PREFIX_LEN]
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["qwen3_moe", "olmoe", "gemma2"])
def test_packed_batches_match_transformers(preset, device, tmp_path):
    from test_compaction import MAX_NEW, _prompts, _staggered_stops, _wide

    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(path, True)
    policy = _wide(PLACEMENTS["cache-split-cpu-attention"])
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
        stops = _staggered_stops(engine.generate(prompts, max_new_tokens=MAX_NEW))
        results = engine.generate(prompts, max_new_tokens=MAX_NEW, stop=stops, echo_prompt=True, top_k_logprobs=2)
        assert engine.stats.compactions > 0
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["mixtral", "olmoe", "gemma2"])
def test_sampled_sequences_are_scored_as_transformers_scores_them(preset, device, tmp_path):
    """Sampling (temperature 1.5, top-p 0.95) through an offloaded placement: each sampled sequence leaves
    the greedy path, and every token's logprob is transformers' log-softmax at that position of that very
    sequence, so routing and caches follow the sampled tokens."""
    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = sample_prompts(path, 3, 5, 30, seed=4)
    with Engine.from_pretrained(path, policy=PLACEMENTS["cache-split-cpu-attention"], offload_dir=tmp_path,
                                device=device) as engine:
        greedy = engine.generate(prompts, max_new_tokens=8)
        results = engine.generate(prompts, max_new_tokens=8, num_completions=3, temperature=1.5, top_p=0.95, seed=5)
    off_greedy = 0
    for prompt, result, first in zip(prompts, results, greedy):
        for completion in result.completions:
            tokens = list(completion.token_ids)
            off_greedy += tokens != list(first.completions[0].token_ids)
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([list(prompt) + tokens])).logits[0].float(), dim=-1)
            for step, token in enumerate(tokens):
                assert abs(completion.logprobs[step] - ref[len(prompt) - 1 + step, token].item()) <= LOGPROB_TOL
    assert off_greedy >= 3  # the test's power: sampled paths differ from the greedy one


@pytest.mark.parametrize("name", ["all-on-device", "mixed-three-tiers", "cache-split-cpu-attention",
                                  "activations-on-cpu"])
@pytest.mark.parametrize("preset", MOE_PRESETS + GEMMA_PRESETS)
def test_gpu_peak_is_within_the_accounting(preset, name, tmp_path):
    """The simulated GPU's peak, the MoE layers' routing and per-expert transients and Gemma's extra norms
    and soft-capped scores included, is at most what memory.account says."""
    from test_cuda_sim import _peak_on_gpu

    path = build_checkpoint(preset)
    prompts = sample_prompts(path, 7, 3, 40, seed=1)
    peak, accounted = _peak_on_gpu("simulated", path, PLACEMENTS[name], prompts, 8, tmp_path)
    assert 0 < peak <= accounted, f"GPU peak {peak} B > accounted {accounted} B"


@pytest.mark.parametrize("preset", ["mixtral", "qwen2_moe"])
def test_chunked_moe_matches_transformers(preset, tmp_path, monkeypatch):
    """With position chunks of a few KiB, each chunk is routed on its own: the results still match and the
    peak stays within the accounting, which counts one chunk."""
    from test_cuda_sim import _peak_on_gpu

    monkeypatch.setattr(memory, "MLP_CHUNK_BYTES", 4096)
    path = build_checkpoint(preset)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = sample_prompts(path, 5, 12, 40, seed=3)
    results = []
    peak, accounted = _peak_on_gpu("simulated", path, PLACEMENTS["mixed-three-tiers"], prompts, 6, tmp_path,
                                   results)
    assert 0 < peak <= accounted
    for prompt, result in zip(prompts, results):
        check_result(hf, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True, top_k=3)


@pytest.mark.cuda_sim
@pytest.mark.parametrize("batch, tokens", [(1, 3), (4, 40), (8, 64)])
@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_moe_layer_transients_are_within_its_bound(preset, batch, tokens, tmp_path):
    """One MoE layer on the simulated GPU spends at most memory.mlp_workspace beyond its input and
    weights (at one token per row the router and per-expert terms are what keeps it so)."""
    from flexgen_core.runtime import unit_math
    from flexgen_core.runtime.simulated_cuda import MEMORY, simulated_cuda

    path = build_checkpoint(preset)
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=4), offload_dir=tmp_path,
                                device="simulated") as engine, simulated_cuda():
        idx = next(i for i, layer in enumerate(engine.layers) if isinstance(layer, SparseMoE))
        weights = engine.weights.load(idx, 0)
        x = torch.randn(batch, tokens, engine.config.hidden_size).to(engine.devices.compute)
        MEMORY.reset_peak()
        base = MEMORY.live_bytes
        unit_math.mlp_unit(engine.layers[idx], weights, x, engine.config.mlp_width)
        peak = MEMORY.peak_bytes - base
    assert 0 < peak <= memory.mlp_workspace(engine.config, batch, tokens, engine.dtype.itemsize)


def test_phi3_long_context_rope_is_refused_by_name():
    """Phi-3's 128k models scale RoPE with `longrope`, which the engine does not implement: loading one
    fails at once, naming the scaling type, not with wrong numbers later."""
    hf = json.loads((build_checkpoint("phi3") / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                             "long_factor": [2.0] * 8, "original_max_position_embeddings": 128}
    with pytest.raises(ValueError, match="longrope"):
        family_for(hf).config_from_hf(hf)


# ---- Gemma's configs ---------------------------------------------------------------------------------

def _hf_logits(path, prompt, **overrides):
    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    hf = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0]


def test_gemma2_preset_soft_caps_and_scalar_bite():
    """The Gemma 2 preset's caps and its query_pre_attn_scalar change transformers' result (so parity checks
    them), and its prompts reach past the local layer's window."""
    path = build_checkpoint("gemma2")
    prompt = sample_prompts(path, 1, 40, 41, seed=1)[0]
    assert len(prompt) > PRESETS["gemma2"].sliding_window
    base = _hf_logits(path, prompt)
    for override in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                     {"query_pre_attn_scalar": PRESETS["gemma2"].resolved_head_dim}):
        assert (base - _hf_logits(path, prompt, **override)).abs().max() > 0.1, override


HUB_GEMMA3 = {  # google/gemma-3-1b-it's config.json as the hub has it (transformers 4.x layout), shortened to 8 layers
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256, "hidden_activation":
    "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "num_attention_heads": 4, "num_hidden_layers": 8, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
    "eos_token_id": 1, "tie_word_embeddings": True,
}


@pytest.mark.parametrize("layout", ["hub", "transformers-5"])
def test_gemma3_config_reads_as_transformers_does(layout):
    """A hub Gemma 3 config (4.x: rope_theta, rope_scaling, rope_local_base_freq, sliding_window_pattern) and
    the same config as transformers 5 writes it (rope_parameters per layer kind, layer_types) give the local
    layers, windows and RoPE frequencies that transformers' own Gemma3TextConfig and rotary embedding give."""
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from flexgen_core.models.gemma import build_layers

    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in HUB_GEMMA3.items() if k != "architectures"})
    hf = HUB_GEMMA3 if layout == "hub" else {**json.loads(theirs.to_json_string()), "architectures": ["Gemma3ForCausalLM"]}
    cfg = family_for(hf).config_from_hf(hf)
    assert cfg.local_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert cfg.local_layers == (True,) * 5 + (False,) + (True,) * 2
    assert cfg.sliding_windows == tuple(512 if t == "sliding_attention" else None for t in theirs.layer_types)
    rotary = Gemma3RotaryEmbedding(theirs)
    layers = build_layers(cfg)
    for i, kind in enumerate(theirs.layer_types):
        ours = layers[1 + 2 * i].rotary.inv_freq
        assert torch.allclose(ours, getattr(rotary, f"{kind}_inv_freq"), rtol=1e-6, atol=0), (i, kind)
    assert layers[1].rotary is not layers[11].rotary


def test_gemma_refusals_name_the_field():
    hf = json.loads((build_checkpoint("gemma2") / "config.json").read_text())
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        family_for(hf).config_from_hf({**hf, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types"):
        family_for(hf).config_from_hf({**hf, "layer_types": ["sliding_attention"]})
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        family_for(hf).config_from_hf({**hf, "attn_logit_softcapping": "50"})
