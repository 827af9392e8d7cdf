"""The planner with a shared prompt prefix (engine._shared_prefix): hand-computed costs on the toy model of
test_cost_model.py, the memory accounting against what the engine really allocates, the planner's larger
blocks, and `flexgen plan --shared-prefix-len`.

Toy case: prompts of S = 8 tokens, the first P = 6 shared, so each sequence has OWN = 2 of its own; N = 4
generated; GPU batch B = 2. Every figure compared is predicted arithmetic, never a wall time.
"""

import json
import logging
import math

import pytest

from flexgen_core import Engine, memory
from flexgen_core.cli import main
from flexgen_core.plan.cost_model import CostModel
from flexgen_core.plan.forms import TierShares
from flexgen_core.plan.memory_model import SharedPrefixMemory
from flexgen_core.plan.workload import Switches, Workload
from flexgen_core.plan.hardware import GiB, load_profile, parse_size
from flexgen_core.plan.lp import PlacementLP
from flexgen_core.plan.search import (
    PlanInfeasible,
    PlanOptions,
    _Evaluator,
    plan,
    usable_memory,
)
from flexgen_core.plan.auto import plan_for_engine
from flexgen_core.plan.shapes import load_model
from flexgen_core.placement import TIERS
from flexgen_core.policy import Policy
from flexgen_core.runtime.schedule import BlockRunner
from flexgen_core.testing import build_checkpoint, sample_prompts
from test_cost_model import (
    ALL_GPU,
    ATTN_DECODE,
    MLP_DECODE,
    OUT_DECODE,
    OUT_PREFILL,
    B,
    N,
    S,
    lanes_of,
    policy,
    toy_hardware,
    toy_model,
)
from test_memory import EXACT_TERMS, POLICIES

P = 6
OWN = S - P
T4 = load_profile("t4-gcp")


def shared_cost(prefix_len: int = P, **hw_changes) -> CostModel:
    return CostModel(toy_model(), Workload(S, N, prefix_len), toy_hardware(**hw_changes), dtype_bytes=2)


# ---- the workload -----------------------------------------------------------------------------------

def test_workload_splits_each_prompt_into_prefix_and_own_tokens():
    wl = Workload(S, N, P)
    assert (wl.own_len, wl.total_len, wl.cache_len) == (2, 12, 6)
    assert wl.decode_rows_loaded == 3   # own rows: steps 1..3 read 2, 3, 4
    assert wl.decode_keys == 10         # every sequence still attends over the prefix: 9, 10, 11 keys
    assert wl.decode_own_keys == 4
    assert wl.unshared() == Workload(S, N) == Workload(S, N, 0)
    for bad in (-1, S, S + 5, 2.0, True, None):
        with pytest.raises(ValueError, match=r"shared_prefix_len .*\[0, prompt_len=8\)"):
            Workload(S, N, bad)


# ---- time ---------------------------------------------------------------------------------------------

# The toy's per-layer compute at B = 2 with the prefix shared: matmuls over the OWN rows only, prompt
# attention of OWN queries over all S keys; decode is as without sharing (every key is still attended).
ATTN_PREFILL_SHARED = 2 * B * OWN * 4 * 64 * 64 / 1e9 + 4 * B * OWN * S * 64 / 1e8
MLP_PREFILL_SHARED = 2 * B * OWN * 2 * 256 * 64 / 1e9
# The prefix's own pass: one sequence of P tokens, logits at every position.
PREFIX_PASS = (2 * P * 4 * 64 * 64 / 1e9 + 4 * P * P * 64 / 1e8) + 2 * P * 2 * 256 * 64 / 1e9 + 2 * P * 100 * 64 / 1e9


def test_all_on_gpu_prefill_computes_own_tokens_and_the_prefix_once():
    est = shared_cost().estimate(policy(ALL_GPU))
    assert est.prefill_s == pytest.approx(ATTN_PREFILL_SHARED + MLP_PREFILL_SHARED + OUT_PREFILL)
    assert est.decode_s == pytest.approx(3 * (ATTN_DECODE + MLP_DECODE + OUT_DECODE))
    assert est.prefix_s == pytest.approx(PREFIX_PASS)
    assert set(est.breakdown["prefix"]) == {"compute.matmul", "compute.attention"}
    # Throughput stays the paper's per-block figure; a run adds the prefix's pass once.
    assert est.throughput == pytest.approx(B * N / est.total_s)
    assert est.run_seconds(5) == pytest.approx(PREFIX_PASS + 3 * est.total_s)  # ceil(5 / 2) blocks
    with pytest.raises(ValueError, match="num_sequences"):
        est.run_seconds(0)


