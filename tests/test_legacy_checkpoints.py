"""Checkpoints written by an earlier version keep resuming, to the same bits.

``tests/fixtures/legacy_checkpoints/`` holds mid-run checkpoints (epoch 2, batch 5 of a 3-epoch
tiny run) written by the version ``expected.json`` names, with the SHA-256 of the final weights
that version's uninterrupted run wrote (``tests/fixtures/make_legacy_checkpoints.py``). A change
to how the training state is saved or restored must still read them and end on those weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from generalist.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_checkpoints"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["model_sha256"]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_a_checkpoint_of_the_previous_version_resumes_to_the_same_weights(tmp_path, case, capsys):
    run = shutil.copytree(FIXTURES / case, tmp_path / case)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert "set aside" not in said.out + said.err
    assert "resuming at epoch 2, batch 5/8 (step 13)" in said.out + said.err
    final = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert final == EXPECTED[case]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
