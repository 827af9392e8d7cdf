"""The zig-zag block schedule (FlexGen paper, Sec. 4.2, Algorithm 1) and its overlapped I/O.

For each generation step, for each layer, for each GPU batch of the block: compute (step, layer,
batch) while the next layer's weights, the next batch's KV cache and hidden states load, and the
previous batch's cache and hidden states store. A layer's weights are loaded once per step and
reused by every GPU batch. `overlap=False` runs the very same order with each copy done in place.

Here are the order, the prefetches, the futures, and forking and packing of batches; the math of one
(step, layer, batch) unit is unit_math.py's, the batches' positions and masks batch.py's.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from flexgen_core.memory import num_slots
from flexgen_core.models.base import LayerKind, ModelShape
from flexgen_core.policy import Policy
from flexgen_core.runtime import unit_math
from flexgen_core.runtime.activations import Activations
from flexgen_core.runtime.batch import Batch
from flexgen_core.runtime.decoding import DecodeSettings, SequenceState
from flexgen_core.runtime.kv_cache import KVCache
from flexgen_core.runtime.storage import Devices, OffloadDir
from flexgen_core.runtime.weights import WeightStore


# A GPU batch is packed once at most this share of its rows is still generating (see _compact).
COMPACT_LIVE_FRACTION = 0.75


class IOQueue:
    """Copies off the compute path: one background thread with its own copy stream (streams.py).

    Each job first waits for the compute issued before it was submitted (an event) and for the
    futures it depends on, and its future resolves only once its stream's copies have landed. With
    overlap off, jobs run at once on the caller's thread.
    """

    def __init__(self, overlap: bool, devices: Devices, name: str):
        self.devices = devices
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"flexgen-{name}",
                                       initializer=devices.enter_thread) if overlap else None
        self.stream = devices.new_stream() if overlap else None

    def submit(self, fn: Callable, *args, waits: tuple[Future | None, ...] = ()) -> Future:
        if self.pool is None:
            done: Future = Future()
            result = fn(*args)
            self.devices.synchronize()
            done.set_result(result)
            return done
        return self.pool.submit(self._run, self.devices.record_event(), waits, fn, args)

    def _run(self, event, waits, fn, args):
        for f in waits:
            if f is not None:
                f.result()
        if self.stream is None:
            return fn(*args)
        with self.stream.active():
            self.stream.wait_event(event)
            result = fn(*args)
        self.stream.synchronize()
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.stream is not None:
            self.stream.close()


@dataclass(frozen=True)
class RunContext:
    """What every block of one engine shares: the model's layers and weights, its policy, devices,
    compute dtype and offload folder."""

    layers: list
    weights: WeightStore
    shape: ModelShape
    policy: Policy
    devices: Devices
    dtype: torch.dtype
    offload: OffloadDir


@dataclass
class RunStats:
    """What the blocks of one engine computed so far (counters only: for logs and benchmarks)."""

    blocks: int = 0
    sequences: int = 0
    prefill_tokens: int = 0  # token rows of prompt passes, padding included (a shared prefix's: below)
    prefix_tokens: int = 0  # tokens of shared prefixes computed (once each, however many sequences use them)
    prefixes_computed: int = 0
    prefixes_reused: int = 0  # generate calls that found their prefix kept from an earlier call
    decode_rows: int = 0  # (sequence, step) rows the decode steps computed, finished ones included
    compactions: int = 0  # GPU batches packed to their live rows between steps
    generated_tokens: int = 0  # tokens the sequences kept
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class BlockRunner:
    """Runs one block of GPU batches through every layer for every generation step."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.loads = IOQueue(ctx.policy.overlap, ctx.devices, "load")
        self.stores = IOQueue(ctx.policy.overlap, ctx.devices, "store")
        self.attention_index = {}
        for layer_idx, layer in enumerate(ctx.layers):
            if layer.kind is LayerKind.ATTENTION:
                self.attention_index[layer_idx] = len(self.attention_index)
        self.load_counts = {"weights": 0, "cache": 0}  # per-kind counters pick staging slots
        self.last_allocated: dict[str, dict[str, int]] = {}  # real bytes per term, after a prompt pass
        self.stats = RunStats()
        self.prefixes_built = 0

    def close(self) -> None:
        self.loads.close()
        self.stores.close()

    def run(self, batches: list[Batch], settings: DecodeSettings, echo_prompt: bool,
            prefix: SharedPrefix | None = None) -> None:
        """Generate for one block; with `prefix`, every prompt of `batches` continues that shared prefix
        (the batches hold the rest of each prompt) and attends over its stored K/V."""
        seqs = [seq for batch in batches for seq in batch.members]
        cache, acts = self._block_buffers(batches, settings.max_new_tokens)
        try:
            _BlockPass(self, batches, cache, acts, settings, echo_prompt, prefix).run()
        finally:
            cache.close()
            acts.close()
        self.stats.blocks += 1
        self.stats.sequences += len(seqs)
        self.stats.generated_tokens += sum(len(seq.out.token_ids) for seq in seqs)

    def run_prefix(self, token_ids: list[int]) -> SharedPrefix:
        """Compute a prompt prefix shared by many sequences once: its K/V, kept on the tiers of the
        policy's cache split, and its prompt logprobs.

        Prompt passes attend over the prefix's exact K/V, as an unshared prompt pass attends over its
        own; with compress_cache, decode steps read a compressed copy, as they read every cached row."""
        ctx = self.ctx
        batch = Batch(torch.tensor([token_ids], dtype=torch.long, device=ctx.devices.compute), [0],
                      [SequenceState(list(token_ids), None)])
        dense_policy = ctx.policy.replace(compress_cache=False)
        self.prefixes_built += 1  # offload files of each kept prefix have names of their own
        label = f"prefix{self.prefixes_built}"
        cache, acts = self._block_buffers([batch], 0, label=label, policy=dense_policy)
        prefix = SharedPrefix(tuple(token_ids), cache, cache)
        try:
            _BlockPass(self, [batch], cache, acts, DecodeSettings(0, 0.0, 1.0, 0, (), None), True, None,
                       building=prefix).run()
            self.stats.prefixes_computed += 1
            if ctx.policy.compress_cache:
                prefix.cache = KVCache(ctx.shape, ctx.policy, ctx.devices, ctx.dtype, ctx.offload,
                                       len(self.attention_index), [1], len(token_ids), f"{label}-4bit")
                for attn_idx in range(len(self.attention_index)):
                    rows = cache.load(attn_idx, 0, len(token_ids), 0)  # synchronous here: no stream active
                    prefix.cache.store(attn_idx, 0, 0, rows)
        except BaseException:
            prefix.close()
            raise
        finally:
            acts.close()
        return prefix

    def _block_buffers(self, batches: list[Batch], gen_len: int, label: str = "cache",
                       policy: Policy | None = None) -> tuple[KVCache, Activations]:
        prompt_len = batches[0].token_ids.shape[1]
        batch_sizes = [len(b.members) for b in batches]
        ctx = self.ctx
        cache = KVCache(ctx.shape, policy or ctx.policy, ctx.devices, ctx.dtype, ctx.offload,
                        len(self.attention_index), batch_sizes, prompt_len + gen_len, label)
        try:
            acts = Activations(ctx.policy, ctx.devices, ctx.dtype, ctx.offload, batch_sizes,
                               prompt_len, ctx.shape.hidden_size)
        except BaseException:
            cache.close()
            raise
        return cache, acts

    def next_slot(self, kind: str) -> int:
        n = self.load_counts[kind]
        self.load_counts[kind] = n + 1
        return n


