"""`helm-run` through HELM's own HuggingFaceClient and through FlexGenClient on the same local model
give the same results (acceptance 1 of the HELM plugin issue).

Plain `helm-run` (a subprocess, our package installed for its entry point), offline, on the `tiny`
random-weight OPT; FlexGen runs a policy with 40% of the weights on disk and half of the KV cache on
disk (none of it on the compute device). Scenario data is written in HELM's layout first.

Compared: the prompts (same adapter, same tokenizer), every generated text (HELM's client samples at
temperature 1e-7 where we decode greedily: the texts must still agree), and for scoring requests
(echo, max_tokens=0) every token text and logprob, within 2e-4.

A mixture of experts goes through a packaged deployment: the `mixtral` random checkpoint (4 experts, each
token's top 2) served by `flexgen/mixtral-8x7b-32kseqlen` as packaged (its client, `policy: auto`, its
tokenizer config's special tokens), only the checkpoint and where it runs replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helm_support import (
    FLEXGEN_DEPLOYMENT,
    HF_DEPLOYMENT,
    request_states,
    run_dirs,
    run_helm,
    stat_mean,
    write_mmlu,
    write_prod_env,
    write_twitter_aae,
)

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm import configs

LOGPROB_TOLERANCE = 2e-4
MAX_EVAL_INSTANCES = 6
ENTRIES = {
    "mmlu:subject=anatomy,method=multiple_choice_joint": "generation",
    "mmlu:subject=anatomy,method=multiple_choice_separate_original": "scoring",
    "twitter_aae:demographic=aa": "scoring",
    "synthetic_reasoning:mode=pattern_match": "generation",
}


# An OPT model, and a Llama-family one (grouped-query attention, RoPE, a Llama-style tokenizer that
# prepends <s> and drops a word's leading space when decoded alone), under the offloading policy.
MODELS = {"tiny": "</s>", "llama": "<s>"}
# Presets served through a packaged deployment: the random checkpoint has the packaged model's
# architecture and a tokenizer with its special tokens (the Llama-style test tokenizer's <s> and </s> are
# Mixtral's).
PACKAGED = {"mixtral": "flexgen/mixtral-8x7b-32kseqlen"}
# What a packaged deployment's args say about the machine rather than the model: replaced here (float32,
# the precision HELM's client computes in on the CPU).
LOCAL_ARGS = ("pretrained_model_name_or_path", "offload_dir", "device", "dtype")


def _packaged_deployment(preset: str, checkpoint: Path, tmp_path: Path) -> dict:
    """write_prod_env's arguments and helm-run's environment for serving `checkpoint` through the packaged
    deployment of PACKAGED[preset]."""
    from test_planner import cpu_host

    deployment = configs.packaged_deployment(PACKAGED[preset])
    assert deployment["client_spec"]["class_name"] == "flexgen_helm.client.FlexGenClient"
    (tokenizer,) = [t for t in configs.load_config(configs.TOKENIZER_CONFIGS_FILE)["tokenizer_configs"]
                    if t["name"] == deployment["tokenizer_name"]]
    hf_config = json.loads((checkpoint / "config.json").read_text())
    # The packaged model's own architecture, and routing that matters: each token picks among the experts.
    assert hf_config["architectures"] == [PRESETS[preset].hf_model_class().__name__]
    assert hf_config["num_local_experts"] > hf_config["num_experts_per_tok"] > 1
    special = json.loads((checkpoint / "special_tokens_map.json").read_text())
    assert (special["eos_token"], special["bos_token"]) == (tokenizer["end_of_text_token"], tokenizer["prefix_token"])
    args = {k: v for k, v in deployment["client_spec"]["args"].items() if k not in LOCAL_ARGS}
    assert args["policy"] == "auto"
    hardware = cpu_host().save(tmp_path / "hardware.json")  # policy auto plans for this host, not a measured one
    return dict(prod_env=dict(flexgen_args=args, prefix_token=tokenizer["prefix_token"],
                              end_of_text_token=tokenizer["end_of_text_token"]),
                env={"FLEXGEN_HARDWARE": str(hardware)})


@pytest.fixture(scope="module", params=sorted(MODELS) + sorted(PACKAGED))
def helm_runs(request, tmp_path_factory) -> dict[str, dict[str, Path]]:
    preset = request.param
    root = tmp_path_factory.mktemp(f"helm_parity_{preset}")
    checkpoint = build_checkpoint(preset, seed=0)
    output_path = root / "benchmark_output"
    write_mmlu(output_path, "anatomy", num_dev=5, num_test=MAX_EVAL_INSTANCES)
    write_twitter_aae(output_path, "aa", count=MAX_EVAL_INSTANCES)
    if preset in PACKAGED:
        packaged = _packaged_deployment(preset, checkpoint, root)
        prod_env_args, env = packaged["prod_env"], packaged["env"]
    else:
        prod_env_args, env = dict(prefix_token=MODELS[preset]), {}
    prod_env = write_prod_env(root / "prod_env", checkpoint, PRESETS[preset].max_positions, **prod_env_args)
    runs = {}
    for suite, deployment in (("hf", HF_DEPLOYMENT), ("flexgen", FLEXGEN_DEPLOYMENT)):
        run_helm(list(ENTRIES), deployment, prod_env, output_path, suite, MAX_EVAL_INSTANCES, extra_env=env)
        runs[suite] = run_dirs(output_path, suite)
    return runs


def _pairs(helm_runs, entry):
    hf_states = request_states(helm_runs["hf"][entry])
    flexgen_states = request_states(helm_runs["flexgen"][entry])
    assert len(hf_states) == len(flexgen_states) > 0
    for hf_state, flexgen_state in zip(hf_states, flexgen_states):
        assert hf_state["request"]["prompt"] == flexgen_state["request"]["prompt"]
        assert flexgen_state["result"]["success"], flexgen_state["result"].get("error")
        yield hf_state, flexgen_state


def test_every_entry_ran_on_both_clients(helm_runs):
    for suite in ("hf", "flexgen"):
        assert set(helm_runs[suite]) == set(ENTRIES), (suite, sorted(helm_runs[suite]))


@pytest.mark.parametrize("entry", [e for e, kind in ENTRIES.items() if kind == "generation"])
def test_generated_texts_identical(helm_runs, entry):
    stopped = 0
    for hf_state, flexgen_state in _pairs(helm_runs, entry):
        hf_texts = [c["text"] for c in hf_state["result"]["completions"]]
        flexgen_completions = flexgen_state["result"]["completions"]
        assert [c["text"] for c in flexgen_completions] == hf_texts
        for completion in flexgen_completions:
            # Token texts are decode([id]) as in HELM's client; a Llama-style tokenizer drops a word's
            # leading space then, so the tokens spell the text up to spaces.
            joined = "".join(t["text"] for t in completion["tokens"]).replace(" ", "")
            assert joined.startswith(completion["text"].replace(" ", ""))
            assert completion["finish_reason"]["reason"] in ("length", "stop", "endoftext")
            stopped += completion["finish_reason"]["reason"] == "stop"
    if entry.startswith("synthetic_reasoning"):
        assert stopped > 0, "no completion ended on the stop sequence: the stop path was not exercised"


@pytest.mark.parametrize("entry", [e for e, kind in ENTRIES.items() if kind == "scoring"])
def test_scoring_logprobs_match(helm_runs, entry):
    max_diff = 0.0
    for hf_state, flexgen_state in _pairs(helm_runs, entry):
        assert flexgen_state["request"]["echo_prompt"] and flexgen_state["request"]["max_tokens"] == 0
        (hf_completion,) = hf_state["result"]["completions"]
        (flexgen_completion,) = flexgen_state["result"]["completions"]
        assert flexgen_completion["text"] == hf_completion["text"]
        hf_tokens, flexgen_tokens = hf_completion["tokens"], flexgen_completion["tokens"]
        assert [t["text"] for t in flexgen_tokens] == [t["text"] for t in hf_tokens]
        for hf_token, flexgen_token in zip(hf_tokens, flexgen_tokens):
            max_diff = max(max_diff, abs(hf_token["logprob"] - flexgen_token["logprob"]))
        total_tolerance = len(hf_tokens) * LOGPROB_TOLERANCE
        assert flexgen_completion["logprob"] == pytest.approx(hf_completion["logprob"], abs=total_tolerance)
    assert max_diff <= LOGPROB_TOLERANCE, f"max token logprob difference {max_diff}"


def test_metrics_agree(helm_runs):
    """HELM's own metrics come out the same (the scoring ones to float tolerance)."""
    checks = {
        "mmlu:subject=anatomy,method=multiple_choice_joint": "exact_match",
        "mmlu:subject=anatomy,method=multiple_choice_separate_original": "exact_match",
        "synthetic_reasoning:mode=pattern_match": "exact_match",
        "twitter_aae:demographic=aa": "logprob",
    }
    for entry, metric in checks.items():
        hf_value = stat_mean(helm_runs["hf"][entry], metric)
        flexgen_value = stat_mean(helm_runs["flexgen"][entry], metric)
        assert hf_value is not None and flexgen_value is not None, (entry, metric)
        assert flexgen_value == pytest.approx(hf_value, abs=1e-3), (entry, metric)


def test_flexgen_reports_batches(helm_runs):
    """Every FlexGen result says which batch it ran in; with -n 4 requests did share batches."""
    batch_sizes = [
        state["result"]["batch_size"]
        for run_dir in helm_runs["flexgen"].values()
        for state in request_states(run_dir)
    ]
    assert all(size is not None and size >= 1 for size in batch_sizes)
    assert max(batch_sizes) > 1
