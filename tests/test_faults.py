"""Faults after the up-front checks, injected as a day-long run meets them: the disk filling while
another run holds its space, corrupt weights, another process's live offload folder, SIGHUP,
broken config.json values, a block over the compute workspace, odd token-id types.

Each test reproduces the fault for real where this machine allows it (a size-limited tmpfs in a
mount namespace, bytes overwritten in an offload file, a second engine in another PID namespace, a
real signal, a real memory cgroup) and checks the outcome: refused early or a clear error naming the
file, tier, field or shortfall; nothing already answered lost; the engine usable afterwards.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexgen_core import Engine, Policy
from flexgen_core.runtime import capacity
from flexgen_core.runtime.decoding import NonFiniteError
from flexgen_core.testing import build_checkpoint, sample_prompts
from test_errors import _HOLD_ENGINE, _cli

REPO = Path(__file__).resolve().parents[1]
ON_DISK = Policy(w_gpu_percent=0, w_cpu_percent=0)  # every weight in offload files
CACHE_ON_DISK = Policy(gpu_batch_size=4, cache_gpu_percent=0, cache_cpu_percent=0)


def _namespace_command(*flags: str) -> list[str] | None:
    """`unshare` with these namespaces (as root, or as a mapped root in a user namespace), or None
    where this host permits neither."""
    for prefix in (["unshare", *flags], ["unshare", "--user", "--map-root-user", *flags]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))


# -- 1. the disk fills up while another run holds its space -------------------------------------

_DISK_FULL = r"""
import json, os, subprocess, sys, threading
from pathlib import Path
mount, size_bytes, checkpoint, gen_len = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)], check=True)
from flexgen_core import Engine, Policy
from flexgen_core.runtime import unit_math
from flexgen_core.runtime.capacity import PolicyDoesNotFit
from flexgen_core.runtime.storage import DiskFile, OffloadSpaceError
from flexgen_core.testing import sample_prompts

policy = Policy(gpu_batch_size=4, cache_gpu_percent=0, cache_cpu_percent=0)
prompts = sample_prompts(checkpoint, 4, 64, 64, seed=1)
a = Engine.from_pretrained(checkpoint, policy=policy, offload_dir=mount / "a", device="cpu")
b = Engine.from_pretrained(checkpoint, policy=policy, offload_dir=mount / "b", device="cpu")
started, resume = threading.Event(), threading.Event()
choose = unit_math.select_tokens

def paused(*args, **kwargs):  # A holds its block's cache files until B has tried
    started.set()
    resume.wait(120)
    return choose(*args, **kwargs)

out = {}
unit_math.select_tokens = paused
thread = threading.Thread(target=lambda: out.update(a=a.generate(prompts, max_new_tokens=gen_len)))
thread.start()
started.wait(120)
unit_math.select_tokens = choose
try:
    b.generate(prompts, max_new_tokens=gen_len)
    out["b_refused"] = None
except PolicyDoesNotFit as e:
    out["b_refused"] = str(e)
resume.set()
thread.join()
result = {"b_refused": out["b_refused"], "a": [r.completions[0].token_ids for r in out["a"]]}
result["b_after"] = [r.completions[0].token_ids for r in b.generate(prompts, max_new_tokens=gen_len)]
try:
    DiskFile(mount / "too-big.bin", 2 * size_bytes, os.open(mount, os.O_RDONLY | os.O_DIRECTORY))
except OffloadSpaceError as e:
    result["too_big"] = str(e)
