"""Phi-3, as transformers' `models/phi3/modeling_phi3.py`: a Llama-style decoder (llama.py) whose q, k and v
projections are one `qkv_proj` (q rows, then k, then v) and whose MLP's gate and up projections are one
`gate_up_proj` (gate rows first), with no biases; a sliding window in every layer when `sliding_window` is
set. RoPE of type `default` only: the long-context models' `longrope` scaling is refused with a clear
error (llama.ROPE_TYPES), as is a partial rotary factor (Phi-4-mini)."""

from __future__ import annotations

from typing import Any, Mapping

from flexgen_core.models.llama import LlamaConfig, common_fields, mistral_windows


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    fields = common_fields(hf)
    return LlamaConfig(**fields, family="phi3", fused_projections=True,
                       sliding_windows=mistral_windows(hf, fields["num_layers"], fields["max_positions"]))
