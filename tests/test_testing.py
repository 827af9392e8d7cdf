"""Tests for flexgen_core.testing: the offline factory of synthetic OPT and Llama-style checkpoints.

Only the small presets are built (tiny, odd, proj and the Llama-style ones), into temporary folders,
never the shared cache.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (after the importorskip guards)
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM  # noqa: E402

from flexgen_core import testing  # noqa: E402
from flexgen_core.testing import (  # noqa: E402
    PRESETS,
    build_checkpoint,
    build_tokenizer,
    default_cache_root,
    sample_prompts,
)
from flexgen_core.testing import common as testing_common  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("test-models")


@pytest.fixture(scope="module")
def tiny(root):
    return build_checkpoint("tiny", root=root)


def _stored_tensors(folder) -> dict:
    """Every tensor of a checkpoint folder, merged across shards."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _assert_same_tensors(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "odd", "proj", "opt-100m", "large"])
def test_num_params_matches_transformers(name):
    preset = PRESETS[name]
    with torch.device("meta"):  # shapes only, no memory
        model = OPTForCausalLM(OPTConfig(**preset.opt_config_kwargs()))
    assert preset.num_params == sum(p.numel() for p in model.parameters())


def test_required_presets_have_the_requested_shapes():
    assert (PRESETS["tiny"].layers, PRESETS["tiny"].hidden, PRESETS["tiny"].heads) == (2, 64, 4)
    assert (PRESETS["tiny"].ffn, PRESETS["tiny"].max_positions) == (256, 256)
    odd = PRESETS["odd"]
    assert (odd.layers, odd.hidden, odd.heads, odd.head_dim, odd.ffn, odd.vocab) == (3, 90, 5, 18, 170, 1001)
    assert odd.tokenizer_vocab <= odd.vocab and odd.max_positions == 300
    proj = PRESETS["proj"]
    assert proj.embed_dim < proj.hidden and not proj.do_layer_norm_before
    opt_100m = PRESETS["opt-100m"]
    assert (opt_100m.layers, opt_100m.hidden, opt_100m.heads, opt_100m.ffn) == (12, 768, 12, 3072)
    assert opt_100m.tokenizer_vocab == 8192 and 80e6 < opt_100m.num_params < 100e6
    assert PRESETS["large"].num_params * 2 > 300e6  # a few hundred MB even in float16