result["left"] = sorted(p.name for p in mount.iterdir())
print(json.dumps(result))
"""


def test_a_full_disk_is_met_when_a_block_starts_not_mid_run(tmp_path):
    """Two engines whose blocks each fit the disk alone: while A's block runs (its KV cache files on
    disk, space reserved), B's block is refused at its start, naming the disk and the shortfall;
    A finishes untouched and B runs once A's block has released its files. Offload files bigger
    than the free space fail when made, naming the file."""
    unshare = _namespace_command("--mount")
    if unshare is None:
        pytest.skip("this host permits no mount namespace (unshare --mount) for a size-limited tmpfs")
    checkpoint = build_checkpoint("odd")
    gen_len = 16
    with Engine.from_pretrained(checkpoint, policy=CACHE_ON_DISK, offload_dir=tmp_path / "probe") as probe:
        block_disk = probe.memory(64, gen_len).peak["disk"]
    assert block_disk > 256 << 10
    size = int(block_disk * 1.5) // 4096 * 4096  # one block fits, two do not
    mount = tmp_path / "small-disk"
    mount.mkdir()
    out = subprocess.run([*unshare, sys.executable, "-c", _DISK_FULL, str(mount), str(size), str(checkpoint),
                          str(gen_len)], capture_output=True, text=True, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["b_refused"] is not None, "B's block was not refused although A's reserved the disk"
    assert "of disk for a block of 4 sequences" in result["b_refused"] and "short by" in result["b_refused"]
    assert result["b_after"] == result["a"]  # the same prompts, greedy: A lost nothing, B works
    assert "too-big.bin" in result["too_big"] and "disk tier" in result["too_big"] and "free" in result["too_big"]
    assert result["left"] == ["a", "b"]  # the failed file is not left behind


def test_a_failed_write_names_the_offload_file(tmp_path, monkeypatch):
    """An I/O error on an offload file (here ENOSPC, injected at os.pwrite) names the file and the
    tier; the engine serves the next call."""
    import errno

    from flexgen_core.runtime import storage

    path = build_checkpoint("odd")
    prompts = sample_prompts(path, 2, 8, 12, seed=0)
    with Engine.from_pretrained(path, policy=CACHE_ON_DISK, offload_dir=tmp_path) as engine:
        expected = [r.completions[0].token_ids for r in engine.generate(prompts, max_new_tokens=4)]
        real = os.pwrite

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(storage.os, "pwrite", full)
        with pytest.raises(storage.OffloadSpaceError, match=r"disk tier: writing offload file .*cache.*\.bin"):
            engine.generate(prompts, max_new_tokens=4)
        monkeypatch.setattr(storage.os, "pwrite", real)
        assert [r.completions[0].token_ids for r in engine.generate(prompts, max_new_tokens=4)] == expected


# -- 2. corrupt weights ------------------------------------------------------------------------------


def test_weights_overwritten_in_an_offload_file_are_named(tmp_path):
    path = build_checkpoint("odd")
    prompts = sample_prompts(path, 3, 6, 12, seed=0)
    with Engine.from_pretrained(path, policy=ON_DISK, offload_dir=tmp_path) as engine:
        expected = [r.completions[0].token_ids for r in engine.generate(prompts, max_new_tokens=4)]
        layer_idx = next(i for i, layer in enumerate(engine.layers) if layer.name == "layer1.mlp")
        file = engine.weights.disk_files[layer_idx].path
        with open(file, "r+b") as f:
            original = f.read(256)
            f.seek(0)
            f.write(b"\xff" * 256)  # 64 float32 NaNs
        with pytest.raises(NonFiniteError, match=rf"weight layer1\.mlp\.\w+ on the disk tier \(offload file "
                                                 rf"{file}\) holds 64 NaN"):
            engine.generate(prompts, max_new_tokens=4)
        with open(file, "r+b") as f:
            f.write(original)
        assert [r.completions[0].token_ids for r in engine.generate(prompts, max_new_tokens=4)] == expected


def test_nonfinite_values_in_the_checkpoint_are_refused_at_load(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(build_checkpoint("odd"), folder)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("fc2.weight"))
    tensors[key][3, 5] = float("nan")
    tensors[key][0, 0] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"checkpoint tensor '{key}' has 2 NaN or infinite values"):
        Engine.from_pretrained(folder, offload_dir=tmp_path / "offload")
    assert list((tmp_path / "offload").iterdir()) == []


def test_activations_that_overflow_are_named_as_such(tmp_path):
    """Finite weights too large for float16: the error says every weight is finite and names the dtype."""
    folder = tmp_path / "ckpt"
    shutil.copytree(build_checkpoint("odd"), folder)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("fc1.weight"))
    tensors[key] = tensors[key].clamp(-1, 1) * 6e4  # finite in float16, products overflow it
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    prompts = sample_prompts(folder, 2, 6, 10, seed=0)
    with Engine.from_pretrained(folder, offload_dir=tmp_path / "offload", dtype="float16", device="cpu") as engine:
        with pytest.raises(NonFiniteError, match=r"every stored weight is finite.*float16 overflows"):
            engine.generate(prompts, max_new_tokens=2)


# -- 3. and 4. offload folders: ownership by lock, signals ---------------------------------------

_OTHER_NAMESPACE = r"""
import json, os, sys
from flexgen_core import Engine, Policy
checkpoint, offload, live_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    os.kill(live_pid, 0)
    visible = True
