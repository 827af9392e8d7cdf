"""Maps a checkpoint's `config.json` to a model family: its config class and layer builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from flexgen_core.models.base import ModelShape


@dataclass(frozen=True)
class Family:
    name: str
    config_from_hf: Callable[[Mapping[str, Any]], ModelShape]
    build_layers: Callable[[Any], list]


def _opt() -> Family:
    from flexgen_core.models import opt

    return Family("opt", opt.OPTConfig.from_hf, opt.build_layers)


def _llama_style(variant: str) -> Callable[[], Family]:
    def load() -> Family:
        from flexgen_core.models import llama

        return Family(variant, lambda hf: llama.LlamaConfig.from_hf(hf, variant), llama.build_layers)

    return load


# HF architecture name / model_type -> family loader (imported lazily).
_ARCHITECTURES: dict[str, Callable[[], Family]] = {
    "OPTForCausalLM": _opt,
    "LlamaForCausalLM": _llama_style("llama"),
    "MistralForCausalLM": _llama_style("mistral"),
    "Qwen2ForCausalLM": _llama_style("qwen2"),
}
_MODEL_TYPES: dict[str, Callable[[], Family]] = {
    "opt": _opt,
    "llama": _llama_style("llama"),
    "mistral": _llama_style("mistral"),
    "qwen2": _llama_style("qwen2"),
}


def supported() -> list[str]:
    return sorted(_ARCHITECTURES)


def family_for(hf_config: Mapping[str, Any]) -> Family:
    """The family for a checkpoint config; a clear error listing what is supported otherwise."""
    for arch in hf_config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]()
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]()
    raise ValueError(
        f"unsupported architecture {hf_config.get('architectures')} (model_type {model_type!r}); "
        f"supported architectures: {', '.join(supported())}"
    )
