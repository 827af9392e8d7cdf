"""The planner: the paper's cases on its machine (t4-gcp), planned policies never exceeding a tier,
infeasible plans explained, model shapes, the `flexgen plan` / `profile` commands and `policy="auto"`.

Paper figures (flexgen-paper.md, prompt 512, 32 generated tokens, tokens/s): OPT-6.7B 25.26 (2x1, all on
the GPU), 4-bit 29.12 (72x1, all on the GPU); OPT-175B 0.69 (32x8, percent 0 50 0 0 0 100, attention on
the CPU), 4-bit 1.12 (48x3, 0 100 0 100 0 100). Tolerances are stated where each figure is checked.
"""

import dataclasses
import json
import logging

import pytest

from flexgen_core import memory
from flexgen_core.cli import main
from flexgen_core.plan.cost_model import CostModel
from flexgen_core.plan.workload import Workload
from flexgen_core.plan.hardware import GiB, HardwareProfile, builtin_profiles, load_profile, parse_size
from flexgen_core.plan.search import (
    PlanInfeasible,
    PlanOptions,
    _Evaluator,
    plan,
    round_percents,
    usable_memory,
)
from flexgen_core.plan.shapes import load_model
from flexgen_core.policy import Policy

PAPER = Workload(512, 32)
T4 = load_profile("t4-gcp")
# A small grid keeps the sweeps fast; the acceptance cases use the full one.
SMALL_GRID = dict(gpu_batch_sizes=(1, 2, 8, 32), num_gpu_batches=(1, 2, 8))

PAPER_175B = Policy.from_percent([0, 50, 0, 0, 0, 100], gpu_batch_size=32, num_gpu_batches=8,
                                 cpu_cache_compute=True, pin_weight=False)
# The paper's decode breakdown for that run: cache reads 7,046 s, weight reads 3,047 s (of 11,315 s).
PAPER_175B_CACHE_READ_S = 7046


def cpu_host(ram_gib: float = 8) -> HardwareProfile:
    """A CPU-only host (the "GPU" is the CPU) with plausible rates."""
    return HardwareProfile(
        name="cpu-test", description="", compute_device="cpu", dtype="float32",
        gpu_bytes=int(ram_gib * GiB), cpu_bytes=int(ram_gib * GiB), disk_bytes=100 * GiB,
        cpu_to_gpu=5 * GiB, gpu_to_cpu_cache=5 * GiB, gpu_to_cpu_hidden=5 * GiB, disk_to_cpu=1 * GiB,
        cpu_to_disk_cache_prefill=1 * GiB, cpu_to_disk_hidden_prefill=1 * GiB, cpu_to_disk_decode=1 * GiB,
        gpu_matmul_prefill=50e9, gpu_matmul_decode=30e9, gpu_batched_matmul_prefill=10e9,
        gpu_batched_matmul_decode=2e9, cpu_attention=2e9, gpu_memory=10 * GiB,
        disk_to_cpu_cached=4 * GiB, cpu_to_disk_cached=2 * GiB, layer_overhead_s=5e-5,
    )


# ---- acceptance 1: the paper's machine -----------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_6_7b():
    return load_model("facebook/opt-6.7b")


@pytest.fixture(scope="module")
def opt_175b():
    return load_model("facebook/opt-175b")


_PLANS: dict = {}


def paper_plan(model, compressed: bool = False):
    """Plans of the paper's cases on t4-gcp, each computed once for the module."""
    key = (model.name, compressed)
    if key not in _PLANS:
        options = PlanOptions(compress_weight=True, compress_cache=True) if compressed else PlanOptions()
        _PLANS[key] = plan(model, PAPER, T4, 2, options)
    return _PLANS[key]


