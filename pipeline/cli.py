"""The `capfilt` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline import __version__
from pipeline.config import SpecError, load_spec

DEMO_ROWS = 300  # 29 s on 2 cores (README: `time capfilt demo`)

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as err:
        print(f"capfilt: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("capfilt: interrupted; finished shards are kept, run again to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    spec = load_spec(args.job, overrides=args.set)  # before importing Ray and torch: bad specs fail fast
    from pipeline.runner import run_job
    from pipeline.summary import format_summary

    result = run_job(spec, address=args.address or os.environ.get("RAY_ADDRESS"))
    print(format_summary(result.manifest, spec.output.path))
    return 0 if result.complete else 1


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import examples, run_demo
    from pipeline.summary import format_summary

    started = time.monotonic()
    result = run_demo(Path(args.out), rows=args.rows, address=args.address)
    print(format_summary(result.manifest, str(result.layout.root)))
    print(examples(result))
    models = Path(args.out) / "models"
    print(
        f"demo finished in {time.monotonic() - started:.0f} s; trained tiny models in "
        f"{models / 'captioner'} and {models / 'itm'} (usable as captioner.model and filter.model)"
    )
    return 0 if result.complete else 1


def _tiny_models(args: argparse.Namespace) -> int:
    if args.trained:
        from pipeline.synthetic.trained import export_trained_models

        paths = export_trained_models(Path(args.dir))
    else:
        from pipeline.tiny_models import write_tiny_models

        paths = write_tiny_models(Path(args.dir), seed=args.seed)
    print(f"captioner: {paths.captioner}\nfilter:    {paths.itm}")
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    import json

    from pipeline.synthetic.quality import format_report, run_quality

    report = run_quality(seed=args.seed, rows=args.rows, address=args.address)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"capfilt {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run or resume a job (on a local Ray unless --address/RAY_ADDRESS)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    run.add_argument("--address", help="Ray address of a running cluster")
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", help="an offline end-to-end run on a generated noisy web, trained tiny models"
    )
    demo.add_argument("--out", default="demo", help="where to write models, URL list and output")
    demo.add_argument(
        "--rows", type=int, default=DEMO_ROWS, help="web image-text pairs (hostile cases are added)"
    )
    demo.add_argument("--address", help="Ray address of a running cluster")
    demo.set_defaults(handler=_demo)

    tiny = commands.add_parser("tiny-models", help="write tiny BLIP captioner and ITM checkpoints")
    tiny.add_argument("dir", help="writes DIR/captioner and DIR/itm")
    tiny.add_argument(
        "--trained", action="store_true", help="the shipped models trained on the synthetic world"
    )
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (without --trained)")
    tiny.set_defaults(handler=_tiny_models)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(required=True, metavar="BENCHMARK")
    quality = bench.add_parser(
        "quality", help="filter, captioner and bootstrap quality on the synthetic world"
    )
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--rows", type=int, default=1000, help="web image-text pairs to curate")
    quality.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    quality.add_argument("--address", help="Ray address of a running cluster")
    quality.set_defaults(handler=_bench_quality)
    return parser


if __name__ == "__main__":
    sys.exit(main())
