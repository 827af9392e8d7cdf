"""What every benchmark suite shares: its command-line sizes, turning measurements into table rows (with
the roofline and the cost model's prediction), targets, and the results files (markdown table, JSON with
machine, commit and versions, PNG plot).

A suite script (`bench_cpu.py`, `bench_gpu30b.py`) builds its model and prompts, measures this machine's
profile (`roofline.load_or_measure`), runs its systems one after another in one process (`systems.py`),
and hands the measurements to `write_suite`. `flexgen bench SUITE` runs these scripts
(`flexgen_core/bench_cli.py`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS_DIR, write_results
from plot import throughput_plot
from roofline import ModelFacts, Rates, predicted_throughput, roofline
from systems import Measurement

MiB = 2**20

COLUMNS = ["system", "batch", "weights", "weights_in_budget_mib", "prompts", "seconds", "tokens_per_s",
           "roofline_tokens_per_s", "pct_of_roofline", "bound", "achieved_gflops", "streamed_gbps",
           "predicted_tokens_per_s", "status"]
# GPU memory of a system's process (systems run in processes of their own, `isolated.py`): what PyTorch
# allocated and what its caching allocator reserved at the peak, and the engine's exact accounting
# (`flexgen_core.memory.account`) of its policy's GPU peak, to compare with the first.
MEMORY_COLUMNS = {"gpu_max_allocated_mib": "gpu_max_allocated_bytes", "gpu_max_reserved_mib": "gpu_max_reserved_bytes",
                  "accounted_gpu_peak_mib": "accounted_gpu_peak_bytes"}
GPU_COLUMNS = COLUMNS[:-1] + list(MEMORY_COLUMNS) + COLUMNS[-1:]


def add_size_args(parser: argparse.ArgumentParser, num_prompts: int, prompt_len: int = 512, gen_len: int = 32,
                  batch1_prompts: int = 4) -> None:
    parser.add_argument("--num-prompts", type=int, default=num_prompts, help=f"prompts (default {num_prompts})")
    parser.add_argument("--prompt-len", type=int, default=prompt_len, help=f"tokens per prompt (default {prompt_len})")
    parser.add_argument("--gen-len", type=int, default=gen_len, help=f"tokens generated per prompt (default {gen_len})")
    parser.add_argument("--batch1-prompts", type=int, default=batch1_prompts,
                        help="batch-1 baselines run on the first N prompts only: each sequence runs alone, so the "
                             f"rate does not depend on how many (default {batch1_prompts}; 0 = all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the .md, .json and .png "
                        "(default benchmarks/results/)")
    parser.add_argument("--name", default=None, help="results file name (default: the suite's name)")
    parser.add_argument("--profile", default=None, help="hardware profile JSON to use for the roofline and the "
                        "cost model instead of measuring this machine now (`flexgen profile --out FILE`)")
    parser.add_argument("--quick-profile", action="store_true", help="measure the profile in the profiler's quick "
                        "mode (smaller sizes, noisier limits)")
    parser.add_argument("--offload-dir", default=None, help="folder under which offload files are made "
                        "(default: the system's temp folder)")


def check_sizes(args) -> None:
    for name in ("num_prompts", "prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch1_prompts < 0:
        raise SystemExit(f"error: --batch1-prompts must be >= 0, got {args.batch1_prompts}")


def batch1_subset(prompts: list, n: int) -> list:
    return prompts[:n] if n else prompts


def parse_shapes(shapes: list[str], num_prompts: int) -> list[tuple[int, int]]:
    """'4x2' -> (gpu_batch_size 4, num_gpu_batches 2); shapes whose block exceeds the prompts are dropped."""
    out = []
    for text in shapes:
        try:
            g, k = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: block shape {text!r} is not GxK, e.g. 4x2") from None
        if g < 1 or k < 1:
            raise SystemExit(f"error: block shape {text!r} needs G, K >= 1")
        if g * k <= num_prompts:
            out.append((g, k))
    if not out:  # every shape too large for so few prompts: one block of them all
        out.append((num_prompts, 1))
    return out


# ---- rows -------------------------------------------------------------------------------------------

def to_row(m: Measurement, model: ModelFacts, rates: Rates | None, profile, prompt_len: int, gen_len: int,
           dtype_bytes: int) -> dict:
    row = {"system": m.system if m.label == m.system else m.label, "batch": m.batch, "weights": m.weights,
           "weights_in_budget_mib": round(m.weights_resident_bytes / MiB, 1) if m.weights_resident_bytes is not None
           else "", "status": m.status}
    row |= {column: round(m.extra["memory"][key] / MiB, 1) for column, key in MEMORY_COLUMNS.items()
            if m.extra.get("memory", {}).get(key) is not None}
    if not m.ok:
        return row
    num_seqs = m.num_prompts
    row |= {"prompts": num_seqs, "seconds": round(m.seconds, 2), "tokens_per_s": m.tokens_per_s}
    if rates is not None and m.traffic is not None:
        floor = roofline(model, m.traffic, rates, num_seqs, prompt_len, gen_len, dtype_bytes)
        row |= {"roofline_tokens_per_s": m.tokens / floor.seconds,
                "pct_of_roofline": round(100 * floor.seconds / m.seconds, 1), "bound": floor.bound,
                "achieved_gflops": floor.flops / m.seconds / 1e9,
                "streamed_gbps": floor.streamed_bytes / m.seconds / 1e9, "roofline": floor.to_dict()}
    row["predicted_tokens_per_s"] = "n/a"
    if m.policy is not None and profile is not None:
        predicted = predicted_throughput(model, m.policy, profile, num_seqs, prompt_len, gen_len, dtype_bytes)
        row["predicted_tokens_per_s"] = predicted if predicted is not None else "n/a"
    if m.policy is not None:
        row["policy"] = m.policy.to_dict()
    if m.extra.get("device_map"):
        row["device_map"] = {k: str(v) for k, v in m.extra["device_map"].items()}
    return row


def best(rows: list[dict], predicate) -> dict | None:
    ran = [r for r in rows if predicate(r) and isinstance(r.get("tokens_per_s"), float)]
    return max(ran, key=lambda r: r["tokens_per_s"]) if ran else None


# ---- targets ----------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    required: float            # ratio at least this
    measured: float | None     # None: could not be measured (a side did not run)
    why_missed: str = ""       # the reason, shown where the target is missed

    @property
    def met(self) -> bool | None:
        return None if self.measured is None else self.measured >= self.required

    def to_dict(self) -> dict:
        return {"name": self.name, "required": self.required, "measured": self.measured, "met": self.met,
                "why_missed": self.why_missed if self.met is False else ""}


def targets_section(targets: list[Target]) -> str:
    if not targets:
        return ""
    lines = ["## Targets", "", "| target | required | measured | met |", "|---|---|---|---|"]
    for t in targets:
        measured = f"{t.measured:.2f}x" if t.measured is not None else "not measured"
        met = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        lines.append(f"| {t.name} | >= {t.required:g}x | {measured} | {met} |")
    missed = [t for t in targets if t.met is False and t.why_missed]
    if missed:
        lines += [""] + [f"- Missed, {t.name}: {t.why_missed}" for t in missed]
    return "\n".join(lines)


def ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None:
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


def ceiling_vs(engine: dict | None, other: dict | None) -> float | None:
    """The most the engine could beat `other` by: its roofline against `other`'s measured rate."""
    if engine is None or other is None or not isinstance(engine.get("roofline_tokens_per_s"), float):
        return None
    return engine["roofline_tokens_per_s"] / other["tokens_per_s"]


