"""The systems a benchmark suite runs side by side, each timed on the same prompts in the same process.

- `run_engine`: our engine (`flexgen_core.Engine`) under a `Policy`;
- `run_transformers`: transformers' `generate` with the whole model on the compute device, in batches;
- `run_accelerate`: Accelerate big-model inference, as users set it up with transformers: `device_map="auto"`,
  `max_memory` (the budget), `offload_folder`; its hooks load each offloaded module's weights before that
  module's forward and drop them after, so offloaded weights stream in for every forward pass;
- `run_deepspeed`: DeepSpeed ZeRO-Inference (ZeRO stage 3, parameters offloaded to CPU), CUDA only.

Every runner warms up on one prompt, then times generating `gen_len` tokens for every prompt, greedy, load
time excluded. Throughput = generated tokens / wall time (prefill + decode), the FlexGen paper's generation
throughput. Each returns `Measurement`s, which carry what the roofline needs (`roofline.Traffic`).
"""

from __future__ import annotations

import gc
import logging
import math
import tempfile
from dataclasses import dataclass, field

import torch
from common import Timer
from roofline import Traffic
from tqdm import tqdm

log = logging.getLogger(__name__)
MiB = 2**20


@dataclass
class Measurement:
    system: str                 # what ran, e.g. "engine", "Accelerate"
    label: str                  # its configuration in words
    batch: str                  # "8" for generate, "4x2" (GPU batch x batches per block) for the engine
    weights: str                # where the weights lived
    seconds: float | None = None
    tokens: int = 0             # tokens generated in the timed run
    num_prompts: int = 0        # prompts in the timed run
    weights_resident_bytes: int | None = None  # weight bytes held on the budgeted tier(s), staging included
    traffic: Traffic | None = None
    policy: object = None       # the engine's Policy
    status: str = "ok"          # "ok", "skipped: <why>", "failed: <why>"
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.ok and self.seconds else None


def skipped(system: str, label: str, why: str, batch: str = "", weights: str = "") -> Measurement:
    return Measurement(system, label, batch, weights, status=f"skipped: {why}")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- our engine -----------------------------------------------------------------------------------

def run_engine(path, prompts: list[list[int]], gen_len: int, policy, label: str, device: str = "cpu",
               dtype: str = "float32", offload_root: str | None = None) -> Measurement:
    from flexgen_core import Engine
    from flexgen_core.runtime.capacity import PolicyDoesNotFit

    batch = f"{policy.gpu_batch_size}x{policy.num_gpu_batches}"
    weights = _percent_placement(policy)
    with tempfile.TemporaryDirectory(prefix="bench-offload.", dir=offload_root) as offload:
        try:
            with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device=device, dtype=dtype) as engine:
                engine.generate(prompts[:1], max_new_tokens=min(2, gen_len))  # warm-up
                with Timer() as t:
                    results = engine.generate(prompts, max_new_tokens=gen_len)
                report = engine.memory(max(map(len, prompts)), gen_len)
                packed = engine.weights.packed_bytes
        except (torch.cuda.OutOfMemoryError, PolicyDoesNotFit) as e:  # the row says so; the suite goes on
            _free_memory()
            return Measurement("engine", label, batch, weights, status=f"failed: {str(e).splitlines()[0]}")
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    cuda = device != "cpu" and torch.cuda.is_available()
    weights = _placement(report.weights, cuda) + (" (4-bit)" if policy.compress_weight else "")
    budgeted = ("gpu",) if cuda else ("gpu", "cpu")  # CPU host: both tiers are host RAM
    resident = sum(report.weights[t] + report.weight_staging[t] for t in budgeted)
    streamed = {"disk": sum(p["disk"] for p in packed)}
    if cuda:
        streamed["cpu"] = sum(p["cpu"] for p in packed)
    blocks = math.ceil(len(prompts) / policy.block_size)
    traffic = Traffic(blocks * gen_len, policy.num_gpu_batches, streamed)
    _free_memory()
    return Measurement("engine", label, batch, weights, seconds=t.seconds, tokens=tokens, num_prompts=len(prompts),
                       weights_resident_bytes=resident, traffic=traffic, policy=policy,
                       extra={"memory": {"accounted_gpu_peak_bytes": report.peak["gpu"]}})


def _percent_placement(policy) -> str:
    return "percent " + " ".join(map(str, policy.percent[:2]))


