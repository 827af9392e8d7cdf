"""OLMoE, as transformers' `models/olmoe/modeling_olmoe.py`: a Llama-style decoder (llama.py) whose q and k
are RMS-normalised over the whole projection before the heads are split, then q, k and v clamped to
`clip_qkv` when set; optional biases on q/k/v/o (`attention_bias`); in every layer a mixture of experts
(moe.py) whose top-k probabilities are renormalised only with `norm_topk_prob`."""

from __future__ import annotations

from typing import Any, Mapping

from flexgen_core.models.base import QWEN_NAMES, MoESpec, config_int, config_num_experts
from flexgen_core.models.llama import LlamaConfig, common_fields


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    fields = common_fields(hf)
    bias = bool(hf.get("attention_bias", False))
    clip = hf.get("clip_qkv")
    moe = MoESpec(config_num_experts(hf), config_int(hf, "num_experts_per_tok"), fields["ffn_size"],
                  bool(hf.get("norm_topk_prob", False)), False, QWEN_NAMES)
    return LlamaConfig(**fields, family="olmoe", qkv_bias=bias, o_bias=bias, qk_norm="full",
                       clip_qkv=None if clip is None else float(clip), moe=moe,
                       moe_layers=(True,) * fields["num_layers"], sliding_windows=(None,) * fields["num_layers"])
