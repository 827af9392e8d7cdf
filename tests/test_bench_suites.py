"""The benchmark suites' arithmetic and wiring, without running a model: roofline floors on hand-computed
cases, block shapes, targets, and the command `flexgen bench` builds for each suite."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
roofline = pytest.importorskip("roofline")
suites = pytest.importorskip("suites")

from flexgen_core import bench_cli  # noqa: E402
from flexgen_core.models import opt  # noqa: E402


def tiny_model() -> "roofline.ModelFacts":
    # Per decoder layer 4 * 64 * 64 (attention) + 2 * 64 * 256 (MLP) = 49152 matrix parameters; output 1024 * 64.
    config = opt.OPTConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                    "ffn_dim": 256, "vocab_size": 1024, "max_position_embeddings": 256})
    return roofline.ModelFacts(config, opt.build_layers(config), "tiny")


def test_work_counts_matmul_and_attention_flops():
    model = tiny_model()
    assert model.matrix_params == 2 * 49152 + 65536
    w = roofline.work(model, num_seqs=1, prompt_len=10, gen_len=3, dtype_bytes=4)
    assert w.prefill_matmul_flops == 2 * (10 * 2 * 49152 + 65536)  # logits of the last position only
    assert w.prefill_attention_flops == 2 * 4 * 10 * 10 * 64
    assert w.decode_matmul_flops == 2 * 2 * (2 * 49152 + 65536)  # two decode steps
    keys = 11 + 12  # step t attends the prompt and t generated positions
    assert w.decode_attention_flops == 2 * 4 * keys * 64
    assert w.decode_cache_bytes == 2 * 2 * keys * 64 * 4


def test_floor_is_the_slowest_term_of_each_phase():
    model = tiny_model()
    rates = roofline.Rates(matmul_prefill=1e9, matmul_decode=1e9, attention_prefill=1e9, memory=None,
                           stream={"disk": 1e6}, source="test")
    # One block, 3 tokens: 3 weight passes, 1e6 bytes from disk each -> 1 s per pass.
    traffic = roofline.Traffic(weight_passes=3, streamed_bytes_per_pass={"disk": 10**6})
    floor = roofline.roofline(model, traffic, rates, 1, 10, 3, 4)
    assert floor.terms["prefill"]["disk read"] == pytest.approx(1.0)
    assert floor.terms["decode"]["disk read"] == pytest.approx(2.0)
    assert floor.seconds == pytest.approx(3.0)  # compute is microseconds: disk sets both floors
    assert floor.bound == "disk read"
    assert floor.streamed_bytes == 3 * 10**6


def test_memory_term_counts_each_gpu_batch():
    model = tiny_model()
    rates = roofline.Rates(1e15, 1e15, 1e15, memory=1e6, stream={}, source="test")
    one = roofline.roofline(model, roofline.Traffic(3, 1), rates, 2, 10, 3, 4)
    two = roofline.roofline(model, roofline.Traffic(3, 2), rates, 2, 10, 3, 4)
    weights = model.matrix_params * 4
    assert two.terms["decode"]["memory"] - one.terms["decode"]["memory"] == pytest.approx(2 * weights / 1e6)
    assert one.bound == "memory"


def test_parse_shapes_drops_blocks_larger_than_the_prompts():
    assert suites.parse_shapes(["16x1", "4x2", "2x2"], 8) == [(4, 2), (2, 2)]
    assert suites.parse_shapes(["16x1"], 2) == [(2, 1)]
    with pytest.raises(SystemExit):
        suites.parse_shapes(["4by2"], 8)


def test_targets_report_missed_with_reason():
    rows = [{"system": "a", "tokens_per_s": 8.0}, {"system": "b", "tokens_per_s": 10.0}]
    target = suites.Target("a vs b", 0.8, suites.ratio(rows[0], rows[1]), "because")
    assert target.met is True
    missed = suites.Target("a vs b", 10, 0.8, "because")
    section = suites.targets_section([target, missed])
    assert "**no**" in section and "because" in section
    assert suites.Target("x", 1, None).met is None


def _bench_args(*argv):
    parser = argparse.ArgumentParser(prog="flexgen")
    bench_cli.add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_bench_command_for_each_suite(tmp_path):
    for name, suite in bench_cli.SUITES.items():
        assert (bench_cli.BENCHMARKS_DIR / suite.script).is_file(), name
    command = bench_cli.suite_command(_bench_args("cpu-offload", "--num-prompts", "8", "--budget", "128MiB",
                                                  "--out", str(tmp_path)))
    assert command[1].endswith("bench_cpu.py") and command[2] == "cpu-offload"
    assert command[3:] == ["--num-prompts", "8", "--out", str(tmp_path), "--budget", "128MiB"]
    # Without --out the results go to a scratch folder, never into the checkout's committed ones.
    smoke = bench_cli.suite_command(_bench_args("cpu-small", "--smoke"))
    assert smoke[3:] == ["--num-prompts", "2", "--prompt-len", "32", "--gen-len", "4", "--quick-profile",
                         "--batch1-prompts", "1", "--out", str(bench_cli.SCRATCH_OUT)]
    assert bench_cli.BENCHMARKS_DIR not in bench_cli.SCRATCH_OUT.parents
    # helm: the script's --out is the stem of its .json/.md, which run_bench plots from.
    helm = bench_cli.suite_command(_bench_args("helm", "--num-prompts", "4", "--out", str(tmp_path)))
    assert helm[1].endswith("bench_helm.py")
    assert helm[2:] == ["--instances", "4", "--threads", "4", "--out", str(tmp_path / "helm")]


def test_bench_passes_the_gpu_30b_shape_and_limits(tmp_path):
    command = bench_cli.suite_command(_bench_args("gpu-30b", "--shape", "opt-6.7b", "--budget", "6GiB",
                                                  "--system-timeout", "90", "--out", str(tmp_path)))
    assert command[1].endswith("bench_gpu30b.py")
    assert command[2:] == ["--out", str(tmp_path), "--budget", "6GiB", "--shape", "opt-6.7b",
                           "--system-timeout", "90.0"]


@pytest.mark.parametrize("argv", [("helm", "--gen-len", "4"), ("cpu-small", "--budget", "1GiB"),
                                  ("cpu-offload", "--checkpoint-dir", "/x"), ("gpu-30b", "--shapes", "4x1"),
                                  ("cpu-small", "--shapes", "4by4"), ("cpu-small", "--shape", "opt-6.7b"),
                                  ("cpu-offload", "--system-timeout", "9")])
def test_bench_rejects_options_a_suite_does_not_take(argv):
    with pytest.raises(ValueError):
        bench_cli.suite_command(_bench_args(*argv))


def test_bench_outside_a_checkout_says_so(tmp_path, monkeypatch):
    """Installed from a wheel there is no benchmarks/ folder beside the package: one plain error."""
    monkeypatch.setattr(bench_cli, "BENCHMARKS_DIR", tmp_path / "site-packages" / "benchmarks")
    with pytest.raises(ValueError, match="repository checkout"):
        bench_cli.suite_command(_bench_args("cpu-small", "--smoke"))


@pytest.mark.parametrize("suite", ["gpu-30b", "gpu-moe"])
def test_gpu_suites_without_cuda_exit_non_zero(suite):
    """A suite that measured nothing must not look like a success to a script running it."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the suite would run for real")
    out = subprocess.run([sys.executable, "-m", "flexgen_core.cli", "bench", suite], capture_output=True, text=True)
    assert out.returncode == bench_cli.SKIPPED_EXIT
    assert f"{suite} skipped: no CUDA device" in out.stdout and "nothing was measured" in out.stderr


ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_in_one_line():
    """scripts/gpu_check.sh on a host without CUDA: one line, the benchmarks' skip code, nothing run."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the check would run for real")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env=os.environ | {"PYTHON": sys.executable}, timeout=120)
    assert out.returncode == bench_cli.SKIPPED_EXIT, out.stdout + out.stderr
    assert out.stdout.splitlines() == [out.stdout.strip()] and "gpu_check skipped: no CUDA device" in out.stdout
    assert out.stderr == ""


def test_gpu_30b_suite_end_to_end_on_a_tiny_shape(tmp_path):
    """The gpu-30b suite's whole path on the CPU (its testing device) with a tiny OPT shape: every system in
    a process of its own, one table. An injected crash and an injected timeout become those systems' rows and
    the others still run; FlexGen 0.1.8 (not installed here, and CUDA-only) is a skipped row."""
    from test_planner import cpu_host

    profile = cpu_host(8).save(tmp_path / "cpu-profile.json")
    out_dir = tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu30b.py"), "--device", "cpu", "--shape", "opt-tiny",
               "--budget", "64MiB", "--num-prompts", "4", "--prompt-len", "16", "--gen-len", "4",
               "--profile", str(profile), "--checkpoint-dir", str(tmp_path / "checkpoint"), "--out", str(out_dir),
               "--offload-dir", str(tmp_path), "--logs", str(tmp_path / "logs"), "--system-timeout", "60",
               "--systems", "transformers", "engine-paper", "engine", "engine-4bit", "flexgen-paper", "accelerate",
               "--inject-failure", "transformers=crash", "--inject-failure", "engine-4bit=timeout"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out_dir / "gpu-30b-opt-tiny.md").read_text()
    assert table in done.stdout  # the one table, printed
    rows = {row["system"]: row for row in json.loads((out_dir / "gpu-30b-opt-tiny.json").read_text())["rows"]}
    paper = rows["engine: the paper's HELM policy for OPT-IML-30B"]
    planner = rows["engine: planner's policy"]
    for row in (paper, planner):
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["accounted_gpu_peak_mib"] > 0
        assert row["process"]["exit_code"] == 0
    assert paper["policy"]["cpu_cache_compute"] and paper["batch"] == "4x1"
    accelerate = next(row for name, row in rows.items() if name.startswith("Accelerate"))
    assert accelerate["status"] == "ok" and accelerate["batch"] == "4"  # the largest of 16 8 4 2 1 <= 4 prompts
    assert rows["transformers generate (whole model on the CPU)"]["status"].startswith("failed: InjectedCrash")
    assert rows["engine: planner's policy, 4-bit weights and cache"]["status"] == "timed out after 2 s"
    flexgen = rows["FlexGen 0.1.8: the paper's HELM policy for OPT-IML-30B"]
    assert flexgen["status"].startswith("skipped: ")
    for label in ("engine: the paper's HELM policy for OPT-IML-30B", "engine: planner's policy"):
        assert any(line.startswith(f"| {label} | 4x1 |") and "| ok |" in line for line in table.splitlines())


def test_gpu_moe_suite_command_and_defaults(tmp_path):
    """`flexgen bench gpu-moe` runs bench_gpu30b.py's gpu-moe suite with the GPU suites' options; the script
    fills the suite's shape, cap, systems and Accelerate margin, and takes only mixture-of-experts shapes."""
    command = bench_cli.suite_command(_bench_args("gpu-moe", "--shape", "olmoe-tiny", "--time-limit", "120",
                                                  "--out", str(tmp_path)))
    assert command[1].endswith("bench_gpu30b.py")
    assert command[2:] == ["--suite", "gpu-moe", "--out", str(tmp_path), "--shape", "olmoe-tiny", "--time-limit",
                           "120.0"]
    with pytest.raises(ValueError):
        bench_cli.suite_command(_bench_args("gpu-moe", "--shapes", "4x1"))
    bench = pytest.importorskip("bench_gpu30b")
    args = bench.build_parser().parse_args(["--suite", "gpu-moe"])
    bench.apply_suite_defaults(args)
    assert (args.shape, args.budget, args.accelerate_margin) == ("olmoe-1b-7b", "3GiB", 2**30)
    assert "accelerate" in args.systems and not any(s.startswith("flexgen") for s in args.systems)
    for suite, shape in (("gpu-moe", "opt-6.7b"), ("gpu-30b", "olmoe-tiny")):
        with pytest.raises(SystemExit, match="takes --shape"):
            bench.apply_suite_defaults(bench.build_parser().parse_args(["--suite", suite, "--shape", shape]))


