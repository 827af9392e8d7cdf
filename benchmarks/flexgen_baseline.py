"""FlexGen 0.1.8 (the FlexGen paper's artifact, `pip install flexgen==0.1.8`) as a benchmark baseline.

Its own entry point (`flexgen.flex_opt.run_flexgen`) loads the facebook/opt-30b tokenizer from the Hugging Face
hub only to make prompts, which a machine without network cannot do. This driver builds what that function
builds, without it: an `OptConfig` of the benchmark's OPT shape, an `ExecutionEnv` of `TorchDevice("cuda:0")`,
`TorchDevice("cpu")`, `TorchDisk(offload dir)` and their `TorchMixedDevice`, FlexGen's `Policy` translated from
ours, and `OptLM(config, env, "_DUMMY_", policy)`: FlexGen's benchmark mode, whose weights are all ones (no
checkpoint is read). Prompts are lists of token ids, as its `generate` takes them.

`generate` runs exactly one block (`gpu_batch_size x num_gpu_batches` prompts, asserted there), so the prompts
run block by block and must be a multiple of the block. Like `run_flexgen`, one warm-up call (32-token
prompts, one generated token) comes first. Throughput = generated tokens / wall time of the timed calls, as for
the other systems; FlexGen's own timer (`timers("generate").costs`: the prefill pass, then each decode step)
is kept beside it. Only FlexGen's `flex_opt`, `pytorch_backend`, `utils`, `timer` and `compression` modules are
imported (they need `attrs`, not `pulp`, which only its policy-search scripts use).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import tempfile
import time

import torch
from roofline import Traffic
from systems import Measurement

from flexgen_core import Policy, memory

FLEXGEN_VERSION = "0.1.8"
SYSTEM = f"FlexGen {FLEXGEN_VERSION}"
WARMUP_PROMPT_LEN = 32  # run_flexgen's warm-up prompts
# FlexGen's 4-bit group-wise compression as run_flexgen configures it: weights grouped along dim 0, the KV
# cache along dim 2 (its cache is (seq, batch * heads, head_dim)).
_COMPRESSION = dict(num_bits=4, group_size=64, symmetric=False)


def flexgen_unavailable(device: str) -> str | None:
    """Why FlexGen 0.1.8 cannot run here, or None."""
    if importlib.util.find_spec("flexgen") is None:
        return f"flexgen {FLEXGEN_VERSION} not installed (pip download --no-deps flexgen=={FLEXGEN_VERSION})"
    try:
        version = importlib.metadata.version("flexgen")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != FLEXGEN_VERSION:
        return f"flexgen {version} is installed, not {FLEXGEN_VERSION}"
    if device != "cuda" or not torch.cuda.is_available():
        return f"FlexGen {FLEXGEN_VERSION} runs on CUDA only (its OptLM makes CUDA streams)"
    return None


def flexgen_config(hf_config):
    """FlexGen's OptConfig for a transformers OPTConfig (its fields have other names)."""
    from flexgen.opt_config import OptConfig

    return OptConfig(name=f"opt-random-{hf_config.num_hidden_layers}x{hf_config.hidden_size}",
                     num_hidden_layers=hf_config.num_hidden_layers, max_seq_len=hf_config.max_position_embeddings,
                     hidden_size=hf_config.hidden_size, n_head=hf_config.num_attention_heads,
                     input_dim=hf_config.word_embed_proj_dim, ffn_embed_dim=hf_config.ffn_dim,
                     vocab_size=hf_config.vocab_size, pad_token_id=hf_config.pad_token_id)


def policy_problem(policy: Policy) -> str | None:
    """Why FlexGen 0.1.8 cannot run `policy`, or None: its OptLM keeps all activations on one tier."""
    if 100 not in (policy.act_gpu_percent, policy.act_cpu_percent, policy.act_disk_percent):
        return (f"FlexGen {FLEXGEN_VERSION} keeps activations on one tier; this policy splits them "
                f"{policy.act_gpu_percent}/{policy.act_cpu_percent}/{policy.act_disk_percent} (GPU/CPU/disk)")
    return None


