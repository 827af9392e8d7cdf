"""The cost model's terms on hand-computed small cases, and its memory against the engine's accounting.

The toy model: hidden 64, 4 heads of 16, one block; input embedding 100x64, attention q/k/v/o 64x64,
MLP 256x64 + 64x256, output embedding 100x64; float16 (2 bytes). Rates are round numbers so each
expected value below is written out as the arithmetic it comes from.
"""

import pytest

from flexgen_core import memory
from flexgen_core.models.base import LayerKind, ModelShape, WeightSpec
from flexgen_core.plan.cost_model import CostModel, combine
from flexgen_core.plan.forms import Linear, TierShares
from flexgen_core.plan.memory_model import cache_compression_ratio
from flexgen_core.plan.workload import Switches, Workload
from flexgen_core.plan.hardware import HardwareProfile, load_profile
from flexgen_core.plan.shapes import PlanModel, SpecOnlyLayer, load_model
from flexgen_core.policy import Policy

B, S, N = 2, 8, 4  # GPU batch, prompt, generated tokens


def toy_model() -> PlanModel:
    def matrix(name, rows, cols):
        return WeightSpec(name, (name,), (rows, cols), compress_group_dim=0)

    shape = ModelShape("toy", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16,
                       ffn_size=256, vocab_size=100, max_positions=64)
    layers = [
        SpecOnlyLayer("input", LayerKind.INPUT, (matrix("tokens", 100, 64),)),
        SpecOnlyLayer("attention", LayerKind.ATTENTION, tuple(matrix(n, 64, 64) for n in "qkvo")),
        SpecOnlyLayer("mlp", LayerKind.MLP, (matrix("fc1", 256, 64), matrix("fc2", 64, 256))),
        SpecOnlyLayer("output", LayerKind.OUTPUT, (matrix("lm_head", 100, 64),)),
    ]
    return PlanModel("toy", shape, layers, "test")


def toy_hardware(**changes) -> HardwareProfile:
    values = dict(
        name="toy", description="round numbers", compute_device="cuda", dtype="float16",
        gpu_bytes=10**9, cpu_bytes=10**10, disk_bytes=10**11,
        cpu_to_gpu=1e6, gpu_to_cpu_cache=1e6, gpu_to_cpu_hidden=1e6, disk_to_cpu=1e5,
        cpu_to_disk_cache_prefill=1e5, cpu_to_disk_hidden_prefill=1e5, cpu_to_disk_decode=1e5,
        gpu_matmul_prefill=1e9, gpu_matmul_decode=1e8, gpu_batched_matmul_prefill=1e8,
        gpu_batched_matmul_decode=1e7, cpu_attention=1e6,
    )
    return HardwareProfile(**(values | changes))


def toy_cost(**hw_changes) -> CostModel:
    return CostModel(toy_model(), Workload(S, N), toy_hardware(**hw_changes), dtype_bytes=2)


def policy(percent, **kwargs) -> Policy:
    return Policy.from_percent(percent, gpu_batch_size=kwargs.pop("gpu_batch_size", B), **kwargs)


ALL_GPU = [100, 0, 100, 0, 100, 0]

# Per-layer compute of the toy model at B=2 (all on the GPU).
ATTN_PREFILL = 2 * B * S * 4 * 64 * 64 / 1e9 + 4 * B * S * S * 64 / 1e8    # matmuls + attention scores/values
MLP_PREFILL = 2 * B * S * 2 * 256 * 64 / 1e9
OUT_PREFILL = 2 * B * 1 * 100 * 64 / 1e9                                   # logits of the last position only
KEYS = S + N / 2                                                           # 10 keys on average in decode
ATTN_DECODE = 2 * B * 4 * 64 * 64 / 1e8 + 4 * B * KEYS * 64 / 1e7
MLP_DECODE = 2 * B * 2 * 256 * 64 / 1e8
OUT_DECODE = 2 * B * 100 * 64 / 1e8


def lanes_of(cost: CostModel, pol: Policy, phase: str) -> dict[str, dict[str, float]]:
    weights, cache, act = cost.memory_model.placement(pol)
    units = cost.units(pol.gpu_batch_size, pol.num_gpu_batches, Switches.of(pol), weights, cache, act, False)
    return {u.name: {lane: getattr(u, phase).total(lane).value() for lane in ("load", "store", "compute")}
            for u in units}


