"""Bad input gets a clear error naming the problem, before expensive work; the engine stays usable."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from flexgen_core import Engine, Policy
from flexgen_core.testing import build_checkpoint, sample_prompts


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_checkpoint("odd")
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=2, w_gpu_percent=50, w_cpu_percent=0),
                                offload_dir=tmp_path_factory.mktemp("offload")) as e:
        yield e


def _copy(tmp_path, name="odd"):
    dst = tmp_path / "ckpt"
    shutil.copytree(build_checkpoint(name), dst)
    return dst


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[2] * 299], dict(max_new_tokens=5), "context of 300 positions"),
    ([[2, 5, 1001]], {}, r"token id\(s\) \[1001\] outside the vocabulary \[0, 1001\)"),
    ([[2, -1]], {}, "outside the vocabulary"),
    ([[2, 5], []], {}, "prompt 1 is empty"),
    ([[2, 5]], dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    ([[2, 5]], dict(top_p=0), "top_p"),
    ([[2, 5]], dict(num_completions=0), "num_completions"),
    ([[2, 5]], dict(stop=[[]]), "stop sequences"),
    ([[2, 5]], dict(seed=[1, 2]), "seed has 2 values for 1 prompts"),
])
def test_bad_requests_are_rejected_and_engine_stays_usable(engine, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, **kwargs)
    good = engine.generate([[2, 5, 9]], max_new_tokens=2)
    assert len(good[0].completions[0].token_ids) == 2


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "nope")


def test_checkpoint_without_config_or_weights(tmp_path):
    path = _copy(tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="has no weights"):
        Engine.from_pretrained(path, offload_dir=tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        Engine.from_pretrained(path, offload_dir=tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    path = _copy(tmp_path)
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        Engine.from_pretrained(path, offload_dir=tmp_path)


def test_missing_shard_is_named(tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(build_checkpoint("odd", sharded=True), dst)
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        Engine.from_pretrained(dst, offload_dir=tmp_path)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_an_index_cannot_point_the_loader_outside_the_checkpoint(tmp_path, escape):
    dst = tmp_path / "sharded"
    shutil.copytree(build_checkpoint("odd", sharded=True), dst)
    shutil.copy(sorted(dst.glob("model-*.safetensors"))[0], tmp_path / "outside.safetensors")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = escape
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names shard file .* not a file inside the checkpoint folder"):
        Engine.from_pretrained(dst, offload_dir=tmp_path / "off")


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _copy(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture.*OPTForCausalLM"):
        Engine.from_pretrained(path, offload_dir=tmp_path)


def test_offload_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be created"):
        Engine.from_pretrained(build_checkpoint("odd"), offload_dir=blocker / "sub")


def test_offload_subdir_removed_on_close_and_on_error(tmp_path):
    path = build_checkpoint("odd")
    with Engine.from_pretrained(path, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=tmp_path) as e:
        assert len(list(tmp_path.iterdir())) == 1  # this engine's own subfolder
        e.generate([[2, 5]], max_new_tokens=1)
    assert list(tmp_path.iterdir()) == []
    broken = _copy(tmp_path / "b")
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 95  # shapes no longer match the tensors: fails while loading
    config["num_attention_heads"] = 5
    config["word_embed_proj_dim"] = 95
    (broken / "config.json").write_text(json.dumps(config))
    offload = tmp_path / "off"
    with pytest.raises(ValueError, match="shape"):
        Engine.from_pretrained(broken, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=offload)
    assert list(offload.iterdir()) == []


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flexgen_core.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "does not exist"),
    (["generate", "--model", "{odd}", "--prompt", "x", "--percent", "60", "60", "0", "0", "100", "0"], "exceeds 100"),
    (["generate", "--model", "{odd}", "--prompt", "x", "--max-new-tokens", "400"], "context of 300"),
    (["generate", "--model", "{odd}", "--prompt", "x", "--gpu-batch-size", "0"], "gpu_batch_size"),
])
def test_cli_errors_are_one_line_without_traceback(args, message):
    args = [a.replace("{odd}", str(build_checkpoint("odd"))) for a in args]
    out = _cli(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_cli_generate_prints_completion():
    path = build_checkpoint("odd")
    out = _cli("generate", "--model", str(path), "--prompt", "import os", "--max-new-tokens", "4",
               "--percent", "0", "50", "0", "100", "100", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("import os") and len(out.stdout.strip()) > len("import os")


def test_cli_generate_prompt_file_completions_stop_and_throughput(tmp_path):
    """Prompts from a file in one call, several completions each, a stop text; the throughput and
    time to first token on stderr. The texts are the engine's own (checked against the API)."""
    from transformers import AutoTokenizer

    path = build_checkpoint("odd")
    prompts = ["import os", "def parse(self):"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = _cli("generate", "--model", str(path), "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens",
               "6", "--num-completions", "2", "--temperature", "1", "--seed", "3", "--stop", "e")
    assert out.returncode == 0, out.stderr
    tokenizer = AutoTokenizer.from_pretrained(path)
    with Engine.from_pretrained(path, offload_dir=tmp_path / "offload") as engine:
        results = engine.generate([tokenizer(p)["input_ids"] for p in prompts], max_new_tokens=6, temperature=1.0,
                                  num_completions=2, seed=3, stop=[tokenizer("e", add_special_tokens=False)["input_ids"]])
    expected = []
    for p_idx, (prompt, result) in enumerate(zip(prompts, results)):
        for c_idx, completion in enumerate(result.completions):
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            expected += [f"--- prompt {p_idx + 1}, completion {c_idx + 1} ({completion.finish_reason})",
                         prompt + text.split("e")[0]]
    assert out.stdout.splitlines() == expected
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    assert re.fullmatch(rf"{tokens} tokens for 2 prompt\(s\) in [0-9.]+ s: [0-9.]+ tokens/s; first token after "
                        r"[0-9.]+ s \(the prompt pass\), decode [0-9.]+ s\n", out.stderr), out.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad = _cli("generate", "--model", str(path), "--prompt-file", str(empty))
    assert bad.returncode == 1 and bad.stderr == f"error: --prompt-file {str(empty)!r} holds no prompt (one per line)\n"


def test_cli_generate_policy_auto_plans_and_its_flags_replay(tmp_path, monkeypatch):
    """`--policy auto` plans for the call and prints the plan's flags; those flags give the same text."""
    from test_planner import cpu_host

    monkeypatch.setenv("FLEXGEN_HARDWARE", str(cpu_host().save(tmp_path / "host.json")))
    path = build_checkpoint("odd")
    args = ["generate", "--model", str(path), "--prompt", "import os", "--max-new-tokens", "5"]
    auto = _cli(*args, "--policy", "auto")
    assert auto.returncode == 0, auto.stderr
    flags = next(line for line in auto.stderr.splitlines() if line.startswith("policy auto: ")).split(": ", 1)[1]
    replay = _cli(*args, *flags.split())
    assert replay.returncode == 0 and replay.stdout == auto.stdout
    both = _cli(*args, "--policy", "auto", "--gpu-batch-size", "4")
    assert both.returncode == 2 and "--policy auto plans --gpu-batch-size itself" in both.stderr
    assert "compress" not in flags  # exact unless asked
    stray = _cli(*args, "--compress", "allow")
    assert stray.returncode == 2 and "--compress goes with --policy auto" in stray.stderr


def test_policy_exceeding_a_tier_is_rejected_before_loading(tmp_path, monkeypatch):
    """The exact accounting is checked against what each tier has free (here: a nearly full disk)."""
    from flexgen_core.runtime import capacity

    real = capacity.available_bytes
    monkeypatch.setattr(capacity, "available_bytes", lambda *a: real(*a) | {"disk": 1000})
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0)
    with pytest.raises(capacity.PolicyDoesNotFit, match=r"of disk for the weights.*short by"):
        Engine.from_pretrained(build_checkpoint("odd"), policy=policy, offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_block_exceeding_memory_is_rejected_and_engine_stays_usable(tmp_path, monkeypatch):
    from flexgen_core.runtime import capacity

    with Engine.from_pretrained(build_checkpoint("odd"), offload_dir=tmp_path) as engine:
        real = capacity.available_bytes
        monkeypatch.setattr(capacity, "available_bytes", lambda *a: real(*a) | {"cpu": 10_000, "gpu": 10_000})
        with pytest.raises(capacity.PolicyDoesNotFit, match=r"needs .* GiB of RAM for a block of 1 sequences"):
            engine.generate([[2] * 200], max_new_tokens=50)
        monkeypatch.undo()
        assert len(engine.generate([[2, 5]], max_new_tokens=3)[0].completions[0].token_ids) == 3


_HOLD_ENGINE = r"""
import sys, time
from flexgen_core import Engine, Policy
engine = Engine.from_pretrained(sys.argv[1], policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=sys.argv[2])
print("ready", flush=True)
time.sleep(60)
"""


def _start_holder(path, offload):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_ENGINE, str(path), str(offload)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_removes_offload_files(tmp_path):
    proc = _start_holder(build_checkpoint("odd"), tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    proc.terminate()
    proc.wait(timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_stale_offload_dirs_of_killed_runs_are_removed(tmp_path):
    path = build_checkpoint("odd")
    proc = _start_holder(path, tmp_path)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait(timeout=30)
    (stale,) = list(tmp_path.iterdir())
    with Engine.from_pretrained(path, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=tmp_path) as e:
        assert e.offload.stale_removed == [stale]
        assert [p.name for p in tmp_path.iterdir()] == [e.offload.path.name]


def test_two_engines_share_one_offload_dir(tmp_path):
    path = build_checkpoint("odd")
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
    prompts = sample_prompts(path, 3, 4, 12, seed=0)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as a, \
            Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as b:
        assert a.offload.path != b.offload.path and len(list(tmp_path.iterdir())) == 2
        ra, rb = a.generate(prompts, max_new_tokens=4), b.generate(prompts, max_new_tokens=4)
    assert [r.completions[0].token_ids for r in ra] == [r.completions[0].token_ids for r in rb]
    assert list(tmp_path.iterdir()) == []


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_both_tools_have_a_version_help_for_every_option_and_one_exit_code_convention(tmp_path):
    """--version; every option of every subcommand has help (its default shown by the formatter); a usage
    mistake exits 2 and a failure while running exits 1, in both tools."""
    from importlib import metadata

    from flexgen_core import cli as flexgen_cli
    from flexgen_helm import cli as helm_cli

    for tool in ("flexgen", "flexgen-helm"):
        out = subprocess.run([shutil.which(tool) or tool, "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout == f"{tool} {metadata.version('flexgen-helm')}\n"
    for parser in (flexgen_cli.build_parser(), helm_cli.build_parser()):
        for name, sub in _subparsers(parser):
            assert sub.description, f"{parser.prog} {name} has no description"
            for action in sub._actions:
                assert action.help, f"{parser.prog} {name} {action.option_strings or action.dest} has no help"
    text = subprocess.run([shutil.which("flexgen"), "generate", "--help"], capture_output=True, text=True).stdout
    for shown in ("tokens to generate per completion (default: 32)", "0 is greedy (default: 0.0)",
                  "(default: 1.0)", "{auto,cpu,cuda,cuda:N,simulated}"):
        assert shown in " ".join(text.split()), shown
    usage = _cli("plan", "--model", "facebook/opt-1.3b", "--hardware", "t4-gcp", "--gpu-mem", "16")
    failure = _cli("plan", "--model", "facebook/opt-1.3b", "--hardware", "t4-gcp", "--gpu-mem", "16MiB")
    bad_device = _cli("generate", "--model", "x", "--prompt", "x", "--device", "gpu")
    assert (usage.returncode, failure.returncode, bad_device.returncode) == (2, 1, 2)
    assert "error: no policy fits" in failure.stderr and "'gpu' is not a device" in bad_device.stderr
    helm_usage = subprocess.run([shutil.which("flexgen-helm"), "compare", "--suite", "s", "--against", str(tmp_path),
                                 "--model-map", "x"], capture_output=True, text=True)
    helm_failure = subprocess.run([shutil.which("flexgen-helm"), "conf", "nope"], capture_output=True, text=True)
    assert (helm_usage.returncode, helm_failure.returncode) == (2, 1)