def test_opt_6_7b_plans_everything_on_the_gpu(opt_6_7b):
    result = paper_plan(opt_6_7b)
    percent = result.policy.percent
    # Weights and activations (nearly) all on the GPU, and most of the cache: a block of 4 fits in the
    # 15 GB less the allocator's reserve (0.88 GB) with a tensor of the weights and a few heads of the
    # cache in RAM, once the workspace counts what a GPU's kernels and the overlapped copies hold beside
    # the compute (memory.workspace_bound).
    assert percent[0] >= 99 and percent[4] == 100 and percent[2] >= 80, percent
    # The paper's run, everything on the GPU at 2x1, fits there too.
    paper_run = CostModel(opt_6_7b, PAPER, T4, 2).estimate(Policy(gpu_batch_size=2), full_memory=True)
    assert paper_run.peak_memory["gpu"] <= result.usable["gpu"] < T4.gpu_bytes - 0.8 * 2**30
    # The paper ran 2x1 (25.26 tokens/s); the model predicts more for the larger block. Tolerance: between
    # the paper's figure and twice it.
    assert result.policy.block_size >= 2
    assert 25.26 <= result.throughput <= 2 * 25.26
    # The paper's own policy (2x1, no overlap) is predicted within 25% of its measured 25.26.
    paper = Policy(gpu_batch_size=2, overlap=False)
    assert CostModel(opt_6_7b, PAPER, T4, 2).estimate(paper).throughput == pytest.approx(25.26, rel=0.25)


def test_opt_175b_needs_disk_for_weights(opt_175b):
    result = paper_plan(opt_175b)
    p = result.policy
    # 326 GiB of fp16 weights on a 15 GB GPU and 204 GB of RAM: most of them on disk, as in the paper
    # (which read half from disk); the KV cache off the GPU, big blocks to amortise the weight reads.
    assert p.w_disk_percent >= 50 and p.cache_gpu_percent == 0
    assert p.block_size >= 64
    # Paper: 0.69 tokens/s. Tolerance 15%.
    assert result.throughput == pytest.approx(0.69, rel=0.15)
    # The paper's own policy, 32x8, is predicted within 15% too.
    assert CostModel(opt_175b, PAPER, T4, 2).estimate(PAPER_175B).throughput == pytest.approx(0.69, rel=0.15)


def test_t4_gcp_disk_rate_is_the_one_the_papers_breakdown_implies(opt_175b):
    """The paper's OPT-175B decode reads its whole KV cache from disk every step, in 7,046 s all told:
    that is the profile's 2.61 GiB/s (the authors' fitted 0.473 would take 38,900 s). With it the model
    reproduces the paper's breakdown and, out of sample, its prompt-1024 run."""
    cost = CostModel(opt_175b, PAPER, T4, 2)
    p = PAPER_175B
    cache_bytes = (cost.memory_model.num_attention * p.num_gpu_batches * PAPER.decode_rows_loaded
                   * cost.memory_model.cache_row_bytes(p.gpu_batch_size, False) * PAPER.decode_steps)
    assert T4.disk_to_cpu == pytest.approx(cache_bytes / PAPER_175B_CACHE_READ_S, rel=0.01)
    est = cost.estimate(p)
    assert est.breakdown["decode"]["load.cache"] == pytest.approx(PAPER_175B_CACHE_READ_S, rel=0.01)
    assert est.breakdown["decode"]["load.weights"] == pytest.approx(3047, rel=0.25)
    assert est.decode_s == pytest.approx(11315, rel=0.15)
    # Prompt 1024: 0.35 tokens/s with 12x12 blocks, same percentages (flexgen-paper.md). Tolerance 10%.
    long_prompt = Policy.from_percent([0, 50, 0, 0, 0, 100], gpu_batch_size=12, num_gpu_batches=12,
                                      cpu_cache_compute=True, pin_weight=False)
    assert CostModel(opt_175b, Workload(1024, 32), T4, 2).estimate(long_prompt).throughput == \
        pytest.approx(0.35, rel=0.10)


PAPER_6_7B_DENSE = Policy(gpu_batch_size=2, overlap=False)
PAPER_6_7B_PACKED = Policy(gpu_batch_size=72, compress_weight=True, compress_cache=True)


def test_decompression_rate_is_fitted_to_the_papers_4_bit_run(opt_6_7b):
    """t4-gcp's decompression rate reproduces the paper's OPT-6.7B 4-bit run (72x1, 29.12 tokens/s) and,
    out of sample, its prompt-1024 run (28x1, 13.18). Tolerance: 1% and 10%."""
    assert CostModel(opt_6_7b, PAPER, T4, 2).estimate(PAPER_6_7B_PACKED).throughput == pytest.approx(29.12, rel=0.01)
    long_prompt = Policy(gpu_batch_size=28, compress_weight=True, compress_cache=True)
    assert CostModel(opt_6_7b, Workload(1024, 32), T4, 2).estimate(long_prompt).throughput == \
        pytest.approx(13.18, rel=0.10)


