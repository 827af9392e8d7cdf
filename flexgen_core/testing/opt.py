"""Small, deterministic, offline OPT checkpoints: the OPT half of `flexgen_core.testing`.

`build_tokenizer` trains a byte-level BPE tokenizer (the `tokenizers` library) on the shared corpus
(`common.corpus_texts`) and saves it in the layout of OPT's Hugging Face tokenizer: `<s>`=0,
`<pad>`=1, `</s>`=2, `<unk>`=3, bos = eos = `</s>`, and encoding a text prepends `</s>`.
`save_checkpoint` builds a `transformers.OPTForCausalLM` for a `Preset`, fills its weights from a seeded
generator (`_scaled_weight`: see `flexgen_core.testing` for why not HF's init) and saves it with
`save_pretrained` (safetensors) next to the tokenizer files.

Files followed: transformers/models/opt/{configuration,modeling}_opt.py; the facebook/opt-125m and
facebook/opt-350m tokenizer and model configs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flexgen_core.testing.common import (
    CORPUS_MAX_BYTES,
    DEFAULT_MODEL_MAX_LENGTH,
    FACTORY_VERSION,
    InitScales,
    build_cached,
    corpus_digest,
    corpus_texts,
    default_cache_root,
    fill_seeded,
    save_model,
    write_json,
)

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3, as in OPT's vocabulary
BOS_TOKEN = EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN_ID = EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 1
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
        shape = {"vocab_size": self.vocab, "hidden_size": self.hidden, "num_hidden_layers": self.layers,
                 "ffn_dim": self.ffn, "num_attention_heads": self.heads, "max_position_embeddings": self.max_positions,
                 "word_embed_proj_dim": self.embed_dim, "do_layer_norm_before": self.do_layer_norm_before}
        special = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
        return shape | special | {"activation_function": "relu", "dropout": 0.0, "attention_dropout": 0.0,
                                  "layerdrop": 0.0, "enable_bias": True, "layer_norm_elementwise_affine": True,
                                  "tie_word_embeddings": True}


OPT_PRESETS = (
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
)


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


def write_tokenizer_config(folder: Path, model_max_length: int) -> None:
    write_json(folder / "tokenizer_config.json", _tokenizer_config(model_max_length))


def _train_tokenizer(vocab_size: int, folder: Path) -> None:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

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
    texts = corpus_texts()
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
    write_tokenizer_config(folder, DEFAULT_MODEL_MAX_LENGTH)


def build_tokenizer(vocab_size: int = 1000, root: str | os.PathLike | None = None) -> Path:
    """Train (or reuse) a byte-level BPE tokenizer of `vocab_size` tokens; returns its folder.

    The folder loads with `transformers.AutoTokenizer.from_pretrained(folder)`; its
    `model_max_length` is OPT's 2048 (a checkpoint's copy carries its preset's `max_positions`).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    cache_root = Path(root) if root is not None else default_cache_root()
    key = f"tokenizer-bpe{vocab_size}-v{FACTORY_VERSION}-{corpus_digest()}"
    return build_cached(cache_root / key, lambda folder: _train_tokenizer(vocab_size, folder))


# ---------------------------------------------------------------------------------------------------
# Weights
def _output_norm_name(preset: Preset) -> str:
    """The last LayerNorm before the output head: the decoder's final norm, or the last block's (post-LN)."""
    if preset.do_layer_norm_before:
        return "model.decoder.final_layer_norm"
    return f"model.decoder.layers.{preset.layers - 1}.final_layer_norm"


def _scaled_weight(name: str, noise: "torch.Tensor", preset: Preset, scales: InitScales) -> "torch.Tensor":
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


def fill_weights(model: "torch.nn.Module", preset: Preset, seed: int, scales: InitScales = InitScales()) -> None:
    """Overwrite every parameter of a float32 OPTForCausalLM with seeded values (`_scaled_weight`)."""
    names = [name for name, _ in model.named_parameters()]  # the tied lm_head appears once, as embed_tokens
    if not any(name.startswith(_output_norm_name(preset) + ".") for name in names):
        raise AssertionError(f"Output norm {_output_norm_name(preset)!r} not among the parameters: {names}")
    fill_seeded(model, seed, lambda name, noise: _scaled_weight(name, noise, preset, scales))


def save_checkpoint(preset: Preset, seed: int, sharded: bool, dtype: str, tokenizer_dir: Path, folder: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(**preset.opt_config_kwargs())).eval()
    fill_weights(model, preset, seed)
    save_model(model, folder, dtype, sharded, tokenizer_dir, TOKENIZER_FILES)
    write_tokenizer_config(folder, preset.max_positions)  # HELM reads model_max_length offline
