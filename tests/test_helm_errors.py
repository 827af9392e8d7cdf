"""A configuration mistake of a flexgen deployment reaches the helm-run user as one line: the run entry
fails through HELM's own failure path, with no traceback and no `Request: Request(...)` tail."""

from __future__ import annotations

import subprocess

import pytest
from helm_support import FLEXGEN_DEPLOYMENT, TEST_MODEL, helm_bin, offline_env, write_prod_env

from flexgen_core.testing import PRESETS, build_checkpoint

MISSING = "/no/such/models/smollm2"
LINE = f"FlexGenClient configuration for '{MISSING}': checkpoint folder '{MISSING}' does not exist"


@pytest.mark.parametrize("exit_on_error", [False, True])
def test_a_missing_checkpoint_is_one_line_in_helm_runs_terminal(tmp_path, exit_on_error):
    prod_env = write_prod_env(tmp_path / "prod_env", build_checkpoint("tiny", seed=0), PRESETS["tiny"].max_positions,
                              flexgen_args={"pretrained_model_name_or_path": MISSING})
    entry = f"synthetic_reasoning:mode=pattern_match,model={TEST_MODEL},model_deployment={FLEXGEN_DEPLOYMENT}"
    command = [helm_bin("helm-run"), "--run-entries", entry, "--suite", "s", "--local-path", str(prod_env),
               "--output-path", str(tmp_path / "out"), "--max-eval-instances", "2", "-n", "2"]
    done = subprocess.run(command + (["--exit-on-error"] if exit_on_error else []), env=offline_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    terminal = done.stdout + done.stderr
    assert done.returncode == 1, terminal[-3000:]
    assert "Traceback" not in terminal and "Request: Request(" not in terminal, terminal[-3000:]
    # (stderr may also hold the tiny test tokenizer's own length warning from transformers)
    ours = [line for line in done.stderr.splitlines() if line.startswith("helm-run: ")]
    if exit_on_error:
        assert ours == [f"helm-run: {LINE}"]
    else:
        assert f"Error when running {entry.replace('/', '_')}: {LINE}" in done.stdout
        assert len(ours) == 1 and ours[0].startswith("helm-run: Failed runs: [")


_PROD_ENV_NAMES_A_PACKAGED_MODEL = r"""
import json, sys
from helm.benchmark.config_registry import register_builtin_configs_from_helm_package, register_configs_from_directory
from helm.benchmark.model_metadata_registry import get_model_metadata
register_builtin_configs_from_helm_package()
register_configs_from_directory(sys.argv[1])  # as helm-run does, before it loads plugins
before = get_model_metadata("flexgen/smollm2-135m-instruct")
import flexgen_helm.plugin  # noqa: F401
after = get_model_metadata("flexgen/smollm2-135m-instruct")
print(json.dumps({"before": before.creator_organization_name, "after": after.creator_organization_name,
                  "display": after.display_name, "deployments": after.deployment_names}))
"""


def test_a_prod_env_deployment_of_a_packaged_model_gets_the_packaged_metadata(tmp_path):
    """HELM reads prod_env/ before it loads plugins: a deployment there naming a model this plugin
    describes first gets HELM's placeholder metadata; the plugin replaces it with its own."""
    import json
    import sys

    prod_env = tmp_path / "prod_env"
    prod_env.mkdir()
    (prod_env / "model_deployments.yaml").write_text(
        "model_deployments:\n  - name: flexgen/my-smollm2\n    model_name: flexgen/smollm2-135m-instruct\n"
        "    tokenizer_name: flexgen/smollm2-135m-instruct\n    max_sequence_length: 2047\n    client_spec:\n"
        "      class_name: flexgen_helm.client.FlexGenClient\n      args: {pretrained_model_name_or_path: /x}\n")
    done = subprocess.run([sys.executable, "-c", _PROD_ENV_NAMES_A_PACKAGED_MODEL, str(prod_env)], capture_output=True,
                          text=True, env=offline_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["before"] == "Unknown" and seen["after"] == "HuggingFace"
    assert seen["display"].startswith("SmolLM2") and "flexgen/my-smollm2" in seen["deployments"]
