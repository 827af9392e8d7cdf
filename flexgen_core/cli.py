"""`flexgen` command line: argument parsing and messages only."""

from __future__ import annotations

import argparse
import logging
import sys

from flexgen_core.policy import Policy


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--percent", nargs=6, type=int, metavar=("W_G", "W_C", "C_G", "C_C", "A_G", "A_C"),
                   default=[100, 0, 100, 0, 100, 0],
                   help="percent of weights, KV cache, activations on GPU and CPU (the rest goes to disk)")
    p.add_argument("--gpu-batch-size", type=int, default=1)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--no-overlap", action="store_true", help="run I/O and compute one after the other")
    p.add_argument("--cpu-cache-compute", action="store_true", help="attention over CPU-resident cache on the CPU")
    p.add_argument("--offload-dir", default=None, help="folder for disk-resident tensors (default: a temp folder)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _policy(args) -> Policy:
    return Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size,
                               num_gpu_batches=args.num_gpu_batches, overlap=not args.no_overlap,
                               cpu_cache_compute=args.cpu_cache_compute)


def _generate(args) -> int:
    from transformers import AutoTokenizer

    from flexgen_core import checkpoint
    from flexgen_core.engine import Engine

    policy = _policy(args)
    folder = checkpoint.resolve(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {str(folder)!r}: {str(e).splitlines()[0]}") from None
    prompt_ids = tokenizer(args.prompt)["input_ids"]
    with Engine.from_pretrained(folder, policy=policy, offload_dir=args.offload_dir, device=args.device,
                                dtype=args.dtype) as engine:
        result = engine.generate([prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed)[0]
    completion = result.completions[0]
    print(args.prompt + tokenizer.decode(completion.token_ids, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen", description="Offloaded, block-scheduled LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--model", required=True, help="hub name or local checkpoint folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    _add_policy_args(gen)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