def test_compression_goes_the_papers_direction(opt_6_7b, opt_175b):
    dense_175b, packed_175b = paper_plan(opt_175b), paper_plan(opt_175b, compressed=True)
    # Paper: 0.69 -> 1.12 tokens/s, weights from disk to the CPU and the cache mostly (there wholly) in
    # RAM (percent 0 100 0 100 0 100, 48x3).
    assert packed_175b.policy.w_disk_percent == 0 and packed_175b.policy.w_gpu_percent <= 5
    assert packed_175b.policy.cache_disk_percent < min(50, dense_175b.policy.cache_disk_percent)
    assert packed_175b.throughput > 1.5 * dense_175b.throughput
    # Paper: 25.26 -> 29.12 tokens/s, block 2 -> 72, weights on the GPU. Compressed, the plan takes
    # much larger blocks with the weights mostly on the GPU, and beats the paper's dense policy...
    dense_6_7b, packed_6_7b = paper_plan(opt_6_7b), paper_plan(opt_6_7b, compressed=True)
    assert packed_6_7b.policy.block_size >= 8 * dense_6_7b.policy.block_size
    assert packed_6_7b.policy.w_gpu_percent >= 80
    paper_dense = CostModel(opt_6_7b, PAPER, T4, 2).estimate(PAPER_6_7B_DENSE).throughput
    assert packed_6_7b.throughput > 1.1 * paper_dense
    # ...but not the better dense policy planned here (all on the GPU with overlap): decompressing at the
    # rate the paper's own 4-bit run implies costs more than it saves when nothing leaves the GPU. Left
    # to choose, the planner compresses OPT-175B and not OPT-6.7B.
    assert packed_6_7b.throughput < dense_6_7b.throughput
    choose = PlanOptions(compress_weight=None, compress_cache=None)
    assert not plan(opt_6_7b, PAPER, T4, 2, choose).policy.compress_weight
    assert plan(opt_175b, PAPER, T4, 2, choose).policy.compress_weight


# ---- acceptance 2: planned policies never exceed a tier ---------------------------------------------------

SWEEP = [
    # model, gpu, cpu, prompt, gen, options
    ("facebook/opt-125m", "2GiB", "4GiB", 128, 16, {}),
    ("facebook/opt-350m", "512MiB", "2GiB", 256, 32, {}),
    ("facebook/opt-1.3b", "1GiB", "2GiB", 512, 32, {}),
    ("facebook/opt-1.3b", "4GiB", "64GiB", 1024, 64, {"compress_weight": None}),
    ("facebook/opt-6.7b", "8GiB", "16GiB", 256, 8, {"compress_cache": True}),
    ("facebook/opt-30b", "16GiB", "32GiB", 512, 32, {}),
    ("facebook/opt-66b", "24GiB", "200GiB", 64, 128, {"compress_weight": True}),
    ("meta-llama/Llama-2-7b-hf", "6GiB", "8GiB", 512, 32, {}),
    ("meta-llama/Llama-2-70b-hf", "40GiB", "64GiB", 2048, 16, {}),
    ("meta-llama/Meta-Llama-3-8B", "16GiB", "32GiB", 4096, 64, {}),
    ("mistralai/Mistral-7B-v0.1", "2GiB", "12GiB", 128, 128, {}),
    ("Qwen/Qwen2.5-32B", "24GiB", "48GiB", 1024, 32, {"cpu_cache_compute": False}),
]


@pytest.mark.parametrize("case", SWEEP, ids=[f"{c[0].split('/')[1]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}" for c in SWEEP])
def test_planned_policy_fits_every_tier(case):
    name, gpu, cpu, prompt_len, gen_len, switches = case
    model = load_model(name)
    hw = T4.with_memory(gpu=parse_size(gpu), cpu=parse_size(cpu))
    result = plan(model, Workload(prompt_len, gen_len), hw, 2, PlanOptions(**SMALL_GRID, **switches))
    _assert_fits(model, result, cuda=True)