@dataclass
class SharedPrefix:
    """A prompt prefix computed once for many sequences: its K/V (a KV cache of one sequence, on the
    policy's tiers), the logprobs of its tokens and the distribution of the token after it."""

    tokens: tuple[int, ...]
    cache: KVCache  # read by decode steps: compressed with compress_cache, else `prompt_cache` itself
    prompt_cache: KVCache  # exact K/V, read by prompt passes
    prompt_logprobs: list[float | None] | None = None  # [None, lp(token 1), ...]
    next_logprobs: torch.Tensor | None = None  # (V,) float32 on the host: log p(next token | prefix)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def caches(self) -> list[KVCache]:
        return [self.prompt_cache] if self.cache is self.prompt_cache else [self.prompt_cache, self.cache]

    def close(self) -> None:
        for cache in self.caches():
            cache.close()


class _BlockPass:
    """The state of one block's schedule: pending loads and stores, the units in order. Each unit's math is
    a function of unit_math.py; the pass hands it its inputs and stores what it returns."""

    def __init__(self, runner: BlockRunner, batches, cache: KVCache, acts: Activations,
                 settings: DecodeSettings, echo_prompt: bool, prefix: SharedPrefix | None,
                 building: SharedPrefix | None = None):
        self.runner = runner
        self.ctx = runner.ctx
        self.batches = batches
        self.cache = cache
        self.acts = acts
        self.settings = settings
        self.echo_prompt = echo_prompt
        self.prefix = prefix  # attended over by every batch
        self.building = building  # this pass computes it
        self.prefix_kv: list[torch.Tensor] | None = None  # the current layer's prefix K/V, per segment
        self.prompt_len = batches[0].token_ids.shape[1]
        self.num_steps = max(settings.max_new_tokens, 1)
        self.cache_loads: dict[tuple[int, int], tuple[Future, int]] = {}  # (layer, batch) -> (future, slot)
        self.cache_stores: dict[tuple[int, int], Future] = {}
        self.slot_stores: dict[int, Future] = {}  # staging slot -> last store reading from it
        self.act_loads: dict[int, Future] = {}
        self.act_stores: dict[int, Future] = {}
        self.last_tokens: dict[int, torch.Tensor] = {}  # batch -> ids chosen at the previous step
        self.pending_weights: Future | None = None
        self._memo_step, self._memo = -1, {}  # positions and decode masks of the current step
        self.failed = False

    # ---- the schedule -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._schedule()
        except BaseException:
            self.failed = True
            raise
        finally:
            self._drain()

    def _drain(self) -> None:
        """Wait for every copy still in flight: none may write into a buffer about to be reused or freed."""
        pending = [f for f, _ in self.cache_loads.values()] + list(self.act_loads.values())
        pending += list(self.cache_stores.values()) + list(self.act_stores.values()) + [self.pending_weights]
        errors = []
        for f in pending:
            if f is not None:
                try:
                    f.result()
                except Exception as e:  # the first failure is re-raised by whoever waits on it
                    errors.append(e)
        if errors and not self.failed:
            raise errors[0]

    def _schedule(self) -> None:
        layers, num_batches = self.ctx.layers, len(self.batches)
        weight_order = [(step, layer_idx) for step in range(self.num_steps) for layer_idx in range(len(layers))]
        # Without overlap there is one staging slot per kind: load each thing only when it is needed.
        prefetch = self.ctx.policy.overlap
        for batch_idx, batch in enumerate(self.batches):  # forking batches: the prompt pass's rows first
            if batch.fork is not None:
                self.cache.compact(batch_idx, torch.arange(len(batch.seqs)), 0)
                self.acts.compact(batch_idx, len(batch.seqs))
        stats, started_s = self.runner.stats, time.perf_counter()
        self.pending_weights = self._load_weights(*weight_order[0])
        for order_idx, (step, layer_idx) in enumerate(weight_order):
            weights, self.prefix_kv = self.pending_weights.result()
            if order_idx + 1 < len(weight_order):
                next_unit = weight_order[order_idx + 1]
                self.pending_weights = self._load_weights(*next_unit) if prefetch else None
            for batch_idx in range(num_batches):
                if not self._live(step, batch_idx):
                    continue
                if prefetch:
                    self._prefetch_next(step, layer_idx, batch_idx)
                self._compute(step, layer_idx, batch_idx, weights)
            if not prefetch and order_idx + 1 < len(weight_order):
                self.pending_weights = self._load_weights(*next_unit)
            if layer_idx == 0:
                rows = sum(len(b.pads) for i, b in enumerate(self.batches) if self._live(step, i))
                if step > 0:
                    stats.decode_rows += rows
                elif self.building is not None:
                    stats.prefix_tokens += rows * self.prompt_len
                else:
                    stats.prefill_tokens += rows * self.prompt_len
            if layers[layer_idx].kind is LayerKind.OUTPUT:
                if step == 0:
                    self.runner.last_allocated = self._allocated()
                    now_s = time.perf_counter()
                    stats.prefill_s += now_s - started_s
                    started_s = now_s
                if all(seq.done for batch in self.batches for seq in batch.members):
                    break
                if step + 1 < self.num_steps:
                    if step == 0:
                        self._fork()
                    self._compact(step)
        stats.decode_s += time.perf_counter() - started_s

    def _allocated(self) -> dict[str, dict[str, int]]:
        real = self.ctx.weights.allocated() | self.cache.allocated() | {"activations": self.acts.allocated()}
        if self.prefix is not None:
            real["shared_prefix"] = {tier: 0 for tier in real["weights"]}
            for cache in self.prefix.caches():
                held = cache.allocated()
                for tier in real["shared_prefix"]:
                    real["shared_prefix"][tier] += held["cache"][tier] + held["cache_staging"][tier]
        return real

    def _load_weights(self, step: int, layer_idx: int) -> Future:
        """A layer's weights and, for attention layers of a block with a shared prefix, the prefix's
        K/V: both loaded once per (step, layer) and used by every GPU batch."""
        slot = self.runner.next_slot("weights")
        return self.runner.loads.submit(self._load_layer, step, layer_idx, slot)

    def _load_layer(self, step: int, layer_idx: int, slot: int):
        weights = self.ctx.weights.load(layer_idx, slot)
        if self.prefix is None or layer_idx not in self.runner.attention_index:
            return weights, None
        cache = self.prefix.prompt_cache if step == 0 else self.prefix.cache
        return weights, cache.load(self.runner.attention_index[layer_idx], 0, self.prefix.length, slot)

    def _settle(self, batch_idx: int) -> None:
        """Wait until no copy of this batch's cache or hidden states is in flight."""
        for (_, b_idx), future in list(self.cache_stores.items()):
            if b_idx == batch_idx:
                future.result()  # every stored row of this batch has landed
        if batch_idx in self.act_stores:
            self.act_stores.pop(batch_idx).result()
        assert not any(b == batch_idx for _, b in self.cache_loads) and batch_idx not in self.act_loads

    def _fork(self) -> None:
        """After the prompt pass, each batch that ran it on its distinct prompts gets a row per
        sequence: its prompts' K/V rows are copied out to every sequence continuing them."""
        for batch_idx, batch in enumerate(self.batches):
            if batch.fork is None:
                continue
            self._settle(batch_idx)
            rows = torch.tensor(batch.fork[1])
            self.cache.compact(batch_idx, rows, self.prompt_len)
            self.acts.compact(batch_idx, len(rows))
            self.batches[batch_idx] = batch.forked()

    def _compact(self, step: int) -> None:
        """Between steps, a GPU batch whose finished sequences make up a quarter or more of its rows
        drops them: its live rows, their KV cache and hidden-state homes are packed into a smaller
        batch, so later steps compute and move only live rows. (A batch with none left is skipped
        whole, see `_live`.)"""
        for batch_idx, batch in enumerate(self.batches):
            live = [row for row, seq in enumerate(batch.seqs) if not seq.done]
            if not live or len(live) > COMPACT_LIVE_FRACTION * len(batch.seqs):
                continue
            self._settle(batch_idx)
            keep = torch.tensor(live)
            self.cache.compact(batch_idx, keep, self.prompt_len + step)
            self.acts.compact(batch_idx, len(live))
            self.batches[batch_idx] = batch.keep(live)
            self.last_tokens[batch_idx] = self.last_tokens[batch_idx].index_select(
                0, keep.to(self.last_tokens[batch_idx].device))
            self.runner.stats.compactions += 1

    def _live(self, step: int, batch_idx: int) -> bool:
        """Decode steps skip a GPU batch whose sequences have all finished (stop, EOS or length): it
        costs nothing more, no compute and no cache or hidden-state traffic."""
        return step == 0 or not all(seq.done for seq in self.batches[batch_idx].seqs)

    def _next_unit(self, step: int, layer_idx: int, batch_idx: int) -> tuple[int, int, int] | None:
        """The next (step, layer, batch) to compute, passing over finished batches."""
        while True:
            if batch_idx + 1 < len(self.batches):
                batch_idx += 1
            elif layer_idx + 1 < len(self.ctx.layers):
                layer_idx, batch_idx = layer_idx + 1, 0
            elif step + 1 < self.num_steps:
                step, layer_idx, batch_idx = step + 1, 0, 0
            else:
                return None
            if self._live(step, batch_idx):
                return step, layer_idx, batch_idx

    def _prefetch_next(self, step: int, layer_idx: int, batch_idx: int) -> None:
        """Start loading the next unit's cache and (when already stored) its hidden states."""
        nxt = self._next_unit(step, layer_idx, batch_idx)
        if nxt is None:
            return
        n_step, n_layer, n_batch = nxt
        if n_step > 0 and n_layer in self.runner.attention_index:
            self._request_cache(n_step, n_layer, n_batch)
        if n_batch != batch_idx and self.ctx.layers[n_layer].kind is not LayerKind.INPUT:
            self._request_act(n_batch)

    def _request_cache(self, step: int, layer_idx: int, batch_idx: int) -> None:
        key = (layer_idx, batch_idx)
        if key in self.cache_loads:
            return
        slot = self.runner.next_slot("cache")
        upto = self.prompt_len + step - 1  # rows already written
        attn_idx = self.runner.attention_index[layer_idx]
        waits = (self.cache_stores.get(key), self.slot_stores.get(slot % num_slots(self.ctx.policy)))
        future = self.runner.loads.submit(self.cache.load, attn_idx, batch_idx, upto, slot, waits=waits)
        self.cache_loads[key] = (future, slot)

    def _request_act(self, batch_idx: int) -> None:
        if batch_idx in self.act_loads or self.acts.on_device[batch_idx]:
            return
        self.act_loads[batch_idx] = self.runner.loads.submit(
            self.acts.load, batch_idx, waits=(self.act_stores.get(batch_idx),))

    def _hidden(self, batch_idx: int) -> torch.Tensor:
        if self.acts.on_device[batch_idx]:
            return self.acts.load(batch_idx)
        self._request_act(batch_idx)  # no-op when prefetched
        return self.act_loads.pop(batch_idx).result()

    def _keep_hidden(self, batch_idx: int, hidden: torch.Tensor) -> None:
        if self.acts.on_device[batch_idx]:
            self.acts.store(batch_idx, hidden)
        else:
            self.act_stores[batch_idx] = self.runner.stores.submit(
                self.acts.store, batch_idx, hidden, waits=(self.act_stores.get(batch_idx),))

    # ---- per-step index tensors, built once per (step, batch) rather than per layer ----------------
    def _positions(self, step: int, batch_idx: int, start: int, length: int) -> torch.Tensor:
        if self._memo_step != step:
            self._memo_step, self._memo = step, {}
        key = ("positions", batch_idx)
        if key not in self._memo:
            self._memo[key] = self.batches[batch_idx].positions(start, length)
        return self._memo[key]

    def _prefix_mask(self, step, batch_idx, start, length, tier, window) -> torch.Tensor | None:
        """Which shared-prefix keys the queries see (None: all), for attention on `tier`."""
        if window is None:
            return None
        if self._memo_step != step:
            self._memo_step, self._memo = step, {}
        key = ("prefix-mask", batch_idx, tier, window)
        if key not in self._memo:
            device = self.ctx.devices.tier_device(tier)
            self._memo[key] = self.batches[batch_idx].prefix_allowed(start, length, device, window)
        return self._memo[key]

    def _mask(self, step, batch_idx, start, length, key_len, tier, window) -> torch.Tensor:
        """The attention mask for attention running on `tier` ("gpu": the compute device, or "cpu")."""
        device = self.ctx.devices.tier_device(tier)
        if step == 0:  # prompt-pass masks are (B, 1, s, s): too big to keep for every batch
            return self.batches[batch_idx].allowed(start, length, key_len, device, window)
        if self._memo_step != step:
            self._memo_step, self._memo = step, {}
        key = ("mask", batch_idx, tier, window)
        if key not in self._memo:
            self._memo[key] = self.batches[batch_idx].allowed(start, length, key_len, device, window)
        return self._memo[key]

    # ---- one unit: (step, layer, batch) ----------------------------------------------------------
    def _compute(self, step: int, layer_idx: int, batch_idx: int, weights) -> None:
        layer = self.ctx.layers[layer_idx]
        batch = self.batches[batch_idx]
        start = 0 if step == 0 else self.prompt_len + step - 1
        length = self.prompt_len if step == 0 else 1
        if layer.kind is LayerKind.INPUT:
            tokens = batch.token_ids if step == 0 else self.last_tokens[batch_idx][:, None]
            hidden = unit_math.input_unit(layer, weights, tokens, self._positions(step, batch_idx, start, length))
        elif layer.kind is LayerKind.ATTENTION:
            hidden = self._attention(layer, layer_idx, batch_idx, weights, step, start, length)
        elif layer.kind is LayerKind.MLP:
            hidden = unit_math.mlp_unit(layer, weights, self._hidden(batch_idx), self.ctx.shape.mlp_width)
        else:
            self._output(layer, batch_idx, weights, step)
            return
        self._keep_hidden(batch_idx, hidden)

    def _attention(self, layer, layer_idx, batch_idx, weights, step, start, length) -> torch.Tensor:
        buffers, slot = (None, None) if step == 0 else self._take_cache(step, layer_idx, batch_idx)
        segments = [self._segment_inputs(layer, seg_idx, buffers, step, batch_idx, start, length)
                    for seg_idx in range(len(self.cache.segments))]
        hidden, rows = unit_math.attention_unit(layer, weights, self._hidden(batch_idx),
                                                self._positions(step, batch_idx, start, length), segments, start,
                                                start + length, self.ctx.devices.compute)
        key = (layer_idx, batch_idx)
        store = self.runner.stores.submit(self.cache.store, self.runner.attention_index[layer_idx], batch_idx, start,
                                          rows, waits=(self.cache_stores.get(key),))
        self.cache_stores[key] = store
        if slot is not None:
            self.slot_stores[slot % num_slots(self.ctx.policy)] = store
        return hidden

    def _take_cache(self, step: int, layer_idx: int, batch_idx: int) -> tuple[list[torch.Tensor], int]:
        """This unit's loaded cache rows (per segment) and their staging slot, loading them now if no
        prefetch did."""
        future, slot = self.cache_loads.pop((layer_idx, batch_idx), (None, None))
        if future is None:
            self._request_cache(step, layer_idx, batch_idx)
            future, slot = self.cache_loads.pop((layer_idx, batch_idx))
        return future.result(), slot

    def _segment_inputs(self, layer, seg_idx, buffers, step, batch_idx, start, length) -> unit_math.SegmentInputs:
        """Where one cache segment's attention runs, and its inputs there. The prompt pass always attends on
        the compute device, where its fresh K/V are (FlexGen's prefill); decode steps where the policy says
        (CPU attention reads an off-device cache where it lies)."""
        seg = self.cache.segments[seg_idx]
        group = self.ctx.shape.num_heads // self.ctx.shape.num_kv_heads
        tier = seg.attends_on(prompt_pass=step == 0)
        device = self.ctx.devices.tier_device(tier)
        window = layer.sliding_window  # Mistral-style local attention (models/base.AttentionLayer)
        mask = self._mask(step, batch_idx, start, length, start + length, tier, window)
        prefix_kv = prefix_mask = None
        if self.prefix_kv is not None:
            if self.prefix_kv[seg_idx].device != device:  # loaded where decode attends: moved once per layer
                self.prefix_kv[seg_idx] = self.prefix_kv[seg_idx].to(device)
            prefix_kv = self.prefix_kv[seg_idx]
            prefix_mask = self._prefix_mask(step, batch_idx, start, length, tier, window)
        return unit_math.SegmentInputs(slice(seg.start, seg.stop), slice(seg.start * group, seg.stop * group),
                                       device, None if buffers is None else buffers[seg_idx], mask, prefix_kv,
                                       prefix_mask)

    def _output(self, layer, batch_idx, weights, step) -> None:
        batch = self.batches[batch_idx]
        x = self._hidden(batch_idx)
        if self.building is not None:  # the shared prefix: its token logprobs and what may follow it
            self.building.prompt_logprobs, self.building.next_logprobs = unit_math.prefix_output_unit(
                layer, weights, x, batch)
            return
        tokens = unit_math.output_unit(layer, weights, x, batch, self.settings, step == 0 and self.echo_prompt,
                                       self.prefix)
        if tokens is not None:
            self.last_tokens[batch_idx] = tokens
