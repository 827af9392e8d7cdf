"""The engine: load a checkpoint onto tiers per a policy, then generate with the block schedule.

    from flexgen_core import Engine, Policy
    with Engine.from_pretrained("facebook/opt-1.3b", policy=Policy(w_gpu_percent=50, w_cpu_percent=50)) as engine:
        results = engine.generate([[2, 100, 200]], max_new_tokens=8)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import os
from typing import Any, Mapping, Sequence

import torch

from flexgen_core import memory, placement
from flexgen_core.models.registry import family_for
from flexgen_core.policy import Policy, auto_compression
from flexgen_core.prefix import common_prefix_len, sharable_prefix_len
from flexgen_core.runtime import checkpoint
from flexgen_core.runtime.capacity import PolicyDoesNotFit, check_fits, mem_available, out_of_memory_error
from flexgen_core.runtime.decoding import (
    DecodeSettings,
    GenerationResult,
    NonFiniteError,
    SequenceState,
    sequence_generator,
)
from flexgen_core.runtime.batch import Batch
from flexgen_core.runtime.prefix_cache import PrefixCache
from flexgen_core.runtime.schedule import BlockRunner, RunContext, SharedPrefix
from flexgen_core.runtime.storage import TORCH_DTYPES, Devices, OffloadDir
from flexgen_core.runtime.weights import WeightStore

log = logging.getLogger(__name__)


def _on_device(method):
    """Run an engine method with the engine's device active (the simulated GPU's tensors; see Devices)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.devices.active():
            return method(self, *args, **kwargs)
    return run


def _as_policy(policy: Policy | Mapping[str, Any] | None) -> Policy:
    parsed = Policy.parse(policy)
    if parsed == "auto":
        raise ValueError("policy='auto' is planned in Engine.from_pretrained, once the model's shape is known")
    return parsed


# The engine's rules about a request, which the HELM client also applies before it batches one.

def context_overflow(prompt_len: int, max_new_tokens: int, max_positions: int) -> str | None:
    """Why a prompt and its new tokens do not fit the model's context, or None."""
    if prompt_len + max_new_tokens <= max_positions:
        return None
    return (f"{prompt_len} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's context of "
            f"{max_positions} positions")


def distinct_completions(num_completions: int, temperature: float, max_new_tokens: int) -> int:
    """Completions that can differ: greedy ones (or none generated) are all the same, computed once."""
    return num_completions if temperature > 0 and max_new_tokens > 0 else 1



def result_host_bytes(sequences: int, prompt_tokens: int, max_new_tokens: int, top_k_logprobs: int,
                      echo_prompt: bool) -> int:
    """A generous estimate of the Python objects a call's results hold: per sequence its record, and
    per generated token an id and a logprob (list slots and objects, ~72 B) and its top-k dict (~120 B
    an entry); echoed prompts add their logprobs and top-k once per prompt."""
    per_token = 72 + 120 * top_k_logprobs
    echoed = prompt_tokens * per_token if echo_prompt else 0
    return sequences * (512 + max_new_tokens * per_token) + echoed

