"""The `capfilt` command."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.job.cluster_jobs import ClusterError
from pipeline.job.console import INTERRUPTED, Interrupt
from pipeline.output.job_output import OutputError
from pipeline.spec.config import SpecError, load_spec

DEMO_ROWS = 300  # 29 s on 2 cores (README: `time capfilt demo`)

USAGE_ERROR = 2
JOBS_API_HELP = "the cluster's Jobs API, e.g. http://HEAD:8265; default RAY_ADDRESS"
VERBOSE_HELP = (
    "show Ray's and the libraries' own output here too (by default it goes to OUTPUT/logs/capfilt.log, "
    "and the console shows capfilt's lines, a progress display and the summary)"
)
OVERWRITE_HELP = (
    "delete everything in output.path first and start afresh, instead of resuming or refusing a "
    "directory that holds other files (never /, the home or the working directory)"
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with Interrupt() as interrupt:
        try:
            return args.handler(args)
        except (SpecError, OutputError, ClusterError) as err:
            print(f"capfilt: error: {err}", file=sys.stderr)
            return USAGE_ERROR
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr, flush=True)
            interrupt.said = True
            return 130


def _run(args: argparse.Namespace) -> int:
    spec = load_spec(args.job, overrides=args.set)  # before importing Ray and torch: bad specs fail fast
    from pipeline.job.console import Console
    from pipeline.job.runner import run_job
    from pipeline.output.summary import format_summary

    address, console = args.address or os.environ.get("RAY_ADDRESS"), Console(verbose=args.verbose)
    result = run_job(spec, address=address, overwrite=args.overwrite, console=console)
    print(format_summary(result.manifest, spec.output.path))
    return 0 if result.complete else 1


def _submit(args: argparse.Namespace) -> int:
    from pipeline.core.storage import is_uri
    from pipeline.ingest.url_list import check_columns
    from pipeline.job.cluster_jobs import submit

    spec = load_spec(args.job, overrides=args.set, check_files=False).with_absolute_paths()
    # A URL list in an object store is left to the cluster: its credentials are the ones that count.
    url_list, local = spec.input.url_list, not is_uri(spec.input.url_list)
    if local and (Path(url_list).exists() or glob.glob(url_list)):  # a file, a directory, a glob of parts
        check_columns(spec.input)
    elif local:
        print(f"capfilt: note: {spec.input.url_list} is not on this machine; the cluster must see it there",
              file=sys.stderr)  # fmt: skip
    job_id = submit(spec, args.address, overwrite=args.overwrite)
    print(job_id)
    print(f"follow it: capfilt logs {job_id} --follow; output: {spec.output.path}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.job.cluster_jobs import ENDED, SUCCEEDED, status

    found = status(args.job_id, args.address)
    print(f"{found['job_id']}: {found['status']}" + (f" ({found['message']})" if found["message"] else ""))
    output = found["metadata"].get("output")
    if output:
        print(f"output: {output}")
        progress = _progress_of(output)
        if progress:
            print(progress)
    return 0 if found["status"] not in ENDED or found["status"] == SUCCEEDED else 1


def _progress_of(output: str) -> str | None:
    """The progress line of the job writing `output`, from its manifest (rewritten every few seconds
    while it runs), when this machine can read it; None when it cannot or the job has not begun."""
    from pipeline.job.progress import progress_line
    from pipeline.spec.layout import OutputLayout

    try:
        manifest = OutputLayout(output).manifest.read_json()
        return f"{progress_line(manifest['progress'])} (as of {manifest['written_at']})"
    except (OSError, ValueError, KeyError, TypeError, ImportError):  # not here, not begun, a backend missing
        return None


def _logs(args: argparse.Namespace) -> int:
    from pipeline.job.cluster_jobs import SUCCEEDED, logs

    final = logs(args.job_id, args.address, args.follow, write=lambda text: print(text, end="", flush=True))
    if args.follow:
        print(f"capfilt: job {args.job_id} {final}", file=sys.stderr)
        return 0 if final == SUCCEEDED else 1
    return 0


def _stop(args: argparse.Namespace) -> int:
    from pipeline.job.cluster_jobs import stop

    if stop(args.job_id, args.address):
        print(f"stopping {args.job_id}; finished shards are kept, submit the same spec again to resume")
    else:
        print(f"{args.job_id} had already ended")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.job.console import Console
    from pipeline.output.summary import format_summary
    from pipeline.synthetic.demo import examples, run_demo

    started = time.monotonic()
    console = Console(verbose=args.verbose)
    result = run_demo(Path(args.out), rows=args.rows, address=args.address, console=console)
    print(format_summary(result.manifest, str(result.layout.root)))
    print(examples(result))
    models = Path(args.out) / "models"
    print(
        f"demo finished in {time.monotonic() - started:.0f} s; trained tiny models in "
        f"{models / 'captioner'} and {models / 'itm'} (usable as captioner.model and filter.model)"
    )
    return 0 if result.complete else 1


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect.inspect_text import format_inspection
    from pipeline.inspect.inspection import inspect_output
    from pipeline.output.job_output import JobOutput

    output = JobOutput.open(args.out_dir)
    found = inspect_output(output, samples=args.samples)
    if args.html:  # first: a closed stdout (`| head`) must not cost the report
        from pipeline.inspect.report_html import write_report

        write_report(found, output, Path(args.html))
    print(format_inspection(found, output.layout.root))
    if args.html:
        print(f"\nreport: {args.html}")
    return 0


def _rethreshold(args: argparse.Namespace) -> int:
    from pipeline.job.rethreshold import rethreshold
    from pipeline.output.job_output import JobOutput
    from pipeline.output.summary import format_summary

    output = JobOutput.open(args.out_dir)
    keep = None
    if (args.keep, args.k, args.by) != (None, None, None):
        job = output.spec.filter.keep
        given = {"rule": args.keep, "k": args.k, "by": args.by}
        keep = dataclasses.replace(job, **{name: value for name, value in given.items() if value is not None})
    dedup = None
    if args.near_threshold is not None:
        dedup = dataclasses.replace(output.spec.filter.dedup, near_threshold=args.near_threshold)
    manifest = rethreshold(output, args.threshold, args.out, keep, dedup)
    print(format_summary(manifest, args.out))
    return 0


def _retry_failed(args: argparse.Namespace) -> int:
    from pipeline.job.console import Console
    from pipeline.job.retry import retry_failed
    from pipeline.output.job_output import JobOutput
    from pipeline.output.summary import format_summary

    address, console = args.address or os.environ.get("RAY_ADDRESS"), Console(verbose=args.verbose)
    result = retry_failed(JobOutput.open(args.out_dir), address=address, console=console)
    if result.retried:
        now = ", ".join(f"{n} {fate}" for fate, n in result.fates.items() if n)
        print(f"retried {result.retried} rows whose download had failed: now {now}")
    else:
        print("no row's download had failed: nothing to retry")
    print(format_summary(result.manifest, args.out_dir))
    return 0 if result.manifest["complete"] else 1


def _tiny_models(args: argparse.Namespace) -> int:
    if args.trained:
        from pipeline.synthetic.trained import export_trained_models

        paths = export_trained_models(Path(args.dir))
    else:
        from pipeline.curate.tiny_models import write_tiny_models

        paths = write_tiny_models(Path(args.dir), seed=args.seed)
    print(f"captioner: {paths.captioner}\nfilter:    {paths.itm}")
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    from pipeline.synthetic.quality import format_report, run_quality

    report = run_quality(seed=args.seed, rows=args.rows, address=args.address)
    return _print_figures(format_report(report), report, args.json)


def _bench_dedup(args: argparse.Namespace) -> int:
    from pipeline.synthetic.dedup_bench import format_dedup_report, run_dedup_bench

    report = run_dedup_bench(args.distinct, args.copies_per_kind, args.near_threshold, seed=args.seed)
    return _print_figures(format_dedup_report(report), report, args.json)


def _print_figures(table: str, figures: dict, json_file: str | None) -> int:
    """A benchmark's table on stdout and, with --json, its figures in a file."""
    import json

    if json_file:  # first: a figure the table fails to format is not lost
        Path(json_file).write_text(json.dumps(figures, indent=2) + "\n")
    print(table)
    if json_file:
        print(f"figures written to {json_file}")
    return 0


