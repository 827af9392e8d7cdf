"""Plots of benchmark results: one horizontal bar per system, measured tokens/s, with the roofline (what
the machine allows for that run) and the cost model's prediction marked on the same axis.

    python benchmarks/plot.py results/cpu-small.json            # redraw a suite's PNG from its JSON
    python benchmarks/plot.py results/helm-real.json --helm     # the helm suite's wall times
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(system: str) -> str:
    return "tab:blue" if system.startswith("engine") else "tab:gray"


def throughput_plot(rows: list[dict], path: str | Path, title: str) -> Path:
    """Bars of `tokens_per_s` for rows that ran; `roofline_tokens_per_s` as a black tick and
    `predicted_tokens_per_s` as an orange dot where present."""
    plt = _pyplot()
    ran = [r for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    labels = [f"{r['system']}  [{r['batch']}]" for r in ran]
    values = [r["tokens_per_s"] for r in ran]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ran) + 2.2))
    y = list(range(len(ran)))[::-1]
    ax.barh(y, values, color=[_color(r["system"]) for r in ran], alpha=0.85)
    limits = [(yy, r["roofline_tokens_per_s"]) for yy, r in zip(y, ran)
              if isinstance(r.get("roofline_tokens_per_s"), (int, float))]
    if limits:
        ax.plot([v for _, v in limits], [yy for yy, _ in limits], "|", color="black", markersize=14, mew=2,
                label="roofline (machine's measured limit for that run)")
    predicted = [(yy, r["predicted_tokens_per_s"]) for yy, r in zip(y, ran)
                 if isinstance(r.get("predicted_tokens_per_s"), (int, float))]
    if predicted:
        ax.plot([v for _, v in predicted], [yy for yy, _ in predicted], "o", color="tab:orange",
                label="cost model's prediction")
    for yy, v in zip(y, values):
        ax.annotate(f"{v:.3g}", (v, yy), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    every = values + [v for _, v in limits] + [v for _, v in predicted]
    if every and min(every) > 0 and max(every) / min(every) > 30:
        ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("tokens/s = sequences x generated tokens / (prefill + decode) time")
    ax.grid(True, axis="x", alpha=0.3)
    if limits or predicted:  # above the bars, under the title
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=9, pad=22 if limits or predicted else 6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def helm_plot(result: dict, path: str | Path) -> Path:
    """Wall time of each helm-run in `benchmarks/bench_helm.py`'s JSON."""
    plt = _pyplot()
    runs = result["runs"]
    labels = [f"{r['client']}{' (share_prefix off)' if 'no-sharing' in r.get('label', '') else ''} (-n {r['threads']})"
              f"{', MMLU only' if r.get('label', '').startswith('mmlu') else ''}" for r in runs]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(runs) + 1.6))
    y = list(range(len(runs)))[::-1]
    ax.barh(y, [r["wall_s"] for r in runs],
            color=["tab:blue" if r["client"] == "FlexGenClient" else "tab:gray" for r in runs])
    for yy, r in zip(y, runs):
        ax.annotate(f"{r['wall_s']:.1f} s", (r["wall_s"], yy), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("helm-run wall time (s), lower is better")
    entries = ", ".join(e.split(":")[0] for e in result.get("entries", [result.get("scenario", "?")]))
    speedup = result.get("speedups", {}).get("vs_fastest_hf", result.get("speedup", "?"))
    title = (f"helm-run {entries}, {result['instances']} instances: speedup of FlexGenClient over "
             f"the fastest HuggingFaceClient run {speedup}x")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--helm", action="store_true", help="the file is benchmarks/bench_helm.py's result")
    parser.add_argument("--out", type=Path, help="PNG to write (default: next to the JSON)")
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    out = args.out or args.json.with_suffix(".png")
    if args.helm:
        helm_plot(data, out)
    else:
        throughput_plot(data["rows"], out, data.get("title", args.json.stem))
    print(out)


if __name__ == "__main__":
    main()
