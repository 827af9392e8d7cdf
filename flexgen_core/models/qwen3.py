"""Qwen3 and Qwen3-MoE, as transformers' `models/qwen3/modeling_qwen3.py` and
`models/qwen3_moe/modeling_qwen3_moe.py`: Llama-style decoders (llama.py) whose q and k are RMS-normalised
per head before RoPE (`q_norm`, `k_norm`, of head_dim weights), with optional biases on q/k/v/o
(`attention_bias`). Qwen3-MoE's MLPs are mixtures of experts (moe.py: softmax top-k, renormalised with
`norm_topk_prob`) in every `decoder_sparse_step`-th layer not in `mlp_only_layers`."""

from __future__ import annotations

from typing import Any, Mapping

from flexgen_core.models.base import QWEN_NAMES, MoESpec, config_int, config_num_experts
from flexgen_core.models.llama import LlamaConfig, common_fields, qwen_windows


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    fields = common_fields(hf)
    bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(**fields, family="qwen3", qkv_bias=bias, o_bias=bias, qk_norm="head",
                       sliding_windows=qwen_windows(hf, fields["num_layers"], fields["max_positions"]))


def moe_config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    fields = common_fields(hf)
    bias = bool(hf.get("attention_bias", False))
    moe = MoESpec(config_num_experts(hf), config_int(hf, "num_experts_per_tok"),
                  config_int(hf, "moe_intermediate_size"), bool(hf.get("norm_topk_prob", False)), False, QWEN_NAMES)
    return LlamaConfig(**fields, family="qwen3_moe", qkv_bias=bias, o_bias=bias, qk_norm="head", moe=moe,
                       moe_layers=sparse_layers(hf, fields["num_layers"]),
                       sliding_windows=qwen_windows(hf, fields["num_layers"], fields["max_positions"], "all"))


def sparse_layers(hf: Mapping[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Which decoder layers have a mixture of experts (the Qwen MoE rule; the others a dense MLP)."""
    step = config_int(hf, "decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