def _placement(weight_bytes: dict[str, int], cuda: bool) -> str:
    """Shares of the stored weight bytes per tier, e.g. '17% RAM, 83% disk' (the policy's percentages
    apply per weight, by the midpoint rule of placement.weight_tiers, so bytes are what to compare)."""
    places = {"GPU": weight_bytes["gpu"], "CPU": weight_bytes["cpu"]} if cuda else \
        {"RAM": weight_bytes["gpu"] + weight_bytes["cpu"]}
    places["disk"] = weight_bytes["disk"]
    return _shares(places)


def _shares(places: dict[str, int]) -> str:
    total = sum(places.values()) or 1
    return ", ".join(f"{100 * n / total:.0f}% {name}" for name, n in places.items() if n)


# ---- transformers generate --------------------------------------------------------------------------

def _generate_batches(model, prompts, gen_len: int, batch: int, device, desc: str) -> int:
    """Greedy `generate` over `prompts` in chunks of `batch`, left-padded; returns tokens generated."""
    tokens = 0
    for start in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", leave=False):
        chunk = prompts[start:start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[1] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, min_new_tokens=gen_len,
                             do_sample=False, pad_token_id=1)
        tokens += (out.shape[1] - width) * len(chunk)
    return tokens


def _warm_up(model, prompts, device) -> None:
    ids = torch.tensor([prompts[0]], device=device)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=1)


def run_transformers(path, prompts: list[list[int]], gen_len: int, batches: list[int], device: str = "cpu",
                     dtype: str = "float32", prompts_for_batch: dict[int, list[list[int]]] | None = None,
                     ) -> list[Measurement]:
    """One load, then one timed run per batch size. `prompts_for_batch` may give a batch size its own
    (sub)set of the prompts (batch 1 on a subset: each sequence runs alone, so the rate is the same)."""
    from transformers import AutoModelForCausalLM

    place = "RAM" if device == "cpu" else "GPU"
    label, whole = f"transformers generate (whole model in {place})", f"100% {place}"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    except torch.cuda.OutOfMemoryError:
        _free_memory()
        return [skipped("transformers", label, "the model does not fit on the device", str(b), whole)
                for b in batches]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    with torch.inference_mode():
        _warm_up(model, prompts, device)
        for batch in batches:
            own = (prompts_for_batch or {}).get(batch, prompts)
            try:
                with Timer() as t:
                    tokens = _generate_batches(model, own, gen_len, batch, device, f"transformers batch {batch}")
            except torch.cuda.OutOfMemoryError:
                _free_memory()
                rows.append(skipped("transformers", label, "out of memory at this batch", str(batch), whole))
                continue
            traffic = Traffic(math.ceil(len(own) / batch) * gen_len)
            rows.append(Measurement("transformers", label, str(batch), whole, seconds=t.seconds, tokens=tokens,
                                    num_prompts=len(own), weights_resident_bytes=weight_bytes, traffic=traffic))
    del model
    _free_memory()
    return rows


# ---- Accelerate ---------------------------------------------------------------------------------------

def run_accelerate(path, prompts: list[list[int]], gen_len: int, batches: list[int], max_memory: dict,
                   device: str = "cpu", dtype: str = "float32", offload_root: str | None = None,
                   prompts_for_batch: dict[int, list[list[int]]] | None = None,
                   first_fit: bool = False) -> list[Measurement]:
    """Accelerate big-model inference under `max_memory` (accelerate's own keys: 0 for GPU 0, "cpu"); what
    does not fit goes to disk. One load, then one timed run per batch size; with `first_fit`, `batches` are
    tried in order until one runs without running out of GPU memory, and only that one is reported (the
    ones that ran out are listed in its row's `extra`)."""
    from transformers import AutoModelForCausalLM

    from flexgen_core.plan.hardware import format_size

    budget = ", ".join(f"{k}: {format_size(v)}" for k, v in max_memory.items())
    label = f"Accelerate device_map=auto, max_memory {budget}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-accelerate.", dir=offload_root) as offload:
        model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory=max_memory,
                                                     offload_folder=offload, dtype=getattr(torch, dtype)).eval()
        device_map = dict(getattr(model, "hf_device_map", {}))
        # Offloaded parameters stay on the meta device between forward passes; the rest are resident.
        by_device: dict[str, int] = {}
        for p in model.parameters():
            by_device[p.device.type] = by_device.get(p.device.type, 0) + p.numel() * p.element_size()
        placed = _module_bytes(model, device_map)
        streamed_tiers = {"disk": placed.get("disk", 0)}
        if device != "cpu":
            streamed_tiers["cpu"] = placed.get("cpu", 0)
        budgeted = "cuda" if device != "cpu" else "cpu"
        resident = by_device.get(budgeted, 0)
        names = {"cuda": "GPU", "cpu": "CPU" if device != "cpu" else "RAM", "disk": "disk"}
        weights = _shares({names[k]: n for k, n in placed.items()})
        out_of_memory: list[int] = []
        with torch.inference_mode():
            _warm_up(model, prompts, device)
            for batch in batches:
                own = (prompts_for_batch or {}).get(batch, prompts)
                try:
                    with Timer() as t:
                        tokens = _generate_batches(model, own, gen_len, batch, device, f"Accelerate batch {batch}")
                except torch.cuda.OutOfMemoryError:
                    _free_memory()
                    out_of_memory.append(batch)
                    if not first_fit:
                        rows.append(skipped("Accelerate", label, "out of memory at this batch", str(batch), weights))
                    continue
                traffic = Traffic(math.ceil(len(own) / batch) * gen_len, 1, streamed_tiers)
                rows.append(Measurement("Accelerate", label, str(batch), weights, seconds=t.seconds, tokens=tokens,
                                        num_prompts=len(own), weights_resident_bytes=resident, traffic=traffic,
                                        extra={"device_map": device_map, "out_of_memory_at_batch": out_of_memory}))
                if first_fit:
                    break
        if first_fit and not rows:
            rows.append(skipped("Accelerate", label, "out of memory at every batch tried: "
                                + ", ".join(map(str, out_of_memory)), "/".join(map(str, batches)), weights))
        del model
        _free_memory()
    return rows


