"""The placement's communication primitives on two gloo ranks, each checked against what one
process would have (the whole runs through them are tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from forked_ranks import fork_two

from generalist.config import build_config
from generalist.training.placement import SingleProcess
from generalist.training.processes import placement


def _exchange(out: Path) -> int:
    """Every primitive once on this rank (of a two-learner run: learner = rank); the results
    written to ``out/rank<r>.json``."""
    config = build_config("generalist-d", dataset="digits")
    rank = int(os.environ["RANK"])
    with placement(config, torch.device("cpu")) as place:
        counts = torch.tensor([rank + 1])
        place.sum_counts(counts)
        teacher = ([torch.tensor([1.0, 2.0]) + 2 * rank], [torch.tensor([7 + rank])])
        mixed, ints = place.mix_sum(0.25 + 0.5 * rank, teacher, [torch.tensor([0])])
        results = {
            "here": place.learners_here(2),
            "losses": place.gather_losses(torch.tensor([rank + 1.0])).tolist(),
            "flags": place.gather_flags(torch.tensor([rank == 1])).tolist(),
            "agree": place.agree(rank, 5 - rank),
            "on_main": place.on_main(lambda: f"decided by {dist.get_rank()}"),
            "sent": place.send_by_learner(lambda: ["part 0", "part 1"]),
            "gathered": place.gather_by_learner(lambda learner: f"state of {learner}"),
            "shards": [place.eval_shard(None), place.eval_shard(0), place.eval_shard(1)],
            "counts": counts.tolist(),
            "mix": [mixed[0].tolist(), ints[0].tolist()],
        }
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    return 0


def test_two_ranks_exchange_what_each_primitive_promises(tmp_path):
    assert fork_two(_exchange, tmp_path) == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    both = {
        "losses": [1.0, 2.0],  # learner i's loss from the rank that trains it
        "flags": [False, True],
        "agree": [1, 5],  # the largest of each value
        "on_main": "decided by 0",
        "counts": [3],
        "mix": [[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 4], [7]],  # γ-mix; ints of teacher 0
    }
    for rank, results in enumerate((rank0, rank1)):
        assert {key: results[key] for key in both} == both, rank
        assert results["here"] == [rank]
    assert rank0["sent"] is None and rank1["sent"] == "part 1"  # rank 0 keeps its own
    assert rank0["gathered"] == ["state of 1"] and rank1["gathered"] == []
    # The global model over both ranks; a learner only where it trains, whole.
    assert rank0["shards"] == [[0, 2], [0, 1], None]
    assert rank1["shards"] == [[1, 2], None, [0, 1]]


def test_one_process_communicates_nothing():
    place = SingleProcess(torch.device("cpu"))
    losses = torch.tensor([0.5, float("nan")])
    assert place.learners_here(3) == [0, 1, 2]
    assert place.gather_losses(losses) is losses
    assert place.agree(0, 1) == (0, 1)
    assert place.send_by_learner(lambda: 1 / 0) is None  # nothing to send: never built
    assert place.gather_by_learner(lambda learner: 1 / 0) == []
    assert place.eval_shard(None) == place.eval_shard(2) == (0, 1)
    assert place.mix_sum is None and place.gradient_sync is None