def test_sharing_shrinks_prefill_by_the_own_share():
    unshared = CostModel(toy_model(), Workload(S, N), toy_hardware(), 2).estimate(policy(ALL_GPU))
    shared = shared_cost().estimate(policy(ALL_GPU))
    # The output layer computes logits of the last position either way; the rest scales by OWN / S.
    ratio = (shared.prefill_s - OUT_PREFILL) / (unshared.prefill_s - OUT_PREFILL)
    assert ratio == pytest.approx(OWN / S)


def test_decode_reads_own_rows_per_batch_and_the_prefix_once_per_layer():
    pol = policy([100, 0, 0, 100, 100, 0], num_gpu_batches=2)
    row = 2 * B * 64 * 2           # K and V of one position of a batch: 512 bytes
    prefix = P * 2 * 1 * 64 * 2    # the prefix's rows, one sequence: 1,536 bytes, host -> device
    decode = lanes_of(shared_cost(), pol, "decode")
    per_layer = 2 * 3 * row / 1e6  # 2 batches x 3 own rows
    assert decode["attention"]["load"] == pytest.approx(per_layer / 2)               # batch 2
    assert decode["input"]["load"] == pytest.approx(per_layer / 2 + prefix / 1e6)   # batch 1 and the prefix
    assert decode["mlp"]["load"] == 0 and decode["output"]["load"] == 0
    prefill = lanes_of(shared_cost(), pol, "prefill")
    assert prefill["input"]["load"] == pytest.approx(prefix / 1e6)  # the prompt pass reads it too
    assert prefill["attention"]["store"] == pytest.approx(2 * OWN * row / 1e6)  # only the own rows go home
    # Once per (layer, step) for the whole block, whatever its batches.
    for gpu_batch_size, num_gpu_batches in ((1, 1), (2, 2), (4, 3)):
        pol = policy([100, 0, 0, 100, 100, 0], gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches)
        est = shared_cost().estimate(pol)
        assert est.breakdown["decode"]["load.prefix"] == pytest.approx(3 * prefix / 1e6)
        assert est.breakdown["prefill"]["load.prefix"] == pytest.approx(prefix / 1e6)


def test_compressed_cache_reads_the_prefixs_4_bit_copy_in_decode():
    cost = shared_cost(decompress=1e6)
    est = cost.estimate(policy([100, 0, 0, 100, 100, 0], compress_cache=True))
    prefix = P * 2 * 64 * 2
    assert est.breakdown["prefill"]["load.prefix"] == pytest.approx(prefix / 1e6)  # exact rows
    assert est.breakdown["decode"]["load.prefix"] == pytest.approx(3 * prefix * cost.memory_model.cache_ratio / 1e6)
    # Decompressed per step: each batch's own rows (4 keys on average) and the prefix's once.
    dense_own, dense_prefix = 4 * 2 * B * 64 * 2, prefix
    assert est.breakdown["decode"]["compute.decompress_cache"] == pytest.approx(3 * (dense_own + dense_prefix) / 1e6)


def test_sharing_off_or_no_prefix_costs_as_before():
    pol = policy([30, 30, 25, 50, 50, 0], num_gpu_batches=2)
    unshared = CostModel(toy_model(), Workload(S, N), toy_hardware(), 2)
    zero = CostModel(toy_model(), Workload(S, N, 0), toy_hardware(), 2)
    assert zero.estimate(pol).to_dict() == unshared.estimate(pol).to_dict()
    off = pol.replace(share_prefix=False)
    assert shared_cost().estimate(off).to_dict() == unshared.estimate(off).to_dict()
    assert unshared.estimate(pol).prefix_s == 0 and "prefix" not in unshared.estimate(pol).breakdown


# ---- memory -------------------------------------------------------------------------------------------

