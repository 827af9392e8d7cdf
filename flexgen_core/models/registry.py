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


def _llama_layers(name: str, module: str, parse: str = "config_from_hf") -> Callable[[], Family]:
    """A family over Llama-style layers (llama.build_layers) whose config `models/<module>.py`'s `parse` reads."""
    def load() -> Family:
        import importlib

        from flexgen_core.models import llama

        return Family(name, getattr(importlib.import_module(f"flexgen_core.models.{module}"), parse),
                      llama.build_layers)

    return load


def _own_layers(name: str, module: str, parse: str) -> Callable[[], Family]:
    """A family with a config parser `parse` and a layer builder `build_layers` of its own in `models/<module>.py`."""
    def load() -> Family:
        import importlib

        loaded = importlib.import_module(f"flexgen_core.models.{module}")
        return Family(name, getattr(loaded, parse), loaded.build_layers)

    return load


# The one registry: HF architecture name -> (model_type, family loader, imported lazily).
_FAMILIES: dict[str, tuple[str, Callable[[], Family]]] = {
    "OPTForCausalLM": ("opt", _opt),
    "LlamaForCausalLM": ("llama", _llama_style("llama")),
    "MistralForCausalLM": ("mistral", _llama_style("mistral")),
    "Qwen2ForCausalLM": ("qwen2", _llama_style("qwen2")),
    "Qwen3ForCausalLM": ("qwen3", _llama_layers("qwen3", "qwen3")),
    "Qwen3MoeForCausalLM": ("qwen3_moe", _llama_layers("qwen3_moe", "qwen3", "moe_config_from_hf")),
    "MixtralForCausalLM": ("mixtral", _llama_layers("mixtral", "mixtral")),
    "OlmoeForCausalLM": ("olmoe", _llama_layers("olmoe", "olmoe")),
    "Qwen2MoeForCausalLM": ("qwen2_moe", _llama_layers("qwen2_moe", "qwen2_moe")),
    "Phi3ForCausalLM": ("phi3", _llama_layers("phi3", "phi3")),
    "Gemma2ForCausalLM": ("gemma2", _own_layers("gemma2", "gemma", "gemma2_config_from_hf")),
    "Gemma3ForCausalLM": ("gemma3_text", _own_layers("gemma3_text", "gemma", "gemma3_config_from_hf")),
}


def supported() -> list[str]:
    return sorted(_FAMILIES)


def supported_model_types() -> list[str]:
    return sorted(model_type for model_type, _ in _FAMILIES.values())


def family_for(hf_config: Mapping[str, Any]) -> Family:
    """The family for a checkpoint config (by architecture, else by model_type); a clear error
    listing what is supported otherwise."""
    for arch in hf_config.get("architectures") or []:
        if arch in _FAMILIES:
            return _FAMILIES[arch][1]()
    model_type = hf_config.get("model_type")
    for known_type, load in _FAMILIES.values():
        if model_type == known_type:
            return load()
    raise ValueError(
        f"unsupported architecture {hf_config.get('architectures')} (model_type {model_type!r}); "
        f"supported architectures: {', '.join(supported())}"
    )
