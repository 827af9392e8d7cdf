"""Shared pieces of the benchmark scripts: machine description, timing, results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_results(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "",
                  extra: dict | None = None, out_dir: str | os.PathLike | None = None,
                  sections: list[str] = ()) -> Path:
    """Write <out_dir>/<name>.md (table with machine and commit, then `sections`, then `notes`) and
    <out_dir>/<name>.json; `out_dir` defaults to benchmarks/results/."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d")} | (extra or {})
    md = [f"# {title}", "",
          f"Commit `{meta['commit']}`, {meta['date']}. Machine: {meta['machine']['cpu']}, "
          f"{meta['machine']['cores']} cores, {meta['machine']['memory_gib']} GiB RAM, "
          f"GPU: {meta['machine']['gpu'] or 'none'}; torch {meta['machine']['torch']}.", "",
          markdown_table(rows, columns), ""]
    for section in sections:
        md += [section, ""]
    if notes:
        md += [notes, ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    (out / f"{name}.json").write_text(json.dumps(meta | {"rows": rows}, indent=2))
    return path


def cpu_pressure() -> float | None:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI `some avg60`), in
    percent: other work on a shared host. None where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None
