"""Small, deterministic, offline OPT and Llama-style checkpoints for tests, benchmarks and the demo.

Llama-style presets (`llama`, `llama3`, `mistral`, `qwen2`) and their Llama-2-like tokenizer are built
by `flexgen_core.testing_llama` through the same functions; what follows describes the OPT ones.

No network is touched. `build_tokenizer` trains a byte-level BPE tokenizer (the `tokenizers`
library) on a fixed, sorted list of Python standard-library source files and saves it in the layout
of OPT's Hugging Face tokenizer: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, bos = eos = `</s>`, and
encoding a text prepends `</s>`. `build_checkpoint` builds a `transformers.OPTForCausalLM` from a
named preset (`PRESETS`), fills its weights from a seeded generator, and saves it with
`save_pretrained` (safetensors) next to the tokenizer files, so `from_pretrained(path)` works offline
for both the model and the tokenizer.

Why the weights are not HF's default init: with std 0.02 everywhere, logits come out nearly uniform
and greedy choices are decided by float noise, so parity tests against HF would compare coin flips;
and random pre-LN models with tied embeddings tend to repeat one token forever. `_scaled_weight`
scales each tensor so that the logits spread over several nats (top-1/top-2 gaps far above float16
noise), generations vary, every bias and LayerNorm parameter is nonzero (an engine that drops one
fails parity), and special tokens are practically never generated (generation runs to
`max_new_tokens`). `greedy_stats` measures this; `python -m flexgen_core.testing` prints it.

Checkpoints are cached under `default_cache_root()` keyed by preset, seed, dtype, sharding, the
factory version and a digest of the tokenizer corpus; each is built in a temporary folder and moved
into place with `os.rename`, so concurrent test processes can race safely.

Files followed: transformers/models/opt/{configuration,modeling}_opt.py; the facebook/opt-125m and
facebook/opt-350m tokenizer and model configs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from flexgen_core.testing_llama import LLAMA_PRESETS, LlamaPreset

if TYPE_CHECKING:  # torch and transformers are imported lazily: importing this module stays cheap.
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bump when anything that changes the files produced changes (weights, shapes, tokenizer layout).
FACTORY_VERSION = 1

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3, as in OPT's vocabulary
BOS_TOKEN = EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN_ID = EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 1

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MODEL_MAX_LENGTH = 2048  # OPT's context length; a checkpoint's tokenizer uses its preset's

# Tokenizer corpus: the first files of the sorted standard-library listing, up to this many bytes.
CORPUS_MAX_BYTES = 3_000_000
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class Preset:
    """Shape of one synthetic OPT model. Field names follow the project's model-shapes.json."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int  # rows of the model's embedding
    tokenizer_vocab: int  # tokens the tokenizer knows; <= vocab, as in OPT (50265 vs 50272)
    max_positions: int
    word_embed_proj_dim: int | None = None  # None: embeddings are `hidden` wide (all OPT but 350m)
    do_layer_norm_before: bool = True  # False: post-LayerNorm blocks, as opt-350m

    def __post_init__(self) -> None:
        if self.hidden % self.heads != 0:
            raise ValueError(f"Preset {self.name!r}: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.tokenizer_vocab > self.vocab:
            raise ValueError(
                f"Preset {self.name!r}: tokenizer_vocab {self.tokenizer_vocab} exceeds model vocab {self.vocab}"
            )
        if self.tokenizer_vocab < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"Preset {self.name!r}: tokenizer_vocab {self.tokenizer_vocab} cannot hold the 256 byte tokens "
                f"and {len(SPECIAL_TOKENS)} special tokens"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (and of the logits' dot product)."""
        return self.word_embed_proj_dim or self.hidden

    @property
    def num_params(self) -> int:
        """Parameter count with tied input/output embeddings, as OPT stores them."""
        h, f = self.hidden, self.ffn
        attention = 4 * (h * h + h)  # q, k, v, out projections with biases
        mlp = h * f + f + f * h + h  # fc1, fc2 with biases
        norms = 2 * 2 * h  # self_attn_layer_norm, final_layer_norm of the block
        embeddings = self.vocab * self.embed_dim + (self.max_positions + 2) * h  # OPT offsets positions by 2
        projections = 2 * h * self.embed_dim if self.embed_dim != h else 0  # project_in/out, no biases
        final_norm = 2 * h if self.do_layer_norm_before else 0
        return self.layers * (attention + mlp + norms) + embeddings + projections + final_norm

    def opt_config_kwargs(self) -> dict:
        """Keyword arguments for `transformers.OPTConfig`."""
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            ffn_dim=self.ffn,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_positions,
            word_embed_proj_dim=self.embed_dim,
            do_layer_norm_before=self.do_layer_norm_before,
            activation_function="relu",
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
            enable_bias=True,
            layer_norm_elementwise_affine=True,
            tie_word_embeddings=True,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
        )


PRESETS: dict[str, Preset | LlamaPreset] = {
    preset.name: preset
    for preset in (
        Preset("tiny", layers=2, hidden=64, heads=4, ffn=256, vocab=1024, tokenizer_vocab=1000, max_positions=256),
        # Nothing is a power of two: head dim 18, ffn 170, an odd vocabulary.
        Preset("odd", layers=3, hidden=90, heads=5, ffn=170, vocab=1001, tokenizer_vocab=1000, max_positions=300),
        # opt-350m's variant: 32-wide embeddings projected to 64, LayerNorm after each block.
        Preset(
            "proj",
            layers=2,
            hidden=64,
            heads=4,
            ffn=256,
            vocab=1024,
            tokenizer_vocab=1000,
            max_positions=256,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
        ),
        # opt-125m's shape with an 8192-token vocabulary (~93M parameters).
        Preset(
            "opt-100m", layers=12, hidden=768, heads=12, ffn=3072, vocab=8192, tokenizer_vocab=8192, max_positions=2048
        ),
        # Large enough (~212M parameters: 848 MB in float32, 424 MB in float16) that a leaked copy of the
        # weights shows in process memory.
        Preset(
            "large", layers=16, hidden=1024, heads=16, ffn=4096, vocab=8192, tokenizer_vocab=8192, max_positions=2048
        ),
        *LLAMA_PRESETS,  # llama, llama3, mistral, qwen2: see testing_llama
    )
}


def default_cache_root() -> Path:
    """`$FLEXGEN_TEST_CACHE`, or `~/.cache/flexgen-helm/test-models`."""
    configured = os.environ.get("FLEXGEN_TEST_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "flexgen-helm" / "test-models"


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _corpus_paths() -> list[Path]:
    """Sorted top-level standard-library modules, capped at `CORPUS_MAX_BYTES` in total."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    total_bytes = 0
    for path in sorted(stdlib.glob("*.py")):
        if total_bytes >= CORPUS_MAX_BYTES:
            break
        paths.append(path)
        total_bytes += path.stat().st_size
    if not paths:
        raise FileNotFoundError(f"No standard-library sources found under {stdlib} to train a tokenizer on")
    return paths


@functools.lru_cache(maxsize=1)
def _corpus_texts() -> tuple[str, ...]:
    return tuple(path.read_text(encoding="utf-8", errors="replace") for path in _corpus_paths())


@functools.lru_cache(maxsize=1)
def _corpus_digest() -> str:
    """Short digest of the training text: another Python's stdlib gives another tokenizer (and cache key)."""
    digest = hashlib.sha256()
    for text in _corpus_texts():
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:10]


def _tokenizer_config(model_max_length: int) -> dict:
    # `add_bos_token` is honoured by transformers 4.x's Python tokenizer; the fast path (and v5) takes the
    # BOS from tokenizer.json's post-processor instead.
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "errors": "replace",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def write_json(path: Path, content: dict) -> None:
    """A tokenizer or config file as Hugging Face writes them: indented, with a final newline."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")


def _write_tokenizer_config(folder: Path, model_max_length: int) -> None:
    write_json(folder / "tokenizer_config.json", _tokenizer_config(model_max_length))


def _train_tokenizer(vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no <unk> in practice
        show_progress=False,
    )
    texts = _corpus_texts()
    tokenizer.train_from_iterator(list(texts), trainer, length=len(texts))
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"Tokenizer training reached {tokenizer.get_vocab_size()} tokens, not the requested {vocab_size}: "
            f"the corpus ({CORPUS_MAX_BYTES} bytes) is too small for that vocabulary"
        )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    # OPT's tokenizer prepends </s> to every text (GPT2Converter with add_bos_token=True does the same).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json and merges.txt, for the Python (slow) tokenizer
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
    }
    write_json(folder / "special_tokens_map.json", special_tokens_map)
    _write_tokenizer_config(folder, DEFAULT_MODEL_MAX_LENGTH)


def build_tokenizer(vocab_size: int = 1000, root: str | os.PathLike | None = None) -> Path:
    """Train (or reuse) a byte-level BPE tokenizer of `vocab_size` tokens; returns its folder.

    The folder loads with `transformers.AutoTokenizer.from_pretrained(folder)`; its
    `model_max_length` is OPT's 2048 (a checkpoint's copy carries its preset's `max_positions`).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    cache_root = Path(root) if root is not None else default_cache_root()
    key = f"tokenizer-bpe{vocab_size}-v{FACTORY_VERSION}-{_corpus_digest()}"
    return _build_cached(cache_root / key, lambda folder: _train_tokenizer(vocab_size, folder))


# ---------------------------------------------------------------------------------------------------
# Checkpoint


@dataclass(frozen=True)
class _InitScales:
    """Scales of the synthetic weights, chosen so greedy decoding is decisive (see `_scaled_weight`)."""

    logit_std: float = 6.0  # std of a logit across the vocabulary; sets the top-1/top-2 gaps
    token_norm: float = 0.25  # norm of a token embedding row: small beside the blocks' outputs
    position_std: float = 0.5  # relative to a token's per-component std in the hidden stream
    special_row_scale: float = 0.1  # rows for special tokens and ids past the tokenizer's vocabulary
    qk_gain: float = 2.5  # attention scores of std ~qk_gain**2: peaked, so that context matters
    attn_out_gain: float = 1.0  # std of a block's attention output, per component
    mlp_out_gain: float = 1.0  # std of a block's MLP output, per component
    bias_std: float = 0.1
    norm_weight_std: float = 0.1  # LayerNorm weight = 1 + noise
    norm_bias_std: float = 0.1
    anti_repeat: float = 1.5  # pre-LN only: layer 0's attention pushes down tokens already in context


def _param_generator(seed: int, name: str) -> "torch.Generator":
    """A generator per tensor, seeded from (seed, name): a tensor's values do not depend on module order."""
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _output_norm_name(preset: Preset) -> str:
    """The last LayerNorm before the output head: the decoder's final norm, or the last block's (post-LN)."""
    if preset.do_layer_norm_before:
        return "model.decoder.final_layer_norm"
    return f"model.decoder.layers.{preset.layers - 1}.final_layer_norm"


def _scaled_weight(name: str, noise: "torch.Tensor", preset: Preset, scales: _InitScales) -> "torch.Tensor":
    """Turn standard-normal `noise` into the value of parameter `name` of an OPTForCausalLM.

    Design, for a model whose greedy choices are decisive and varied rather than coin flips:
    - Logits spread over `logit_std` nats. The spread comes from the weight of the output LayerNorm,
      not from large embeddings: embeddings are tied, so in a pre-LN model a token embedding that is
      large in the residual stream makes the current token its own best prediction, and greedy
      decoding repeats it. Rows have norm `token_norm`, small beside the blocks' outputs (std ~1).
    - A Linear(fan_in, ...) of std gain/sqrt(fan_in) maps a unit-variance input to std `gain`, so every
      block adds about unit variance to the residual stream.
    - Every bias and LayerNorm parameter is nonzero, so an engine that drops one fails parity.
    - Rows of special tokens and of ids past the tokenizer's vocabulary are small: their logits are
      never the maximum, so generation runs to `max_new_tokens` and decodes to text.
    """
    import torch

    hidden, embed_dim = preset.hidden, preset.embed_dim
    token_std = scales.token_norm / embed_dim**0.5
    # Per-component std of a token in the hidden stream: small in a pre-LN model (see above); a post-LN
    # model's first block works on raw embeddings, which need unit scale there.
    stream_std = scales.token_norm / hidden**0.5 if preset.do_layer_norm_before else 1.0
    is_output_norm = name.startswith(_output_norm_name(preset) + ".")
    output_gain = scales.logit_std / scales.token_norm if is_output_norm else 1.0

    if name.endswith("embed_tokens.weight"):
        values = noise * token_std
        values[: len(SPECIAL_TOKENS)] *= scales.special_row_scale
        values[preset.tokenizer_vocab :] *= scales.special_row_scale
        return values
    if "layer_norm" in name:
        if name.endswith(".weight"):
            return output_gain * (1.0 + scales.norm_weight_std * noise)
        return output_gain * scales.norm_bias_std * noise
    if name.endswith(".bias"):
        return scales.bias_std * noise

    std_by_suffix = {
        "q_proj.weight": scales.qk_gain / hidden**0.5,
        "k_proj.weight": scales.qk_gain / hidden**0.5,
        "v_proj.weight": 1.0 / hidden**0.5,
        "out_proj.weight": scales.attn_out_gain / hidden**0.5,
        "fc1.weight": 1.0 / hidden**0.5,
        "fc2.weight": scales.mlp_out_gain * 2**0.5 / preset.ffn**0.5,  # sqrt(2): ReLU halves the variance
        "project_in.weight": stream_std / scales.token_norm,  # an embedding row -> `stream_std` per component
        "project_out.weight": 1.0 / hidden**0.5,
        "embed_positions.weight": scales.position_std * (stream_std if embed_dim != hidden else token_std),
    }
    suffix = ".".join(name.split(".")[-2:])
    if suffix not in std_by_suffix:
        raise AssertionError(f"No init rule for parameter {name!r}")
    values = noise * std_by_suffix[suffix]
    if suffix == "fc2.weight":
        # ReLU outputs have a positive mean; zero-sum rows keep it from adding one fixed vector at every
        # position, which would make a few "hub" tokens win everywhere.
        values -= values.mean(dim=1, keepdim=True)
    if scales.anti_repeat and preset.do_layer_norm_before and name.startswith("model.decoder.layers.0.self_attn."):
        # Layer 0 sees normalised token embeddings. With v = I + noise and out = -c I + noise its
        # attention output carries minus the tokens it attends to, and the tied head turns that into
        # lower logits for tokens already in context: a built-in repetition penalty. Random models
        # otherwise fall into loops of one token. c makes the push about `anti_repeat` * logit spread:
        # the final hidden state has rms ~sqrt(2 * layers + 1), an embedding's self-projection ~sqrt(hidden).
        eye = torch.eye(hidden)
        if suffix == "v_proj.weight":
            values += eye
        elif suffix == "out_proj.weight":
            values -= eye * scales.anti_repeat * (2 * preset.layers + 1) ** 0.5 / hidden**0.5
    return values


def _fill_weights(model: "torch.nn.Module", preset: Preset, seed: int, scales: _InitScales = _InitScales()) -> None:
    """Overwrite every parameter of a float32 OPTForCausalLM with seeded values (`_scaled_weight`)."""
    import torch

    names = [name for name, _ in model.named_parameters()]  # the tied lm_head appears once, as embed_tokens
    if not any(name.startswith(_output_norm_name(preset) + ".") for name in names):
        raise AssertionError(f"Output norm {_output_norm_name(preset)!r} not among the parameters: {names}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=_param_generator(seed, name), dtype=torch.float32)
            param.copy_(_scaled_weight(name, noise, preset, scales))


def _checkpoint_key(preset: Preset | LlamaPreset, seed: int, sharded: bool, dtype: str) -> str:
    layout = "sharded" if sharded else "single"
    return f"model-{preset.name}-seed{seed}-{dtype}-{layout}-v{FACTORY_VERSION}-{_corpus_digest()}"


def _shard_bytes(model: "torch.nn.Module") -> int:
    """A shard size that splits the stored state dict into roughly four files."""
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(total_bytes // 4, 1)


def _save_checkpoint(preset: Preset, seed: int, sharded: bool, dtype: str, tokenizer_dir: Path, folder: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch_dtype = getattr(torch, dtype)
    config = OPTConfig(**preset.opt_config_kwargs())
    model = OPTForCausalLM(config)
    model.eval()
    _fill_weights(model, preset, seed)
    model.to(torch_dtype)  # save_pretrained records it in config.json
    max_shard_size = _shard_bytes(model) if sharded else "50GB"
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    for file_name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / file_name, folder / file_name)
    _write_tokenizer_config(folder, preset.max_positions)  # HELM reads model_max_length offline
    if sharded and not (folder / "model.safetensors.index.json").exists():
        raise AssertionError(f"save_pretrained wrote no shard index in {folder}: {sorted(os.listdir(folder))}")


def build_checkpoint(
    preset: str = "tiny",
    root: str | os.PathLike | None = None,
    seed: int = 0,
    sharded: bool = False,
    dtype: str = "float32",
) -> Path:
    """Build (or reuse) a random-weight checkpoint (OPT or Llama-style) with its tokenizer; returns its folder.

    The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. Same
    arguments, same files: weights come from `seed` alone (not from HF's init or the global RNG).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    spec = PRESETS[preset]
    cache_root = Path(root) if root is not None else default_cache_root()
    if isinstance(spec, LlamaPreset):
        from flexgen_core import testing_llama

        tokenizer_dir = testing_llama.build_llama_tokenizer(spec.tokenizer_vocab, cache_root)
        save = testing_llama.save_checkpoint
    else:
        tokenizer_dir = build_tokenizer(spec.tokenizer_vocab, root=cache_root)
        save = _save_checkpoint
    target = cache_root / _checkpoint_key(spec, seed, bool(sharded), dtype)
    return _build_cached(target, lambda folder: save(spec, seed, bool(sharded), dtype, tokenizer_dir, folder))


def _build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first with `build(temp_folder)` unless it exists.

    The folder appears atomically (`os.rename` of a finished sibling temp folder); a process that loses
    a race discards its own build and uses the winner's.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        started_s = time.perf_counter()
        build(temp_folder)
        # mkdtemp makes the folder private; the cache is meant to be shared like any other cache.
        os.chmod(temp_folder, 0o755)
        for file_path in temp_folder.iterdir():
            os.chmod(file_path, 0o644)
        try:
            os.rename(temp_folder, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.debug("Another process built %s first; using its copy", target)
        else:
            logger.info("Built %s in %.1f s", target, time.perf_counter() - started_s)
    finally:
        if temp_folder.exists():
            shutil.rmtree(temp_folder, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------
# Prompts


def _load_tokenizer(tokenizer_or_path: "PreTrainedTokenizerBase | str | os.PathLike") -> "PreTrainedTokenizerBase":
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer_or_path))
    return tokenizer_or_path


def _corpus_chunks(max_chars: int = 1000):
    """Corpus text in pieces of whole lines, short enough to encode without length warnings."""
    for text in _corpus_texts():
        chunk: list[str] = []
        chunk_chars = 0
        for line in text.splitlines(keepends=True):
            if chunk and chunk_chars + len(line) > max_chars:
                yield "".join(chunk)
                chunk, chunk_chars = [], 0
            chunk.append(line)
            chunk_chars += len(line)
        if chunk:
            yield "".join(chunk)


def sample_prompts(
    tokenizer_or_path: "PreTrainedTokenizerBase | str | os.PathLike",
    n: int,
    min_len: int = 4,
    max_len: int = 32,
    seed: int = 0,
) -> list[list[int]]:
    """`n` token-id prompts of ragged lengths in [min_len, max_len], each starting with the tokenizer's BOS
    (`</s>` for OPT, `<s>` for the Llama-style presets).

    The ids after BOS are consecutive tokens of standard-library source text, so the prompts look
    like what the tokenizer produces for real text; no other special token occurs in them.
    Deterministic for a tokenizer and `seed`. `tokenizer_or_path` is a tokenizer, or a folder that
    `AutoTokenizer` loads (a checkpoint from `build_checkpoint`, or `build_tokenizer`'s folder).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise ValueError(f"need integers 1 <= min_len <= max_len, got min_len={min_len!r}, max_len={max_len!r}")
    tokenizer = _load_tokenizer(tokenizer_or_path)
    if tokenizer.bos_token_id is None:
        raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has no BOS token")
    special_ids = set(tokenizer.all_special_ids)
    token_ids: list[int] = []
    wanted_tokens = max(4096, 64 * max_len)  # room for windows at many offsets
    for chunk in _corpus_chunks():
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        token_ids.extend(token_id for token_id in ids if token_id not in special_ids)
        if len(token_ids) >= wanted_tokens:
            break
    if len(token_ids) < max_len:
        raise ValueError(f"The corpus encodes to only {len(token_ids)} tokens, fewer than max_len={max_len}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)  # BOS included
        start = rng.randrange(len(token_ids) - (length - 1) + 1)
        prompts.append([tokenizer.bos_token_id] + token_ids[start : start + length - 1])
    return prompts


# ---------------------------------------------------------------------------------------------------
# Measuring a checkpoint


@dataclass(frozen=True)
class GreedyStats:
    """How decisive and how varied greedy decoding is, measured with Hugging Face's model."""

    steps: int  # greedy steps measured (prompts x max_new_tokens)
    decisive_fraction: float  # share of steps whose top-1 minus top-2 logprob exceeds the threshold
    median_gap: float  # median top-1 minus top-2 logprob, in nats
    min_gap: float
    distinct_fraction: float  # distinct tokens / generated tokens, averaged over prompts
    longest_run: int  # longest run of one token repeated, over all prompts
    all_finite: bool  # no inf/NaN among the logits


def _longest_run(token_ids: Sequence[int]) -> int:
    """Length of the longest run of one token repeated back to back."""
    longest = run = 0
    previous = None
    for token_id in token_ids:
        run = run + 1 if token_id == previous else 1
        longest = max(longest, run)
        previous = token_id
    return longest


def greedy_stats(
    checkpoint: str | os.PathLike,
    n_prompts: int = 4,
    max_new_tokens: int = 16,
    threshold: float = 1e-3,
    dtype: str = "float32",
    seed: int = 0,
) -> GreedyStats:
    """Greedy-decode `n_prompts` sampled prompts with `transformers` and summarise the logprob gaps.

    Runs on the CPU, one prompt at a time (no padding), in `dtype`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if n_prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"need n_prompts >= 1 and max_new_tokens >= 1, got {n_prompts} and {max_new_tokens}")
    model = AutoModelForCausalLM.from_pretrained(os.fspath(checkpoint), dtype=getattr(torch, dtype)).eval()
    prompts = sample_prompts(checkpoint, n_prompts, min_len=8, max_len=24, seed=seed)
    gaps: list[float] = []
    distinct_fractions: list[float] = []
    longest_run = 0
    all_finite = True
    with torch.no_grad():
        for prompt in prompts:
            token_ids = list(prompt)
            generated: list[int] = []
            for _ in range(max_new_tokens):
                # The whole sequence each step, no KV cache: slower, but the plainest reference.
                logits = model(torch.tensor([token_ids])).logits[0, -1]  # (vocab,)
                all_finite = all_finite and bool(torch.isfinite(logits).all())
                top2 = torch.log_softmax(logits.float(), dim=-1).topk(2).values
                gaps.append(float(top2[0] - top2[1]))
                next_id = int(logits.argmax())
                generated.append(next_id)
                token_ids.append(next_id)
            distinct_fractions.append(len(set(generated)) / len(generated))
            longest_run = max(longest_run, _longest_run(generated))
    sorted_gaps = sorted(gaps)
    return GreedyStats(
        steps=len(gaps),
        decisive_fraction=sum(gap > threshold for gap in gaps) / len(gaps),
        median_gap=sorted_gaps[len(sorted_gaps) // 2],
        min_gap=sorted_gaps[0],
        distinct_fraction=sum(distinct_fractions) / len(distinct_fractions),
        longest_run=longest_run,
        all_finite=all_finite,
    )


def preset_table() -> list[dict]:
    """One row per preset, for docs and reports: shape fields plus the parameter count."""
    return [dict(dataclasses.asdict(spec), num_params=spec.num_params) for spec in PRESETS.values()]


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build synthetic checkpoints and print their greedy statistics.")
    parser.add_argument("presets", nargs="*", default=["tiny", "odd", "proj"], choices=sorted(PRESETS))
    parser.add_argument("--root", default=None, help=f"cache folder (default {default_cache_root()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--no-stats", action="store_true", help="build only")
    parser.add_argument("--path-only", action="store_true", help="build only and print just the folder(s)")
    args = parser.parse_args(argv)
    for name in args.presets:
        started_s = time.perf_counter()
        path = build_checkpoint(name, root=args.root, seed=args.seed, sharded=args.sharded, dtype=args.dtype)
        if args.path_only:
            print(path)
            continue
        build_s = time.perf_counter() - started_s
        weight_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        line = (
            f"{name:9s} params={PRESETS[name].num_params / 1e6:8.2f}M weights={weight_mb:8.1f}MiB"
            f" build_or_reuse={build_s:6.1f}s"
        )
        if not args.no_stats:
            stats = greedy_stats(path, dtype=args.dtype)
            line += (
                f" gap>1e-3={stats.decisive_fraction:.3f} median_gap={stats.median_gap:.3f} min_gap={stats.min_gap:.2e}"
                f" distinct={stats.distinct_fraction:.2f} longest_run={stats.longest_run} finite={stats.all_finite}"
            )
        print(line, "\n   ", path)


if __name__ == "__main__":
    _main()
