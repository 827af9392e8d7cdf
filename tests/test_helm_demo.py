"""`flexgen-helm demo` from an empty folder with an empty home (nothing built, nothing cached),
offline; then helm-summarize's output is there and helm-server serves it (acceptance 5). Also the
packaged configs: registration through the entry point, prod_env/ overrides, the paper's conf.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from helm_support import helm_bin, offline_env

from flexgen_core.testing import PRESETS
from flexgen_core.testing.common import default_cache_root
from flexgen_core.testing.real import RealModelUnavailable, real_checkpoint
from flexgen_helm import configs, demo, demo_data

REPO = Path(__file__).resolve().parents[1]


def _run_demo(home: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = offline_env(home)
    # The real model: fetched and converted once per machine into the test cache, not once per home.
    env["FLEXGEN_TEST_CACHE"] = str(default_cache_root())
    return subprocess.run([helm_bin("flexgen-helm"), "demo", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo from an empty folder and an empty home, on the real model (the default)."""
    try:
        real_checkpoint()
    except RealModelUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    home = tmp_path_factory.mktemp("home")
    workdir = tmp_path_factory.mktemp("empty")
    completed = _run_demo(home, workdir, "--max-eval-instances", "6", "-n", "8")
    return {"completed": completed, "workdir": workdir, "home": home}


