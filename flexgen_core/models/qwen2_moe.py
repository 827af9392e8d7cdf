"""Qwen2-MoE, as transformers' `models/qwen2_moe/modeling_qwen2_moe.py`: Qwen2's attention (llama.py: q/k/v
biases) and a mixture of experts (moe.py) with a shared expert beside the routed ones, scaled by
sigmoid(`shared_expert_gate`); sparse layers as Qwen3-MoE's (qwen3.sparse_layers)."""

from __future__ import annotations

from typing import Any, Mapping

from flexgen_core.models.base import QWEN_NAMES, MoESpec, config_int, config_num_experts
from flexgen_core.models.llama import LlamaConfig, common_fields, qwen_windows
from flexgen_core.models.qwen3 import sparse_layers


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    fields = common_fields(hf)
    if hf.get("use_sliding_window") and hf.get("layer_types") is None:
        raise ValueError("Qwen2-MoE with use_sliding_window and no layer_types is not supported")
    moe = MoESpec(config_num_experts(hf), config_int(hf, "num_experts_per_tok"),
                  config_int(hf, "moe_intermediate_size"), bool(hf.get("norm_topk_prob", False)), False,
                  QWEN_NAMES, shared_ffn=config_int(hf, "shared_expert_intermediate_size", 0, minimum=0))
    return LlamaConfig(**fields, family="qwen2_moe", qkv_bias=bool(hf.get("qkv_bias", True)), moe=moe,
                       moe_layers=sparse_layers(hf, fields["num_layers"]),
                       sliding_windows=qwen_windows(hf, fields["num_layers"], fields["max_positions"]))
