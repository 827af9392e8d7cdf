"""Small, deterministic, offline Llama-style checkpoints (Llama 2/3, Mistral, Qwen2) for tests.

The Llama-family half of `flexgen_core.testing`, which holds the public API (`build_checkpoint`,
`sample_prompts`, `PRESETS`); the on-disk cache and the corpus are in `testing.common`. This
file adds `LlamaPreset`, the Llama-style tokenizer and the seeded weights.

Tokenizer: shaped like Llama 2's, i.e. a sentencepiece-style BPE that `transformers` loads as
`LlamaTokenizer`: words carry a "▁" prefix (Metaspace), characters outside the vocabulary fall back
to byte tokens `<0x00>`..`<0xFF>`, `<unk>`=0, `<s>`=1, `</s>`=2, no pad token; encoding a text
prepends `<s>` (BOS), and decoding a single word token drops its leading space. It is trained with the
`tokenizers` library on the same standard-library corpus as OPT's. All Llama-style presets share it,
although the real Llama 3 and Qwen2 tokenizers are byte-level (and Qwen2's adds no BOS): the engine
sees token ids only, and a Llama-2-like tokenizer is the one whose BOS handling differs from OPT's.

Weights follow `testing_opt._scaled_weight`'s design for OPT (decisive, varied greedy choices; special
and byte-fallback tokens practically never generated), adapted to RMSNorm and the SwiGLU MLP.

Files followed: transformers/models/{llama,mistral,qwen2}/configuration_*.py and modeling_*.py; the
meta-llama/Llama-2-7b-hf tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexgen_core.testing import common

if TYPE_CHECKING:
    import torch

LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama 2's vocabulary
LLAMA_UNK_TOKEN, LLAMA_BOS_TOKEN, LLAMA_EOS_TOKEN = LLAMA_SPECIAL_TOKENS
LLAMA_UNK_TOKEN_ID, LLAMA_BOS_TOKEN_ID, LLAMA_EOS_TOKEN_ID = 0, 1, 2
NUM_BYTE_TOKENS = 256  # <0x00>..<0xFF>, ids 3..258
ALPHABET_LIMIT = 96  # characters the BPE learns; rarer ones go through byte fallback
LLAMA_TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "phi3": "Phi3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
GEMMA_ARCHITECTURES = ("gemma2", "gemma3_text")
WINDOWED_ARCHITECTURES = ("mistral", "mixtral", "phi3", *GEMMA_ARCHITECTURES)
# E[silu(g)^2] for g ~ N(0, 1) is 0.356: a SwiGLU of unit-variance gate and up inputs has std ~0.6.
SWIGLU_STD = 0.356**0.5


@dataclass(frozen=True)
class LlamaPreset:
    """Shape of one synthetic Llama-style model (field names follow model-shapes.json where they can)."""

    name: str
    architecture: str  # "llama", "mistral" or "qwen2" (the HF model_type)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int  # rows of the model's embedding
    tokenizer_vocab: int  # tokens the tokenizer knows; <= vocab
    max_positions: int
    head_dim: int | None = None  # None: hidden // heads
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)  # e.g. {"rope_type": "llama3", ...}
    sliding_window: int | None = None  # Mistral's local attention
    rms_norm_eps: float = 1e-6
    experts: int = 0  # MoE architectures: routed experts per layer, each token's top `experts_per_token`
    experts_per_token: int = 0
    expert_ffn: int = 0  # an expert's intermediate width (Mixtral and OLMoE: `ffn`)
    shared_expert_ffn: int = 0  # Qwen2-MoE's shared expert
    norm_topk_prob: bool = False
    dense_layers: tuple[int, ...] = ()  # Qwen MoE: layers with a dense MLP (`mlp_only_layers`)
    clip_qkv: float | None = None  # OLMoE
    router_gain: float = 1.0  # router logits of std ~this: routing varied across tokens, rarely near a tie
    # Gemma: scores scaled by query_pre_attn_scalar ** -0.5; soft caps of scores and logits (Gemma 2); local
    # layers' RoPE base (Gemma 3). Gemma presets' even layers are local (sliding_window), odd ones global.
    query_pre_attn_scalar: int = 256
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Preset {self.name!r}: architecture must be one of {sorted(ARCHITECTURES)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"Preset {self.name!r}: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"Preset {self.name!r}: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.tokenizer_vocab > self.vocab:
            raise ValueError(
                f"Preset {self.name!r}: tokenizer_vocab {self.tokenizer_vocab} exceeds model vocab {self.vocab}"
            )
        if self.tokenizer_vocab < len(LLAMA_SPECIAL_TOKENS) + NUM_BYTE_TOKENS + ALPHABET_LIMIT:
            raise ValueError(f"Preset {self.name!r}: tokenizer_vocab {self.tokenizer_vocab} is too small")
        if self.sliding_window is not None and self.architecture not in WINDOWED_ARCHITECTURES:
            raise ValueError(f"Preset {self.name!r}: only {WINDOWED_ARCHITECTURES} presets take a sliding_window")
        if (self.architecture in MOE_ARCHITECTURES) != (self.experts > 0):
            raise ValueError(f"Preset {self.name!r}: experts are for the MoE architectures {MOE_ARCHITECTURES}")

    @property
    def family(self) -> str:
        return self.architecture

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.resolved_head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.resolved_head_dim

    @property
    def num_params(self) -> int:
        """Parameter count as transformers counts it (a tied output embedding once)."""
        h, f = self.hidden, self.ffn
        attention = 2 * h * self.q_width + 2 * h * self.kv_width
        if self.architecture in ("qwen2", "qwen2_moe"):
            attention += self.q_width + 2 * self.kv_width  # q/k/v biases
        if self.architecture in ("qwen3", "qwen3_moe", "gemma3_text"):
            attention += 2 * self.resolved_head_dim  # per-head q/k norms
        if self.architecture in GEMMA_ARCHITECTURES:
            attention += 2 * h  # the norms after attention and after the MLP
        if self.architecture == "olmoe":
            attention += self.q_width + self.kv_width  # q/k norms over the projections
        dense = 3 * h * f
        moe = self.experts * (3 * h * self.expert_ffn + h)  # experts and the router's rows
        if self.shared_expert_ffn:
            moe += 3 * h * self.shared_expert_ffn + h  # the shared expert and its gate
        mlps = sum(moe if self.experts and i not in self.dense_layers else dense for i in range(self.layers))
        embeddings = self.vocab * h * (1 if self.tie_word_embeddings else 2)
        return self.layers * (attention + 2 * h) + mlps + embeddings + h  # + two RMSNorms a block, the final one

    def hf_config(self):
        """The matching `transformers` config object."""
        import transformers

        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        kwargs = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.resolved_head_dim,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act="silu",
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope,
            attention_dropout=0.0,
            bos_token_id=LLAMA_BOS_TOKEN_ID,
            eos_token_id=LLAMA_EOS_TOKEN_ID,
            pad_token_id=None,
        )
        if self.architecture == "llama":
            return transformers.LlamaConfig(**kwargs, attention_bias=False, mlp_bias=False)
        if self.architecture == "mistral":
            return transformers.MistralConfig(**kwargs, sliding_window=self.sliding_window)  # default is 4096
        if self.architecture == "qwen2":
            return transformers.Qwen2Config(**kwargs, use_sliding_window=False)
        if self.architecture == "qwen3":
            return transformers.Qwen3Config(**kwargs, use_sliding_window=False, attention_bias=False)
        if self.architecture in GEMMA_ARCHITECTURES:
            del kwargs["hidden_act"]
            gemma = dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=self.query_pre_attn_scalar,
                         sliding_window=self.sliding_window, attn_logit_softcapping=self.attn_softcap,
                         final_logit_softcapping=self.final_softcap, attention_bias=False,
                         layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(self.layers)])
            if self.architecture == "gemma2":
                return transformers.Gemma2Config(**kwargs, **gemma)
            kwargs["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": self.local_rope_theta}}
            return transformers.Gemma3TextConfig(**kwargs, **gemma)
        if self.architecture == "phi3":
            return transformers.Phi3Config(**kwargs, sliding_window=self.sliding_window, resid_pdrop=0.0,
                                           embd_pdrop=0.0)
        moe = dict(num_experts_per_tok=self.experts_per_token, output_router_logits=False)
        if self.architecture == "mixtral":
            return transformers.MixtralConfig(**kwargs, **moe, num_local_experts=self.experts,
                                              sliding_window=self.sliding_window)
        moe.update(num_experts=self.experts, norm_topk_prob=self.norm_topk_prob)
        if self.architecture == "olmoe":
            return transformers.OlmoeConfig(**kwargs, **moe, clip_qkv=self.clip_qkv)
        qwen_moe = dict(**moe, moe_intermediate_size=self.expert_ffn, decoder_sparse_step=1,
                        mlp_only_layers=list(self.dense_layers), use_sliding_window=False)
        if self.architecture == "qwen3_moe":
            return transformers.Qwen3MoeConfig(**kwargs, **qwen_moe, attention_bias=False)
        return transformers.Qwen2MoeConfig(**kwargs, **qwen_moe, shared_expert_intermediate_size=self.shared_expert_ffn)

    def hf_model_class(self):
        import transformers

        return getattr(transformers, ARCHITECTURES[self.architecture])


LLAMA_PRESETS: tuple[LlamaPreset, ...] = (
    # Grouped-query attention (6 query heads share 2 KV heads), an odd vocabulary, untied output embedding.
    LlamaPreset("llama", "llama", layers=2, hidden=96, heads=6, kv_heads=2, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256),
    # Llama 3.1's RoPE scaling, with an original context short enough that all three frequency bands
    # (kept, interpolated, slowed) occur at head_dim 16; tied embeddings; theta as Llama 3's.
    LlamaPreset("llama3", "llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn=176, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # A sliding window shorter than the test prompts, 3 KV heads (a cache split 25/50/25 lands on three
    # tiers) and head_dim 24 != hidden / heads (as Mistral NeMo's), so q is wider than the stream.
    LlamaPreset("mistral", "mistral", layers=2, hidden=96, heads=6, kv_heads=3, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, head_dim=24, sliding_window=16),
    # q/k/v biases; Qwen2.5's rope theta.
    LlamaPreset("qwen2", "qwen2", layers=2, hidden=96, heads=6, kv_heads=2, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, rope_theta=1000000.0),
    # Per-head q/k norms; head_dim 32 != hidden / heads, as Qwen3's 128 against 4096 / 32 is not.
    LlamaPreset("qwen3", "qwen3", layers=2, hidden=96, heads=6, kv_heads=2, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, head_dim=32, rope_theta=1000000.0),
    # Phi-3: fused qkv and gate_up projections, a sliding window.
    LlamaPreset("phi3", "phi3", layers=2, hidden=96, heads=6, kv_heads=2, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, sliding_window=16),
    # Gemma 2: a local layer (window 16) then a global one; scores scaled by 24 ** -0.5 against head_dim 32;
    # caps on scores and logits that bite (the released 50 and 30 rarely do at this scale).
    LlamaPreset("gemma2", "gemma2", layers=2, hidden=96, heads=4, kv_heads=2, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, head_dim=32, tie_word_embeddings=True, sliding_window=16,
                query_pre_attn_scalar=24, attn_softcap=5.0, final_softcap=10.0),
    # Gemma 3: per-head q/k norms; the local layer's RoPE at base 10000, the global one's at 1e6 scaled
    # linearly (as the 4B-27B models' are).
    LlamaPreset("gemma3", "gemma3_text", layers=2, hidden=96, heads=4, kv_heads=2, ffn=160, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, head_dim=32, tie_word_embeddings=True, sliding_window=16,
                rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=48),
    # Mixture-of-experts presets: 4 to 8 experts, top 2, each token's routing its own.
    # Mixtral: top-2 of 4, renormalised, weighed in float32; a sliding window as Mistral's.
    LlamaPreset("mixtral", "mixtral", layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, sliding_window=16, experts=4, experts_per_token=2,
                expert_ffn=96),
    # Qwen2-MoE: a shared expert with its sigmoid gate, q/k/v biases, and a dense second layer.
    LlamaPreset("qwen2_moe", "qwen2_moe", layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, experts=4, experts_per_token=2, expert_ffn=48,
                shared_expert_ffn=96, dense_layers=(1,)),
    # Qwen3-MoE: top-2 of 8 renormalised (norm_topk_prob), per-head q/k norms, head_dim 32.
    LlamaPreset("qwen3_moe", "qwen3_moe", layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, head_dim=32, experts=8, experts_per_token=2,
                expert_ffn=32, norm_topk_prob=True),
    # OLMoE-1B-7B's layout (64 experts, top 8, expert width half the hidden size, full MHA) scaled down to
    # 4 layers of width 512 and an 8192-token vocabulary: ~110M parameters, nine tenths of them experts.
    # For the CPU MoE benchmark (benchmarks/bench_cpu.py cpu-moe).
    LlamaPreset("olmoe-small", "olmoe", layers=4, hidden=512, heads=8, kv_heads=8, ffn=256, vocab=8192,
                tokenizer_vocab=8192, max_positions=2048, experts=64, experts_per_token=8, expert_ffn=256),
    # OLMoE: top-2 of 8 not renormalised, q/k norms over the projections, q/k/v clipped; full MHA.
    LlamaPreset("olmoe", "olmoe", layers=2, hidden=64, heads=4, kv_heads=4, ffn=48, vocab=1001,
                tokenizer_vocab=1000, max_positions=256, experts=8, experts_per_token=2, expert_ffn=48,
                clip_qkv=2.0),
)


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _train_llama_tokenizer(vocab_size: int, folder: Path, model_max_length: int) -> None:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    # Learn merges on "▁"-prefixed words (sentencepiece never merges across a word start), then lay out
    # the vocabulary as Llama's: specials, the 256 byte-fallback tokens, then the learned pieces.
    learner = Tokenizer(models.BPE(unk_token=LLAMA_UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_BYTE_TOKENS,
        min_frequency=2,
        special_tokens=list(LLAMA_SPECIAL_TOKENS),
        limit_alphabet=ALPHABET_LIMIT,
        show_progress=False,
    )
    texts = common.corpus_texts()
    learner.train_from_iterator(list(texts), trainer, length=len(texts))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: token_id for token_id, token in enumerate(LLAMA_SPECIAL_TOKENS)}
    for byte in range(NUM_BYTE_TOKENS):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    if len(vocab) != vocab_size:
        raise ValueError(f"Llama tokenizer reached {len(vocab)} tokens, not the requested {vocab_size}")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=LLAMA_UNK_TOKEN, byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA_SPECIAL_TOKENS])
    # As HF's Llama tokenizer.json: no split at "▁" (equivalent here: no merge spans a word start).
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS_TOKEN}:0 $A:0",
        pair=f"{LLAMA_BOS_TOKEN}:0 $A:0 {LLAMA_BOS_TOKEN}:1 $B:1",
        special_tokens=[(LLAMA_BOS_TOKEN, LLAMA_BOS_TOKEN_ID)],
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    special_tokens_map = {"bos_token": LLAMA_BOS_TOKEN, "eos_token": LLAMA_EOS_TOKEN, "unk_token": LLAMA_UNK_TOKEN}
    common.write_json(folder / "special_tokens_map.json", special_tokens_map)
    write_tokenizer_config(folder, model_max_length)


def write_tokenizer_config(folder: Path, model_max_length: int) -> None:
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": LLAMA_BOS_TOKEN,
        "eos_token": LLAMA_EOS_TOKEN,
        "unk_token": LLAMA_UNK_TOKEN,
        "pad_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    common.write_json(folder / "tokenizer_config.json", config)


def build_llama_tokenizer(vocab_size: int, cache_root: Path) -> Path:
    """Train (or reuse) the Llama-style tokenizer of `vocab_size` tokens under `cache_root`."""
    key = f"tokenizer-llama-bpe{vocab_size}-v{common.FACTORY_VERSION}-{common.corpus_digest()}"
    return common.build_cached(
        cache_root / key,
        lambda folder: _train_llama_tokenizer(vocab_size, folder, common.DEFAULT_MODEL_MAX_LENGTH),
    )


# ---------------------------------------------------------------------------------------------------
# Weights


def _rare_rows(preset: LlamaPreset) -> list[slice]:
    """Embedding rows never meant to be generated: specials, byte fallbacks, ids past the tokenizer."""
    return [slice(0, len(LLAMA_SPECIAL_TOKENS) + NUM_BYTE_TOKENS), slice(preset.tokenizer_vocab, None)]


def _scaled_weight(name: str, noise: "torch.Tensor", preset: LlamaPreset, scales) -> "torch.Tensor":
    """Turn standard-normal `noise` into the value of parameter `name` of a Llama-style causal LM.

    As `testing_opt._scaled_weight` for OPT: token embeddings (and an untied head) have rows of norm
    `token_norm`; the final RMSNorm's weight spreads the logits over `logit_std` nats; each block adds
    about unit variance to the residual stream; every RMSNorm weight and bias is visibly nontrivial.
    """
    hidden = preset.hidden
    # Gemma scales the embedding by sqrt(hidden): its rows are that much shorter (the stream as Llama's), and
    # the tied head's logits are made up by the final norm. Its norms store their scale's offset from 1.
    gemma = preset.architecture in GEMMA_ARCHITECTURES
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        values = noise * (scales.token_norm / hidden**0.5) / (hidden**0.5 if gemma else 1.0)
        for rows in _rare_rows(preset):
            values[rows] *= scales.special_row_scale
        return values
    if name.endswith(("layernorm.weight", "model.norm.weight", "q_norm.weight", "k_norm.weight")):
        gain = scales.logit_std / scales.token_norm if name == "model.norm.weight" else 1.0
        if gemma and name == "model.norm.weight":
            gain *= hidden**0.5
        return gain * (1.0 + scales.norm_weight_std * noise) - (1.0 if gemma else 0.0)
    if name.endswith(".bias"):
        return scales.bias_std * noise
    std_by_suffix = {
        "q_proj.weight": scales.qk_gain / hidden**0.5,
        "k_proj.weight": scales.qk_gain / hidden**0.5,
        "v_proj.weight": 1.0 / hidden**0.5,
        "o_proj.weight": scales.attn_out_gain / preset.q_width**0.5,
        "gate_proj.weight": 1.0 / hidden**0.5,
        "up_proj.weight": 1.0 / hidden**0.5,
        "down_proj.weight": scales.mlp_out_gain / (SWIGLU_STD * preset.ffn**0.5),
        # MoE (transformers' in-memory names): the router, the experts' fused gate/up and down projections
        # (each token's output a weighted mean of its experts'), Qwen2-MoE's shared expert gate.
        "gate.weight": preset.router_gain / hidden**0.5,
        "experts.gate_up_proj": 1.0 / hidden**0.5,
        "experts.down_proj": scales.mlp_out_gain / (SWIGLU_STD * max(preset.expert_ffn, 1)**0.5),
        "shared_expert_gate.weight": 1.0 / hidden**0.5,
        # Phi-3's fused projections: gate and up alike; q and k rows as q_proj's and k_proj's, v rows as v_proj's.
        "gate_up_proj.weight": 1.0 / hidden**0.5,
    }
    if name.endswith("qkv_proj.weight"):
        values = noise * (scales.qk_gain / hidden**0.5)
        values[preset.q_width + preset.kv_width:] /= scales.qk_gain
        return values
    suffix = ".".join(name.split(".")[-2:])
    if suffix not in std_by_suffix:
        raise AssertionError(f"No init rule for parameter {name!r}")
    return noise * std_by_suffix[suffix]


def fill_weights(model: "torch.nn.Module", preset: LlamaPreset, seed: int) -> None:
    """Overwrite every parameter of a float32 Llama-style model with seeded values (`_scaled_weight`)."""
    scales = common.InitScales()
    common.fill_seeded(model, seed, lambda name, noise: _scaled_weight(name, noise, preset, scales))


def save_checkpoint(preset: LlamaPreset, seed: int, sharded: bool, dtype: str, tokenizer_dir: Path,
                    folder: Path) -> None:
    model = preset.hf_model_class()(preset.hf_config()).eval()
    fill_weights(model, preset, seed)
    common.save_model(model, folder, dtype, sharded, tokenizer_dir, LLAMA_TOKENIZER_FILES)
    write_tokenizer_config(folder, preset.max_positions)
