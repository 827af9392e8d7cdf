"""The engine with 4-bit weights and/or KV cache, on every placement of the parity suite.

References are built with tests/quant_reference.py (numpy, the paper's settings pinned there), never
with flexgen_core's own `compress` or its compression config.

- Weights are quantised once from the checkpoint: the engine and the reference quantise the same
  float32 values, so their codes are equal and the engine must match the quantised-weights model as
  tightly as the plain engine matches plain transformers.
- The KV cache is quantised from K/V that the engine and transformers compute with different kernels
  (~1e-7 apart): a value on a rounding boundary of its group may get the neighbouring code. So the
  check is split where exactness is real and where it is not:
  1. every row the engine stores equals the reference quantisation of the K/V the engine computed,
     bit for bit, on every tier and split;
  2. the reference runs transformers step by step over the engine's stored cache (decoded by the
     reference) and must give the engine's logprobs within LOGPROB_TOL at every step, and K/V within
     KV_TOL of the engine's;
  3. the reference's own quantisation of its K/V differs from the engine's codes only by rounding-
     boundary flips: each differing code is off by exactly one step, and they are counted (at most
     MAX_FLIP_RATE of all codes).
"""

import dataclasses

import numpy as np
import pytest
import torch
from quant_reference import quantise, quantised_weights_model, unpack
from reference import cache_kwargs, check_result
from test_parity_opt import DEVICES, LOGPROB_TOL, PLACEMENTS, TIE_TOL
from transformers import AutoModelForCausalLM, DynamicCache

from flexgen_core import Engine
from flexgen_core.runtime.kv_cache import KVCache
from flexgen_core.runtime.schedule import BlockRunner
from flexgen_core.runtime.storage import view_as
from flexgen_core.testing import build_checkpoint, sample_prompts

KV_TOL = 1e-4  # engine vs transformers K/V over the same (quantised) cache: kernel noise, ~1e-6 seen
MAX_FLIP_RATE = 1e-3  # boundary flips per code: ~1e-5 expected from ~1e-7 noise on ~1e-2 steps


