"""A point's evaluation does not depend on how the evaluation was run.

AutoAttack's attacks (APGD, FAB, Square) seed their random draws by (seed, attack, the point's
global index), so the per-point masks are the same for any batch size, any order of the points,
any number of processes (``--nproc``/torchrun: shards merged into one folder) and a resume in
the middle of Square. All on the tiny digits CNN of :mod:`test_eval_suite`: AutoAttack's four
stages with 5 iterations per gradient attack and Square cut to ``QUERIES`` queries (5000 would
take minutes on the points that survive), plus APGD-CE on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from forked_ranks import cli_rank, fork_two
from test_eval_suite import digits, eval_args, results_only, run_dir  # noqa: F401 (fixtures)

from generalist.attacks import AutoAttack, Square
from generalist.cli import main
from generalist.errors import ConfigError
from generalist.evaluation import cli_eval
from generalist.evaluation import suite as suite_module
from generalist.evaluation.cli_eval import eval_from_args
from generalist.evaluation.suite import EvaluationSuite, Progress, SuiteResult
from generalist.weights import load_model

N = 40
ATTACKS = ["autoattack", "apgd-ce"]
THREAT = "Linf:0.05"
"""Where several AutoAttack stages break points and some points stand (the first test checks)."""
QUERIES = 300

_build_attack = suite_module._build_attack


def _cheap_build(name: str, threat, *, seed: int, n_iter: int | None):
    """The suite's attacks, but AutoAttack's Square with ``QUERIES`` queries."""
    if name != "autoattack":
        return _build_attack(name, threat, seed=seed, n_iter=n_iter)
    square = Square(threat, n_queries=QUERIES, seed=seed)
    return AutoAttack(
        threat, seed=seed, n_iter=n_iter, attacks=["apgd-ce", "apgd-t", "fab-t", square]
    )


@pytest.fixture(scope="module", autouse=True)
def cheap_square():
    """Every suite here (and every forked rank, which inherits the patch) uses the cheap Square."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(suite_module, "_build_attack", _cheap_build)
        yield


class Killed(Exception):
    pass


def masks(result: SuiteResult) -> dict[str, torch.Tensor]:
    """Every per-point mask of a result: clean, each attack, each AutoAttack stage, worst case."""
    found = {"clean": result.clean}
    for threat in result.threats:
        found[f"{threat.threat} worst"] = threat.worst_case
        for attack in threat.attacks:
            found[f"{threat.threat} {attack.name}"] = attack.robust
            for stage in attack.stages:
                found[f"{threat.threat} {attack.name}/{stage.name}"] = stage.robust
    return found