def test_linear_forms():
    x = Linear.var("w_gpu") * 3 + Linear(2.0) + Linear.var("w_cpu")
    assert x.value({"w_gpu": 0.5, "w_cpu": 0.25}) == pytest.approx(3 * 0.5 + 2 + 0.25)
    assert (x / 2).value({"w_gpu": 1, "w_cpu": 0}) == pytest.approx(2.5)
    assert TierShares.of(0.2, 0.3, 0.5).off_gpu.value() == pytest.approx(0.8)


def test_workload_averages():
    wl = Workload(S, N)
    assert wl.decode_steps == 3
    assert wl.decode_rows_loaded == 9   # steps 1..3 read 8, 9, 10 rows
    assert wl.decode_keys == 10         # and attend over 9, 10, 11 keys
    with pytest.raises(ValueError, match="gen_len"):
        Workload(8, 0)


def test_all_on_gpu_is_compute_only():
    est = toy_cost().estimate(policy(ALL_GPU))
    assert est.prefill_s == pytest.approx(ATTN_PREFILL + MLP_PREFILL + OUT_PREFILL)
    decode_step = ATTN_DECODE + MLP_DECODE + OUT_DECODE
    assert est.decode_s == pytest.approx(3 * decode_step)
    assert est.throughput == pytest.approx(B * N / (est.prefill_s + 3 * decode_step))
    assert set(est.breakdown["decode"]) == {"compute.matmul", "compute.attention"}


def test_weights_on_disk_load_the_next_layer():
    cost = toy_cost()
    lanes = lanes_of(cost, policy([0, 0, 100, 0, 100, 0]), "decode")
    per_byte = 1 / 1e5 + 1 / 1e6  # disk -> host, then host -> device, on one thread
    assert lanes["input"]["load"] == pytest.approx(4 * 64 * 64 * 2 * per_byte)     # attention's weights
    assert lanes["attention"]["load"] == pytest.approx(2 * 256 * 64 * 2 * per_byte)  # the MLP's
    assert lanes["mlp"]["load"] == pytest.approx(100 * 64 * 2 * per_byte)           # the output layer's
    assert lanes["output"]["load"] == pytest.approx(100 * 64 * 2 * per_byte)        # next step's input
    est = cost.estimate(policy([0, 0, 100, 0, 100, 0]))
    step = (4 * 64 * 64 + 2 * 256 * 64 + 2 * 100 * 64) * 2 * per_byte  # I/O bound: every layer waits on loads
    assert est.decode_s == pytest.approx(3 * step)
    assert est.prefill_s == pytest.approx(step)


def test_weights_on_cpu_skip_the_disk():
    lanes = lanes_of(toy_cost(), policy([0, 100, 100, 0, 100, 0]), "decode")
    assert lanes["attention"]["load"] == pytest.approx(2 * 256 * 64 * 2 / 1e6)


def test_cache_on_cpu_with_gpu_attention():
    pol = policy([100, 0, 0, 100, 100, 0], num_gpu_batches=2)
    lanes = lanes_of(toy_cost(), pol, "decode")
    row = 2 * B * 64 * 2                      # K and V of one position, one batch: 512 bytes
    per_layer = 2 * 9 * row / 1e6             # 2 batches x 9 rows, host -> device
    assert lanes["attention"]["load"] == pytest.approx(per_layer / 2)  # batch 2, during batch 1
    assert lanes["input"]["load"] == pytest.approx(per_layer / 2)      # batch 1, during the layer before
    assert lanes["attention"]["store"] == pytest.approx(2 * row / 1e6)  # each batch's new row, device -> host
    prefill = lanes_of(toy_cost(), pol, "prefill")
    assert prefill["attention"]["store"] == pytest.approx(2 * S * row / 1e6)  # the prompt's rows


def test_cache_on_disk_reads_then_copies():
    lanes = lanes_of(toy_cost(), policy([100, 0, 0, 0, 100, 0], num_gpu_batches=1), "decode")
    row = 2 * B * 64 * 2
    assert lanes["input"]["load"] == pytest.approx(9 * row * (1 / 1e5 + 1 / 1e6))
    assert lanes["attention"]["store"] == pytest.approx(row * (1 / 1e6 + 1 / 1e5))


def test_cpu_attention_moves_no_cache_and_uses_the_fitted_efficiency():
    pol = policy([100, 0, 0, 100, 100, 0], cpu_cache_compute=True)
    lanes = lanes_of(toy_cost(), pol, "decode")
    work = 4 * B * KEYS * 64
    assert lanes["input"]["load"] == 0 and lanes["attention"]["store"] == 0  # rows written in place
    assert lanes["attention"]["compute"] == pytest.approx(2 * B * 4 * 64 * 64 / 1e8 + work / 1e6)
    # The paper's fitted correction: a = log2(64 / 2) = 5, b = log2(4096 / 64) = 6.
    c1, c2, c3 = 0.0168, 0.0328, 0.0621
    factor = 1 + c1 * 5 * 6 - c2 * 5 - c3 * 6
    cost = toy_cost(cpu_attention_correction=(c1, c2, c3))
    assert cost.cpu_attention_rate(B) == pytest.approx(1e6 * factor)
    assert lanes_of(cost, pol, "decode")["attention"]["compute"] == pytest.approx(
        2 * B * 4 * 64 * 64 / 1e8 + work / (1e6 * factor))