@pytest.mark.parametrize("ram", ["300MiB", "1GiB", "6GiB"])
def test_planned_policy_fits_a_cpu_only_host(ram):
    model = load_model("facebook/opt-350m")
    hw = cpu_host().with_memory(gpu=parse_size(ram), cpu=parse_size(ram))
    result = plan(model, Workload(256, 16), hw, 4, PlanOptions(**SMALL_GRID))
    _assert_fits(model, result, cuda=False)
    peak = result.best.peak_memory
    assert peak["gpu"] + peak["cpu"] <= result.usable["cpu"]  # both tiers are host RAM


def _assert_fits(model, result, cuda: bool) -> None:
    """Check with memory.account itself (compression included), on the model's whole layer list."""
    p, wl = result.policy, result.workload
    peak = memory.account(model.layers, model.shape, p, wl.prompt_len, wl.gen_len, result.dtype_bytes, cuda).peak
    for tier in ("gpu", "cpu", "disk"):
        assert peak[tier] <= result.usable[tier], (tier, peak, result.usable, p)
    assert result.usable == usable_memory(result.hardware, 0.95)


def test_rounded_policies_that_overflow_are_repaired():
    model = load_model("facebook/opt-1.3b")
    hw = T4.with_memory(gpu=3 * GiB)
    cost = CostModel(model, PAPER, hw, 2)
    evaluator = _Evaluator(cost, usable_memory(hw, 0.95))
    too_big = Policy(gpu_batch_size=8)  # 2.6 GB of weights plus cache and workspace on a 3 GB GPU
    assert evaluator.over(evaluator(too_big))
    fixed = evaluator.repair(too_big)
    assert fixed is not None and not evaluator.over(fixed)
    assert fixed.policy.gpu_batch_size == 8 and fixed.policy.percent != too_big.percent


def test_round_percents():
    assert round_percents([0.333, 0.333, 0.334]) == [33, 33, 34]
    assert round_percents([1.0, 0.0, 0.0]) == [100, 0, 0]
    assert round_percents([0.996, 0.004, 0.0]) == [100, 0, 0]
    assert round_percents([0.125, 0.125, 0.75]) == [12, 13, 75] or round_percents([0.125, 0.125, 0.75]) == [13, 12, 75]
    assert sum(round_percents([0.1234, 0.5678, 0.3088])) == 100


def test_no_feasible_policy_says_what_does_not_fit():
    model = load_model("facebook/opt-175b")
    with pytest.raises(PlanInfeasible, match=r"disk needs .*short by"):
        plan(model, PAPER, T4.with_memory(disk=100 * GiB, cpu=100 * GiB), 2, PlanOptions(**SMALL_GRID))
    with pytest.raises(PlanInfeasible, match=r"gpu needs .*short by"):
        plan(model, PAPER, T4.with_memory(gpu=64 * 2**20), 2, PlanOptions(**SMALL_GRID))


def test_max_block_size_caps_the_block():
    result = plan(load_model("facebook/opt-1.3b"), PAPER, T4, 2, PlanOptions(max_block_size=6))
    assert result.policy.block_size <= 6


# ---- model shapes ----------------------------------------------------------------------------------------

def test_model_shapes_from_the_table():
    assert load_model("opt-175b").name == "facebook/opt-175b"
    llama = load_model("meta-llama/Llama-2-7b-hf")
    assert llama.num_params == 6_738_415_616  # the published count (untied lm_head)
    gqa = load_model("meta-llama/Meta-Llama-3-70B")
    assert gqa.shape.num_kv_heads == 8 and gqa.shape.kv_width == 1024
    qwen = load_model("Qwen/Qwen2.5-32B")
    assert any(s.name == "q_b" for s in qwen.layers[1].specs)
    with pytest.raises(ValueError, match="known"):
        load_model("./no-such-folder")


def test_model_shape_from_a_checkpoint_folder():
    from flexgen_core.models.opt import OPTConfig
    from flexgen_core.testing import build_checkpoint

    model = load_model(build_checkpoint("tiny"))
    assert isinstance(model.shape, OPTConfig) and model.source == "folder"
    assert len(model.layers) == 2 * model.shape.num_layers + 2


# ---- commands and the engine ------------------------------------------------------------------------------

