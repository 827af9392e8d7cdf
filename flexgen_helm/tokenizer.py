"""HELM's HuggingFaceTokenizer, with a preflight: its files must be on this machine (a local folder or
the Hugging Face cache) or reachable on the hub, else the run entry fails at once with one line
saying what is missing and how to get it. (HELM's own tokenizer loads lazily and, offline, logs a
`Failed to tokenize` traceback per prompt while the run goes on.)

The packaged `flexgen/...` deployments name tokenizers of this class; use it in a deployment of your own
as `class_name: "flexgen_helm.tokenizer.CheckedHuggingFaceTokenizer"`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from helm.common.cache import CacheConfig
from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer

HUB_CHECK_TIMEOUT_S = 10.0
# What a model or tokenizer folder holds that says it is one (any of them).
_MARKERS = ("config.json", "tokenizer_config.json", "tokenizer.json")


def unavailable_reason(name_or_path: str, what: str) -> str | None:
    """Why `name_or_path` (a folder or a hub name) cannot be had here, in one line; None if it can."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _MARKERS):
            return None
        return f"{what} folder {str(path)!r} has none of {', '.join(_MARKERS)}"
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return f"{what} folder {str(path)!r} does not exist"
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name_or_path, marker), str) for marker in _MARKERS):
        return None  # in the Hugging Face cache
    get = f"get it with `hf download {name_or_path}` (on a machine with network, then copy ~/.cache/huggingface)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{what} {name_or_path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {get}"
    from huggingface_hub import model_info

    try:
        model_info(name_or_path, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as error:  # no network, unknown or gated repo: all mean the same here
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"{what} {name_or_path!r} is not in the Hugging Face cache and the hub cannot be reached ({first}): {get}"
    return None


class CheckedHuggingFaceTokenizer(HuggingFaceTokenizer):
    def __init__(self, cache_config: CacheConfig, tokenizer_name: str,
                 pretrained_model_name_or_path: str | None = None, **kwargs: Any) -> None:
        source = os.path.expanduser(pretrained_model_name_or_path or tokenizer_name)
        reason = unavailable_reason(source, "tokenizer")
        if reason is not None:
            raise ValueError(f"FlexGen: {reason}")
        super().__init__(cache_config, tokenizer_name, pretrained_model_name_or_path=source, **kwargs)
