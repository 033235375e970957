"""``generalist train | eval | report | compare | demo | presets | data``: the command line.

Every user-facing failure is a ``GeneralistError`` and is printed as one ``error:`` line with
exit status 2; a traceback means a bug in generalist, not in the user's input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from generalist import __version__
from generalist.errors import GeneralistError, os_error_message

DEMO_PRESETS = ("standard", "pgd-at", "generalist-d")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="method preset (see `generalist presets`)")
    parser.add_argument(
        "--dataset", help="digits, mnist, cifar10, cifar100, npz, imagefolder, imagenet"
    )
    parser.add_argument("--data-dir", help="folder (or .npz file) holding the dataset")
    parser.add_argument("--config", help="a YAML file layered over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set learners.adv_linf.optimizer.lr=0.05",
    )
    parser.add_argument("--epochs", type=int, help="shorthand for --set epochs=N")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the kernels (default: all cores, or those other jobs leave free)",
    )
    parser.add_argument("--out", help="parent folder of the run directory (default runs/)")
    parser.add_argument("--name", help="run name (default: the preset name)")
    parser.add_argument(
        "--init-from",
        metavar="RUN_DIR_OR_WEIGHTS",
        help="start from saved weights of the same model (shorthand for --set model.init_from=)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides)
    for key, value in (
        ("epochs", args.epochs),
        ("device", args.device),
        ("threads", args.threads),
        ("out_dir", args.out),
        ("name", args.name),
        ("data.data_dir", args.data_dir),
        ("model.init_from", args.init_from),
    ):
        if value is not None:
            extra.append(f"{key}={value}")
    return extra


def _build(args: argparse.Namespace, preset: str | None) -> object:
    from generalist.config import build_config

    if preset is None and args.config is None:
        raise GeneralistError("give --preset NAME (see `generalist presets`) or --config FILE")
    return build_config(
        preset, dataset=args.dataset, user_yaml=args.config, overrides=_overrides(args)
    )


def cmd_train(args: argparse.Namespace) -> int:
    from generalist.rundir import RunDir, discard_unstarted_runs
    from generalist.runlock import release_folder
    from generalist.torchrun import is_rank_zero
    from generalist.training.loop import train
    from generalist.training.signals import TrainingInterrupted

    run = None
    if args.resume:
        config = _resume_config(args)  # takes the run's lock: a second process stops here
        run = RunDir.open(args.resume)
    else:
        config = _build(args, args.preset)
    if args.nproc not in (None, 1):  # one process needs no launcher
        from generalist.devices import resolve_device
        from generalist.torchrun import check_gpus, launch
        from generalist.training.processes import replicas_per_learner

        replicas_per_learner(args.nproc, config, "--nproc asks for")
        check_gpus(args.nproc, resolve_device(config.device), "--nproc asks for")
        if not args.dry_run:
            if run is not None:
                release_folder(run.path)  # torchrun's rank 0 takes it
            return launch(args.nproc, args.argv)
    if args.dry_run:
        from generalist.preflight import start_notes

        print(config.to_yaml(), end="")
        print(f"# {_ema_cap_line(config)}")  # a YAML comment: the output still loads as a config
        for line in start_notes(config):  # stderr: stdout stays the YAML a file can take
            print(line, file=sys.stderr)
        return 0
    try:
        train(config, run, resume=run is not None, progress=not args.no_progress)
    except TrainingInterrupted as stop:
        if is_rank_zero():
            print(f"\n{stop}", file=sys.stderr)
        return stop.exit_status
    except (GeneralistError, OSError):
        for path in discard_unstarted_runs():  # a full disk at the start: no half run left
            print(f"note: removed {path}, which it could not start", file=sys.stderr)
        raise
    return 0


def _ema_cap_line(config) -> str:
    """The d_max this config trains with; with ``auto`` it needs the training split's size, so
    the data are read (an image folder only listed), or the line says why they could not be."""
    from generalist.data.batches import EpochBatches
    from generalist.data.folders import FolderOptions
    from generalist.data.splits import training_split_size
    from generalist.training.recipe import describe_ema_cap, ema_cap_record, ema_decay_cap

    data = config.data
    try:
        examples = training_split_size(
            data.dataset,
            data.data_dir,
            val_size=data.val_size,
            train_limit=data.train_limit,
            folder=FolderOptions.from_settings(data),
        )
        steps_per_epoch = EpochBatches(examples, data.batch_size, config.seed).num_batches
    except (GeneralistError, OSError) as error:
        if config.merge.ema_decay != "auto":
            return f"EMA cap d_max = {ema_decay_cap(config, 1):.6g} (merge.ema_decay as given)"
        return (
            "EMA cap d_max: merge.ema_decay auto resolves it from the training split's size "
            f"when training starts (manifest.json records it); the data cannot be read now: "
            f"{error}"
        )
    return describe_ema_cap(ema_cap_record(config, steps_per_epoch))


def _resume_config(args: argparse.Namespace) -> object:
    """The run's own config; presets, files and --set may only change what a resume allows."""
    from generalist.config import build_config
    from generalist.training.save_and_resume import resume_config

    if args.out or args.name:
        raise GeneralistError(
            "--out and --name place a new run; --resume continues RUN_DIR where it is"
        )
    given = None
    if args.preset or args.config or args.dataset:
        given = build_config(
            args.preset, dataset=args.dataset, user_yaml=args.config, overrides=_overrides(args)
        )
    return resume_config(args.resume, given, _overrides(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the three headline methods on digits, print one comparison table, write a report."""
    from generalist.reporting.report import write_report
    from generalist.reporting.runs import load_runs
    from generalist.training.loop import train

    args.dataset = args.dataset or "digits"
    results = []
    for preset in DEMO_PRESETS:
        config = _build(args, preset)
        print(f"\n== {preset} ==")
        results.append((preset, train(config, progress=not args.no_progress)))
    columns = list(results[0][1].test)
    print(
        f"\nTest accuracy (%) on {args.dataset}, global model, PGD-{config.eval.test_steps}; "
        f"last: the final model, best: selected on validation ({config.eval.select}):"
    )
    rows = []
    for preset, result in results:
        rows.append((preset, "last", result.test, result.run.path))
        if result.best is not None:
            best = f"best (epoch {result.best['epoch']})"
            rows.append((preset, best, result.best["test"], result.run.path))
    width = max(len("model"), *(len(model) for _, model, _, _ in rows))
    header = (
        f"| {'preset':<14} | {'model':<{width}} | "
        + " | ".join(f"{c:>14}" for c in columns)
        + " | run |"
    )
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for preset, model, test, path in rows:
        cells = " | ".join(f"{test.get(c, float('nan')):>14.1f}" for c in columns)
        print(f"| {preset:<14} | {model:<{width}} | {cells} | {path} |")
    runs = load_runs([result.run.path for _, result in results])
    report = write_report(runs, results[0][1].run.path.parent / "demo-report")
    print(f"\nreport with figures: {report.path}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from generalist.presets import describe_preset, list_presets, list_profiles

    for name in list_presets():
        print(f"{name:<14} {describe_preset(name)}")
    print(f"\ndataset profiles: {', '.join(list_profiles())}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from generalist.data.cli_data import add_data_parser
    from generalist.evaluation.cli_eval import add_eval_parser
    from generalist.reporting.cli_report import add_compare_parser, add_report_parser

    parser = argparse.ArgumentParser(
        prog="generalist",
        description="Generalist adversarial training and honest robustness evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"generalist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a preset or a config file")
    _add_config_arguments(train)
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last checkpoint (its config.yaml is used; "
        "--epochs N trains it longer)",
    )
    train.add_argument("--dry-run", action="store_true", help="print the resolved config, stop")
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (one per learner, or a multiple of that for "
        "data parallelism): runs `torchrun --standalone --nproc-per-node N` for you",
    )
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="standard vs PGD-AT vs Generalist-D on digits, one table")
    _add_config_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    add_eval_parser(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    add_data_parser(sub)

    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except GeneralistError as exc:
        if not getattr(exc, "quiet", False):  # rank 0 of a distributed run says it
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder the OS refuses (read-only, full): the user's to fix
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from generalist.torchrun import is_rank_zero

        if not is_rank_zero():  # rank 0 says it for every process
            return 130
        if args.command == "eval":
            print(
                "\ninterrupted; continue with: generalist eval --resume EVAL_DIR",
                file=sys.stderr,
            )
        else:
            out = Path(getattr(args, "out", None) or "runs")
            print(f"\ninterrupted; finished epochs are logged under {out}/", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
