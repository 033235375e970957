"""``generalist eval``: evaluate a trained model under attacks and write the record.

Everything not given on the command line comes from the run directory: the dataset and its
split settings from ``config.yaml`` (else the dataset named in ``model.json``), the threat
models from the config's adversarial learners. The test split is the default because model
*selection* already used the validation split (docs/algorithm.md, "Model selection").
Weights saved by another program (no ``model.json``) are evaluated with ``--arch``.

Outputs, in ``--out`` (default ``RUN_DIR/eval-<timestamp>``): ``eval.json`` (the record),
``results.md`` (tables), ``model_info.json`` (RobustBench format; one more file per further
threat model), ``request.json`` (the resolved settings) and ``state.json``, from which
``--resume`` continues a killed evaluation. ``--corruptions SOURCE`` adds the
common-corruptions track (:mod:`generalist.evaluation.corruptions`): its table,
``model_info_corruptions.json`` and ``corruptions-state.json``; alone (no ``--attacks``,
``--threat`` or ``--norm``) it runs instead of the attacks. With ``--nproc N`` (or under
torchrun) the attacks' points are split over the processes, each with its own state file in
``shards/``, and rank 0 merges them (:mod:`generalist.evaluation.sharding`). This module only
turns flags into an ``evaluation.api.EvalRequest`` and starts torchrun for ``--nproc``; the work
is ``evaluation.api.run_eval``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from generalist.errors import ConfigError, GeneralistError
from generalist.evaluation.api import (
    AUTOATTACK,
    DEFAULT_BATCH,
    MODEL_CHOICES,
    STATE_FILE,
    EvalRequest,
    resumed_request,
    run_eval,
)
from generalist.evaluation.sharding import check_resumable, launch_evaluation
from generalist.evaluation.suite import Progress, parse_attack_names
from generalist.torchrun import world_size

FLAGS = {
    "n_examples": "--n-examples",
    "num_classes": "--num-classes",
    "which": "--model",
    "out": "--out",
    "resume": "--resume",
    "device": "--device",
    "batch_size": "--batch-size",
    "n_iter": "--n-iter",
    "corruptions": "--corruptions",
    "processes": "--nproc",
}
"""The library's parameter names and the flags that set them, for its errors' first word."""


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained model: AutoAttack or chosen attacks, per threat model and union",
        description=__doc__.split("\n\n")[0],
    )
    # in the order --help lists them
    _add_model_flags(parser)
    _add_attack_flags(parser)
    _add_data_flags(parser)
    _add_folder_flags(parser)
    _add_process_flags(parser)
    parser.set_defaults(func=cmd_eval)
    return parser


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """What is evaluated: a run directory or weights file, and how to build its model."""
    parser.add_argument(
        "target",
        nargs="?",
        metavar="RUN_DIR_OR_WEIGHTS",
        help="a run directory from `generalist train`, a model.safetensors file, or (with "
        "--arch) any weights file: safetensors or a torch.save(model.state_dict()) file; "
        "optional with --resume",
    )
    parser.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        help="which model of a run directory: last (default; the final global model, "
        "model.safetensors) or best (model-best.safetensors, selected on the validation split)",
    )
    parser.add_argument(
        "--arch",
        metavar="NAME_OR_IMPORT_PATH",
        help="the architecture of weights saved without model.json, a registered name or your "
        "own as package.module:callable (with --dataset); naming the file and its "
        "architecture is your consent to load a file no model.json hash vouches for "
        "(it is still read without unpickling code, and must fit the architecture exactly)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="K",
        help="with --arch: the model's number of outputs (default: the dataset's classes)",
    )


def _add_attack_flags(parser: argparse.ArgumentParser) -> None:
    """Which attacks under which threat models, on how many points, in what batches."""
    parser.add_argument(
        "--attacks",
        action="append",
        metavar="LIST",
        help=f"comma list, repeatable: {AUTOATTACK} (default; the reference's standard "
        "version), autoattack-plus, autoattack-rand (EoT, for randomised models), pgd-20, "
        "apgd-ce, ...",
    )
    parser.add_argument(
        "--threat",
        action="append",
        default=[],
        metavar="NORM:EPS",
        help="threat model, repeatable, e.g. --threat Linf:8/255 --threat L2:0.5 "
        "(default: the run's training threats)",
    )
    parser.add_argument(
        "--norm", action="append", default=[], help="Linf, L2 or L1 (pair with --eps)"
    )
    parser.add_argument("--eps", action="append", default=[], help="e.g. 8/255 (pair with --norm)")
    parser.add_argument(
        "--n-examples",
        type=int,
        metavar="N",
        help="evaluate the first N examples of the split (default: all)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help=f"examples per attack call (default: the run's eval batch size or {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--n-iter",
        type=int,
        metavar="K",
        help="iterations of the iterative attacks (default: each attack's standard)",
    )


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The corruption track, the seed, and the data evaluated on."""
    parser.add_argument(
        "--corruptions",
        metavar="SOURCE",
        help="also score common corruptions (alone: only them): a CIFAR-10-C/-100-C folder "
        "(<corruption>.npy + labels.npy, the reference protocol), an ImageNet-C folder "
        "(<corruption>/<severity>/<class>/*), or `generated` (made at run time from the split, "
        "14 of the 15; not CIFAR-10-C)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="attack seed, and that of generated corruptions (default 0)",
    )
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="where that dataset lives (default: the run's)")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test (default) or the validation split carved from training data",
    )