except ProcessLookupError:
    visible = False
with Engine.from_pretrained(checkpoint, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=offload) as e:
    print(json.dumps({"pid": os.getpid(), "live_pid_visible": visible,
                      "removed": [str(p) for p in e.offload.stale_removed]}))
"""


def test_a_live_engine_in_another_pid_namespace_keeps_its_folder(tmp_path):
    unshare = _namespace_command("--pid", "--fork")
    if unshare is None:
        pytest.skip("this host permits no PID namespace (unshare --pid --fork)")
    path = build_checkpoint("odd")
    prompts = sample_prompts(path, 2, 6, 10, seed=0)
    with Engine.from_pretrained(path, policy=ON_DISK, offload_dir=tmp_path) as live:
        expected = [r.completions[0].token_ids for r in live.generate(prompts, max_new_tokens=3)]
        out = subprocess.run([*unshare, sys.executable, "-c", _OTHER_NAMESPACE, str(path), str(tmp_path),
                              str(os.getpid())], capture_output=True, text=True, timeout=300, env=_env())
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.splitlines()[-1])
        # The other engine cannot see this process: a PID rule would call the folder stale.
        assert seen["live_pid_visible"] is False and seen["pid"] != os.getpid()
        assert seen["removed"] == []
        assert live.offload.path.is_dir()
        assert [r.completions[0].token_ids for r in live.generate(prompts, max_new_tokens=3)] == expected


def _killed_engines_folder(checkpoint, base: Path) -> Path:
    """The folder an engine made in `base` and left when it was killed (SIGKILL: nothing cleaned up)."""
    before = set(base.iterdir()) if base.exists() else set()
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_ENGINE, str(checkpoint), str(base)], stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait(timeout=30)
    (left,) = set(base.iterdir()) - before
    return left


def test_cleanup_removes_only_folders_an_engine_made_and_abandoned(tmp_path):
    """Stale folders are judged by the owner record an engine writes in its folder and by its lock,
    never by name or PID: a killed engine's folder goes, even renamed after a live PID; the user's own
    `engine-2024-results/`, a folder with a bare `owner.lock`, one being made, symlinks and FIFOs stay,
    and the log names only what was removed."""
    checkpoint = build_checkpoint("odd")
    abandoned = _killed_engines_folder(checkpoint, tmp_path)
    assert (abandoned / "owner.lock").is_file()
    reused = abandoned.rename(tmp_path / f"engine-{os.getpid()}-deadbeef")  # the name says "alive": ignored
    results = tmp_path / "engine-2024-results"
    results.mkdir()
    (results / "table.csv").write_text("model,score\nx,1\n")
    bare = tmp_path / "engine-12-cafe"  # a lock file with no owner record of ours
    bare.mkdir()
    (bare / "owner.lock").touch()
    being_made = tmp_path / f".making-engine-{2**22 + 17}-f00d"  # no record yet
    being_made.mkdir()
    fifo_owner = tmp_path / "engine-13-beef"
    fifo_owner.mkdir()
    os.mkfifo(fifo_owner / "owner.lock")
    (tmp_path / "engine-14-link").symlink_to(results)
    kept = {results.name, bare.name, being_made.name, fifo_owner.name, "engine-14-link"}
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flexgen_core.runtime.storage").addHandler(handler)
    try:
        with Engine.from_pretrained(checkpoint, policy=ON_DISK, offload_dir=tmp_path) as engine:
            assert engine.offload.stale_removed == [reused]
            assert {p.name for p in tmp_path.iterdir()} == kept | {engine.offload.path.name}
    finally:
        logging.getLogger("flexgen_core.runtime.storage").removeHandler(handler)
    assert [r.getMessage() for r in records if "removed" in r.getMessage()] == [
        f"removed offload files left by a process that no longer runs: {reused}"]
    assert (results / "table.csv").read_text().startswith("model,score")
    assert {p.name for p in tmp_path.iterdir()} == kept


def _default_signals() -> None:
    """In the child: SIGHUP and SIGTERM as in a fresh terminal session. (Under `nohup`, as CI may run,
    SIGHUP is inherited as ignored, and a process that ignores it rightly keeps running.)"""
    for signum in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def test_sighup_removes_offload_files(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_ENGINE, str(build_checkpoint("odd")), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    assert proc.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.iterdir())) == 1
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == -signal.SIGHUP  # it died of the signal, after cleaning up
    assert list(tmp_path.iterdir()) == []


_CHILD_TESTS = r'''
import os, time
from flexgen_core import Engine, Policy
from flexgen_core.runtime import unit_math


def test_holds_a_block():
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
    with Engine.from_pretrained(os.environ["CKPT"], policy=policy, offload_dir=os.environ["OFFLOAD"],
                                device="cpu") as engine:
        def stalled(*args, **kwargs):  # mid-block: the first token is being chosen
            open(os.environ["MARKER"], "w").close()
            time.sleep(300)
        unit_math.select_tokens = stalled
        engine.generate([[2, 5, 7, 9]], max_new_tokens=4)


def test_would_run_next():
    open(os.environ["MARKER"] + ".next", "w").close()
'''


def test_sigterm_ends_a_test_run_mid_block(tmp_path):
    """`timeout` or a batch system sends SIGTERM to pytest while a test's engine is inside a block: the
    process removes its offload folder and dies of the signal, and runs no further test."""
    (tmp_path / "test_child.py").write_text(_CHILD_TESTS)
    offload, marker = tmp_path / "offload", tmp_path / "in-block"
    env = {**_env(), "CKPT": str(build_checkpoint("odd")), "OFFLOAD": str(offload), "MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_signals)
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=30)[0][-3000:]
        assert len(list(offload.iterdir())) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM, proc.stdout.read()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    assert list(offload.iterdir()) == []
    assert not Path(str(marker) + ".next").exists()


_HELM_LIKE = r"""
import sys, threading, time
import flexgen_helm.plugin  # as helm-run imports it, in the main thread
from flexgen_core import Engine, Policy
engines = []
worker = threading.Thread(target=lambda: engines.append(Engine.from_pretrained(
    sys.argv[1], policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=sys.argv[2])))