def _bench_perf(args: argparse.Namespace) -> int:
    from pipeline.perf.harness import PerfSettings, format_report, run_perf

    settings = PerfSettings(
        work=Path(args.dir),
        rows=tuple(args.rows),
        batch_size=args.batch_size,
        architectures=tuple(args.architectures),
        model_images=args.model_images,
        model_batch=args.model_batch,
    )
    report = run_perf(settings)
    return _print_figures(format_report(report), report, args.json)


def _bench_engine(args: argparse.Namespace) -> int:
    from pipeline.perf.engine_bench import EngineSettings, format_engine_report, run_engine_bench

    settings = EngineSettings(work=Path(args.dir), architecture=args.architecture)
    report = run_engine_bench(settings)
    return _print_figures(format_engine_report(report), report, args.json)


def _bench_stream(args: argparse.Namespace) -> int:
    from pipeline.perf.stream_bench import StreamSettings, format_stream_report, run_stream_bench

    settings = StreamSettings(work=Path(args.dir), overlap_rows=args.overlap_rows)
    report = run_stream_bench(settings)
    return _print_figures(format_stream_report(report), report, args.json)


def _command(group: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose `--help` says what it does (its one line, as `capfilt --help` lists it) and
    each option's default."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    return group.add_parser(name, help=help, description=help, formatter_class=defaults, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"capfilt {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = _command(commands, "run", help="run or resume a job (on a local Ray unless --address/RAY_ADDRESS)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    run.add_argument("--address", help="Ray address of a running cluster")
    run.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(handler=_run)

    submit = _command(
        commands, "submit", help="submit a job to a running Ray cluster (Ray Jobs API); prints the job id"
    )
    submit.add_argument("job", help="job spec YAML (validated here, shipped to the cluster)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    submit.add_argument("--address", help=JOBS_API_HELP)
    submit.add_argument("--overwrite", action="store_true", help=f"{OVERWRITE_HELP} (on the cluster)")
    submit.set_defaults(handler=_submit)
    for name, handler, about in (
        ("status", _status, "a submitted job's status and progress (exit 1 if it failed or was stopped)"),
        ("logs", _logs, "a submitted job's log"),
        ("stop", _stop, "stop a submitted job (finished shards are kept)"),
    ):
        command = _command(commands, name, help=about)
        command.add_argument("job_id", help="the id `capfilt submit` printed")
        command.add_argument("--address", help=JOBS_API_HELP)
        command.set_defaults(handler=handler)
        if name == "logs":
            command.add_argument(
                "--follow", action="store_true", help="until the job ends; exit 1 unless it succeeded"
            )

    demo = _command(
        commands, "demo", help="an offline end-to-end run on a generated noisy web, trained tiny models"
    )
    demo.add_argument("--out", default="demo", help="where to write models, URL list and output")
    demo.add_argument(
        "--rows", type=int, default=DEMO_ROWS, help="web image-text pairs (hostile cases are added)"
    )
    demo.add_argument("--address", help="Ray address of a running cluster")
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo.set_defaults(handler=_demo)

    inspect = _command(
        commands,
        "inspect",
        help="what a job kept and dropped, and why (works on a running or unfinished job)",
    )
    inspect.add_argument("out_dir", help="the job's output.path")
    inspect.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    inspect.add_argument("--samples", type=int, default=24, help="sample images in the HTML report")
    inspect.set_defaults(handler=_inspect)

    rethreshold = _command(
        commands,
        "rethreshold",
        help="write the output for another ITM threshold from the stored scores (no GPU)",
    )
    rethreshold.add_argument("out_dir", help="the job's output.path (left as it is)")
    rethreshold.add_argument("--threshold", type=float, help="the new ITM threshold (default: the job's)")
    rethreshold.add_argument(
        "--keep",
        choices=["threshold", "top_k"],
        help="keep every passing caption, or the k best (filter.keep.rule)",
    )
    rethreshold.add_argument("--k", type=int, help="captions kept per image under --keep top_k")
    rethreshold.add_argument("--by", choices=["itm", "itc"], help="what ranks the passing captions")
    rethreshold.add_argument(
        "--near-threshold",
        type=float,
        help="dedup altered copies at this image-embedding cosine (filter.dedup.near_threshold)",
    )
    rethreshold.add_argument("--out", required=True, help="a new directory for the new output")
    rethreshold.set_defaults(handler=_rethreshold)

    retry = _command(
        commands,
        "retry-failed",
        help="download again the rows whose download failed, caption, filter and fold them in",
    )
    retry.add_argument("out_dir", help="the job's output.path (updated in place)")
    retry.add_argument("--address", help="Ray address of a running cluster")
    retry.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    retry.set_defaults(handler=_retry_failed)

    tiny = _command(commands, "tiny-models", help="write tiny BLIP captioner and ITM checkpoints")
    tiny.add_argument("dir", help="writes DIR/captioner and DIR/itm")
    tiny.add_argument(
        "--trained", action="store_true", help="the shipped models trained on the synthetic world"
    )
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (without --trained)")
    tiny.set_defaults(handler=_tiny_models)

    bench = _command(commands, "bench", help="benchmarks").add_subparsers(required=True, metavar="BENCHMARK")
    quality = _command(
        bench, "quality", help="filter, captioner and bootstrap quality on the synthetic world"
    )
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--rows", type=int, default=1000, help="web image-text pairs to curate")
    quality.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    quality.add_argument("--address", help="Ray address of a running cluster")
    quality.set_defaults(handler=_bench_quality)

    dedup = _command(bench, "dedup", help="image dedup's recall and false merges on planted copies")
    dedup.add_argument("--seed", type=int, default=0)
    dedup.add_argument("--distinct", type=int, default=600, help="distinct images of the synthetic world")
    dedup.add_argument(
        "--copies-per-kind", type=int, default=40, help="planted copies of each of the 5 kinds"
    )
    dedup.add_argument("--near-threshold", type=float, help="filter.dedup.near_threshold for the job")
    dedup.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    dedup.set_defaults(handler=_bench_dedup)

    perf = _command(bench, "perf", help="speed per stage, Ray's cost, memory, the model vs a plain HF loop")
    perf.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1000, 5000, 20000],
        help="row counts to run (memory at each; the other figures at the largest)",
    )
    perf.add_argument("--batch-size", type=int, default=64, help="the job's captioner.batch_size")
    perf.add_argument(
        "--architectures",
        nargs="*",
        default=["base", "large"],
        choices=["tiny", "base", "large"],
        help="BLIP sizes for the model-cost figures (random weights; none: skip them)",
    )
    perf.add_argument("--model-images", type=int, default=8, help="images per model-cost measurement")
    perf.add_argument("--model-batch", type=int, default=4, help="batch of the model-cost measurement")
    perf.add_argument("--dir", default="capfilt-bench", help="work directory (jobs, models; reused)")
    perf.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    perf.set_defaults(handler=_bench_perf)

    engine = _command(
        bench,
        "engine",
        help="the CapFilt model work: FLOPs vs the minimum, vs the matmul rate, vs a plain HF loop",
    )
    engine.add_argument(
        "--architecture", default="large", choices=["tiny", "base", "large"], help="BLIP sizes"
    )
    engine.add_argument("--dir", default="capfilt-bench", help="work directory (model checkpoints; reused)")
    engine.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    engine.set_defaults(handler=_bench_engine)

    stream = _command(bench, "stream", help="first shard against list length, download/model overlap, disk")
    stream.add_argument("--overlap-rows", type=int, default=20000, help="rows of the overlap measurement")
    stream.add_argument("--dir", default="capfilt-bench-stream", help="work directory (jobs, models)")
    stream.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    stream.set_defaults(handler=_bench_stream)
    return parser


if __name__ == "__main__":
    sys.exit(main())