def _add_folder_flags(parser: argparse.ArgumentParser) -> None:
    """Where the evaluation's files go, or which interrupted evaluation to continue."""
    parser.add_argument("--out", help="output folder (default: RUN_DIR/eval-<timestamp>)")
    parser.add_argument(
        "--resume",
        metavar="EVAL_DIR",
        help="continue the interrupted evaluation in EVAL_DIR, a folder with state.json or "
        "corruptions-state.json (its request.json holds the target, threats, corruptions, "
        "dataset, data dir and examples: nothing else is needed)",
    )


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    """How it runs: device, processes, threads, compilation, what to trust, progress bars."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="split the points over N processes of this machine (one GPU each; gloo on the CPU): "
        "runs `torchrun --standalone --nproc-per-node N` for you; per-point results are those "
        "of one process. A resumed evaluation keeps its number",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the kernels (default: all cores, or those other jobs leave free)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the model with torch.compile (pays on long evaluations on a GPU)",
    )
    parser.add_argument(
        "--trust-unhashed",
        action="store_true",
        help="load weights whose model.json has no sha256 (damage or a swap goes unnoticed)",
    )
    parser.add_argument(
        "--trust-changed-code",
        action="store_true",
        help="build a model given by import path from its file as it is now, though it "
        "changed since the run recorded its SHA-256",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_eval(args: argparse.Namespace) -> int:
    from generalist.evaluation.tables import render_markdown

    request, resume = request_from_args(args)
    nproc = request.processes
    if nproc is not None and nproc != 1 and world_size() == 1:  # not yet under torchrun
        return _launch(nproc, request, args.argv, resume)
    with _flags_in_errors():
        out, record = run_eval(request, resume=resume)
    if record is None:  # another rank than 0 of a sharded evaluation: rank 0 reports
        return 0
    print(render_markdown(record), end="")
    print(f"\nwrote {', '.join(record['files'])} to {out}")
    return 0


def eval_from_args(
    args: argparse.Namespace, on_progress: Callable[[Progress], None] | None = None
) -> tuple[Path, dict[str, Any] | None]:
    """Check the flags, build the request (from ``--resume``'s folder too) and run it in this
    process (a rank of it under torchrun: the record is ``None`` on ranks other than 0)."""
    request, resume = request_from_args(args)
    with _flags_in_errors():
        return run_eval(request, resume=resume, on_progress=on_progress)


def _launch(nproc: int, request: EvalRequest, argv: list[str], resume: bool) -> int:
    """This command again on ``nproc`` processes (torchrun; ``--nproc`` is left out of their
    arguments, the count is theirs from torchrun); its exit status."""
    from generalist.devices import resolve_device

    with _flags_in_errors():
        if resume:  # refused here, before torchrun starts and reports a failed worker
            check_resumable(Path(request.out or ""), STATE_FILE, nproc)
        return launch_evaluation(nproc, argv, resolve_device(request.device, "device"))


def request_from_args(args: argparse.Namespace) -> tuple[EvalRequest, bool]:
    """The flags checked and turned into an :class:`EvalRequest` (with ``--resume``, the
    folder's saved one with the flags given on top), and whether it resumes."""
    _check_flags(args)
    given = _given_values(args)
    run_settings = {
        "device": args.device,
        "threads": args.threads,
        "compile": args.compile,
        "trust_unhashed": args.trust_unhashed,
        "trust_changed_code": args.trust_changed_code,
        "progress": not args.no_progress,
    }
    with _flags_in_errors():
        if args.resume:
            if args.out and Path(args.out) != Path(args.resume):
                raise ConfigError("--out and --resume name different folders; give only --resume")
            # a seed or split given again must match the saved one (the plan check says so)
            request = resumed_request(
                args.resume,
                **given,
                seed=args.seed if args.seed != 0 else None,
                split=args.split if args.split != "test" else None,
            ).with_values(**run_settings)
        else:
            request = EvalRequest(
                **{k: v for k, v in given.items() if v is not None},
                seed=args.seed,
                split=args.split,
                out=args.out,
                **run_settings,
            )
    return request, bool(args.resume)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that are wrong on their own or together, before anything is read."""
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--n-iter", args.n_iter),
        ("--num-classes", args.num_classes),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1 (leave it out for the default)")
    if args.num_classes is not None and args.arch is None:
        raise ConfigError("--num-classes goes with --arch; a run's model.json already says it")
    if len(args.norm) != len(args.eps):
        raise ConfigError("give --norm and --eps in pairs, e.g. --norm Linf --eps 8/255")
    if args.target is None and not args.resume:
        raise ConfigError("name what to evaluate: a run directory or a weights file")
    if args.model is not None and args.target and not Path(args.target).is_dir():
        raise ConfigError(
            f"--model {args.model} picks a model inside a run directory; pass the run directory "
            f"instead of {args.target}"
        )


def _given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The request's values the flags set (None: not given), by the library's names."""
    threats = (*args.threat, *(f"{n}:{e}" for n, e in zip(args.norm, args.eps, strict=True)))
    attacks = tuple(parse_attack_names(args.attacks)) if args.attacks else None
    if args.corruptions and not (attacks or threats) and not args.resume:
        attacks = ()  # the corruption track alone
    return {
        "target": args.target,
        "which": args.model,
        "arch": args.arch,
        "num_classes": args.num_classes,
        "attacks": attacks,
        "threats": threats or None,
        "n_examples": args.n_examples,
        "batch_size": args.batch_size,
        "n_iter": args.n_iter,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "corruptions": args.corruptions,
        "processes": args.nproc,
    }


@contextmanager
def _flags_in_errors() -> Iterator[None]:
    """The library's errors raised inside, with their parameter names written as flags."""
    try:
        yield
    except GeneralistError as exc:
        raise _in_flags(exc) from None


def _in_flags(exc: GeneralistError) -> GeneralistError:
    """The library's error with its leading parameter name written as the flag that sets it."""
    message = str(exc)
    for parameter, flag in FLAGS.items():
        if message.startswith(f"{parameter} "):
            renamed = type(exc)(flag + message[len(parameter) :])
            renamed.__dict__.update(exc.__dict__)
            return renamed
    return exc