def test_plan_command_json(capsys):
    code = main(["plan", "--model", "facebook/opt-1.3b", "--hardware", "t4-gcp", "--gpu-mem", "2GiB",
                 "--prompt-len", "256", "--gen-len", "16", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(Policy.from_dict(out["policy"]).to_dict()) == set(out["policy"])
    assert out["throughput"] > 0 and out["prefill_s"] > 0 and out["decode_s"] > 0
    assert out["peak_memory"]["gpu"] <= 2 * GiB


def test_plan_command_table_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", "--model", "facebook/opt-125m", "--hardware", "t4-gcp", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "throughput" in out and "--percent" in out and "memory" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plan_flags_replay_through_generate(capsys):
    """The plan's `flags` line, given to `flexgen generate`, gives back the planned Policy: compression
    and every switch included."""
    import shlex

    from flexgen_core.cli import _policy, build_parser, policy_flags

    main(["plan", "--model", "facebook/opt-6.7b", "--hardware", "t4-gcp", "--compress-weight", "on",
          "--compress-cache", "on", "--json"])
    planned = Policy.from_dict(json.loads(capsys.readouterr().out)["policy"])
    assert planned.compress_weight and planned.compress_cache
    main(["plan", "--model", "facebook/opt-6.7b", "--hardware", "t4-gcp", "--compress-weight", "on",
          "--compress-cache", "on"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("flags")]
    flags = shlex.split(line.split("flags", 1)[1])
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", *flags])
    assert _policy(args) == planned
    others = [Policy(), Policy(overlap=False, cpu_cache_compute=True, pin_weight=False, share_prefix=False,
                               gpu_batch_size=3, num_gpu_batches=5, w_gpu_percent=10, w_cpu_percent=20),
              Policy(compress_cache=True, cache_gpu_percent=0, cache_cpu_percent=0)]
    for policy in others:
        args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", *shlex.split(policy_flags(policy))])
        assert _policy(args) == policy


def test_plan_command_infeasible_exits_with_one_line(capsys):
    code = main(["plan", "--model", "facebook/opt-175b", "--hardware", "t4-gcp", "--disk-mem", "100GB",
                 "--cpu-mem", "100GB"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: no policy fits") and err.count("\n") == 1


def test_plan_says_why_the_chosen_policy_is_not_the_fastest(capsys):
    """The 5% tie rule is stated, and the fastest policy named when it is another one."""
    result = plan(load_model("facebook/opt-6.7b"), Workload(512, 32), T4, 2)
    fastest = result.fastest
    assert result.best.throughput <= fastest.throughput <= result.best.throughput / 0.95
    assert main(["plan", "--model", "facebook/opt-6.7b", "--hardware", "t4-gcp", "--prompt-len", "512",
                 "--gen-len", "32"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "chosen as the least offloading, then the smallest block, of the policies predicted within 5% of the " \
           "fastest" in out
    if fastest.policy != result.best.policy:
        p = fastest.policy
        assert (f"the fastest, {fastest.throughput:.4g} tokens/s, is {p.gpu_batch_size}x{p.num_gpu_batches} "
                f"{' '.join(map(str, p.percent))}") in out


def test_a_prompt_past_the_context_is_named(capsys):
    code = main(["plan", "--model", "facebook/opt-1.3b", "--hardware", "t4-gcp", "--prompt-len", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: --prompt-len 100000 + --gen-len 32 exceeds facebook/opt-1.3b's context "
                                 "of 2048 positions\n")


def test_sizes_need_a_unit_and_gb_means_two_to_the_thirty(capsys):
    """One convention, the profiles' and the paper's: GB = GiB = 2**30 bytes; a bare number is refused."""
    assert parse_size("16GB") == parse_size("16GiB") == 16 * 2**30 and parse_size("1.5TB") == int(1.5 * 2**40)
    assert parse_size("900mib") == 900 * 2**20
    code = main(["plan", "--model", "facebook/opt-1.3b", "--hardware", "t4-gcp", "--gpu-mem", "16"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: memory size '16' needs a unit: e.g. 16GB (GB = GiB = 2**30 bytes)\n"
    # G, GB and GiB all mean 2**30: what people type.
    assert parse_size("16G") == parse_size("16GB") == parse_size("16GiB") == parse_size("16 gib")
    assert parse_size("512M") == 512 * 2**20 and parse_size("2t") == 2 * 2**40


def test_profile_to_an_unwritable_place_fails_before_measuring(tmp_path, capsys, monkeypatch):
    from flexgen_core.plan import profiler

    monkeypatch.setattr(profiler, "measure", lambda **kw: pytest.fail("measured before checking --out"))
    (tmp_path / "a-file").write_text("")
    code = main(["profile", "--device", "cpu", "--out", str(tmp_path / "a-file" / "me.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: cannot write the profile to '{tmp_path / 'a-file' / 'me.json'}'")


def test_profile_command_measures_this_machine(tmp_path, capsys):
    out = tmp_path / "me.json"
    code = main(["profile", "--quick", "--device", "cpu", "--out", str(out), "--offload-dir", str(tmp_path)])
    assert code == 0 and str(out) in capsys.readouterr().out
    hw = load_profile(out)
    assert hw.unified and hw.dtype == "float32" and hw.gpu_bytes == hw.cpu_bytes > 0
    assert hw.disk_to_cpu > 0 and hw.disk_to_cpu_cached > 0 and hw.gpu_memory > 0 and hw.decompress > 0
    assert hw.gpu_matmul_prefill > 1e8 and 0 <= hw.io_overlap <= 1 and hw.layer_overhead_s >= 0
    rows = [r for r, _ in hw.matmul_s_per_param]
    assert rows[0] == 1 and rows[-1] >= 1024  # one token up to a prompt pass
    # More rows take longer in all (the same weights are read), but less per row.
    per_row = [t / r for r, t in hw.matmul_s_per_param]
    assert hw.matmul_seconds(rows[-1], 10**6) > hw.matmul_seconds(1, 10**6) and per_row[-1] < per_row[0]
    assert list(tmp_path.iterdir()) == [out]  # the offload files are gone


def test_profile_round_trips(tmp_path):
    hw = cpu_host()
    path = hw.save(tmp_path / "p.json")
    loaded = load_profile(path)
    assert loaded.unified and loaded.disk_to_cpu_cached == pytest.approx(hw.disk_to_cpu_cached, rel=1e-3)
    assert loaded.gpu_bytes == hw.gpu_bytes
    table = dataclasses.replace(hw, matmul_s_per_param=((1, 2.5e-10), (64, 1.0e-9)))
    assert load_profile(table.save(tmp_path / "t.json")).matmul_s_per_param == table.matmul_s_per_param
    with pytest.raises(ValueError, match="t4-gcp"):
        load_profile(tmp_path / "missing.json")


def test_engine_plans_policy_auto(tmp_path, caplog, monkeypatch):
    from flexgen_core import Engine
    from flexgen_core.testing import build_checkpoint, sample_prompts

    path = build_checkpoint("tiny")
    # A RAM budget below the model's weights forces offloading to disk.
    weights = sum(s.numel for layer in load_model(path).layers for s in layer.specs) * 4
    budget = int(0.9 * weights)
    hw = cpu_host().with_memory(gpu=budget, cpu=budget)
    profile_file = hw.save(tmp_path / "host.json")
    monkeypatch.setenv("FLEXGEN_HARDWARE", str(profile_file))
    prompts = sample_prompts(path, 4, 8, 16, seed=0)
    with caplog.at_level(logging.INFO, logger="flexgen_core.plan.auto"):
        with Engine.from_pretrained(path, policy="auto", device="cpu", offload_dir=tmp_path, prompt_len_hint=16,
                                    gen_len_hint=4, num_prompts_hint=4, compress_weight=False,
                                    compress_cache=False) as engine:
            results = engine.generate(prompts, max_new_tokens=4)
            policy = engine.policy
            allocated = engine.runner.last_allocated
    assert "policy='auto'" in caplog.text and "cpu-test" in caplog.text
    assert policy.w_disk_percent > 0 and policy.block_size <= 4
    assert all(len(r.completions[0].token_ids) == 4 for r in results)
    host = sum(allocated[term][tier] for term in allocated for tier in ("gpu", "cpu"))
    assert host <= 0.95 * budget


def test_policy_auto_compresses_only_when_allowed(tmp_path, monkeypatch, caplog):
    """On a host whose RAM holds the 4-bit weights but not the dense ones, behind a slow disk, the cost
    model predicts compressed weights faster. `policy="auto"` still plans an exact policy unless the
    caller allows compression (`compress="allow"`): then it takes the faster, lossy one and says so."""
    from flexgen_core import Engine
    from flexgen_core.testing import build_checkpoint

    path = build_checkpoint("tiny")
    model = load_model(path)
    weights = sum(s.numel for layer in model.layers for s in layer.specs) * 4
    hw = dataclasses.replace(cpu_host().with_memory(gpu=int(0.95 * weights), cpu=int(0.95 * weights)),
                             disk_to_cpu=50e6, disk_to_cpu_cached=None)
    monkeypatch.setenv("FLEXGEN_HARDWARE", str(hw.save(tmp_path / "host.json")))
    workload = Workload(16, 4)
    predicted = {cw: plan(model, workload, hw, 4, PlanOptions(compress_weight=cw, max_block_size=4)).best.throughput
                 for cw in (False, True)}
    assert predicted[True] > predicted[False]
    hints = dict(prompt_len_hint=16, gen_len_hint=4, num_prompts_hint=4)
    with caplog.at_level("WARNING", logger="flexgen_core.plan.auto"):
        with Engine.from_pretrained(path, policy="auto", device="cpu", offload_dir=tmp_path, **hints) as engine:
            assert engine.policy.lossy == []  # exact unless asked
            engine.generate([[2, 5, 7]], max_new_tokens=2)
        assert "lossy" not in caplog.text
        with Engine.from_pretrained(path, policy="auto", device="cpu", offload_dir=tmp_path, compress="allow",
                                    **hints) as engine:
            assert engine.policy.compress_weight
            engine.generate([[2, 5, 7]], max_new_tokens=2)
        assert "chose 4-bit weights" in caplog.text and "results are lossy" in caplog.text
    with Engine.from_pretrained(path, policy="auto", device="cpu", offload_dir=tmp_path, compress="allow",
                                compress_weight=False, **hints) as engine:
        assert not engine.policy.compress_weight  # an explicit switch is respected
    with pytest.raises(ValueError, match="policy='auto'"):
        Engine.from_pretrained(path, policy=Policy(), compress_weight=True)
    with pytest.raises(ValueError, match="policy='auto'"):
        Engine.from_pretrained(path, policy=Policy(), compress="allow")
    with pytest.raises(ValueError, match="compress must be one of never, allow"):
        Engine.from_pretrained(path, policy="auto", compress="yes", **hints)


def _auto_deployments() -> list[str]:
    """The hub models of the packaged HELM deployments whose policy is planned (`policy: auto`)."""
    import yaml

    from flexgen_helm import configs

    deployments = yaml.safe_load((configs.config_dir() / "model_deployments.yaml").read_text())["model_deployments"]
    return sorted({d["client_spec"]["args"]["pretrained_model_name_or_path"] for d in deployments
                   if d["client_spec"]["args"].get("policy") == "auto"})


def _hosts() -> list:
    """Hosts from the packaged profiles, at their own size and with the GPU and RAM a quarter as large
    (where offloading, and so compression, matters most)."""
    hosts = []
    for name in builtin_profiles():
        profile = load_profile(name)
        hosts += [profile, profile.with_memory(gpu=profile.gpu_bytes // 4, cpu=profile.cpu_bytes // 4)]
    return hosts


def test_policy_auto_is_exact_unless_compression_is_allowed(caplog):
    """For every packaged deployment planned at load time and every packaged host: no compression
    without the opt-in; with it, the planner may compress (it does somewhere here) and says it is lossy."""
    from flexgen_core.plan.auto import plan_for_engine
    from flexgen_core.policy import auto_compression

    names = _auto_deployments()
    assert len(names) >= 6, names
    compressed_when_allowed = 0
    for name in names:
        model = load_model(name)
        for host in _hosts():
            for compress in ("never", "allow"):
                switches = auto_compression(compress)
                caplog.clear()
                with caplog.at_level("WARNING", logger="flexgen_core.plan.auto"):
                    try:
                        policy = plan_for_engine(name=name, config=model.shape, layers=model.layers,
                                                 device_type=host.compute_device, dtype_bytes=2, hardware=host,
                                                 offload_dir=None, prompt_len=512, gen_len=32, num_prompts=64,
                                                 compress_weight=switches[0], compress_cache=switches[1])
                    except ValueError:  # nothing fits this host at all: no policy, exact or not
                        continue
                if compress == "never":
                    assert policy.lossy == [], (name, host.name, policy)
                else:
                    compressed_when_allowed += bool(policy.lossy)
                assert ("results are lossy" in caplog.text) == bool(policy.lossy)
    assert compressed_when_allowed > 0


def test_a_new_block_policy_runs_on_the_loaded_weights(tmp_path, monkeypatch):
    """Engine.replan applies a plan that keeps the loaded weights at once (another block shape here);
    the fields the weights depend on cannot change without a new load, and only planned engines re-plan."""
    from flexgen_core import Engine
    from flexgen_core.policy import WEIGHT_FIELDS
    from flexgen_core.testing import build_checkpoint

    monkeypatch.setenv("FLEXGEN_HARDWARE", str(cpu_host().save(tmp_path / "host.json")))
    path = build_checkpoint("tiny")
    with Engine.from_pretrained(path, policy="auto", device="cpu", offload_dir=tmp_path, prompt_len_hint=8,
                                gen_len_hint=1, num_prompts_hint=2) as engine:
        first = engine.policy
        replanned = engine.replan(prompt_len_hint=8, gen_len_hint=16, num_prompts_hint=64)
        assert engine.policy == replanned and replanned.block_size > first.block_size
        assert all(getattr(replanned, f) == getattr(first, f) for f in WEIGHT_FIELDS)
        with pytest.raises(ValueError, match="w_gpu_percent"):
            engine.use_block_policy(replanned.replace(w_gpu_percent=50, w_cpu_percent=50))
        engine.generate([[2, 5, 7]] * 3, max_new_tokens=2)
    with Engine.from_pretrained(path, policy=Policy(), device="cpu", offload_dir=tmp_path) as engine:
        with pytest.raises(ValueError, match="only an engine loaded with policy='auto' re-plans"):
            engine.replan(prompt_len_hint=8, gen_len_hint=16)


def test_planner_leaves_the_allocators_reserve_free_on_a_gpu():
    """The H200 measured 0.88 GiB reserved but unallocated by the caching allocator at a 6 GiB cap: the
    planner keeps that free on a GPU of 6 GiB or more, the same share of a smaller one, none on a CPU."""
    mib = 2**20
    for size, reserve in (("15GiB", 0.88 * GiB), ("6GiB", 0.88 * GiB), ("80GiB", 0.88 * GiB), ("1GiB", 0.88 * GiB / 6)):
        hw = T4.with_memory(gpu=parse_size(size))
        assert hw.allocator_reserve() == pytest.approx(reserve, abs=1)
        usable = usable_memory(hw, 0.95)["gpu"]
        assert usable == min(int(0.95 * hw.gpu_bytes), hw.gpu_bytes - hw.allocator_reserve())
    assert usable_memory(T4.with_memory(gpu=6 * GiB), 0.95)["gpu"] < 6 * GiB - 880 * mib
    host = cpu_host(8)
    assert host.allocator_reserve() == 0 and usable_memory(host, 0.95)["gpu"] == int(0.95 * host.gpu_bytes)
    # A profile that measured its own reserve keeps it, through its JSON too.
    measured = dataclasses.replace(T4, allocator_reserve_bytes=2 * GiB)
    assert usable_memory(measured, 0.95)["gpu"] == 13 * GiB
    again = HardwareProfile.from_dict(json.loads(json.dumps(measured.to_dict())))
    assert again == measured and "allocator_reserve_GB" not in T4.to_dict()["memory"]
    # And a plan made for 6 GiB stays within 6 GiB less the reserve.
    result = plan(load_model("facebook/opt-1.3b"), Workload(512, 32), T4.with_memory(gpu=6 * GiB, cpu=64 * GiB), 2,
                  PlanOptions(**SMALL_GRID))
    assert result.best.peak_memory["gpu"] <= 6 * GiB - 0.88 * GiB
