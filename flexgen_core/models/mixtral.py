"""Mixtral, as transformers' `models/mixtral/modeling_mixtral.py`: Mistral's attention (llama.py, a sliding
window when `sliding_window` is set) and, in every layer, a mixture of `num_local_experts` SwiGLU experts
(moe.py) of which each token uses `num_experts_per_tok`, their probabilities renormalised and applied in
float32. Checkpoint keys: `block_sparse_moe.gate` (the router), `block_sparse_moe.experts.{e}.w1/w3/w2`."""

from __future__ import annotations

from typing import Any, Mapping

from flexgen_core.models.base import MIXTRAL_NAMES, MoESpec, config_int, config_num_experts
from flexgen_core.models.llama import LlamaConfig, common_fields, mistral_windows


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    fields = common_fields(hf)
    moe = MoESpec(config_num_experts(hf), config_int(hf, "num_experts_per_tok", 2),
                  fields["ffn_size"], True, True, MIXTRAL_NAMES)
    return LlamaConfig(**fields, family="mixtral", moe=moe, moe_layers=(True,) * fields["num_layers"],
                       sliding_windows=mistral_windows(hf, fields["num_layers"], fields["max_positions"]))