# ---- writing ----------------------------------------------------------------------------------------

def versions() -> dict:
    out = {}
    for package in ("torch", "transformers", "accelerate", "deepspeed", "flexgen", "cvxpy", "crfm-helm"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def write_suite(name: str, title: str, rows: list[dict], out_dir: Path, notes: str, targets: list[Target],
                extra: dict, columns: list[str] = COLUMNS) -> Path:
    """<out>/<name>.md (table, targets, plot, notes), <out>/<name>.json, <out>/<name>.png (the plot only where
    matplotlib imports: a GPU machine without network may lack it; the markdown then says so)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        png = throughput_plot(rows, out_dir / f"{name}.png", title)
        plot = f"![{name}]({png.name})"
    except ImportError as e:
        plot = f"(No plot: {e}.)"
    sections = [s for s in (targets_section(targets), plot) if s]
    table_rows = [{k: v for k, v in r.items() if k in columns} for r in rows]
    path = write_results(name, title, table_rows, columns, notes, out_dir=out_dir, sections=sections,
                         extra=extra | {"title": title, "versions": versions(),
                                        "targets": [t.to_dict() for t in targets]})
    # The JSON keeps each row's details (roofline terms, policy, device map) beside the table's columns.
    data = json.loads((out_dir / f"{name}.json").read_text())
    data["rows"] = [_jsonable(r) for r in rows]
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2))
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