def test_cache_and_activations_shrink_to_the_own_rows():
    model = load_model("facebook/opt-1.3b")
    prompt, gen, prefix = 512, 32, 384
    for compress in (False, True):
        pol = Policy.from_percent([50, 50, 20, 30, 50, 50], gpu_batch_size=4, num_gpu_batches=3,
                                  compress_cache=compress)
        shared = CostModel(model, Workload(prompt, gen, prefix), T4, 2).memory_model.exact_memory(pol)
        unshared = CostModel(model, Workload(prompt, gen), T4, 2).memory_model.exact_memory(pol)
        for tier in TIERS:
            assert shared.cache[tier] * (prompt + gen) == unshared.cache[tier] * (prompt - prefix + gen)
            assert shared.activations[tier] * prompt == unshared.activations[tier] * (prompt - prefix)
        assert shared.weights == unshared.weights


def test_prefix_kv_is_one_sequence_on_the_cache_tiers():
    model = load_model("facebook/opt-1.3b")
    pol = Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=8, num_gpu_batches=2)
    report = CostModel(model, Workload(512, 32, 448), T4, 2).memory_model.exact_memory(pol)
    assert isinstance(report, SharedPrefixMemory)
    rows = 448 * 2 * model.shape.kv_width * 2  # K and V of 448 positions, one sequence, fp16, per layer
    # All in RAM, attended on the GPU: 24 layers' worth on the host, two layers' staging slots on the device.
    assert report.shared_prefix == {"gpu": 2 * rows, "cpu": 24 * rows, "disk": 0}
    assert report.block_peak == {t: sum(getattr(report, term)[t] for term in report.TERMS) for t in TIERS}


def test_peak_is_the_larger_phase():
    """One sequence of one own token after a long prefix: the prefix's pass (its hidden states and its
    logits at every position) needs more device memory than the block, and the peak says so."""
    model = load_model("facebook/opt-125m")
    report = CostModel(model, Workload(1001, 1, 1000), T4, 2).memory_model.exact_memory(Policy())
    assert report.prefix_pass_peak["gpu"] > report.block_peak["gpu"]
    assert report.peak == {t: max(report.block_peak[t], report.prefix_pass_peak[t]) for t in TIERS}
    expected = memory.MemoryReport()
    memory.add_weight_terms(expected, model.layers, Policy(), 2, True)
    memory.add_shared_prefix_terms(expected, model.layers, model.shape, Policy(), 1000, 2, True)
    assert report.prefix_pass_peak == expected.peak


def test_linear_memory_forms_match_the_accounting_in_both_phases():
    cost = CostModel(load_model("facebook/opt-125m"), Workload(128, 16, 100), toy_hardware(), 2)
    for percent in ([30, 30, 25, 50, 50, 0], [0, 0, 0, 0, 0, 0], [100, 0, 100, 0, 100, 0], [10, 80, 0, 100, 0, 100]):
        for cpu_attention, compress in ((False, False), (True, False), (False, True)):
            pol = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=2, cpu_cache_compute=cpu_attention,
                                      compress_weight=compress, compress_cache=compress)
            weights, cache, act = cost.memory_model.placement(pol)
            one_act = cost.memory_model.placement(pol.replace(gpu_batch_size=1, num_gpu_batches=1))[2]  # the pass's one row
            block = cost.memory_model.memory_forms(3, 2, Switches.of(pol), weights, cache, act)
            prefix = cost.memory_model.prefix_pass_forms(Switches.of(pol), weights, cache, one_act)
            report = cost.memory_model.exact_memory(pol)
            for tier in TIERS:
                assert block[tier].value() == pytest.approx(report.block_peak[tier], rel=1e-3, abs=64 * 200)
                assert prefix[tier].value() == pytest.approx(report.prefix_pass_peak[tier], rel=1e-3, abs=64 * 200)
    assert CostModel(cost.model, Workload(128, 16), toy_hardware(), 2).memory_model.prefix_pass_forms(
        Switches(), weights, cache, act) is None