class Engine:
    def __init__(self, folder, config, ctx: RunContext):
        self.folder = folder
        self.config = config
        self.ctx = ctx
        self.runner = BlockRunner(ctx)
        self.prefixes = PrefixCache()  # shared prefixes kept for later calls
        self._closed = False
        self._planning: dict[str, Any] | None = None  # how policy="auto" planned it (for replan)

    # What the blocks share, read from the run context (defined once there).
    layers = property(lambda self: self.ctx.layers)
    weights = property(lambda self: self.ctx.weights)
    policy = property(lambda self: self.ctx.policy)
    devices = property(lambda self: self.ctx.devices)
    dtype = property(lambda self: self.ctx.dtype)
    offload = property(lambda self: self.ctx.offload)
    stats = property(lambda self: self.runner.stats, doc="RunStats: what this engine has computed so far")

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, policy: Policy | Mapping[str, Any] | str | None = None,
                        offload_dir: str | os.PathLike | None = None, device: str = "auto",
                        dtype: str = "float32", hardware=None, prompt_len_hint: int = 512, gen_len_hint: int = 32,
                        num_prompts_hint: int | None = None, compress_weight: bool | None = None,
                        compress_cache: bool | None = None, shared_prefix_len_hint: int = 0,
                        compress: str = "never") -> "Engine":
        """`policy="auto"` plans the policy (plan/search.py) for prompts of `prompt_len_hint` tokens
        (the first `shared_prefix_len_hint` of them shared by all prompts, as HELM's few-shot prompts are)
        generating `gen_len_hint`, at most `num_prompts_hint` sequences per block, on `hardware`: a
        HardwareProfile, a built-in profile name or a profile file; by default `$FLEXGEN_HARDWARE` or this
        machine's measured profile (measured once and kept, see plan.profiler.resolve). It plans exact
        policies only, unless `compress="allow"` lets it choose 4-bit weights or cache where its cost
        model says they pay (a lossy change, logged as such); `compress_weight` / `compress_cache` fix
        either switch. Those three go with `policy="auto"` only: a given policy carries its own switches."""
        auto = isinstance(policy, str) and policy == "auto"
        if not auto and (compress_weight is not None or compress_cache is not None or compress != "never"):
            raise ValueError("compress, compress_weight and compress_cache go with policy='auto'; "
                             "set the switches in the Policy instead")
        policy = None if auto else _as_policy(policy)
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
        devices = Devices(device)
        folder, family, config = read_model(name_or_path)
        layers = family.build_layers(config)
        if auto:
            from flexgen_core.plan.auto import plan_for_engine

            compress_weight, compress_cache = auto_compression(compress, compress_weight, compress_cache)
            planning = dict(hardware=hardware, offload_dir=offload_dir, compress_weight=compress_weight,
                            compress_cache=compress_cache)
            policy = plan_for_engine(name=str(folder), config=config, layers=layers,
                                     device_type=devices.profile_device, dtype_bytes=TORCH_DTYPES[dtype].itemsize,
                                     prompt_len=prompt_len_hint, gen_len=gen_len_hint, num_prompts=num_prompts_hint,
                                     shared_prefix_len=shared_prefix_len_hint, **planning)
        files = checkpoint.weight_files(folder)
        sources = _match_checkpoint(layers, checkpoint.checkpoint_keys(files), folder)

        offload = OffloadDir(offload_dir)
        with devices.active():
            try:
                needs = memory.MemoryReport()
                memory.add_weight_terms(needs, layers, policy, TORCH_DTYPES[dtype].itemsize, devices.separate_device)
                check_fits(_sum_terms(needs, ("weights", "weight_staging")), devices, offload.path, policy,
                           "the weights")
                weights = WeightStore(layers, policy, devices, TORCH_DTYPES[dtype], offload)
                for key, tensor in checkpoint.iter_tensors(files, set(sources)):
                    for layer_idx, name in sources[key]:
                        weights.put(layer_idx, name, tensor, source=f"checkpoint tensor {key!r}")
                    del tensor
                ctx = RunContext(layers, weights, config, policy, devices, TORCH_DTYPES[dtype], offload)
                engine = cls(folder, config, ctx)
            except BaseException:
                offload.close()
                raise
        log.info("loaded %s (%s, %d layers) with policy %s on %s", folder, config.family, config.num_layers,
                 policy.percent, devices.compute)
        engine._planning = planning if auto else None
        return engine

    # ---- re-planning --------------------------------------------------------------------------------
    def replan(self, prompt_len_hint: int, gen_len_hint: int, num_prompts_hint: int | None = None,
               shared_prefix_len_hint: int = 0) -> Policy:
        """Plan again for calls of another shape (an engine loaded with policy="auto" only, with the same
        hardware and compression settings). The plan keeps the loaded weights unless moving them is
        faster by more than the planner's tie tolerance. A plan that keeps them is applied at once
        (use_block_policy); one that moves them is returned for the caller to load anew."""
        if self._planning is None:
            raise ValueError("only an engine loaded with policy='auto' re-plans")
        from flexgen_core.plan.auto import plan_for_engine

        planning = self._planning
        policy = plan_for_engine(name=str(self.folder), config=self.config, layers=self.layers,
                                 device_type=self.devices.profile_device, dtype_bytes=self.dtype.itemsize,
                                 prompt_len=prompt_len_hint, gen_len=gen_len_hint, num_prompts=num_prompts_hint,
                                 shared_prefix_len=shared_prefix_len_hint, current=self.policy, **planning)
        if policy.keeps_weights(self.policy):
            self.use_block_policy(policy)
        return policy

    def use_block_policy(self, policy: Policy) -> None:
        """Run later calls under `policy`, on the weights as loaded: it may change the block's shape, the
        KV cache's and activations' placement, CPU attention, cache compression and prefix sharing, not
        the fields the loaded weights depend on (policy.WEIGHT_FIELDS). Kept shared prefixes stay unless
        the cache's placement or compression changes (their K/V lie where the old policy put them)."""
        from flexgen_core.policy import WEIGHT_FIELDS

        changed = [f for f in WEIGHT_FIELDS if getattr(policy, f) != getattr(self.policy, f)]
        if changed:
            raise ValueError(f"the loaded weights fix {', '.join(changed)}; load the engine anew for that policy")
        if policy == self.policy:
            return
        cache_layout = ("cache_gpu_percent", "cache_cpu_percent", "cpu_cache_compute", "compress_cache", "share_prefix")
        if any(getattr(policy, f) != getattr(self.policy, f) for f in cache_layout):
            self.prefixes.drop()
        self.ctx = dataclasses.replace(self.ctx, policy=policy)
        self.runner.ctx = self.ctx

    # ---- generation -------------------------------------------------------------------------------
    @_on_device
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, num_completions: int = 1, stop: Sequence[Sequence[int]] | None = None,
                 echo_prompt: bool = False, top_k_logprobs: int = 0,
                 seed: int | Sequence[int] | None = None,
                 forced_tokens: Sequence[Sequence[int]] | None = None) -> list[GenerationResult]:
        """Generate for every prompt (token-id lists used as given). See README for the result fields.

        `forced_tokens` (one list per prompt, at least `max_new_tokens` long) are fed instead of the
        chosen tokens and scored: the logprobs of a given continuation through the decode path (with
        its KV cache, compressed or not), e.g. for perplexity."""
        if self._closed:
            raise ValueError("this engine is closed")
        prompts = [list(p) for p in prompts]
        seeds = self._validate(prompts, max_new_tokens, temperature, top_p, num_completions, stop,
                               top_k_logprobs, seed, echo_prompt)
        if not prompts:
            return []
        settings = DecodeSettings(max_new_tokens, float(temperature), float(top_p), top_k_logprobs,
                                  tuple(tuple(_token_ids(s, "a stop sequence")) for s in stop or ()),
                                  self.config.eos_token_id)
        # Greedy completions of one prompt are identical: compute one and copy it.
        distinct = distinct_completions(num_completions, temperature, max_new_tokens)
        forced = None
        if forced_tokens is not None:
            if len(forced_tokens) != len(prompts) or any(len(f) < max_new_tokens for f in forced_tokens):
                raise ValueError(f"forced_tokens needs one list of >= max_new_tokens={max_new_tokens} tokens per prompt")
            forced = [list(f) for f in forced_tokens]
            self._validate(forced, 0, 0.0, 1.0, 1, None, 0, 0)
        seqs = [
            SequenceState(prompt, sequence_generator(seeds[p_idx], c_idx) if temperature > 0 else None,
                     list(forced[p_idx]) if forced is not None else None)
            for p_idx, prompt in enumerate(prompts) for c_idx in range(distinct)
        ]
        # Longest first, so each block pads little.
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].prompt))
        prefix = self._shared_prefix([s.prompt for s in seqs])
        block = self.policy.block_size
        for start in range(0, len(order), block):
            self._run_block([seqs[i] for i in order[start:start + block]], settings, echo_prompt, prefix)

        results = []
        for p_idx, prompt in enumerate(prompts):
            own = seqs[p_idx * distinct:(p_idx + 1) * distinct]
            completions = [own[c % distinct].out for c in range(num_completions)]
            if distinct == 1 and num_completions > 1:
                completions = [completions[0]] + [_copy(c) for c in completions[1:]]
            results.append(GenerationResult(prompt, completions, own[0].prompt_logprobs if echo_prompt else None))
        return results

    def _run_block(self, seqs: list[SequenceState], settings: DecodeSettings, echo_prompt: bool,
                   prefix: SharedPrefix | None) -> None:
        shared = prefix.length if prefix is not None else 0
        prompt_len = max(len(s.prompt) for s in seqs) - shared  # each prompt's own tokens, after the prefix
        pad_id = 0
        batches = []
        for start in range(0, len(seqs), self.policy.gpu_batch_size):
            members = seqs[start:start + self.policy.gpu_batch_size]
            pads = [prompt_len - (len(s.prompt) - shared) for s in members]
            ids = torch.tensor([[pad_id] * pad + s.prompt[shared:] for pad, s in zip(pads, members)],
                               dtype=torch.long, device=self.devices.compute)
            batches.append(Batch.of(ids, pads, members, offset=shared))
        needs = memory.MemoryReport()
        memory.add_block_terms(needs, self.layers, self.config, self.policy, prompt_len, settings.max_new_tokens,
                               self.dtype.itemsize, self.devices.separate_device, echo_prompt, shared)
        what = f"a block of {len(seqs)} sequences of {shared}+{prompt_len}+{settings.max_new_tokens} tokens"
        self._check_block(needs, what, keep=prefix)
        try:
            self.runner.run(batches, settings, echo_prompt, prefix)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {self._nonfinite_source()}") from None
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()  # the block's buffers are already released by the runner
            raise out_of_memory_error(self.policy, e) from None

    def _check_block(self, needs: memory.MemoryReport, what: str, keep: SharedPrefix | None = None) -> None:
        """A block's cache, activations and compute workspace (the largest layer's transient tensors,
        memory.workspace_bound), with a shared prefix's K/V already held, must fit what is free;
        prefixes kept from earlier calls (but `keep`) are let go first if that makes it fit."""
        terms = _sum_terms(needs, ("cache", "cache_staging", "activations", "workspace"))
        try:
            check_fits(terms, self.devices, self.offload.path, self.policy, what)
        except PolicyDoesNotFit:
            if not self.prefixes.drop(keep=keep):
                raise
            check_fits(terms, self.devices, self.offload.path, self.policy, what)

    # ---- shared prefixes ------------------------------------------------------------------------
    def _shared_prefix(self, prompts: list[list[int]]) -> SharedPrefix | None:
        """The prefix the sequences of this call share, computed once (or kept from an earlier call).

        The longest common token prefix, leaving each sequence at least one token of its own. A kept
        prefix (runtime/prefix_cache.py) is reused while every prompt starts with it, unless a longer common
        prefix saves more prompt tokens than computing it costs; a new one needs
        SHARED_PREFIX_MIN_TOKENS tokens (the rules: flexgen_core/prefix.py)."""
        if not self.policy.share_prefix:
            return None
        common = common_prefix_len(prompts)
        kept = self.prefixes.find(prompts, common)
        if kept is not None:
            self.runner.stats.prefixes_reused += 1
            return kept
        if sharable_prefix_len(prompts) == 0:
            return None
        self.prefixes.make_room()
        needs = memory.MemoryReport()
        memory.add_shared_prefix_terms(needs, self.layers, self.config, self.policy, common, self.dtype.itemsize,
                                       self.devices.separate_device)
        self._check_block(needs, f"a shared prefix of {common} tokens")
        try:
            prefix = self.runner.run_prefix(prompts[0][:common])
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {self._nonfinite_source()}") from None
        self.prefixes.add(prefix)
        log.info("computed a shared prefix of %d tokens for %d sequences (kept for later calls)", common, len(prompts))
        return prefix

    def _nonfinite_source(self) -> str:
        """Where NaN or inf logits came from: the first stored weight holding such values (layer, tier,
        file), or, with every weight finite, the activations."""
        found = self.weights.nonfinite()
        if not found:
            hint = " (float16 overflows past 65504: try bfloat16 or float32)" if self.dtype == torch.float16 else ""
            return (f"every stored weight is finite: the values arose in the activations or the KV cache, "
                    f"computed in {str(self.dtype).removeprefix('torch.')}{hint}")
        layer_idx, name, tier, count = found[0]
        file = self.weights.disk_files[layer_idx]
        where = f" (offload file {file.path})" if tier == "disk" and file is not None else ""
        return (f"weight {self.layers[layer_idx].name}.{name} on the {tier} tier{where} holds {count} NaN or "
                f"infinite values ({len(found)} corrupt weights in all; it was finite when loaded: the stored "
                "copy was overwritten). Nothing of this call was returned; load the engine again")

    # A call holds every sequence's results until it returns: more than this many is refused up front
    # (split the call, or set `engine.max_sequences`), as is a call whose results would not fit in RAM.
    max_sequences = 65_536

    def _check_call_size(self, prompts, max_new_tokens: int, num_completions: int, top_k_logprobs: int,
                         echo_prompt: bool) -> None:
        sequences = len(prompts) * num_completions
        what = (f"this call holds {sequences:,} sequences ({len(prompts):,} prompt(s) x {num_completions:,} "
                f"completion(s))")
        if sequences > self.max_sequences:
            raise ValueError(f"{what}, more than the engine's limit of {self.max_sequences:,} per call: split "
                             f"the call, or raise the limit with engine.max_sequences = N")
        needed = result_host_bytes(sequences, sum(map(len, prompts)), max_new_tokens, top_k_logprobs, echo_prompt)
        free = mem_available()
        if free is not None and needed > free // 2:
            raise ValueError(f"{what}; their results need about {needed / 2**30:.1f} GiB of RAM and "
                             f"{free / 2**30:.1f} GiB are available: split the call")

    def _validate(self, prompts, max_new_tokens, temperature, top_p, num_completions, stop, top_k_logprobs,
                  seed, echo_prompt: bool = False) -> list[int]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not 0 <= temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(num_completions, int) or num_completions < 1:
            raise ValueError(f"num_completions must be an integer >= 1, got {num_completions!r}")
        if not isinstance(top_k_logprobs, int) or top_k_logprobs < 0:
            raise ValueError(f"top_k_logprobs must be an integer >= 0, got {top_k_logprobs!r}")
        self._check_call_size(prompts, max_new_tokens, num_completions, top_k_logprobs, echo_prompt)
        for s in stop or ():
            if len(s) == 0:
                raise ValueError("stop sequences must be non-empty token-id lists")
            _token_ids(s, "a stop sequence")
        vocab, limit = self.config.vocab_size, self.config.max_positions
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            prompt[:] = _token_ids(prompt, f"prompt {i}")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
            overflow = context_overflow(len(prompt), max_new_tokens, limit)
            if overflow:
                raise ValueError(f"prompt {i}: {overflow}")
        if seed is None:
            return [int(torch.seed()) for _ in prompts]
        if _is_int(seed):
            return [operator.index(seed)] * len(prompts)
        if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence) or \
                not all(v is None or _is_int(v) for v in seed):
            raise ValueError(f"seed must be an integer or a list of one integer (or None) per prompt, got {seed!r}")
        if len(seed) != len(prompts):
            raise ValueError(f"seed has {len(seed)} values for {len(prompts)} prompts")
        return [int(torch.seed()) if v is None else operator.index(v) for v in seed]

    # ---- memory -------------------------------------------------------------------------------
    def memory(self, prompt_len: int, gen_len: int, echo_prompt: bool = False) -> memory.MemoryReport:
        """Bytes per tier for a block of prompts padded to `prompt_len` generating `gen_len` tokens."""
        return memory.account(self.layers, self.config, self.policy, prompt_len, gen_len, self.dtype.itemsize,
                              self.devices.separate_device, echo_prompt)

    # ---- lifetime -----------------------------------------------------------------------------
    @_on_device
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.prefixes.drop()
            self.runner.close()
            self.offload.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_model(name_or_path: str | os.PathLike):
    """(local folder, model family, ModelConfig) of a checkpoint, without loading its weights."""
    folder = checkpoint.resolve(name_or_path)
    hf_config = checkpoint.read_config(folder)
    family = family_for(hf_config)
    return folder, family, family.config_from_hf(hf_config)


