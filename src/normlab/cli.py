"""The `normlab` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_study_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


# --- normlab study ------------------------------------------------------------------------------------------


def _comma_list(convert):
    def parse(text: str) -> list:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r} ({err})") from err

    return parse


def _add_study_parser(subparsers) -> None:
    from normlab.study.data import DATASETS
    from normlab.study.runner import DEFAULT_BATCH_SIZES, METHOD_ORDER, QUICK, StudyConfig

    d = StudyConfig()  # the defaults, for the help texts
    q = ", ".join(
        f"{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in QUICK.items()
    )
    p = subparsers.add_parser(
        "study",
        help="train one small CNN per (method, batch size, seed) and plot error versus batch size",
        description=(
            "The batch-size study (SPEC §3): trains the same small convolutional network once per "
            "(method, batch size, seed) with the Group Norm paper's protocol — learning rate base·B/32, the "
            "same epochs at every batch size, the same seeds and data order for every method — and reports "
            "test error, training error, wall time and Switchable Norm's learned importance weights. "
            "Writes results.jsonl (one line per finished run), report.md and PNG figures into --out. "
            "Interrupt it at any time and rerun the same command: finished runs are skipped."
        ),
    )
    p.add_argument(
        "--quick", action="store_true", help=f"a taste in under a minute: {q} (other options still override)"
    )
    p.add_argument(
        "--methods",
        type=_comma_list(str),
        default=None,
        metavar="LIST",
        help=f"comma-separated normalization methods (default: those of {','.join(METHOD_ORDER)} "
        "that are registered; 'none' = no normalization; any name from normlab.list_norms())",
    )
    p.add_argument(
        "--batch-sizes",
        type=_comma_list(int),
        default=None,
        metavar="LIST",
        help=f"comma-separated batch sizes (default: {','.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help=f"epochs per run, the same at every batch size (default: {d.epochs})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help=f"number of seeds per (method, batch size): seeds 0..N-1 (default: {d.seeds})",
    )
    p.add_argument(
        "--lr",
        dest="base_lr",
        type=float,
        default=None,
        metavar="LR",
        help=f"learning rate at batch 32; batch B uses LR·B/32 (default: {d.base_lr})",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="digits: scikit-learn's 8x8 digits, no download; mnist1d: generated offline by the "
        "mnist1d package; cifar10: the python pickle batches in --data-dir; mnist: the IDX files "
        f"(optionally .gz) in --data-dir (default: {d.dataset})",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder with the cifar10 batches (data_batch_1..5, test_batch) or the mnist IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        metavar="N",
        help="train on a fixed random subset of N training samples (default: all)",
    )
    p.add_argument(
        "--test-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on a fixed random subset of N test samples (default: all)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"output folder for results.jsonl, report.md and the PNGs (default: {d.out})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=f"parallel worker processes, one torch thread each (default: {d.workers})",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help=f"torch device for training, e.g. cpu, cuda, cuda:1 (default: {d.device})",
    )
    p.add_argument(
        "--distributed",
        nargs=argparse.REMAINDER,
        default=None,
        metavar="...",
        help="the study across processes, under torchrun: each rank trains on its shard at a fixed per-rank "
        "batch, comparing per-rank BN, synchronized BN, GN and SN. Everything after --distributed goes to it "
        "(see `normlab study --distributed --help`), e.g. torchrun --nproc_per_node 2 -m normlab.cli study "
        "--distributed --batch-size 4",
    )
    p.set_defaults(func=_run_study)


def _run_study(args: argparse.Namespace) -> int:
    if args.distributed is not None:
        from normlab.study import distributed

        return distributed.main(args.distributed)
    from normlab.study.data import DataError
    from normlab.study.runner import run_study, study_config

    options = {
        k: getattr(args, k)
        for k in (
            "methods",
            "batch_sizes",
            "epochs",
            "seeds",
            "base_lr",
            "dataset",
            "data_dir",
            "train_size",
            "test_size",
            "out",
            "workers",
            "device",
        )
    }
    try:
        outcome = run_study(study_config(quick=args.quick, **options))
    except (DataError, ValueError) as err:
        print(f"normlab study: error: {err}", file=sys.stderr)
        return 2
    if outcome.interrupted:
        return 130
    if "report" in outcome.paths:
        print(outcome.paths["report"].read_text())
        print("written: " + ", ".join(str(p) for p in (outcome.results_path, *outcome.paths.values())))
    if outcome.failures:
        print(f"normlab study: {len(outcome.failures)} run(s) failed (see above); rerun to retry them", file=sys.stderr)
        return 1
    return 0


# --- normlab bench ------------------------------------------------------------------------------------------


def _add_bench_parser(subparsers) -> None:
    from normlab.bench import DEFAULT_DTYPES, DEFAULT_SHAPES, METHODS, parse_shape

    shapes = ",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES)
    p = subparsers.add_parser(
        "bench",
        help="time each method's forward and backward against torch's own, with a clone as the yardstick",
        description=(
            "Times forward, backward and forward+backward of each method in training mode (median of --reps "
            "after --warmup), normlab against torch.nn's layer (SN: the authors' plain-PyTorch composite; WN: "
            "torch's weight_norm), with a clone of the same tensor timed in the same loop as the yardstick. "
            "Reports ms, time ÷ clone, speedup over the baseline, GB/s (forward: x in + y out; backward: x + "
            "dy in + dx out) and the memory each layer keeps for backward."
        ),
    )
    p.add_argument("--methods", type=_comma_list(str), default=list(METHODS), metavar="LIST",
                   help=f"comma-separated methods (default: {','.join(METHODS)})")
    p.add_argument("--shapes", type=_comma_list(parse_shape), default=list(DEFAULT_SHAPES), metavar="LIST",
                   help=f"comma-separated shapes like 32x64x56x56 (default: {shapes})")
    p.add_argument("--dtypes", type=_comma_list(str), default=list(DEFAULT_DTYPES), metavar="LIST",
                   help=f"comma-separated dtypes (default: {','.join(DEFAULT_DTYPES)})")
    p.add_argument("--reps", type=int, default=15, metavar="N", help="timed repetitions per pass (default: 15)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed repetitions first (default: 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="where to run, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "native", "cpu", "triton"),
                   help="normlab's kernel (default: auto — Triton on CUDA; on the CPU normlab's native kernels, "
                        "else ATen's)")
    p.add_argument("--channels-last", action="store_true",
                   help="store 4-d and 5-d inputs (and WN's conv weights) channels_last, for every provider")
    p.add_argument("--save", metavar="PATH", default=None,
                   help="also write the JSON report to PATH, rewritten after every case (an interrupted run "
                        "keeps what it measured)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of the table")
    out.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from normlab import bench

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    total = len(args.methods) * len(args.shapes) * len(args.dtypes)
    done = []

    def progress(row: dict) -> None:  # on stderr: stdout carries only the table or the JSON
        shape = "x".join(map(str, row["shape"]))
        times = ", ".join(f"{p} {row[p]['ms']:.3f} ms" for p in ("fwd", "bwd", "fwd+bwd") if p in row)
        print(f"  [{len(done) + 1}/{total}] {row['method']} {shape} {row['dtype']} {row['provider']}: {times}",
              file=sys.stderr, flush=True)

    def save(report: dict) -> None:  # whole or not at all: written aside, then renamed
        if args.save:
            tmp = f"{args.save}.tmp"
            with open(tmp, "w") as f:
                f.write(bench.to_json(report))
            os.replace(tmp, args.save)

    def checkpoint(report: dict) -> None:
        done.append(None)
        save(report)

    try:
        report = bench.run(args.methods, args.shapes, args.dtypes, args.reps, args.warmup, progress=progress,
                           device=args.device, backend=args.backend, checkpoint=checkpoint,
                           layout="channels_last" if args.channels_last else "contiguous")
    except ValueError as err:
        print(f"normlab bench: error: {err}", file=sys.stderr)
        return 2
    save(report)
    print(bench.to_json(report) if args.json else bench.markdown(report) if args.markdown else bench.table(report))
    if report["interrupted"]:
        print(f"normlab bench: interrupted after {len(done)} of {total} cases; the table holds those",
              file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
