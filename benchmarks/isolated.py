"""Each benchmark system in a process of its own, under a wall-clock limit.

A system that crashes, runs out of memory or hangs must not take the suite down with it, nor leave its memory
(pinned host buffers, the CUDA caching allocator's reserve, FlexGen's copy threads) to the systems after it.
`run_isolated` writes a job (a JSON-able dict naming the system and everything it needs) to a file, starts
`python <script> --run-one JOB --result RESULT` in a new session, kills the whole process group at the limit,
and returns the `Measurement`s the child wrote, or one row saying what went wrong:

- the child wrote its rows: they are the answer, whatever its exit code (a Python error inside a system is
  caught there and written as a `failed: ...` row, with the GPU memory it had reached);
- it ran past the limit: `timed out after N s`;
- it died without writing (a segfault, the kernel's OOM killer, an error before the system started):
  `failed: ...` with the signal or exit code and the last line of its output.

The child side (`child_main`) caps the GPU memory of its process at the job's budget before anything else
touches CUDA (`torch.cuda.set_per_process_memory_fraction`) and adds the process's peak
`torch.cuda.max_memory_allocated()` / `max_memory_reserved()` to every row it writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from roofline import Traffic
from systems import Measurement

MiB = 2**20
KILL_GRACE_S = 10  # after SIGTERM at the limit, SIGKILL follows this much later
LOG_TAIL_LINES = 20
# Testing hooks (`--inject-failure SYSTEM=crash|timeout`): a crash raises inside the child after its setup; a
# timeout makes the child sleep and the parent give it FORCED_TIMEOUT_S, so CI sees both kinds of failure rows
# without waiting out a real limit.
FAILURES = ("crash", "timeout")
FORCED_TIMEOUT_S = 2.0


class InjectedCrash(RuntimeError):
    pass


# ---- measurements as JSON -------------------------------------------------------------------------------

def measurement_to_json(m: Measurement) -> dict:
    out = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
    out["traffic"] = dataclasses.asdict(m.traffic) if m.traffic is not None else None
    out["policy"] = m.policy.to_dict() if m.policy is not None else None
    return out


def measurement_from_json(values: dict) -> Measurement:
    from flexgen_core import Policy

    values = dict(values)
    if values.get("traffic") is not None:
        values["traffic"] = Traffic(**values["traffic"])
    if values.get("policy") is not None:
        values["policy"] = Policy.from_dict(values["policy"])
    return Measurement(**values)


# ---- parent side ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JobRow:
    """What the parent knows of a job's row before it runs: enough to report a failure."""

    system: str
    label: str
    batch: str = ""
    weights: str = ""


def run_isolated(script: Path, job: dict, row: JobRow, limit_s: float, log_dir: Path,
                 inject: str | None = None) -> list[Measurement]:
    """Run `job` in a child process of `script` for at most `limit_s` seconds; its output goes to
    `log_dir/<job name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    name = job["name"]
    job_file, result_file, log_file = (log_dir / f"{name}{suffix}" for suffix in (".job.json", ".result.json", ".log"))
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job | {"inject": inject}, indent=1))
    if inject == "timeout":
        limit_s = min(limit_s, FORCED_TIMEOUT_S)
    command = [sys.executable, str(script), "--run-one", str(job_file), "--result", str(result_file)]
    started = time.monotonic()
    with open(log_file, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 cwd=script.parent.parent)
        try:
            code = child.wait(timeout=max(limit_s, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(child)
            code = child.returncode
        except BaseException:  # interrupted (Ctrl-C, or SIGTERM via `exit_on_sigterm`): the child goes too
            _kill_group(child)
            raise
    wall_s = time.monotonic() - started
    tail = _tail(log_file)
    if result_file.is_file() and not timed_out:
        try:
            rows = [measurement_from_json(r) for r in json.loads(result_file.read_text())]
        except (ValueError, TypeError, KeyError) as e:
            rows = [_failure(row, f"failed: unreadable result ({type(e).__name__}: {e})")]
    elif timed_out:
        rows = [_failure(row, f"timed out after {limit_s:.0f} s")]
    else:
        rows = [_failure(row, f"failed: {_exit_reason(code)}: {_last_line(tail)}")]
    for m in rows:
        m.extra.setdefault("process", {}).update({"wall_s": round(wall_s, 1), "exit_code": code, "log": str(log_file)})
        if not m.ok:
            m.extra["log_tail"] = tail
    return rows


def exit_on_sigterm() -> None:
    """Make SIGTERM (`timeout`, a batch system) exit the parent through Python, so `run_isolated` ends the
    running system's process group first: it lives in a session of its own and would outlive the parent."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _kill_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (it started its own session), then SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (the kernel's OOM killer?)" if name == "SIGKILL" else "")
    return f"exit code {code}"


def _failure(row: JobRow, status: str) -> Measurement:
    return Measurement(row.system, row.label, row.batch, row.weights, status=status)


def _tail(log_file: Path) -> list[str]:
    try:
        lines = log_file.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip()][-LOG_TAIL_LINES:]


def _last_line(tail: list[str]) -> str:
    errors = [line for line in tail if "Error" in line or "error" in line]
    return (errors or tail or ["no output"])[-1].strip()[:300]


def default_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="gpu-bench-logs."))


# ---- child side -----------------------------------------------------------------------------------------

def child_main(job_file: Path, result_file: Path, runners: dict[str, Callable[[dict], list[Measurement]]]) -> int:
    """Run the job in `job_file` with `runners[job["kind"]]`; write its rows to `result_file` as JSON."""
    job = json.loads(Path(job_file).read_text())
    if job.get("inject") == "timeout":
        time.sleep(3600)
    cuda = _cap_gpu(job)
    try:
        if job.get("inject") == "crash":
            raise InjectedCrash(f"crash injected into {job['name']} (--inject-failure)")
        rows = runners[job["kind"]](job)
        code = 0
    except Exception as e:  # the row says what failed; the parent goes on with the next system
        traceback.print_exc()
        row = job["row"]
        first = str(e).splitlines()[0] if str(e) else ""
        rows = [Measurement(row["system"], row["label"], row.get("batch", ""), row.get("weights", ""),
                            status=f"failed: {type(e).__name__}: {first}"[:400])]
        code = 1
    memory = _gpu_memory(cuda)
    for m in rows:
        m.extra.setdefault("memory", {}).update(memory)
    Path(result_file).write_text(json.dumps([measurement_to_json(m) for m in rows], indent=1))
    return code


def _cap_gpu(job: dict) -> bool:
    if job.get("device") != "cuda":
        return False
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, job["budget_bytes"] / total))
    torch.cuda.reset_peak_memory_stats()
    return True


def _gpu_memory(cuda: bool) -> dict:
    if not cuda:
        return {}
    import torch

    return {"gpu_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "gpu_max_reserved_bytes": torch.cuda.max_memory_reserved()}