@pytest.mark.parametrize("device", ["cpu", "simulated"])
@pytest.mark.parametrize("policy_idx", range(len(POLICIES)))
def test_accounting_equals_real_allocations_with_a_shared_prefix(policy_idx, device, tmp_path, monkeypatch):
    """One full block of prompts sharing a 40-token prefix, 9 tokens each of their own: the engine's real
    bytes after the block's prompt pass (and after the prefix's pass) are the cost model's exact memory."""
    policy = POLICIES[policy_idx]
    path = build_checkpoint("odd")
    prefix_len, own_len, gen_len = 40, 9, 3
    prefix = sample_prompts(path, 1, prefix_len, prefix_len, seed=3)[0]
    prompts = [prefix + tail[1:] for tail in sample_prompts(path, policy.block_size, own_len + 1, own_len + 1, seed=5)]
    passes = []
    run_prefix = BlockRunner.run_prefix

    def recording(runner, token_ids):
        shared = run_prefix(runner, token_ids)
        passes.append((len(token_ids), runner.last_allocated))
        return shared

    monkeypatch.setattr(BlockRunner, "run_prefix", recording)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, device=device) as engine:
        engine.generate(prompts, max_new_tokens=gen_len)
        real = engine.runner.last_allocated
        separate = engine.devices.separate_device
    assert [length for length, _ in passes] == [prefix_len]
    hardware = toy_hardware(compute_device="cuda" if separate else "cpu")
    cost = CostModel(load_model(path), Workload(prefix_len + own_len, gen_len, prefix_len), hardware, 4)
    predicted = cost.memory_model.exact_memory(policy, full=True)
    for term in EXACT_TERMS + ("shared_prefix",):
        assert real[term] == getattr(predicted, term), term
    assert cost.memory_model.exact_memory(policy).to_dict() == predicted.to_dict()  # the per-kind shortcut agrees
    pass_real = passes[0][1]
    assert pass_real["activations"] == predicted.prefix_pass.activations
    if not policy.compress_cache:  # (with it, a 4-bit copy is made after the pass)
        assert pass_real["cache"] == predicted.prefix_pass.cache
        assert pass_real["cache_staging"] == predicted.prefix_pass.cache_staging


# ---- the planner ---------------------------------------------------------------------------------------

def _assert_fits_both_phases(model, result) -> None:
    """Checked with memory.py itself: a block over the own tokens with the prefix's K/V beside it, and the
    prefix's pass after the weights."""
    p, wl, cuda = result.policy, result.workload, result.hardware.cuda
    block = memory.account(model.layers, model.shape, p, wl.own_len, wl.gen_len, result.dtype_bytes, cuda)
    prefix = memory.MemoryReport()
    memory.add_shared_prefix_terms(prefix, model.layers, model.shape, p, wl.shared_prefix_len, result.dtype_bytes, cuda)
    for tier in TIERS:
        held = prefix.cache[tier] + prefix.cache_staging[tier]
        assert block.peak[tier] + held <= result.usable[tier], (tier, p)
        weights = block.weights[tier] + block.weight_staging[tier]
        assert weights + prefix.peak[tier] <= result.usable[tier], (tier, p)


def test_planner_finds_larger_blocks_with_a_prefix():
    """OPT-6.7B with a 4 GiB GPU and 24 GiB of RAM: the KV cache bounds the block. With 448 of the 512
    prompt tokens shared, each sequence caches 96 rows instead of 544 and the planner takes a block
    several times larger, which without sharing does not fit at all."""
    model = load_model("facebook/opt-6.7b")
    hw = T4.with_memory(gpu=4 * GiB, cpu=24 * GiB)
    options = PlanOptions(gpu_batch_sizes=(1, 2, 4, 8, 16, 32, 64), num_gpu_batches=(1, 2, 4, 8, 16))
    unshared = plan(model, Workload(512, 32), hw, 2, options)
    shared = plan(model, Workload(512, 32, 448), hw, 2, options)
    assert shared.policy.block_size >= 4 * unshared.policy.block_size
    assert shared.throughput > 2 * unshared.throughput
    _assert_fits_both_phases(model, shared)
    evaluator = _Evaluator(CostModel(model, Workload(512, 32), hw, 2), usable_memory(hw, 0.95))
    assert evaluator.over(evaluator(shared.policy))
    assert shared.to_dict()["shared_prefix_len"] == 448 and shared.to_dict()["prefix_s"] > 0