def assert_same_masks(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    assert list(one) == list(other)
    for key in one:
        assert torch.equal(one[key], other[key]), key


@pytest.fixture(scope="module")
def model(run_dir):  # noqa: F811 (the imported fixture)
    return load_model(run_dir)[0]


@pytest.fixture(scope="module")
def points(digits):  # noqa: F811
    return digits.test.subset(torch.arange(N))


@pytest.fixture(scope="module")
def reference(model, points) -> SuiteResult:
    """One process, one batch: the evaluation every other way of running it must equal."""
    return EvaluationSuite([THREAT], ATTACKS, n_iter=5, batch_size=500).run(model, points)


def test_reference_breaks_some_points_in_several_stages(reference):
    """The comparisons below are only worth something if the attacks did break points, in
    more than one AutoAttack stage, and left some standing."""
    aa = reference.threats[0].attacks[0]
    broken_per_stage = []
    before = reference.clean
    for stage in aa.stages:
        broken_per_stage.append(int((before & ~stage.robust).sum()))
        before = stage.robust
    assert sum(n > 0 for n in broken_per_stage) >= 2
    assert 0 < int(aa.robust.sum()) < int(reference.clean.sum())


def test_masks_do_not_depend_on_the_batch_size(model, points, reference):
    small = EvaluationSuite([THREAT], ATTACKS, n_iter=5, batch_size=37).run(model, points)
    assert_same_masks(masks(small), masks(reference))


def test_masks_follow_their_points_in_any_order(model, points, reference):
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    suite = EvaluationSuite([THREAT], ATTACKS, n_iter=5, batch_size=16)
    permuted = suite.run(model, points.subset(order), indices=order)
    assert_same_masks(masks(permuted), {k: m[order] for k, m in masks(reference).items()})


def test_resume_in_the_middle_of_square_equals_an_uninterrupted_run(
    model, points, reference, tmp_path
):
    suite = EvaluationSuite([THREAT], ATTACKS, n_iter=5, batch_size=8)
    seen: list[Progress] = []

    def kill_inside_square(progress: Progress) -> None:
        seen.append(progress)
        if progress.attack == "autoattack/square" and 0 < progress.done < progress.total:
            raise Killed

    with pytest.raises(Killed):
        suite.run(
            model, points, state_path=tmp_path / "killed.json", on_progress=kill_inside_square
        )
    state = json.loads((tmp_path / "killed.json").read_text())
    aa_state = state["jobs"][f"{THREAT} autoattack"]["autoattack"]
    assert aa_state["finished"] == ["apgd-ce", "apgd-t", "fab-t"]
    assert 0 < aa_state["queue_done"] < len(aa_state["queue"])

    resumed = suite.run(model, points, state_path=tmp_path / "killed.json")
    assert_same_masks(masks(resumed), masks(reference))


# --- processes --------------------------------------------------------------------------------


def cli(run_dir: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return [
        "eval",
        str(run_dir),
        "--no-progress",
        "--n-examples",
        str(N),
        "--threat",
        THREAT,
        "--attacks",
        ",".join(ATTACKS),
        "--n-iter",
        "5",
        "--batch-size",
        "8",
        *extra,
        *([] if "--resume" in extra else ["--out", str(out)]),
    ]


def state_masks(folder: Path) -> dict[str, object]:
    """The per-point content of a folder's ``state.json``: every mask and AutoAttack's lists."""
    state = json.loads((folder / "state.json").read_text())
    found: dict[str, object] = {"clean": state["clean"]["correct"], "checks": state["checks"]}
    for key, job in state["jobs"].items():
        if "autoattack" in job:
            aa = job["autoattack"]
            found[key] = (aa["clean_correct"], aa["broken_by"], aa["finished"])
        else:
            found[key] = (job["done"], job["robust"])
    return found


@pytest.fixture(scope="module")
def one_process(run_dir, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("one") / "eval"
    eval_from_args(eval_args(*cli(run_dir, out)[1:]))
    return out


def test_two_processes_write_the_one_process_folder(run_dir, one_process, tmp_path):  # noqa: F811
    out = tmp_path / "two"
    assert fork_two(cli_rank, cli(run_dir, out)) == [0, 0]
    one = json.loads((one_process / "eval.json").read_text())
    two = json.loads((out / "eval.json").read_text())
    assert results_only(two) == results_only(one)
    assert state_masks(out) == state_masks(one_process)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "state-0-of-2.json",
        "state-1-of-2.json",
    ]
    # the cost is that of the same work, only split: pass counts add up to one process's
    assert two["threats"][0]["attacks"][0]["cost"] == one["threats"][0]["attacks"][0]["cost"]
    assert (two["settings"]["processes"], one["settings"]["processes"]) == (2, 1)
    saved = [json.loads((f / "request.json").read_text()) for f in (out, one_process)]
    assert [request["processes"] for request in saved] == [2, 1]


def _killed_rank(argv: list[str], after: int) -> int:
    """``generalist eval`` as one rank, stopped by an exception after ``after`` saved steps."""
    count = 0

    def stop(progress: Progress) -> None:
        nonlocal count
        count += 1
        if count == after:
            raise Killed

    args = eval_args(*argv[1:])
    try:
        eval_from_args(args, on_progress=stop)
    except Killed:
        return 3
    return 0


def test_a_killed_sharded_evaluation_resumes_to_the_one_process_result(
    run_dir,  # noqa: F811
    one_process,
    tmp_path,
    monkeypatch,
):
    out = tmp_path / "killed"
    assert fork_two(_killed_rank, cli(run_dir, out), 6) == [3, 3]
    assert not (out / "eval.json").exists()
    for rank in (0, 1):
        shard = json.loads((out / "shards" / f"state-{rank}-of-2.json").read_text())
        assert shard["jobs"], "the kill came after some attack work was saved"

    with pytest.raises(ConfigError, match=r"evaluated on 2 processes.*--nproc 2") as info:
        eval_from_args(eval_args(*cli(run_dir, out, "--resume", str(out))[1:]))
    assert "\n" not in str(info.value)
    # `--resume DIR` alone starts torchrun on the number of processes request.json saved
    launched = []
    with monkeypatch.context() as patch:
        patch.setattr(cli_eval, "launch_evaluation", lambda *call: launched.append(call) or 0)
        assert main(["eval", "--resume", str(out)]) == 0
    assert [(n, argv) for n, argv, _ in launched] == [(2, ["eval", "--resume", str(out)])]

    assert fork_two(cli_rank, cli(run_dir, out, "--resume", str(out))) == [0, 0]
    one = json.loads((one_process / "eval.json").read_text())
    assert results_only(json.loads((out / "eval.json").read_text())) == results_only(one)
    assert state_masks(out) == state_masks(one_process)


def test_a_one_process_folder_is_not_resumed_on_two(run_dir, one_process):  # noqa: F811
    argv = cli(run_dir, one_process, "--resume", str(one_process))
    assert fork_two(cli_rank, argv) == [2, 2]


def test_each_rank_names_its_own_damaged_shard_file(run_dir, tmp_path, capfd):  # noqa: F811
    out = tmp_path / "damaged"
    (out / "shards").mkdir(parents=True)
    for rank in (0, 1):
        (out / "shards" / f"state-{rank}-of-2.json").write_text("{torn")
    assert fork_two(cli_rank, cli(run_dir, out, "--resume", str(out))) == [2, 2]
    err = capfd.readouterr().err
    for rank in (0, 1):
        assert f"state-{rank}-of-2.json is not a readable state file" in err


def test_more_processes_than_points_is_a_one_line_error(run_dir, tmp_path, capfd):  # noqa: F811
    argv = cli(run_dir, tmp_path / "e")
    argv[argv.index("--n-examples") + 1] = "1"
    assert fork_two(cli_rank, argv) == [2, 2]
    err = capfd.readouterr().err
    assert err.count("error: 1 examples cannot be split over 2 processes") == 1


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (("--nproc", "0"), "--nproc 0: give at least 1 process"),
        (("--resume", "SHARDED", "--nproc", "3"), "evaluated on 2 processes, so resume it with"),
        (("--out", "SHARDED"), "already holds an evaluation; continue it with --resume"),
    ],
)
def test_process_counts_and_folders_are_checked_before_any_work(
    run_dir,  # noqa: F811
    tmp_path,
    capsys,
    extra,
    phrase,
):
    sharded = tmp_path / "sharded"
    (sharded / "shards").mkdir(parents=True)
    (sharded / "shards" / "state-0-of-2.json").write_text("{}")
    argv = [a.replace("SHARDED", str(sharded)) for a in extra]
    assert main(["eval", str(run_dir), "--threat", THREAT, *argv]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1


def test_versions_are_evaluations_of_their_own(model, points):
    suite = EvaluationSuite([THREAT], ["autoattack-plus", "autoattack-rand"], n_iter=1)
    versions = [a.describe()["autoattack_version"] for a in suite.attacks.values()]
    assert versions == ["plus", "rand"]
    result = EvaluationSuite([THREAT], ["autoattack-rand"], n_iter=2).run(model, points)
    (rand,) = result.threats[0].attacks
    assert rand.name == "autoattack-rand"
    assert [s.name for s in rand.stages] == ["apgd-ce", "apgd-dlr"]
    # Expectation over Transformation: every gradient is the mean of 20, from the first one on
    assert rand.stages[0].passes.backward >= 20 * int(result.clean.sum())


def test_a_randomised_model_is_told_to_run_autoattack_rand(model, points):
    class Noisy(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + torch.randn(len(x), 10)

    result = EvaluationSuite([THREAT], ["apgd-ce"], n_iter=2).run(Noisy(model), points)
    (warning,) = [w for w in result.warnings if "differ between forward passes" in w]
    assert warning.count("autoattack-rand") == 1
