"""``generalist eval``: evaluate a trained model under attacks and write the record.

Everything not given on the command line comes from the run directory: the dataset and its
split settings from ``config.yaml`` (else the dataset named in ``model.json``), the threat
models from the config's adversarial learners. The test split is the default because model
*selection* already used the validation split (docs/algorithm.md, "Model selection").

Outputs, in ``--out`` (default ``RUN_DIR/eval-<timestamp>``): ``eval.json`` (the record),
``results.md`` (tables), ``model_info.json`` (RobustBench format; one more file per further
threat model) and ``state.json``, from which ``--resume`` continues a killed evaluation.
With ``--nproc N`` (or under torchrun) the points are split over the processes, each with its
own state file in ``shards/``, and rank 0 merges them (:mod:`generalist.evaluation.sharding`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from generalist.attacks.threat import ThreatModel
from generalist.compiling import compile_in_place
from generalist.devices import resolve_device
from generalist.errors import CheckpointError, ConfigError
from generalist.evaluation.sharding import (
    SHARD_FOLDER,
    check_resumable,
    evaluation_processes,
    holds_evaluation,
    launch_evaluation,
    run_sharded,
)
from generalist.evaluation.suite import AUTOATTACK, EvaluationSuite, Progress
from generalist.runlock import lock_folder
from generalist.threads import apply_threads
from generalist.torchrun import is_rank_zero, said_by_rank_zero

STATE_FILE = "state.json"
RECORD_FILE = "eval.json"
TABLES_FILE = "results.md"
DEFAULT_BATCH = 500
MODEL_CHOICES = ("last", "best")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained model: AutoAttack or chosen attacks, per threat model and union",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "target",
        metavar="RUN_DIR_OR_WEIGHTS",
        help="a run directory from `generalist train` or a model.safetensors file",
    )
    parser.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        help="which model of a run directory: last (default; the final global model, "
        "model.safetensors) or best (model-best.safetensors, selected on the validation split)",
    )
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
    parser.add_argument("--seed", type=int, default=0, help="attack seed (default 0)")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="where that dataset lives (default: the run's)")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test (default) or the validation split carved from training data",
    )
    parser.add_argument("--out", help="output folder (default: RUN_DIR/eval-<timestamp>)")
    parser.add_argument(
        "--resume", metavar="EVAL_DIR", help="continue the interrupted evaluation in EVAL_DIR"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="split the points over N processes of this machine (one GPU each; gloo on the CPU): "
        "runs `torchrun --standalone --nproc-per-node N` for you; per-point results are those "
        "of one process",
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from generalist.evaluation.tables import render_markdown

    if args.nproc not in (None, 1):  # one process needs no launcher
        if args.resume:  # refused here, before torchrun starts and reports a failed worker
            check_resumable(Path(args.resume), STATE_FILE, args.nproc)
        device = resolve_device(args.device, "--device")
        return launch_evaluation(args.nproc, args.argv, device)
    out, record = run_eval(args)
    if record is None:  # another rank than 0 of a sharded evaluation: rank 0 reports
        return 0
    print(render_markdown(record), end="")
    print(f"\nwrote {', '.join(record['files'])} to {out}")
    return 0


def run_eval(
    args: argparse.Namespace, on_progress: Callable[[Progress], None] | None = None
) -> tuple[Path, dict[str, Any] | None]:
    """Resolve the arguments, run the suite and write every output; returns (folder, record).

    Under torchrun every rank evaluates its shard of the points and only rank 0 writes the
    outputs; the record is ``None`` on the other ranks. An error every rank meets alike is
    printed once, by rank 0."""
    with said_by_rank_zero(), ExitStack() as group:
        return _evaluate(args, group, on_progress)


def _evaluate(
    args: argparse.Namespace,
    group: ExitStack,
    on_progress: Callable[[Progress], None] | None,
) -> tuple[Path, dict[str, Any] | None]:
    from generalist.checkpoint import load_model, sha256_file

    started = time.perf_counter()
    target = Path(args.target)
    if not target.exists():
        raise CheckpointError(
            f"{target} does not exist; pass a run directory from `generalist train` "
            "or a model.safetensors file"
        )
    weights, which = _weights_of(target, getattr(args, "model", None))
    run_dir = target if target.is_dir() else target.parent
    for flag, value in (("--batch-size", args.batch_size), ("--n-iter", args.n_iter)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1 (leave it out for the default)")
    config = _run_config(run_dir)
    suite = EvaluationSuite(
        _threats(args, config),
        args.attacks or [AUTOATTACK],
        seed=args.seed,
        batch_size=args.batch_size or (config.data.eval_batch_size if config else DEFAULT_BATCH),
        n_iter=args.n_iter,
        progress=not args.no_progress and is_rank_zero(),
    )
    # the arguments are checked: now join the other processes (torchrun), if any
    processes = group.enter_context(evaluation_processes(resolve_device(args.device, "--device")))
    out = processes.agree(lambda: _out_dir(args, run_dir, processes.count))
    device = processes.device
    apply_threads(args.threads)
    model, spec = load_model(weights, device, trust_unhashed=args.trust_unhashed)
    if args.compile:
        compile_in_place(model)  # in place: the model's names and hash are unchanged
    model_hash = sha256_file(weights)
    data, data_meta = _evaluation_data(args, config, spec)
    _check_fits(spec, data_meta, target)
    processes.agree(lambda: _claim(out))
    identity = {
        "model_sha256": model_hash,
        "data_fingerprint": data_meta["fingerprint"],
        "dataset": data_meta["dataset"],
        "split": data_meta["split"],
    }
    result = run_sharded(
        suite,
        model,
        data,
        folder=out,
        state_file=STATE_FILE,
        identity=identity,
        processes=processes,
        on_progress=on_progress,
    )
    if result is None:
        return out, None
    return out, _write_outputs(
        out,
        result,
        suite,
        args,
        device,
        started,
        model={
            "path": str(weights),
            "which": which,
            "selected": spec.get("selected"),
            "sha256": model_hash,
            "architecture": spec["model"]["name"],
            "spec": spec["model"],
            "trained_on": spec.get("dataset"),
        },
        data=data_meta,
        run_name=run_dir.name,
        processes=processes.count,
    )


def _write_outputs(
    out: Path,
    result: Any,
    suite: EvaluationSuite,
    args: argparse.Namespace,
    device: torch.device,
    started: float,
    *,
    model: dict[str, Any],
    data: dict[str, Any],
    run_name: str,
    processes: int,
) -> dict[str, Any]:
    from generalist.durable import write_text_durably
    from generalist.evaluation.records import build_record, model_info, model_info_filename
    from generalist.evaluation.tables import render_markdown

    settings = {
        "attacks": suite.attack_names,
        "threats": [str(t) for t in suite.threats],
        "seed": suite.seed,
        "batch_size": suite.batch_size,
        "n_iter": suite.n_iter,
        "device": str(device),
        "processes": processes,
        "precision": "fp32",
        "arguments": {k: v for k, v in vars(args).items() if _is_plain(v)},
    }
    record = build_record(
        result, model=model, data=data, settings=settings, seconds=time.perf_counter() - started
    )
    infos = {
        model_info_filename(record, i): model_info(
            record, i, name=run_name, architecture=model["architecture"]
        )
        for i in range(len(record["threats"]))
    }
    shards = [f"{SHARD_FOLDER}/"] if processes > 1 else []
    record["files"] = [RECORD_FILE, TABLES_FILE, *infos, STATE_FILE, *shards]
    for name, info in infos.items():
        write_text_durably(out / name, json.dumps(info, indent=2) + "\n")
    write_text_durably(out / TABLES_FILE, render_markdown(record))
    write_text_durably(out / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    return record


def _weights_of(target: Path, which: str | None) -> tuple[Path, str | None]:
    """The weights file ``--model`` names in a run directory, and ``last``/``best`` (None for
    a weights file given directly)."""
    from generalist.checkpoint import BEST_STEM, WEIGHTS_FILE

    if not target.is_dir():
        if which is not None:
            raise ConfigError(
                f"--model {which} picks a model inside a run directory; pass the run directory "
                f"instead of {target}"
            )
        return target, None
    which = which or "last"
    weights = target / (WEIGHTS_FILE if which == "last" else f"{BEST_STEM}.safetensors")
    if which == "best" and not weights.is_file():
        raise CheckpointError(
            f"{target} has no {weights.name}: no validated model was selected (eval.select: "
            "none, no epoch passed the clean gate, or training has not validated yet); "
            "evaluate --model last"
        )
    return weights, which


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list)


def _run_config(run_dir: Path) -> Any:
    """The training run's resolved config, or ``None`` for bare weights without one."""
    from generalist.config import build_config

    path = run_dir / "config.yaml"
    return build_config(user_yaml=path) if path.is_file() else None