def test_linear_program_keeps_room_for_the_prefix_pass():
    """A long prefix's pass holds its logits at every position on the device: the linear program leaves
    that room, so it cannot put all the weights on a GPU that holds them and a block but not the pass."""
    model = load_model("facebook/opt-125m")
    cost = CostModel(model, Workload(1001, 8, 1000), T4, 2)
    weights = sum(f.weight_bytes for f in cost.memory_model.layers)
    pass_workspace = memory.workspace_bound(model.shape, 1, 1000, 1000, 2, True)
    usable = {"gpu": int(weights + 0.9 * pass_workspace), "cpu": 8 * GiB, "disk": 100 * GiB}
    lp = PlacementLP(cost, Switches(), usable, disk_cached=False)
    fractions, _ = lp.solve(1, 1, act_on_gpu=True)
    assert fractions["w_gpu"] < 0.9
    weights_split, cache, act = TierShares.variables("w"), TierShares.variables("cache"), TierShares.variables("act")
    during_pass = cost.memory_model.prefix_pass_forms(Switches(), lambda _facts: weights_split, cache, act)
    during_block = cost.memory_model.memory_forms(1, 1, Switches(), lambda _facts: weights_split, cache, act)
    assert during_pass["gpu"].value(fractions) <= usable["gpu"] * (1 + 1e-6)
    assert during_block["gpu"].value(fractions) < 0.9 * usable["gpu"]  # the block alone would leave room


def test_a_prefix_pass_that_cannot_fit_is_explained():
    with pytest.raises(PlanInfeasible, match=r"gpu needs .* while computing the shared prefix of 1990 tokens, "
                                             r"mostly its workspace"):
        plan(load_model("facebook/opt-125m"), Workload(2000, 8, 1990), T4.with_memory(gpu=parse_size("900MiB")), 2,
             PlanOptions(gpu_batch_sizes=(1, 2), num_gpu_batches=(1, 2)))


def test_plan_for_engine_takes_the_shared_prefix(tmp_path, caplog):
    from test_planner import cpu_host

    path = build_checkpoint("tiny")
    model = load_model(path)
    hw = cpu_host()
    args = dict(name=str(path), config=model.shape, layers=model.layers, device_type="cpu", dtype_bytes=4, hardware=hw,
                offload_dir=tmp_path, prompt_len=48, gen_len=4, num_prompts=8)
    with caplog.at_level(logging.INFO, logger="flexgen_core.plan.auto"):
        policy = plan_for_engine(**args, compress_weight=False, compress_cache=False, shared_prefix_len=40)
        assert isinstance(policy, Policy) and policy.block_size <= 8
        assert "(40 shared)" in caplog.text
        # A hint longer than the prompt is cut to leave each prompt a token; a negative one is an error.
        plan_for_engine(**args, compress_weight=False, compress_cache=False, shared_prefix_len=100)
        assert "(47 shared)" in caplog.text
    with pytest.raises(ValueError, match="shared_prefix_len"):
        plan_for_engine(**args, compress_weight=False, compress_cache=False, shared_prefix_len=-1)


# ---- the command ---------------------------------------------------------------------------------------

def test_plan_command_with_a_shared_prefix(capsys):
    base = ["plan", "--model", "facebook/opt-125m", "--hardware", "t4-gcp", "--gpu-mem", "1GiB", "--prompt-len", "512",
            "--gen-len", "16"]
    assert main(base + ["--shared-prefix-len", "448", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shared_prefix_len"] == 448 and out["prefix_s"] > 0
    assert "shared_prefix" in out["memory"] and "prefix" in out["breakdown"]
    assert main(base + ["--shared-prefix-len", "448"]) == 0
    table = capsys.readouterr().out
    assert "prompt 512 (448 shared)" in table and "shared prefix  448 tokens computed once" in table
    for bad in ("512", "-1"):
        assert main(base + ["--shared-prefix-len", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --shared-prefix-len must be in [0, --prompt-len=512)") and err.count("\n") == 1
    assert main(base) == 0
    assert "shared" not in capsys.readouterr().out  # no prefix: the table as before


def test_run_seconds_counts_blocks_of_the_planned_size():
    est = shared_cost().estimate(policy(ALL_GPU, num_gpu_batches=3))  # blocks of 6
    for n, blocks in ((1, 1), (6, 1), (7, 2), (480, 80)):
        assert est.run_seconds(n) == pytest.approx(est.prefix_s + blocks * est.total_s)
    assert math.isclose(est.run_seconds(6) - est.prefix_s, est.total_s)
