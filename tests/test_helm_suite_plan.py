"""`flexgen-helm plan`: a conf's predicted time through FlexGen, per run entry and in total, from a
HELM dry run where the entry's data and tokenizer are here, from the stated lengths (saying why)
where not. The dry-run figures are checked against a separate dry run counted here with the tokenizer
and os.path.commonprefix."""

from __future__ import annotations

import os
import re
import subprocess

from helm_support import FLEXGEN_DEPLOYMENT, TEST_MODEL, helm_bin, offline_env, request_states, run_dirs, run_helm, \
    write_prod_env
from transformers import AutoTokenizer

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm.cli import RUN_SPECS_DIR

INSTANCES = 6


def _plan(home, *args: str):
    return subprocess.run([helm_bin("flexgen-helm"), "plan", "--hardware", "t4-gcp", *args], capture_output=True,
                          text=True, env=offline_env(home), timeout=600, cwd=home)


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 7 and ":" in cells[0]:
            rows[cells[0]] = cells
    return rows


def test_the_papers_conf_offline_uses_stated_lengths_and_says_why(tmp_path):
    out = _plan(tmp_path, "--conf-paths", str(RUN_SPECS_DIR / "flexgen.conf"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(out.stdout)
    assert len(rows) == 7 and all(cells[1].startswith("stated [") for cells in rows.values())
    minutes = [float(cells[6].split()[0]) for cells in rows.values()]
    total = re.search(r"^total\s+(\d+)\s+(\d+) min", out.stdout, re.M)
    assert total and int(total.group(1)) == sum(int(cells[2]) for cells in rows.values())
    assert abs(int(total.group(2)) - sum(minutes)) <= 1
    reasons = re.findall(r"^  \[\d\] (\S+): (.+)$", out.stdout, re.M)
    assert len(reasons) == 7
    assert all("URLError" in why or "is not in the Hugging Face cache" in why for _, why in reasons), reasons


def test_an_entry_the_dry_run_serves_is_counted_from_its_requests(tmp_path):
    checkpoint = build_checkpoint("tiny", seed=0)
    prod_env = write_prod_env(tmp_path / "prod_env", checkpoint, PRESETS["tiny"].max_positions)
    served, stated = "synthetic_reasoning:mode=pattern_match", "wikifact:k=5,subject=plaintiff"  # no data here
    conf = tmp_path / "mine.conf"
    conf.write_text("entries: [\n" + "".join(
        f'  {{description: "{e},model={TEST_MODEL},model_deployment={FLEXGEN_DEPLOYMENT}", priority: 1}}\n'
        for e in (served, stated)) + "]\n")
    out = _plan(tmp_path, "--conf-paths", str(conf), "--local-path", str(prod_env), "--model", str(checkpoint),
                "--max-eval-instances", str(INSTANCES))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(out.stdout)
    assert rows[served][1] == "dry run" and rows[stated][1].startswith("stated [")

    # The same dry run, counted here.
    output = tmp_path / "check"
    run_helm([served], FLEXGEN_DEPLOYMENT, prod_env, output, "check", INSTANCES, extra_args=["--dry-run"])
    states = request_states(run_dirs(output, "check")[served])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = [tokenizer(s["request"]["prompt"])["input_ids"] for s in states]
    shared = min(len(os.path.commonprefix(ids)), min(map(len, ids)) - 1)
    mean = round(sum(map(len, ids)) / len(ids))
    gen = max(s["request"]["max_tokens"] for s in states)
    assert rows[served][2] == str(len(states))
    assert rows[served][3] == f"{mean} / {shared} / {gen}" and shared > 16
