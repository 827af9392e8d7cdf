"""`flexgen-helm compare`: two local suites (FlexGenClient and HELM's own HuggingFaceClient on the
same model: every metric equal within float noise) and a reference laid out as HELM's published
releases (another model's rows, mapped with --model-map, flagged as a different model)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import urllib.parse

import pytest
from helm_support import FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, TEST_MODEL, helm_bin, run_dirs, run_helm, write_mmlu, \
    write_prod_env

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm import compare

ENTRIES = ["mmlu:subject=anatomy,method=multiple_choice_joint", "synthetic_reasoning:mode=pattern_match"]
NOISE = 1e-4  # logprob-derived metrics of two clients differ by float rounding only


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    checkpoint = build_checkpoint("tiny", seed=0)
    prod_env = write_prod_env(root / "prod_env", checkpoint, PRESETS["tiny"].max_positions)
    output = root / "benchmark_output"
    write_mmlu(output, "anatomy", num_test=4)
    run_helm(ENTRIES, FLEXGEN_DEPLOYMENT, prod_env, output, "ours", 4)
    run_helm(ENTRIES, HF_DEPLOYMENT, prod_env, output, "hf", 4)
    return root, output


def _compare(*args: str):
    return subprocess.run([helm_bin("flexgen-helm"), "compare", *args], capture_output=True, text=True)


def test_two_local_suites_agree_within_float_noise(suites, tmp_path):
    _, output = suites
    out = _compare("--suite", "ours", "--output-path", str(output), "--against", str(output),
                   "--against-suite", "hf", "--all-metrics", "--csv", str(tmp_path / "t.csv"),
                   "--markdown", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png"))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert {r["run_entry"] for r in rows} == set(ENTRIES) and len(rows) > 20
    for row in rows:
        assert row["reference_model"] == row["model"] == TEST_MODEL.replace("/", "_"), row
        assert row["ours_count"] == row["reference_count"] != "0", row
        if not compare.client_reported(row["metric"]):  # those are marked in the table, see compare.py
            assert abs(float(row["difference"])) <= NOISE, row
    reported = [r for r in rows if compare.client_reported(r["metric"])]
    assert reported and out.stdout.count("reported by each client (see the note)") == len(reported)
    assert out.stdout.count(compare.CLIENT_NOTE) == 1
    # Instances are HELM's num_instances of each run (the same in both suites), not its count of trials.
    for entry, run_dir in run_dirs(output, "ours").items():
        stats = json.loads((run_dir / "stats.json").read_text())
        (num,) = [s["mean"] for s in stats if s["name"]["name"] == "num_instances"
                  and not s["name"].get("perturbation") and s["name"].get("split") == "test"]
        assert num > 1 and {(r["ours_instances"], r["reference_instances"]) for r in rows
                            if r["run_entry"] == entry} == {(str(round(num)), str(round(num)))}
        line = next(line for line in out.stdout.splitlines() if line.startswith(entry))
        assert f" {round(num)}/{round(num)} " in line
    assert "exact_match" in out.stdout and "different models" not in out.stdout
    assert (tmp_path / "t.md").read_text().startswith("| run entry | metric |") and (tmp_path / "t.png").stat().st_size


def _release_tree(output, root):
    """HELM's published layout: releases/<release>/runs_to_run_suites.json, runs/<suite>/<run>/stats.json,
    here with the HF client's runs renamed to another model, as HELM Classic's OPT-175B rows are."""
    tree = root / "published" / "benchmark_output"
    mapping = {}
    for entry, run_dir in run_dirs(output, "hf").items():
        name = f"{entry},model=together_opt-175b"
        shutil.copytree(run_dir, tree / "runs" / "v0.9.9" / name)
        mapping[name] = "v0.9.9"
    (tree / "releases" / "v9").mkdir(parents=True)
    (tree / "releases" / "v9" / "runs_to_run_suites.json").write_text(json.dumps(mapping))
    (tree / "releases" / "v9" / "summary.json").write_text(json.dumps({"release": "v9", "suites": ["v0.9.9"]}))
    return tree


def test_a_published_release_with_another_model(suites, tmp_path):
    root, output = suites
    tree = _release_tree(output, tmp_path)
    out = _compare("--suite", "ours", "--output-path", str(output), "--against", str(tree),
                   "--against-release", "v9", "--model-map", f"{TEST_MODEL}=together/opt-175b",
                   "--csv", str(tmp_path / "r.csv"))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    # Each run group's main metric in HELM's schema (schema_classic.yaml: mmlu, synthetic_reasoning).
    assert [r["metric"] for r in rows] == ["exact_match", "quasi_exact_match"]
    assert compare.CLIENT_NOTE not in out.stdout
    assert all(r["reference_model"] == "together_opt-175b" and r["reference"] for r in rows)
    assert out.stdout.count("different models, the difference is the model's") == 2
    unmapped = _compare("--suite", "ours", "--output-path", str(output), "--against", str(tree),
                        "--against-release", "v9")
    assert unmapped.returncode == 0 and "2 row(s) without a reference run" in unmapped.stdout


@pytest.mark.parametrize("args, message, code", [
    (["--against", "/no/such/folder"], "is not a folder", 1),
    (["--against", "{out}", "--model-map", "nomapping"], "--model-map takes OURS=REF", 2),  # a usage mistake
    (["--against", "{out}", "--against-suite", "nope"], "no suite 'nope'", 1),
])
def test_bad_arguments_are_one_line(suites, args, message, code):
    _, output = suites
    out = _compare("--suite", "ours", "--output-path", str(output), *[a.replace("{out}", str(output)) for a in args])
    assert out.returncode == code and out.stderr.startswith("error: ") and message in out.stderr
    assert out.stderr.count("\n") == 1


def test_the_test_split_is_preferred_and_perturbed_and_timing_stats_left_out():
    def stat(name, mean, split=None, perturbation=None, count=3):
        return {"name": {"name": name, "split": split, **({"perturbation": perturbation} if perturbation else {})},
                "mean": mean, "count": count}

    stats = [stat("exact_match", 0.1, "valid"), stat("exact_match", 0.2, "test"), stat("f1", 0.3, "valid"),
             stat("exact_match", 0.9, "test", {"name": "typo"}), stat("inference_runtime", 5.0, "test"),
             stat("empty", 1.0, "test", count=0)]
    assert compare._main_stats(stats) == {"exact_match": (0.2, 3), "f1": (0.3, 3)}


class _Reference:
    """A local HTTP server of a reference's benchmark_output, told per path to misbehave."""

    def __init__(self, folder):
        import http.server
        import threading

        self.folder, self.faults, self.hits = folder, {}, []
        reference = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                relative = self.path.split("/benchmark_output/", 1)[1]
                reference.hits.append(relative)
                fault = reference.faults.pop(relative, None)
                path = reference.folder / urllib.parse.unquote(relative)
                if fault is None and not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes() if fault is None else b""
                if fault == "html":
                    body = b"<!DOCTYPE html><html><body>Maintenance</body></html>"
                elif fault == "truncated":
                    body = path.read_bytes()[:-40]
                self.send_response(200)
                if fault == "huge":  # 3 GiB, streamed: the client must stop reading at its cap
                    self.send_header("Content-Length", str(3 * 2**30))
                    self.end_headers()
                    chunk = b" " * 2**20
                    try:
                        for _ in range(3 * 2**10):
                            self.wfile.write(chunk)
                    except OSError:
                        pass
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/benchmark_output"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(suites, tmp_path):
    """The HF suite served over HTTP with HELM's published index (run_specs.json), and a home of its own
    (compare's cache is under ~/.cache)."""
    _, output = suites
    tree = tmp_path / "served" / "benchmark_output"
    shutil.copytree(output / "runs" / "hf", tree / "runs" / "hf")
    specs = [{"name": p.parent.name} for p in sorted((tree / "runs" / "hf").glob("*/stats.json"))]
    (tree / "runs" / "hf" / "run_specs.json").write_text(json.dumps(specs))
    reference = _Reference(tree)
    yield output, tree, reference, tmp_path / "home"
    reference.close()