def _is_int(value) -> bool:
    """Python, numpy and torch integers (not bools, not floats)."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == torch.bool:
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _token_ids(tokens, what: str) -> list[int]:
    """`tokens` as plain ints: Python, numpy and torch integers are token ids; anything else
    (floats, bools, strings) is a ValueError naming it."""
    bad = [t for t in tokens if not _is_int(t)]
    if bad:
        raise ValueError(f"{what} has {len(bad)} value(s) that are not integer token ids, e.g. {bad[0]!r}")
    return [operator.index(t) for t in tokens]


def _sum_terms(report: memory.MemoryReport, terms) -> dict[str, int]:
    return {tier: sum(getattr(report, term)[tier] for term in terms) for tier in placement.TIERS}


def _copy(completion):
    from dataclasses import replace

    return replace(completion, token_ids=list(completion.token_ids), logprobs=list(completion.logprobs),
                   top_logprobs=[dict(t) for t in completion.top_logprobs])


def _match_checkpoint(layers, keys: set[str], folder) -> dict[str, list[tuple[int, str]]]:
    """checkpoint key -> the (layer, weight) places it fills; tied weights fill two."""
    sources: dict[str, list[tuple[int, str]]] = {}
    for layer_idx, layer in enumerate(layers):
        for spec in layer.specs:
            key = next((k for k in spec.checkpoint_names if k in keys), None)
            if key is None:
                raise ValueError(
                    f"checkpoint {str(folder)!r} has no tensor for {layer.name}.{spec.name} "
                    f"(looked for {spec.checkpoint_names[0]!r})"
                )
            sources.setdefault(key, []).append((layer_idx, spec.name))
    return sources