def test_random_moe_checkpoint_is_in_the_hub_layout(tmp_path):
    """A random OLMoE checkpoint holds one tensor per expert (as the hub's, which transformers 5 fuses on
    loading), one shard per decoder layer, unit norms and a zero EOS row in the (untied) output embedding."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    random_checkpoint = pytest.importorskip("random_checkpoint")
    config = random_checkpoint.model_config("olmoe-tiny")
    path = random_checkpoint.build_random_checkpoint(tmp_path / "olmoe", config, "float32", device="cpu",
                                                     progress=False)
    weight_map = json.loads((path / random_checkpoint.INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) == config.num_hidden_layers + 1
    last = config.num_experts - 1
    for name in (f"model.layers.1.mlp.experts.{last}.down_proj.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.0.self_attn.q_norm.weight", "lm_head.weight"):
        assert name in weight_map, name
    with safe_open(str(path / weight_map["lm_head.weight"]), "pt") as shard:
        assert not shard.get_tensor("lm_head.weight")[config.eos_token_id].any()
    with safe_open(str(path / weight_map["model.layers.0.self_attn.q_norm.weight"]), "pt") as shard:
        assert (shard.get_tensor("model.layers.0.self_attn.q_norm.weight") == 1).all()
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert random_checkpoint.checkpoint_bytes(config, torch.float32) == sum(
        f.stat().st_size for f in path.glob("model-*.safetensors")) - _safetensors_headers(path)


def _safetensors_headers(path: Path) -> int:
    """Bytes of the safetensors files that are not tensor data: each file's 8-byte length and JSON header."""
    total = 0
    for file in path.glob("model-*.safetensors"):
        with open(file, "rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return total


def test_gpu_moe_suite_end_to_end_on_a_tiny_shape(tmp_path):
    """The gpu-moe suite's whole path on the CPU (its testing device) with a tiny OLMoE shape: the engine under
    the planner's policy and Accelerate, each in a process of its own, one table; FlexGen 0.1.8 (OPT only) is
    a skipped row."""
    from test_planner import cpu_host

    profile = cpu_host(8).save(tmp_path / "cpu-profile.json")
    out_dir = tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu30b.py"), "--suite", "gpu-moe", "--device", "cpu",
               "--shape", "olmoe-tiny", "--budget", "64MiB", "--num-prompts", "4", "--prompt-len", "16",
               "--gen-len", "4", "--profile", str(profile), "--checkpoint-dir", str(tmp_path / "checkpoint"),
               "--out", str(out_dir), "--offload-dir", str(tmp_path), "--logs", str(tmp_path / "logs"),
               "--system-timeout", "60", "--systems", "engine", "flexgen-paper", "accelerate"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out_dir / "gpu-moe-olmoe-tiny.md").read_text()
    assert table in done.stdout and table.startswith("# gpu-moe: olmoe-tiny shape")
    data = json.loads((out_dir / "gpu-moe-olmoe-tiny.json").read_text())
    assert data["suite"] == "gpu-moe"
    rows = {row["system"]: row for row in data["rows"]}
    engine = rows["engine: planner's policy"]
    assert engine["status"] == "ok" and engine["tokens_per_s"] > 0 and engine["process"]["exit_code"] == 0
    accelerate = next(row for name, row in rows.items() if name.startswith("Accelerate"))
    assert accelerate["status"] == "ok" and accelerate["batch"] == "4"
    flexgen = next(row for name, row in rows.items() if name.startswith("FlexGen"))
    assert flexgen["status"] == "skipped: FlexGen 0.1.8 runs OPT models only"
    assert "Engine vs Accelerate on this machine" in table and "experts per layer" in table


def test_gpu_check_skips_the_moe_benchmark_when_time_is_short(tmp_path):
    """scripts/gpu_check.sh's testing path on the CPU: with too little of its time limit left, the MoE benchmark
    is skipped and says so (a skip, not a failure: the exit code is the headline benchmark's, here not run)."""
    from test_planner import cpu_host

    profile = cpu_host(8).save(tmp_path / "cpu-profile.json")
    env = os.environ | {"PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SHAPE": "opt-tiny",
                        "GPU_CHECK_MOE_SHAPE": "olmoe-tiny", "GPU_CHECK_PROFILE": str(profile),
                        "GPU_CHECK_TIME_LIMIT": "70"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=240)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "gpu_check: no time left for the benchmark" in out.stdout
    assert "gpu_check: MoE benchmark skipped:" in out.stdout
    assert "MoE benchmark skipped (see " in out.stdout.splitlines()[-1]
    assert "MoE benchmark skipped:" in (tmp_path / "out" / "gpu-check-moe.log").read_text()
