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


def test_gpu_30b_without_cuda_exits_non_zero():
    """A suite that measured nothing must not look like a success to a script running it."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the suite would run for real")
    out = subprocess.run([sys.executable, "-m", "flexgen_core.cli", "bench", "gpu-30b"], capture_output=True, text=True)
    assert out.returncode == bench_cli.SKIPPED_EXIT
    assert "gpu-30b skipped: no CUDA device" in out.stdout and "nothing was measured" in out.stderr


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