def flexgen_policy(policy: Policy):
    """FlexGen's Policy for ours."""
    from flexgen.compression import CompressionConfig
    from flexgen.flex_opt import Policy as FlexGenPolicy

    problem = policy_problem(policy)
    if problem:
        raise ValueError(problem)
    return FlexGenPolicy(
        policy.gpu_batch_size, policy.num_gpu_batches, *policy.percent,
        overlap=policy.overlap, sep_layer=True, pin_weight=policy.pin_weight,
        cpu_cache_compute=policy.cpu_cache_compute, attn_sparsity=1.0,
        compress_weight=policy.compress_weight, comp_weight_config=CompressionConfig(group_dim=0, **_COMPRESSION),
        compress_cache=policy.compress_cache, comp_cache_config=CompressionConfig(group_dim=2, **_COMPRESSION))


def run_flexgen(hf_config, model_facts, prompts: list[list[int]], gen_len: int, policy: Policy, label: str,
                offload_root: str | None = None) -> Measurement:
    """FlexGen 0.1.8 under `policy` on the first whole blocks of `prompts` (all of the same length)."""
    block = policy.block_size
    num_blocks = len(prompts) // block
    batch = f"{policy.gpu_batch_size}x{policy.num_gpu_batches}"
    weights = "percent " + " ".join(map(str, policy.percent[:2]))
    if num_blocks == 0:
        return Measurement(SYSTEM, label, batch, weights,
                           status=f"skipped: {len(prompts)} prompts make no whole block of {block}")
    why = flexgen_unavailable("cuda")
    if why:
        return Measurement(SYSTEM, label, batch, weights, status=f"skipped: {why}")
    from flexgen.flex_opt import OptLM
    from flexgen.pytorch_backend import TorchDevice, TorchDisk, TorchMixedDevice
    from flexgen.timer import timers
    from flexgen.utils import ExecutionEnv

    prompts = prompts[:num_blocks * block]
    warmup = [p[:WARMUP_PROMPT_LEN] for p in prompts[:block]]
    with tempfile.TemporaryDirectory(prefix="bench-flexgen.", dir=offload_root) as offload:
        gpu, cpu, disk = TorchDevice("cuda:0"), TorchDevice("cpu"), TorchDisk(offload)
        env = ExecutionEnv(gpu=gpu, cpu=cpu, disk=disk, mixed=TorchMixedDevice([gpu, cpu, disk]))
        try:
            model = OptLM(flexgen_config(hf_config), env, "_DUMMY_", flexgen_policy(policy))
            model.generate(warmup, max_new_tokens=1)
            timers("generate").reset()
            start = _now()
            for block_idx in range(num_blocks):
                model.generate(prompts[block_idx * block:(block_idx + 1) * block], max_new_tokens=gen_len)
            seconds = _now() - start
            costs = list(timers("generate").costs)
            del model
        finally:
            env.close_copy_threads()  # its disk copy threads are not daemons: the process would not exit
    # FlexGen places each layer's weights by the midpoint rule our engine also uses (placement.weight_tiers).
    report = memory.account(model_facts.layers, model_facts.shape, policy, len(prompts[0]), gen_len, 2, separate_device=True)
    streamed = {"cpu": report.weights["cpu"], "disk": report.weights["disk"]}
    traffic = Traffic(math.ceil(len(prompts) / block) * gen_len, policy.num_gpu_batches, streamed)
    timer_s = {"prefill_s": round(sum(costs[::gen_len]), 3), "decode_s": round(sum(costs) - sum(costs[::gen_len]), 3)}
    return Measurement(SYSTEM, label, batch, weights, seconds=seconds, tokens=len(prompts) * gen_len,
                       num_prompts=len(prompts), weights_resident_bytes=report.weights["gpu"], traffic=traffic,
                       policy=policy, extra={"flexgen_timer": timer_s})


def _now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()