def test_one_batch_with_hidden_states_off_device_serialises_load_and_compute():
    cost = toy_cost()
    pol = policy([100, 0, 100, 0, 0, 100])
    lanes = lanes_of(cost, pol, "decode")
    hidden = B * 1 * 64 * 2
    assert lanes["attention"]["load"] == pytest.approx(hidden / 1e6)
    assert lanes["attention"]["store"] == pytest.approx(hidden / 1e6)
    est = cost.estimate(pol)
    step = sum(max(lanes[n]["load"] + lanes[n]["compute"], lanes[n]["store"]) for n in ("attention", "mlp", "output"))
    step += max(lanes["input"].values())  # the input layer reads token ids, not hidden states
    assert est.decode_s == pytest.approx(3 * step)
    # With two batches per block the hidden states are prefetched: the lanes overlap again.
    assert combine({"load": 1, "store": 2, "compute": 3}, overlap=True, serial_load=False) == 3
    assert combine({"load": 1, "store": 2, "compute": 3}, overlap=True, serial_load=True) == 4
    assert combine({"load": 1, "store": 2, "compute": 3}, overlap=False, serial_load=False) == 6


def test_no_overlap_adds_the_lanes():
    cost = toy_cost()
    pol = policy([0, 0, 100, 0, 100, 0], overlap=False)
    lanes = lanes_of(cost, pol, "decode")
    assert cost.estimate(pol).decode_s == pytest.approx(3 * sum(sum(v.values()) for v in lanes.values()))


def test_roofline_bounds_decode_matmuls_by_memory_bandwidth():
    cost = toy_cost(gpu_memory=1e6)  # 1 MB/s: reading the weights dominates
    est = cost.estimate(policy(ALL_GPU))
    decode_matmul = (4 * 64 * 64 + 2 * 256 * 64 + 100 * 64) * 2 / 1e6
    assert est.breakdown["decode"]["compute.matmul"] == pytest.approx(3 * decode_matmul)


def test_measured_matmul_table_interpolates_in_log_log_and_extrapolates_linearly():
    hw = toy_hardware(matmul_s_per_param=((1, 1e-10), (4, 4e-10), (16, 8e-10)))
    assert hw.matmul_seconds(1, 1000) == pytest.approx(1e-7)
    assert hw.matmul_seconds(2, 1000) == pytest.approx(2e-7)        # halfway between 1 and 4 in log rows
    assert hw.matmul_seconds(8, 1000) == pytest.approx(4e-10 * 2**0.5 * 1000)  # 4e-10 -> 8e-10 over 4 -> 16
    assert hw.matmul_seconds(64, 1000) == pytest.approx(8e-10 * 4 * 1000)      # past the table: x rows
    assert toy_hardware().matmul_seconds(8, 1000) is None
    with pytest.raises(ValueError, match="matmul_s_per_param"):
        toy_hardware(matmul_s_per_param=((4, 1e-10), (1, 2e-10)))


def test_measured_matmul_table_replaces_the_roofline():
    table = ((1, 1e-6), (2, 3e-6))
    est = toy_cost(matmul_s_per_param=table, gpu_memory=1e6).estimate(policy(ALL_GPU))
    params = {"attention": 4 * 64 * 64, "mlp": 2 * 256 * 64, "output": 100 * 64}
    # Decode multiplies B = 2 rows per layer; prefill B x S = 16 rows (linear past 2), the output layer 2.
    decode = sum(params.values()) * 3e-6
    prefill = (params["attention"] + params["mlp"]) * 3e-6 * 16 / 2 + params["output"] * 3e-6
    assert est.breakdown["decode"]["compute.matmul"] == pytest.approx(3 * decode)
    assert est.breakdown["prefill"]["compute.matmul"] == pytest.approx(prefill)