def _module_bytes(model, device_map: dict) -> dict[str, int]:
    """Parameter bytes per place of `device_map` ("disk", "cpu", or a GPU index counted as "cuda")."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for prefix, place in sorted(device_map.items(), key=lambda kv: -len(kv[0])):
        module = model.get_submodule(prefix) if prefix else model
        key = "cuda" if isinstance(place, int) or str(place).startswith("cuda") else str(place)
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


# ---- DeepSpeed ZeRO-Inference -------------------------------------------------------------------------

def deepspeed_unavailable(device: str) -> str | None:
    """Why DeepSpeed cannot run here, or None."""
    if device == "cpu" or not torch.cuda.is_available():
        return "ZeRO-Inference runs on CUDA GPUs only"
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # not installed, or installed without its CUDA ops
        return f"deepspeed does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def run_deepspeed(path, prompts: list[list[int]], gen_len: int, batches: list[int], dtype: str = "float16",
                  prompts_for_batch: dict[int, list[list[int]]] | None = None) -> list[Measurement]:
    """ZeRO stage 3 with parameters offloaded to pinned CPU memory (DeepSpeed's ZeRO-Inference recipe):
    each layer's parameters are gathered onto the GPU for its forward, every forward pass."""
    label = "DeepSpeed ZeRO-Inference (stage 3, parameters on CPU)"
    why = deepspeed_unavailable("cuda")
    if why:
        return [skipped("DeepSpeed", label, why, str(b), "100% cpu") for b in batches]
    import os

    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    rows = []
    try:
        deepspeed.init_distributed()
        config = {
            "fp16": {"enabled": dtype == "float16"},
            "bf16": {"enabled": dtype == "bfloat16"},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                  "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": max(batches),
        }
        keep = HfDeepSpeedConfig(config)  # noqa: F841 - must live while the model loads: zero.Init partitions it
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        engine = deepspeed.initialize(model=model, config_params=config)[0]
        engine.module.eval()
        weight_bytes = sum(p.ds_numel * p.element_size() for p in engine.module.parameters())
        with torch.inference_mode():
            _warm_up(engine.module, prompts, "cuda")
            for batch in batches:
                own = (prompts_for_batch or {}).get(batch, prompts)
                try:
                    with Timer() as t:
                        tokens = _generate_batches(engine.module, own, gen_len, batch, "cuda",
                                                   f"DeepSpeed batch {batch}")
                except torch.cuda.OutOfMemoryError:
                    _free_memory()
                    rows.append(skipped("DeepSpeed", label, "out of memory at this batch", str(batch), "100% cpu"))
                    continue
                traffic = Traffic(math.ceil(len(own) / batch) * gen_len, 1, {"cpu": weight_bytes})
                rows.append(Measurement("DeepSpeed", label, str(batch), "100% cpu", seconds=t.seconds, tokens=tokens,
                                        num_prompts=len(own), weights_resident_bytes=0, traffic=traffic))
        del engine, model
    except Exception as e:  # a baseline that fails is reported in its row; the suite goes on
        log.exception("DeepSpeed failed")
        done = {r.batch for r in rows}
        rows += [Measurement("DeepSpeed", label, str(b), "100% cpu", status=f"failed: {type(e).__name__}: {e}")
                 for b in batches if str(b) not in done]
    _free_memory()
    return rows