def _table_rows(out: str) -> dict[str, list[str]]:
    """The demo's table: from its header to the first blank line."""
    table = out[out.rindex("\n", 0, out.index("main metric")) + 1:].split("\n\n")[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split()
        if cells and ":" in cells[0] and len(cells) >= 6:
            rows[cells[0]] = cells
    return rows


def _schema_main_metric(group: str) -> str:
    """The main metric HELM's schema file names for a run group (read here with yaml, apart from the code)."""
    import importlib.resources

    import yaml

    text = importlib.resources.files("helm.benchmark.static").joinpath("schema_classic.yaml").read_text()
    (found,) = [g for g in yaml.safe_load(text)["run_groups"] if g["name"] == group]
    return found["environment"]["main_name"]


def test_demo_runs_the_real_model_and_prints_its_table(demo_run):
    completed = demo_run["completed"]
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert "SmolLM2-135M-Instruct" in out and "Q4_1" in out and "RANDOM" not in out
    assert "[1/3]" in out and "[2/3]" in out and "[3/3]" in out
    rows = _table_rows(out)
    expected = {entry.split(",model=")[0] for entry in demo.read_run_entries(demo.DEMO_CONF)}
    assert set(rows) == expected and len(expected) == 4
    for run, cells in rows.items():
        metric, value = cells[1].split("=")
        assert metric == _schema_main_metric(run.split(":")[0]) and 0.0 <= float(value) <= 1.0
        # one request per instance; separate_original scores each of the 4 options apart
        assert int(cells[2]) == (24 if "separate" in run else 6)
        assert float(cells[3]) > 1 and cells[5] == "s"
    # HELM's own output is in the log; ours (progress per batch, a summary per run entry) on screen.
    log = demo_run["workdir"] / "benchmark_output" / "logs" / "flexgen-demo.log"
    assert f"HELM's own output goes to {log}" in out and log.is_file() and "Looking in path" in log.read_text()
    assert "Looking in path" not in out and "INFO" not in out and out.count("\n") < 80
    assert "    FlexGen: [6/6 requests to flexgen/smollm2-135m-instruct] batch of" in out and "requests to flexgen/smollm2-135m-instruct in" in out
    assert "Policy: 16x2 blocks, percent 40 40 100 0 100 0" in out and "mean batch size: over requests" in out
    # Scoring batches (separate_original: max_tokens 0) report the prompt tokens they read, not "0.0 tokens/s";
    # no progress line is left open ("... {").
    assert "prompt tokens scored/s" in out and " 0.0 tokens/s" not in out
    assert not [line for line in out.splitlines() if line.rstrip().endswith("{")]
    assert "From HELM's cache (computed by an earlier run): nothing." in out
    link = demo_run["home"] / ".cache" / "flexgen-helm" / "demo" / "smollm2-135m-instruct"
    assert (link / "config.json").is_file() and link.resolve() == real_checkpoint().resolve()
    data = demo_run["workdir"] / "benchmark_output" / "scenarios" / "mmlu" / "data" / "test"
    assert (data / f"{demo_data.DEMO_SUBJECT}_test.csv").is_file()


def test_random_model_demo(tmp_path):
    """`--random-model`: the locally built random-weight OPT, no download at all."""
    home, workdir = tmp_path / "home", tmp_path / "work"
    workdir.mkdir()
    completed = _run_demo(home, workdir, "--random-model", "--max-eval-instances", "4", "-n", "4")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "RANDOM weights" in completed.stdout
    rows = _table_rows(completed.stdout)
    assert set(rows) == {"synthetic_reasoning:mode=pattern_match", "synthetic_reasoning_natural:difficulty=easy"}
    assert all(cells[2] == "4" for cells in rows.values())
    model_dir = home / ".cache" / "flexgen-helm" / "demo" / "opt-demo"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()


def test_demo_keeps_an_existing_mmlu_data_folder(tmp_path):
    data = tmp_path / "scenarios" / "mmlu" / "data"
    assert demo_data.write_mmlu_demo(tmp_path)
    rows = (data / "test" / f"{demo_data.DEMO_SUBJECT}_test.csv").read_text().splitlines()
    assert len(rows) == 20 and all(row.rsplit(",", 1)[1] in "ABCD" for row in rows)
    (data / "test" / "other_test.csv").write_text("kept\n")
    assert not demo_data.write_mmlu_demo(tmp_path)
    assert (data / "test" / "other_test.csv").read_text() == "kept\n"


def test_demo_output_summarized_and_served(demo_run):
    output_path = demo_run["workdir"] / "benchmark_output"
    suite_dir = output_path / "runs" / "flexgen-demo"
    assert (suite_dir / "groups").is_dir() and (suite_dir / "summary.json").is_file()
    runs = [path for path in suite_dir.glob("*/stats.json")]
    assert len(runs) == 4
    for stats_path in runs:
        batch_sizes = [s for s in json.loads(stats_path.read_text()) if s["name"]["name"] == "batch_size"]
        assert batch_sizes and batch_sizes[0]["mean"] > 1

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [helm_bin("helm-server"), "--port", str(port), "--output-path", str(output_path), "--suite", "flexgen-demo"],
        cwd=demo_run["workdir"],
        env=offline_env(demo_run["home"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never via a proxy
    try:
        body = None
        deadline_s = time.monotonic() + 60
        while body is None and time.monotonic() < deadline_s:
            try:
                url = f"http://127.0.0.1:{port}/benchmark_output/runs/flexgen-demo/summary.json"
                with opener.open(url, timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                assert server.poll() is None, "helm-server exited"
                time.sleep(0.5)
        assert body is not None, "helm-server did not answer"
        assert body["suite"] == "flexgen-demo"
        with opener.open(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_error_is_one_line(tmp_path):
    completed = subprocess.run(
        [helm_bin("flexgen-helm"), "demo", "--max-eval-instances", "0"],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith("error: ") and "Traceback" not in completed.stderr


# -- packaged configs --------------------------------------------------------------------------


def test_entry_point_points_at_the_plugin():
    (entry,) = [ep for ep in entry_points().select(group="helm") if ep.value == "flexgen_helm.plugin"]
    assert entry.name == "flexgen"


def test_demo_deployment_matches_the_demo_model():
    deployment = configs.packaged_deployment(configs.DEMO_DEPLOYMENT)
    assert deployment["max_sequence_length"] == PRESETS[demo.DEMO_PRESET].max_positions - 1
    metadata = {m["name"]: m for m in configs.load_config(configs.MODEL_METADATA_FILE)["models"]}
    assert metadata[configs.DEMO_DEPLOYMENT]["num_parameters"] == PRESETS[demo.DEMO_PRESET].num_params
    assert "random weights" in metadata[configs.DEMO_DEPLOYMENT]["display_name"].lower()
    assert not deployment["client_spec"]["args"]["pretrained_model_name_or_path"].startswith("~")


def test_real_demo_deployment_matches_the_real_model():
    """The packaged SmolLM2 entries agree with the checkpoint the demo links (positions, parameters,
    the tokenizer's end-of-text token and its lack of a BOS token)."""
    try:
        path = real_checkpoint()
    except RealModelUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    deployment = configs.packaged_deployment(demo.REAL_DEPLOYMENT)
    assert deployment["max_sequence_length"] == config["max_position_embeddings"]  # no prefix token to leave room for
    metadata = {m["name"]: m for m in configs.load_config(configs.MODEL_METADATA_FILE)["models"]}
    params = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            params += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    assert metadata[demo.REAL_DEPLOYMENT]["num_parameters"] == params
    (tokenizer_config,) = [t for t in configs.load_config(configs.TOKENIZER_CONFIGS_FILE)["tokenizer_configs"]
                           if t["name"] == deployment["tokenizer_name"]]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer_config["end_of_text_token"] == tokenizer.eos_token
    assert tokenizer_config["prefix_token"] == "" and tokenizer("Hi")["input_ids"][0] != tokenizer.bos_token_id
    assert deployment["client_spec"]["args"]["pretrained_model_name_or_path"] == str(demo.model_dir(demo.REAL_DEPLOYMENT))


def test_packaged_tokenizers_are_checked_and_agree_with_helms_own():
    """Every packaged deployment's tokenizer is packaged, loads through the preflight
    (CheckedHuggingFaceTokenizer), and, for a model HELM serves itself, has the special tokens of HELM's
    own tokenizer config for that model: both clients then frame prompts alike (HELM's language-modeling
    adapter prepends `prefix_token`; `end_of_text_token` ends generated text)."""
    import helm

    helm_configs = Path(helm.__file__).parent / "config"
    helm_tokenizers: dict = {}
    for tokenizer in yaml.safe_load((helm_configs / "tokenizer_configs.yaml").read_text())["tokenizer_configs"]:
        helm_tokenizers.setdefault(tokenizer["name"], tokenizer)  # HELM's file names one twice, alike
    helm_deployments = yaml.safe_load((helm_configs / "model_deployments.yaml").read_text())["model_deployments"]
    ours = {t["name"]: t for t in configs.load_config(configs.TOKENIZER_CONFIGS_FILE)["tokenizer_configs"]}
    compared = []
    for deployment in configs.load_config(configs.MODEL_DEPLOYMENTS_FILE)["model_deployments"]:
        tokenizer = ours[deployment["tokenizer_name"]]
        assert tokenizer["tokenizer_spec"]["class_name"] == "flexgen_helm.tokenizer.CheckedHuggingFaceTokenizer"
        tokens = (tokenizer["end_of_text_token"], tokenizer["prefix_token"])
        helms = {(helm_tokenizers[d["tokenizer_name"]]["end_of_text_token"],
                  helm_tokenizers[d["tokenizer_name"]]["prefix_token"])
                 for d in helm_deployments
                 if d["model_name"] == deployment["model_name"] and d.get("tokenizer_name") in helm_tokenizers}
        if helms:
            assert helms == {tokens}, (deployment["name"], tokens, helms)
            compared.append(deployment["model_name"])
    # The MoE and Phi-3 models HELM knows among them (Qwen3-8B and Qwen3-30B-A3B it does not).
    assert {"mistralai/mixtral-8x7b-32kseqlen", "allenai/olmoe-1b-7b-0125-instruct",
            "microsoft/phi-3-medium-4k-instruct", "meta/llama-2-7b"} <= set(compared)


_REGISTRATION_CHECK = """
import json, sys
from helm.benchmark.config_registry import register_builtin_configs_from_helm_package, register_configs_from_directory
from helm.benchmark.run import load_entry_point_plugins
from helm.benchmark.model_deployment_registry import get_model_deployment
from helm.benchmark.model_metadata_registry import get_model_metadata
from helm.benchmark.tokenizer_config_registry import get_tokenizer_config
register_builtin_configs_from_helm_package()
if len(sys.argv) > 1:
    register_configs_from_directory(sys.argv[1])
from flexgen_helm import configs
load_entry_point_plugins()  # what helm-run does after reading prod_env/
names = [d["name"] for d in configs.load_config(configs.MODEL_DEPLOYMENTS_FILE)["model_deployments"]]
out = {}
for name in names:
    deployment = get_model_deployment(name)
    # Real metadata (HELM's or ours), not the placeholder HELM invents for a model it has none for.
    assert get_model_metadata(deployment.model_name).creator_organization_name != "Unknown", deployment.model_name
    assert get_tokenizer_config(deployment.tokenizer_name) is not None, deployment.tokenizer_name
    out[name] = {"class": deployment.client_spec.class_name, "args": deployment.client_spec.args,
                 "model": deployment.model_name}
print(json.dumps(out))
"""


def _registered(tmp_path, prod_env=None) -> dict:
    args = [sys.executable, "-c", _REGISTRATION_CHECK] + ([str(prod_env)] if prod_env else [])
    completed = subprocess.run(
        args, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_entry_point_registers_the_deployments(tmp_path):
    registered = _registered(tmp_path)
    assert {d["class"] for d in registered.values()} == {"flexgen_helm.client.FlexGenClient"}
    assert registered["flexgen/mixtral-8x7b-32kseqlen"]["model"] == "mistralai/mixtral-8x7b-32kseqlen"
    assert registered["flexgen/qwen3-30b-a3b"]["args"]["policy"] == "auto"
    paper = registered["flexgen/opt-iml-30b"]
    assert paper["model"] == "meta/opt-iml-30b"
    assert paper["args"]["pretrained_model_name_or_path"] == "facebook/opt-iml-30b"
    policy = paper["args"]["policy"]
    assert [policy[k] for k in ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                                 "act_gpu_percent", "act_cpu_percent")] == [20, 80, 0, 100, 0, 100]
    assert policy["cpu_cache_compute"] is True
    assert registered["flexgen/opt-30b"]["args"]["pretrained_model_name_or_path"] == "facebook/opt-30b"
    assert registered["flexgen/opt-demo"]["args"]["pretrained_model_name_or_path"].startswith(str(tmp_path))


def test_prod_env_overrides_a_packaged_deployment(tmp_path):
    prod_env = tmp_path / "prod_env"
    prod_env.mkdir()
    override = {
        "model_deployments": [
            {
                "name": "flexgen/opt-1.3b",
                "model_name": "meta/opt-1.3b",
                "tokenizer_name": "facebook/opt-66b",
                "max_sequence_length": 2047,
                "client_spec": {
                    "class_name": "flexgen_helm.client.FlexGenClient",
                    "args": {"pretrained_model_name_or_path": "/models/opt-1.3b", "policy": {"gpu_batch_size": 64}},
                },
            }
        ]
    }
    (prod_env / "model_deployments.yaml").write_text(yaml.safe_dump(override))
    registered = _registered(tmp_path, prod_env)
    assert registered["flexgen/opt-1.3b"]["args"] == override["model_deployments"][0]["client_spec"]["args"]
    assert registered["flexgen/opt-6.7b"]["args"]["pretrained_model_name_or_path"] == "facebook/opt-6.7b"


def test_paper_conf_has_the_seven_sub_scenarios():
    entries = demo.read_run_entries(REPO / "run_specs" / "flexgen.conf")
    scenarios = [entry.split(",model=")[0] for entry in entries]
    assert scenarios == [
        "wikifact:k=5,subject=plaintiff",
        "wikifact:k=5,subject=instance_of",
        "mmlu:subject=abstract_algebra,data_augmentation=canonical",
        "mmlu:subject=us_foreign_policy,data_augmentation=canonical",
        "synthetic_reasoning:mode=pattern_match",
        "synthetic_reasoning_natural:difficulty=easy",
        "summarization_xsum_sampled:temperature=0.3,device=cpu",
    ]
    deployments = [entry.split("model_deployment=")[1] for entry in entries]
    assert deployments == ["flexgen/opt-iml-30b"] * 6 + ["flexgen/opt-iml-30b-long"]
    assert all(",model=meta/opt-iml-30b," in entry for entry in entries)


def test_paper_conf_builds_run_specs_offline(tmp_path):
    """HELM turns every entry of run_specs/flexgen.conf into a run spec on our deployments (no
    model is loaded and nothing is downloaded: --dry-run stops before execution)."""
    script = """
import sys
from helm.benchmark.config_registry import register_builtin_configs_from_helm_package
from helm.benchmark.run import load_entry_point_plugins, run_entries_to_run_specs
from helm.benchmark.presentation.run_entry import read_run_entries
register_builtin_configs_from_helm_package()
load_entry_point_plugins()
entries = read_run_entries([sys.argv[1]]).entries
specs = run_entries_to_run_specs(entries, max_eval_instances=10)
print(len(specs), sorted({s.adapter_spec.model_deployment for s in specs}))
"""
    conf = REPO / "run_specs" / "flexgen.conf"
    completed = subprocess.run(
        [sys.executable, "-c", script, str(conf)], env=offline_env(tmp_path), capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "7 ['flexgen/opt-iml-30b', 'flexgen/opt-iml-30b-long']"


def _helm_run_packaged(tmp_path, deployment: str, model: str, prod_env: Path | None = None):
    from helm_support import write_mmlu

    output = tmp_path / "out"
    write_mmlu(output, "college_mathematics", num_test=4)
    command = [helm_bin("helm-run"), "--run-entries",
               f"mmlu:subject=college_mathematics,method=multiple_choice_joint,model={model},model_deployment={deployment}",
               "--suite", "preflight", "--output-path", str(output), "--max-eval-instances", "4", "-n", "4"]
    if prod_env is not None:
        command += ["--local-path", str(prod_env)]
    started_s = time.perf_counter()
    completed = subprocess.run(command, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300,
                               cwd=tmp_path)
    return completed, time.perf_counter() - started_s, completed.stdout + completed.stderr


def test_a_tokenizer_that_cannot_be_had_fails_the_run_entry_at_once(tmp_path):
    """Offline with an empty Hugging Face cache, the paper's OPT tokenizer cannot be loaded: one line
    naming it and how to get it, no traceback per prompt, no run directory."""
    completed, seconds, out = _helm_run_packaged(tmp_path, "flexgen/opt-1.3b", "meta/opt-1.3b")
    line = ("tokenizer 'facebook/opt-66b' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: get it with "
            "`hf download facebook/opt-66b`")
    assert line in out, out[-3000:]
    assert "Failed to tokenize" not in out
    assert not (tmp_path / "out" / "runs" / "preflight" /
                "mmlu:subject=college_mathematics,method=multiple_choice_joint,model=meta_opt-1.3b").exists()
    print(f"helm-run failed in {seconds:.1f} s with {out.count(chr(10))} lines of output")


def test_a_checkpoint_that_cannot_be_had_fails_in_one_line(tmp_path):
    """The tokenizer is here (a local folder) but the checkpoint is not: the client's first request
    fails fatally, naming the checkpoint."""
    from flexgen_core.testing import build_checkpoint

    prod_env = tmp_path / "prod_env"
    prod_env.mkdir()
    tokenizer = {"tokenizer_configs": [{
        "name": "local/preflight",
        "tokenizer_spec": {"class_name": "flexgen_helm.tokenizer.CheckedHuggingFaceTokenizer",
                           "args": {"pretrained_model_name_or_path": str(build_checkpoint("tiny"))}},
        "end_of_text_token": "</s>", "prefix_token": "</s>"}]}
    deployment = {"model_deployments": [{
        "name": "flexgen/opt-1.3b", "model_name": "meta/opt-1.3b", "tokenizer_name": "local/preflight",
        "max_sequence_length": 2047,
        "client_spec": {"class_name": "flexgen_helm.client.FlexGenClient",
                        "args": {"pretrained_model_name_or_path": "facebook/opt-1.3b"}}}]}
    (prod_env / "tokenizer_configs.yaml").write_text(yaml.safe_dump(tokenizer))
    (prod_env / "model_deployments.yaml").write_text(yaml.safe_dump(deployment))
    completed, seconds, out = _helm_run_packaged(tmp_path, "flexgen/opt-1.3b", "meta/opt-1.3b", prod_env)
    assert ("checkpoint 'facebook/opt-1.3b' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: get it "
            "with `hf download facebook/opt-1.3b`") in out, out[-3000:]
    # Each of the -n 4 requests in flight fails once (fatal: no retries), then HELM reports the run.
    assert out.count("is not in the Hugging Face cache") <= 8 and "Retrying" not in out


def test_packaged_confs_by_name(tmp_path):
    """`flexgen-helm conf NAME` prints a packaged conf's path: helm-run --conf-paths works from any folder."""
    out = subprocess.run([helm_bin("flexgen-helm"), "conf", "flexgen"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.is_file() and path.read_text() == (REPO / "run_specs" / "flexgen.conf").read_text()
    listing = subprocess.run([helm_bin("flexgen-helm"), "conf"], capture_output=True, text=True, cwd=tmp_path)
    assert {Path(line).stem for line in listing.stdout.split()} == {"flexgen", "flexgen_demo", "flexgen_demo_random"}
    bad = subprocess.run([helm_bin("flexgen-helm"), "conf", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: no packaged conf 'nope'; packaged: flexgen")