worker.start()  # HELM builds clients, so engines, in worker threads
worker.join()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_clean_up_an_engine_made_in_a_worker_thread(tmp_path, signum):
    """As in helm-run: the plugin (imported in the main thread) installs the handlers that a worker
    thread cannot."""
    proc = subprocess.Popen([sys.executable, "-c", _HELM_LIKE, str(build_checkpoint("odd")), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=_env(), preexec_fn=_default_signals)
    assert proc.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.iterdir())) == 1
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == -signum
    assert list(tmp_path.iterdir()) == []


# -- 5. config.json values ----------------------------------------------------------------------------

@pytest.mark.parametrize("preset, edit, message", [
    ("odd", {"num_hidden_layers": 0}, "'num_hidden_layers' must be an integer >= 1, got 0"),
    ("odd", {"num_hidden_layers": -1}, "'num_hidden_layers' must be an integer >= 1, got -1"),
    ("odd", {"num_attention_heads": 0}, "'num_attention_heads' must be an integer >= 1, got 0"),
    ("odd", {"ffn_dim": -5}, "'ffn_dim' must be an integer >= 1, got -5"),
    ("odd", {"hidden_size": -64}, "'hidden_size' must be an integer >= 1, got -64"),
    ("odd", {"vocab_size": "1001"}, "'vocab_size' must be an integer >= 1, got '1001'"),
    ("odd", {"num_hidden_layers": True}, "'num_hidden_layers' must be an integer >= 1, got True"),
    ("mistral", {"num_key_value_heads": 0}, "'num_key_value_heads' must be an integer >= 1, got 0"),
    ("mistral", {"intermediate_size": 2.5}, "'intermediate_size' must be an integer >= 1, got 2.5"),
    ("odd", [1, 2], "must hold a JSON object of config fields, got a list"),
])
def test_bad_config_values_are_named_when_read(tmp_path, preset, edit, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(build_checkpoint(preset), folder)
    config = json.loads((folder / "config.json").read_text())
    config = edit if isinstance(edit, list) else {**config, **edit}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Engine.from_pretrained(folder, offload_dir=tmp_path / "offload")
    out = _cli("generate", "--model", str(folder), "--prompt", "x")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.strip().count("\n") == 0


# -- 6. the compute workspace, and the memory cgroup ---------------------------------------------------

def test_a_block_over_its_compute_workspace_is_refused(tmp_path, monkeypatch):
    """Free RAM enough for the block's cache and activations but not for its largest layer's
    transient tensors: refused before any compute, naming RAM and the shortfall; runs when it fits."""
    path = build_checkpoint("odd")
    policy = Policy(gpu_batch_size=16, w_gpu_percent=100, w_cpu_percent=0)
    prompts = [[2] + [5 + i] * 239 for i in range(16)]
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path) as engine:
        needs = engine.memory(240, 2)
        held = sum(getattr(needs, term)[tier] for term in ("cache", "cache_staging", "activations")
                   for tier in ("gpu", "cpu"))
        workspace = needs.workspace["gpu"] + needs.workspace["cpu"]
        assert workspace > held  # the case the check used to miss
        monkeypatch.setattr(capacity, "mem_available", lambda: held + workspace // 2)
        with pytest.raises(capacity.PolicyDoesNotFit, match=r"GiB of RAM for a block of 16 sequences.*short by"):
            engine.generate(prompts, max_new_tokens=2)
        monkeypatch.setattr(capacity, "mem_available", lambda: held + workspace + (1 << 20))
        assert len(engine.generate(prompts, max_new_tokens=2)) == 16


_IN_CGROUP = r"""
import sys
from flexgen_core.runtime.capacity import mem_available, cgroup_available
print(cgroup_available(), mem_available())
"""


def test_the_memory_limit_of_the_cgroup_counts(tmp_path):
    """A process in a memory cgroup limited to 256 MiB sees at most that much RAM free."""
    own = next((line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] in ("memory", "")), None)
    roots = [Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")] if own and own[1] == "memory" else \
        [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")]
    limit_file = "memory.limit_in_bytes" if own and own[1] == "memory" else "memory.max"
    parent = next((root / own[2].strip("/") for root in roots if own and (root / own[2].strip("/") / limit_file).exists()),
                  None)
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable memory cgroup here to make a limited one in")
    child = parent / f"flexgen-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
        (child / limit_file).write_text(str(256 << 20))
    except OSError as e:
        pytest.skip(f"cannot make a limited memory cgroup: {e}")
    try:
        script = f"echo $$ > {child / 'cgroup.procs'} && exec {sys.executable} -c {shlex.quote(_IN_CGROUP)}"
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120, env=_env())
        assert out.returncode == 0, out.stderr[-2000:]
        limited, available = (int(v) for v in out.stdout.split())
        assert 0 < limited <= 256 << 20 and available == limited
    finally:
        shutil.rmtree(child, ignore_errors=True)
        try:
            child.rmdir()
        except OSError:
            pass