def _compare_http(output, reference, home):
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([helm_bin("flexgen-helm"), "compare", "--suite", "ours", "--output-path", str(output),
                           "--against", reference.url, "--against-suite", "hf"],
                          capture_output=True, text=True, env=env)


def _one_line(out, *phrases):
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr


@pytest.mark.parametrize("fault, phrase", [("html", "is not JSON"), ("truncated", "is not JSON"),
                                           ("huge", "more than the 256 MiB")])
def test_a_bad_reference_body_is_one_line_and_never_cached(served, fault, phrase):
    output, tree, reference, home = served
    run = next(p.parent.name for p in (tree / "runs" / "hf").glob("*/stats.json"))
    for user, relative in enumerate(("runs/hf/run_specs.json", f"runs/hf/{run}/stats.json")):
        own_home = home / str(user)  # an empty cache each
        reference.faults[relative] = fault
        _one_line(_compare_http(output, reference, own_home), phrase, f"{reference.url}/{relative}")
        # Fixed on the server: the next run asks again, and succeeds.
        asked = len(reference.hits)
        out = _compare_http(output, reference, own_home)
        assert out.returncode == 0, out.stderr
        assert relative in reference.hits[asked:]
        cache = own_home / ".cache" / "flexgen-helm" / "compare"
        assert not [p for p in cache.iterdir() if p.name.startswith(".partial-")]
        # All cached now: a third run reads nothing from the server.
        asked = len(reference.hits)
        assert _compare_http(output, reference, own_home).returncode == 0 and reference.hits[asked:] == []