@pytest.fixture(scope="module", params=["odd", "llama", "mistral", "qwen2"])
def model(request):
    path = build_checkpoint(request.param)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _run(path, policy, tmp_path, prompts, device="cpu", max_new_tokens=6):
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
        return engine.generate(prompts, max_new_tokens=max_new_tokens, echo_prompt=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_compressed_weights_match_quantised_reference(model, name, device, tmp_path):
    path, hf = model
    reference = quantised_weights_model(hf)
    prompts = sample_prompts(path, 5, 3, 30, seed=5)
    policy = dataclasses.replace(PLACEMENTS[name], compress_weight=True)
    for prompt, result in zip(prompts, _run(path, policy, tmp_path, prompts, device)):
        check_result(reference, prompt, result, logprob_tol=LOGPROB_TOL, tie_tol=TIE_TOL, echo=True)


# ---- the KV cache ------------------------------------------------------------------------------------

class CacheRecorder:
    """Watches the engine's compressed KV cache without changing what it does: the dense rows each
    store is given (the K/V the engine computed), and what the store left on its tier (read back when
    that cache is closed, after every copy has landed). A shared prefix's compressed copy is a block
    of its own whose rows belong to every sequence (positions 0..P-1); dense caches are not watched."""

    def __init__(self, monkeypatch):
        self.blocks: list[dict] = []
        run, run_prefix = BlockRunner.run, BlockRunner.run_prefix
        store, close, compact = KVCache.store, KVCache.close, KVCache.compact
        recorder = self

        def recording_run(runner, batches, settings, echo_prompt, prefix=None):
            # Each batch's members now; a store records the members it was made for (compaction
            # packs a batch's live rows into fewer, see schedule._BlockPass._compact).
            recorder.blocks.append({"batches": [(list(b.pads), list(b.seqs), b.offset) for b in batches],
                                    "stores": []})
            return run(runner, batches, settings, echo_prompt, prefix)

        def recording_run_prefix(runner, token_ids):
            recorder.blocks.append({"batches": None, "stores": []})  # rows of every sequence
            return run_prefix(runner, token_ids)

        def recording_store(cache, attn_idx, batch_idx, start, rows):
            if cache.layouts[0].compressed:
                dense = [r.detach().cpu().clone().numpy() for r in rows]  # before the store may reuse the buffer
                block = recorder.blocks[-1]
                members = None if block["batches"] is None else block["batches"][batch_idx]
                block["stores"].append(dict(cache=id(cache), attn=attn_idx, batch=batch_idx, start=start,
                                            dense=dense, members=members))
            return store(cache, attn_idx, batch_idx, start, rows)

        def read_back(cache, batch_idx=None):
            for block in recorder.blocks:
                for s in block["stores"]:
                    if s["cache"] != id(cache) or "stored" in s or batch_idx not in (None, s["batch"]):
                        continue
                    batch = 1 if s["members"] is None else len(s["members"][0])
                    s["stored"] = [_read_rows(layout, home, s["start"], len(d), batch) for layout, home, d
                                   in zip(cache.layouts, cache.homes[(s["attn"], s["batch"])], s["dense"])]
                    s["tiers"] = [layout.seg.tier for layout in cache.layouts]

        def recording_compact(cache, batch_idx, keep, rows):
            if cache.layouts[0].compressed:
                read_back(cache, batch_idx)  # what was stored, before the rows move
                block = recorder.blocks[-1]
                pads, seqs, offset = block["batches"][batch_idx]
                block["batches"][batch_idx] = ([pads[i] for i in keep.tolist()], [seqs[i] for i in keep.tolist()],
                                               offset)
            return compact(cache, batch_idx, keep, rows)

        def recording_close(cache):
            if cache.homes:
                read_back(cache)
            return close(cache)

        monkeypatch.setattr(BlockRunner, "run", recording_run)
        monkeypatch.setattr(BlockRunner, "run_prefix", recording_run_prefix)
        monkeypatch.setattr(KVCache, "store", recording_store)
        monkeypatch.setattr(KVCache, "compact", recording_compact)
        monkeypatch.setattr(KVCache, "close", recording_close)

    def stores(self):
        for block in self.blocks:
            yield from block["stores"]

    def per_sequence(self, completion):
        """For the sequence that produced `completion`: per attention layer, position -> (dense K/V
        (2, kv_heads, head_dim), stored codes (2, kv_heads, N, group), scale, min (2, kv_heads, N))."""
        out: dict[int, dict[int, tuple]] = {}
        for block in self.blocks:
            for s in block["stores"]:
                if s["members"] is None:
                    members = [(0, 0, 0)]  # the shared prefix: row 0, no padding, from position 0
                else:
                    pads, seqs, offset = s["members"]
                    members = [(row, pads[row], offset) for row, seq in enumerate(seqs) if seq.out is completion]
                for row, pad, offset in members:
                    for i in range(len(s["dense"][0])):
                        pos = s["start"] + i - pad
                        if pos < 0:
                            continue  # left padding
                        dense = np.concatenate([d[i, :, row] for d in s["dense"]], axis=1)
                        parts = [{n: t[i, :, row] for n, t in stored.items()} for stored in s["stored"]]
                        codes = np.concatenate([unpack(p["data"]) for p in parts], axis=1)
                        scale = np.concatenate([p["scale"] for p in parts], axis=1)
                        minimum = np.concatenate([p["min"] for p in parts], axis=1)
                        out.setdefault(s["attn"], {})[offset + pos] = (dense, codes, scale, minimum)
        return out


def _read_rows(layout, home, start: int, count: int, batch: int) -> dict[str, np.ndarray]:
    """Rows [start, start + count) of each stored part of one segment, from whichever tier holds it."""
    rows = {}
    for name, dtype, shape in layout.parts(batch):
        part = home[name]
        if layout.seg.tier == "disk":
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            buf = torch.empty(count * row_bytes, dtype=torch.uint8)
            part.read_into(start * row_bytes, buf)
            rows[name] = view_as(buf, 0, dtype, (count, *shape[1:])).numpy().copy()
        else:
            rows[name] = part[start:start + count].cpu().numpy().copy()
    return rows


def _reference_over_engine_cache(hf, ids, prompt_len, engine_rows, prefix_len=0):
    """Teacher-forced transformers logprobs where, after each step, the rows just added to the cache
    are replaced by the engine's stored rows (decoded by the reference). Returns the logprobs
    (len(ids), V) and, per layer and position, transformers' own K/V before replacement. With a
    shared `prefix_len`, the prompt runs as the engine runs it: the prefix, then the rest of the prompt
    over the prefix's exact K/V; only then are the prompt's rows replaced."""
    cache, logits, own = DynamicCache(), [], {}

    def take_new_rows(end, new):
        for layer_idx, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values  # (1, kv_heads, kept, head_dim)
            kept = min(new, keys.shape[2])
            for offset in range(kept):
                pos, at = end - kept + offset, keys.shape[2] - kept + offset
                own.setdefault(layer_idx, {})[pos] = np.stack([keys[0, :, at].numpy(), values[0, :, at].numpy()])
                _, codes, scale, minimum = engine_rows[layer_idx][pos]
                decoded = minimum[..., None].astype(np.float32) + codes.astype(np.float32) * scale[..., None].astype(np.float32)
                decoded = torch.from_numpy(decoded.reshape(*decoded.shape[:-2], -1)[..., :keys.shape[-1]])
                keys[0, :, at], values[0, :, at] = decoded[0], decoded[1]

    with torch.no_grad():
        for chunk in ([ids[:prefix_len], ids[prefix_len:prompt_len]] if prefix_len else [ids[:prompt_len]]):
            out = hf(torch.tensor([chunk]), **cache_kwargs(hf, cache), use_cache=True)
            logits.append(out.logits[0].float())
        take_new_rows(prompt_len, prompt_len)
        for pos in range(prompt_len, len(ids) - 1):
            out = hf(torch.tensor([[ids[pos]]]), **cache_kwargs(hf, cache), use_cache=True)
            logits.append(out.logits[0].float())
            take_new_rows(pos + 1, 1)
    return torch.log_softmax(torch.cat(logits), dim=-1), own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_compressed_cache_matches_quantised_reference(model, name, device, tmp_path, monkeypatch):
    path, hf = model
    prompts = sample_prompts(path, 5, 3, 30, seed=6)
    policy = dataclasses.replace(PLACEMENTS[name], compress_cache=True)
    recorder = CacheRecorder(monkeypatch)
    results = _run(path, policy, tmp_path, prompts, device)
    flips, codes = check_compressed_cache(recorder, hf, prompts, results)
    print(f"{name}/{device}: {flips} rounding-boundary flips in {codes} codes")


def check_compressed_cache(recorder: CacheRecorder, hf, prompts, results, prefix_len: int = 0) -> tuple[int, int]:
    """Steps 1-3 of the module docstring for `results` of `prompts`; returns (flips, codes compared)."""
    # 1. What the engine stores is the quantisation of what it computed, bit for bit, on every tier.
    for s in recorder.stores():
        for dense, stored, tier in zip(s["dense"], s["stored"], s["tiers"]):
            q = quantise(dense)
            assert np.array_equal(stored["data"], q.packed()), f"codes stored on {tier} differ"
            assert np.array_equal(stored["scale"], q.scale) and np.array_equal(stored["min"], q.minimum), tier

    flips = codes = 0
    for prompt, result in zip(prompts, results):
        completion = result.completions[0]
        rows = recorder.per_sequence(completion)
        ids = list(prompt) + list(completion.token_ids)
        ref, own = _reference_over_engine_cache(hf, ids, len(prompt), rows, prefix_len)
        # 2. Over the engine's cache, transformers gives the engine's logprobs and K/V.
        for step, token in enumerate(completion.token_ids):
            row = ref[len(prompt) - 1 + step]
            assert abs(completion.logprobs[step] - row[token].item()) <= LOGPROB_TOL, f"step {step}"
            assert row.max().item() - row[token].item() <= TIE_TOL, f"step {step}: not the reference's argmax"
        for layer_idx, by_pos in own.items():
            for pos, kv in by_pos.items():
                dense, engine_codes, _, _ = rows[layer_idx][pos]
                assert np.abs(kv - dense).max() <= KV_TOL, f"layer {layer_idx} position {pos}"
                # 3. Quantising transformers' own K/V differs from the engine's codes only by flips.
                differ = np.abs(quantise(kv).codes.astype(int) - engine_codes.astype(int))
                assert differ.max() <= 1, f"layer {layer_idx} position {pos}: a code off by {differ.max()}"
                flips += int(differ.sum())
                codes += differ.size
    assert codes > 0 and flips <= MAX_FLIP_RATE * codes
    return flips, codes


def test_compressed_cache_leaves_the_prompt_pass_exact(model, tmp_path):
    """The prompt pass attends over exact K/V (they are compressed only when stored), so prompt
    logprobs and the first generated token equal the uncompressed engine's. How much 4-bit storage
    moves a trained model's perplexity is measured in benchmarks/bench_compression.py."""
    path, _ = model
    prompts = sample_prompts(path, 4, 8, 30, seed=7)
    plain = _run(path, PLACEMENTS["mixed-three-tiers"], tmp_path, prompts)
    packed = _run(path, dataclasses.replace(PLACEMENTS["mixed-three-tiers"], compress_cache=True), tmp_path, prompts)
    for p, q in zip(plain, packed):
        assert max(abs(a - b) for a, b in zip(p.prompt_logprobs[1:], q.prompt_logprobs[1:])) < 1e-5
        assert p.completions[0].token_ids[0] == q.completions[0].token_ids[0]
        assert abs(p.completions[0].logprobs[0] - q.completions[0].logprobs[0]) < 1e-5