def test_bad_arguments_name_the_allowed_values(root):
    with pytest.raises(ValueError, match="tiny"):
        build_checkpoint("no-such-preset", root=root)
    with pytest.raises(ValueError, match="float16"):
        build_checkpoint("tiny", root=root, dtype="int8")
    with pytest.raises(ValueError, match="seed"):
        build_checkpoint("tiny", root=root, seed=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(100, root=root)


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXGEN_TEST_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("FLEXGEN_TEST_CACHE")
    assert default_cache_root().parts[-2:] == ("flexgen-helm", "test-models")


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_behaves_like_opts(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.bos_token == tokenizer.eos_token == "</s>"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2, 1)
    assert len(tokenizer) == PRESETS["tiny"].tokenizer_vocab
    text = "def greet(name):\n    return f'Hello, {name}!'  # ünïcode ✓"
    input_ids = tokenizer(text)["input_ids"]
    assert input_ids[0] == 2 and 2 not in input_ids[1:]  # </s> prepended, once
    assert tokenizer.decode(input_ids, skip_special_tokens=True) == text
    assert tokenizer.decode(input_ids) == "</s>" + text
    ascii_ids = tokenizer("for index in range(10):", add_special_tokens=False)["input_ids"]
    assert len(ascii_ids) > 1
    assert "".join(tokenizer.decode([token_id]) for token_id in ascii_ids) == "for index in range(10):"


def test_checkpoint_tokenizer_carries_model_max_length(root, tiny):
    with open(tiny / "tokenizer_config.json", encoding="utf-8") as handle:
        assert json.load(handle)["model_max_length"] == PRESETS["tiny"].max_positions
    assert AutoTokenizer.from_pretrained(tiny).model_max_length == PRESETS["tiny"].max_positions
    odd = build_checkpoint("odd", root=root)
    assert AutoTokenizer.from_pretrained(odd).model_max_length == 300
    standalone = build_tokenizer(PRESETS["tiny"].tokenizer_vocab, root=root)
    assert AutoTokenizer.from_pretrained(standalone).model_max_length == testing.DEFAULT_MODEL_MAX_LENGTH


def test_tokenizer_is_deterministic(root, tmp_path):
    first = build_tokenizer(PRESETS["tiny"].tokenizer_vocab, root=root)
    second = build_tokenizer(PRESETS["tiny"].tokenizer_vocab, root=tmp_path)
    assert first != second
    for file_name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (first / file_name).read_bytes() == (second / file_name).read_bytes(), file_name


# --- checkpoints --------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_another_seed_different(root, tiny, tmp_path):
    rebuilt = build_checkpoint("tiny", root=tmp_path, seed=0)
    assert rebuilt != tiny
    _assert_same_tensors(_stored_tensors(tiny), _stored_tensors(rebuilt))
    other_seed = _stored_tensors(build_checkpoint("tiny", root=root, seed=1))
    for name, tensor in _stored_tensors(tiny).items():
        assert not torch.equal(tensor, other_seed[name]), name


def test_checkpoint_is_cached_and_leaves_no_temp_folders(root, tiny):
    mtime_ns = (tiny / "model.safetensors").stat().st_mtime_ns
    assert build_checkpoint("tiny", root=root) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == mtime_ns
    assert not [entry.name for entry in root.iterdir() if entry.name.endswith(".tmp")]


def test_losing_a_build_race_keeps_the_winners_folder(tmp_path):
    target = tmp_path / "artifact"

    def build_while_another_process_wins(folder):
        (folder / "mine.txt").write_text("loser")
        target.mkdir()
        (target / "theirs.txt").write_text("winner")

    assert testing_common.build_cached(target, build_while_another_process_wins) == target
    assert sorted(os.listdir(target)) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["artifact"]  # the loser's temp folder is gone


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken_build(folder):
        (folder / "partial.bin").write_bytes(b"\0")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        testing_common.build_cached(tmp_path / "artifact", broken_build)
    assert os.listdir(tmp_path) == []


def test_sharded_checkpoint_has_an_index_and_loads_identically(root, tiny):
    sharded = build_checkpoint("tiny", root=root, sharded=True)
    with open(sharded / "model.safetensors.index.json", encoding="utf-8") as handle:
        weight_map = json.load(handle)["weight_map"]
    shard_files = sorted(sharded.glob("*.safetensors"))
    assert len(shard_files) > 1
    assert sorted(set(weight_map.values())) == [path.name for path in shard_files]
    _assert_same_tensors(_stored_tensors(tiny), _stored_tensors(sharded))

    input_ids = torch.tensor([sample_prompts(tiny, 1, 12, 12, seed=3)[0]])
    with torch.no_grad():
        expected = OPTForCausalLM.from_pretrained(tiny).eval()(input_ids).logits
        actual = OPTForCausalLM.from_pretrained(sharded).eval()(input_ids).logits
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_dtype_and_finite_logits(root, tiny, dtype):
    folder = build_checkpoint("tiny", root=root, dtype=dtype)
    stored = _stored_tensors(folder)
    assert {tensor.dtype for tensor in stored.values()} == {getattr(torch, dtype)}
    # The same weights as float32, rounded.
    reference = _stored_tensors(tiny)
    for name, tensor in stored.items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name
    with open(folder / "config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    stats = testing.greedy_stats(folder, n_prompts=2, max_new_tokens=8, dtype=dtype)
    assert stats.all_finite


def test_odd_preset_has_an_odd_vocabulary(root):
    folder = build_checkpoint("odd", root=root)
    stored = _stored_tensors(folder)
    assert stored["model.decoder.embed_tokens.weight"].shape == (1001, 90)
    assert stored["model.decoder.layers.0.fc1.weight"].shape == (170, 90)
    model = OPTForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 1001
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_proj_preset_projects_and_normalises_after_each_block(root):
    folder = build_checkpoint("proj", root=root)
    stored = _stored_tensors(folder)
    preset = PRESETS["proj"]
    assert stored["model.decoder.project_in.weight"].shape == (preset.hidden, preset.embed_dim)
    assert stored["model.decoder.project_out.weight"].shape == (preset.embed_dim, preset.hidden)
    assert "model.decoder.final_layer_norm.weight" not in stored  # opt-350m has no final norm
    assert OPTForCausalLM.from_pretrained(folder).config.do_layer_norm_before is False


def test_no_bias_or_norm_parameter_is_trivial(tiny):
    # An engine that drops a bias or a LayerNorm affine must fail parity, so none may be 0 (or 1).
    for name, tensor in _stored_tensors(tiny).items():
        if name.endswith(".bias"):
            assert tensor.abs().min() > 0, name
        if "layer_norm" in name and name.endswith(".weight"):
            assert not torch.allclose(tensor, torch.ones_like(tensor)), name


@pytest.mark.parametrize("name", ["tiny", "odd", "proj"])
def test_greedy_steps_are_decisive_and_varied(root, name):
    stats = testing.greedy_stats(build_checkpoint(name, root=root), n_prompts=4, max_new_tokens=16)
    assert stats.steps == 64
    assert stats.decisive_fraction > 0.95, stats
    assert stats.median_gap > 0.1, stats
    assert stats.distinct_fraction > 0.6, stats  # not one token repeated
    assert stats.longest_run < 8, stats
    assert stats.all_finite


# --- Llama-style presets --------------------------------------------------------------------------

LLAMA_STYLE = ["llama", "llama3", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def llama_checkpoint(root):
    return build_checkpoint("llama", root=root)


@pytest.mark.parametrize("name", LLAMA_STYLE)
def test_llama_num_params_matches_transformers(name):
    preset = PRESETS[name]
    with torch.device("meta"):
        model = preset.hf_model_class()(preset.hf_config())
    assert preset.num_params == sum(p.numel() for p in model.parameters())


def test_llama_tokenizer_behaves_like_llamas(llama_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, None)
    assert len(tokenizer) == PRESETS["llama"].tokenizer_vocab
    assert tokenizer.model_max_length == PRESETS["llama"].max_positions
    text = "def greet(name):\n    return f'Hello, {name}!'  # ünïcode ✓"
    input_ids = tokenizer(text)["input_ids"]
    assert input_ids[0] == 1 and 1 not in input_ids[1:] and 2 not in input_ids  # <s> prepended, once; no </s>
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == input_ids[1:]
    assert tokenizer.decode(input_ids, skip_special_tokens=True) == text
    assert "<0xE2>" in tokenizer.convert_ids_to_tokens(input_ids)  # ✓ falls back to bytes
    word_ids = tokenizer("x = 1", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(word_ids)
    assert pieces[0].startswith("▁")  # sentencepiece-style word prefix
    assert tokenizer.decode(word_ids[:1]) == pieces[0][1:]  # a lone word decodes without its space, as Llama's


def test_llama_checkpoints_are_deterministic_and_tie_as_configured(root, llama_checkpoint, tmp_path):
    stored = _stored_tensors(llama_checkpoint)
    _assert_same_tensors(stored, _stored_tensors(build_checkpoint("llama", root=tmp_path)))
    assert stored["model.embed_tokens.weight"].shape == (1001, 96)
    assert stored["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 96)  # 2 KV heads of 16
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    assert "lm_head.weight" not in _stored_tensors(build_checkpoint("llama3", root=root))  # tied
    qwen2 = _stored_tensors(build_checkpoint("qwen2", root=root))
    for name, tensor in qwen2.items():
        if name.endswith(".bias"):
            assert tensor.abs().min() > 0, name
        if "norm" in name:
            assert not torch.allclose(tensor, torch.ones_like(tensor)), name
    assert {"q_proj", "k_proj", "v_proj"} == {n.split(".")[-2] for n in qwen2 if n.endswith(".bias")}
    with open(build_checkpoint("mistral", root=root) / "config.json", encoding="utf-8") as handle:
        assert json.load(handle)["sliding_window"] == PRESETS["mistral"].sliding_window


@pytest.mark.parametrize("name", LLAMA_STYLE)
def test_llama_greedy_steps_are_decisive_and_varied(root, name):
    stats = testing.greedy_stats(build_checkpoint(name, root=root), n_prompts=4, max_new_tokens=16)
    assert stats.decisive_fraction > 0.95, stats
    assert stats.median_gap > 0.1, stats
    assert stats.distinct_fraction > 0.6, stats
    assert stats.longest_run < 8, stats
    assert stats.all_finite


# --- prompts ------------------------------------------------------------------------------------


def test_sample_prompts_are_ragged_deterministic_and_clean(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompts = sample_prompts(tokenizer, 20, min_len=3, max_len=17, seed=5)
    assert len(prompts) == 20
    assert all(3 <= len(prompt) <= 17 for prompt in prompts)
    assert len({len(prompt) for prompt in prompts}) > 3
    special_ids = set(tokenizer.all_special_ids)
    for prompt in prompts:
        assert prompt[0] == tokenizer.bos_token_id
        assert not special_ids & set(prompt[1:])
        assert all(0 <= token_id < len(tokenizer) for token_id in prompt)
    assert sample_prompts(tiny, 20, min_len=3, max_len=17, seed=5) == prompts  # a path works too
    assert sample_prompts(tokenizer, 20, min_len=3, max_len=17, seed=6) != prompts
    assert sample_prompts(tokenizer, 2, min_len=1, max_len=1) == [[tokenizer.bos_token_id]] * 2
    with pytest.raises(ValueError, match="min_len"):
        sample_prompts(tokenizer, 1, min_len=5, max_len=4)