@pytest.mark.parametrize("bad", ["../../../outside", "a/b", ".."])
def test_run_names_from_a_reference_index_stay_inside_it(served, bad):
    output, tree, reference, home = served
    outside = tree.parent / "outside"
    shutil.copytree(next((tree / "runs" / "hf").glob("*/")), outside)
    (tree / "runs" / "hf" / "run_specs.json").write_text(json.dumps([{"name": bad}]))
    _one_line(_compare_http(output, reference, home), f"run {bad!r} is not a plain name",
              f"{reference.url}/runs/hf/run_specs.json")
    assert not any("outside" in hit and "stats.json" in hit for hit in reference.hits)


def test_a_local_reference_file_too_big_or_not_json_names_the_file(suites, tmp_path):
    _, output = suites
    tree = tmp_path / "benchmark_output"
    shutil.copytree(output / "runs" / "hf", tree / "runs" / "hf")
    stats = next((tree / "runs" / "hf").glob("*/stats.json"))
    stats.write_text("<html>")
    out = _compare("--suite", "ours", "--output-path", str(output), "--against", str(tree), "--against-suite", "hf")
    _one_line(out, f"{stats} is not JSON")
    source = compare.Source(str(tree), max_bytes=4)
    stats.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"stats.json is 0 MiB, more than the 0 MiB"):
        source.json(str(stats.relative_to(tree)))


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (from /proc/net/tcp and tcp6; state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_serve_shows_helms_website_on_localhost_only(suites, tmp_path):
    """helm-server binds 0.0.0.0; `flexgen-helm serve` binds 127.0.0.1 unless told otherwise."""
    import socket
    import time
    import urllib.request

    _, output = suites
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([helm_bin("flexgen-helm"), "serve", "--output-path", str(output), "--suite", "ours",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    try:
        for _ in range(300):
            if _listening_addresses(port) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert _listening_addresses(port) == {"0100007F"}, proc.stdout.read() if proc.poll() is not None else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config.js", timeout=30) as config:
            assert b"ours" in config.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