def test_decompression_at_the_measured_rate():
    cost = toy_cost(decompress=1e6, gpu_memory=1e9)
    est = cost.estimate(policy(ALL_GPU, compress_weight=True, num_gpu_batches=2))
    # Once per layer and step for the whole block: every layer's dense bytes (fp16) at 1 MB/s.
    dense = (100 * 64 + 4 * 64 * 64 + 2 * 256 * 64 + 100 * 64) * 2
    assert est.breakdown["decode"]["compute.decompress"] == pytest.approx(3 * dense / 1e6)
    assert est.breakdown["prefill"]["compute.decompress"] == pytest.approx(dense / 1e6)
    # Without a measured rate: one read of the 4-bit parts and one write of the dense weights at 1 GB/s.
    fallback = toy_cost(gpu_memory=1e9).estimate(policy(ALL_GPU, compress_weight=True))
    stored = sum(layer.weight_bytes_compressed for layer in cost.memory_model.layers)
    assert fallback.breakdown["prefill"]["compute.decompress"] == pytest.approx((dense + stored) / 1e9)


def test_layer_overhead_counts_per_layer_and_batch():
    cost = toy_cost(layer_overhead_s=1e-3)
    est = cost.estimate(policy(ALL_GPU, num_gpu_batches=3))
    assert est.breakdown["decode"]["compute.overhead"] == pytest.approx(3 * 4 * 3 * 1e-3)  # steps x layers x batches


def test_compressed_cache_ratio():
    # 4-bit codes of 64 values (32 bytes) plus fp16 scale and min (4 bytes) per group of 64 fp16 (128 bytes).
    assert cache_compression_ratio(128, 2) == pytest.approx(36 / 128)
    assert cache_compression_ratio(64, 4) == pytest.approx(36 / 256)


def test_memory_is_the_engines_accounting():
    cost = CostModel(load_model("facebook/opt-125m"), Workload(128, 16), toy_hardware(), 2)
    pol = Policy.from_percent([30, 30, 25, 50, 50, 0], gpu_batch_size=3, num_gpu_batches=2)
    expected = memory.account(cost.model.layers, cost.shape, pol, 128, 16, 2, separate_device=True)
    assert cost.estimate(pol).memory.to_dict() == expected.to_dict()
    assert cost.memory_model.exact_memory(pol).to_dict() == cost.memory_model.exact_memory(pol, full=True).to_dict()
    # Compression included, and the per-kind shortcut equals the whole-model accounting.
    for packed in (pol.replace(compress_cache=True), pol.replace(compress_weight=True, compress_cache=True)):
        packed_expected = memory.account(cost.model.layers, cost.shape, packed, 128, 16, 2, separate_device=True)
        assert cost.memory_model.exact_memory(packed).to_dict() == packed_expected.to_dict()
    assert cost.memory_model.exact_memory(pol.replace(compress_cache=True)).cache["cpu"] == pytest.approx(
        expected.cache["cpu"] * cost.memory_model.cache_ratio, rel=1e-6)


def test_linear_memory_forms_match_the_accounting():
    """The LP's memory forms, fed a policy's real placement, equal memory.account up to alignment."""
    cost = CostModel(load_model("facebook/opt-125m"), Workload(128, 16), toy_hardware(), 2)
    for percent in ([30, 30, 25, 50, 50, 0], [0, 0, 0, 0, 0, 0], [100, 0, 100, 0, 100, 0], [10, 80, 0, 100, 0, 100]):
        for cpu_attention, compress in ((False, False), (True, False), (False, True)):
            pol = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=2, cpu_cache_compute=cpu_attention,
                                      compress_weight=compress, compress_cache=compress)
            weights, cache, act = cost.memory_model.placement(pol)
            forms = cost.memory_model.memory_forms(3, 2, Switches.of(pol), weights, cache, act)
            peak = cost.memory_model.exact_memory(pol).peak
            for tier in ("gpu", "cpu", "disk"):
                assert forms[tier].value() == pytest.approx(peak[tier], rel=1e-3, abs=64 * 200), (percent, tier)


def test_the_paper_profile_loads():
    hw = load_profile("t4-gcp")
    assert hw.gpu_bytes == 15 * 2**30 and hw.cpu_bytes == 204 * 2**30 and hw.disk_bytes == 1500 * 2**30
    assert hw.disk_to_cpu == pytest.approx(2.61 * 2**30)  # from the paper's breakdown: see test_planner.py
    assert hw.cpu_to_gpu == pytest.approx(12.89 * 2**30) and hw.gpu_to_cpu_cache == pytest.approx(0.97 * 2**30)
    assert hw.gpu_matmul_prefill == pytest.approx(21.24e12)
    assert hw.cpu_attention_correction == (0.0168, 0.0328, 0.0621)
    assert HardwareProfile.from_dict(hw.to_dict()) == hw
