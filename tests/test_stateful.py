"""The generic flattening of a state dict into a checkpoint's tensors and JSON, and back."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from generalist.errors import CheckpointError
from generalist.schedules import PiecewiseLinear
from generalist.training.learner import Learner
from generalist.training.stateful import flatten, unflatten
from generalist.training.tasks.natural import NaturalTask


def test_tensors_go_to_the_table_and_the_rest_stays_json_in_place():
    tree = {
        "learners": [{"name": "a", "model": {"w": torch.ones(2)}}, {"name": "b"}],
        "only_tensors": {"x": torch.zeros(1)},
        "empty": {},
        "rng": {"torch": torch.arange(3), "python": (3, (1, 2), None)},
        "steps": [],
    }
    tensors, rest = flatten(tree)
    assert set(tensors) == {"learners/0/model/w", "only_tensors/x", "rng/torch"}
    assert rest == {
        "learners": [{"name": "a"}, {"name": "b"}],
        "empty": {},
        "rng": {"python": [3, [1, 2], None]},
        "steps": [],
    }
    back = unflatten(tensors, json.loads(json.dumps(rest)))
    assert torch.equal(back["learners"][0]["model"]["w"], torch.ones(2))
    assert back["empty"] == {} and back["steps"] == [] and back["learners"][1] == {"name": "b"}


@pytest.mark.parametrize("path", ["learners/5/model/w", "rng/python/x", "learners/x/w"])
def test_a_tensor_the_json_has_no_room_for_is_named(path):
    tensors, rest = flatten({"learners": [{"name": "a"}], "rng": {"python": [3]}})
    with pytest.raises(CheckpointError, match=f"holds '{path}', which this run has no place"):
        unflatten({**tensors, path: torch.zeros(1)}, rest)


def test_a_learner_takes_back_its_own_state_through_json():
    """Adam's step counters and betas tuple, its moments, the generator: a learner restored
    from its flattened state continues exactly as the original does."""

    def learner() -> Learner:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        constant = PiecewiseLinear.constant
        return Learner(
            "a", model, optimizer, constant(0.01), constant(1.0), NaturalTask(), torch.Generator()
        )

    x, y = torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    original, copy = learner(), learner()
    original.train_step(x, y, 0.5)
    tensors, rest = flatten(original.state_dict())
    from_file = {key: tensor.clone() for key, tensor in tensors.items()}  # as if read from a file
    copy.load_state_dict(unflatten(from_file, json.loads(json.dumps(rest))))
    assert copy.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    for learner_ in (original, copy):
        learner_.train_step(x, y, 0.6)
    for mine, theirs in zip(copy.model.parameters(), original.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