def test_cgroup_limits_are_read_up_the_hierarchy(tmp_path):
    """cgroup v2 layout: the smallest of (limit - usage + inactive file cache) over the levels."""
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    for level, limit, usage, inactive in (("job", "1000000", 300000, 100000), ("job/step", "max", 5, 0)):
        folder = tmp_path / "fs" / level
        folder.mkdir(parents=True)
        (folder / "memory.max").write_text(limit + "\n")
        (folder / "memory.current").write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 7\n")
    assert capacity.cgroup_available(proc, tmp_path / "fs") == 1000000 - 300000 + 100000
    proc.write_text("0::/\n")
    assert capacity.cgroup_available(proc, tmp_path / "fs") is None


# -- 7. token ids of other integer types -----------------------------------------------------------------

def test_numpy_and_torch_integers_are_token_ids(tmp_path):
    path = build_checkpoint("odd")
    prompts = sample_prompts(path, 2, 5, 8, seed=0)
    with Engine.from_pretrained(path, offload_dir=tmp_path) as engine:
        expected = [r.completions[0].token_ids for r in engine.generate(prompts, max_new_tokens=3)]
        as_numpy = [np.array(p, dtype=np.int64) for p in prompts]
        as_torch = [torch.tensor(p, dtype=torch.int32) for p in prompts]
        for other in (as_numpy, as_torch, [[np.int16(t) for t in p] for p in prompts]):
            out = engine.generate(other, max_new_tokens=3, seed=np.int64(3))
            assert [r.completions[0].token_ids for r in out] == expected
            assert all(type(t) is int for r in out for t in r.prompt_ids)
        for bad, message in (([[2, True]], "not integer token ids, e.g. True"),
                             ([[2, 5.0]], "not integer token ids, e.g. 5.0"),
                             ([torch.tensor([2, 1], dtype=torch.bool)], "not integer token ids")):
            with pytest.raises(ValueError, match=message):
                engine.generate(bad, max_new_tokens=1)
        with pytest.raises(ValueError, match=r"seed must be an integer or a list of one integer \(or None\) per prompt, got .abc."):
            engine.generate(prompts, max_new_tokens=1, seed="abc")