def _threats(args: argparse.Namespace, config: Any) -> list[ThreatModel]:
    if len(args.norm) != len(args.eps):
        raise ConfigError("give --norm and --eps in pairs, e.g. --norm Linf --eps 8/255")
    threats = [ThreatModel.parse(text) for text in args.threat]
    threats += [ThreatModel.of(norm, eps) for norm, eps in zip(args.norm, args.eps, strict=True)]
    if threats:
        return threats
    if config is not None and config.eval_threats():
        return config.eval_threats()
    raise ConfigError(
        f"{args.target} has no config.yaml to take threat models from; "
        "pass them, e.g. --threat Linf:8/255"
    )


def _claim(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lock_folder(out, "evaluation folder", "a separate evaluation needs its own --out")


def _out_dir(args: argparse.Namespace, run_dir: Path, processes: int) -> Path:
    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            raise ConfigError("--out and --resume name different folders; give only --resume")
        check_resumable(out, STATE_FILE, processes)
        return out
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for the evaluation's files")
    else:
        base = run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    if holds_evaluation(out, STATE_FILE):
        raise ConfigError(
            f"{out} already holds an evaluation; continue it with --resume {out} or another --out"
        )
    return out


def _evaluation_data(args: argparse.Namespace, config: Any, spec: dict[str, Any]) -> tuple:
    """The evaluated subset (the first ``--n-examples`` of the split) and its description."""
    from generalist.data import load_splits
    from generalist.data.folders import FolderOptions

    name = args.dataset or (config.data.dataset if config else None) or spec.get("dataset")
    if not name:
        raise ConfigError(
            f"cannot tell which dataset {args.target} was trained on; pass --dataset and --data-dir"
        )
    data_dir = args.data_dir or (config.data.data_dir if config and not args.dataset else None)
    split_settings = (
        {
            "val_size": config.data.val_size,
            "split_seed": config.data.split_seed,
            "train_limit": config.data.train_limit,
        }
        if config
        else {}
    )
    size = spec.get("model", {}).get("image_size") or 224
    folder = FolderOptions.from_settings(config.data) if config else FolderOptions(image_size=size)
    splits = load_splits(name, data_dir, folder=folder, **split_settings)
    data = splits.test if args.split == "test" else splits.val
    if args.n_examples is not None:
        if not 1 <= args.n_examples <= len(data):
            raise ConfigError(
                f"--n-examples {args.n_examples}: the {name} {args.split} split has "
                f"{len(data)} examples; use 1 to {len(data)}"
            )
        data = data.subset(torch.arange(args.n_examples))
    meta = {
        "dataset": name,
        "data_dir": None if data_dir is None else str(data_dir),
        "split": args.split,
        **{k: v for k, v in split_settings.items()},
        "fingerprint": data.fingerprint(),
        "num_classes": splits.info.num_classes,
        "image_shape": list(splits.info.image_shape),
    }
    return data, meta


def _check_fits(spec: dict[str, Any], data: dict[str, Any], target: Path) -> None:
    """Refuse data the model cannot take, before an attack fails with a shape error."""
    model = spec["model"]
    expected = {
        "num_classes": (model.get("num_classes"), data["num_classes"]),
        "in_channels": (model.get("in_channels"), data["image_shape"][0]),
        "image_size": (model.get("image_size"), data["image_shape"][-1]),
    }
    for key, (wants, has) in expected.items():
        if wants is not None and wants != has:
            raise ConfigError(
                f"{target} was built for {key}={wants} but {data['dataset']} has {has}; "
                "pass the --dataset it was trained on"
            )
