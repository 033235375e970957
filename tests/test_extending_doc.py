"""docs/extending.md's Python blocks run as written: one script, in order, in a fresh folder,
with the ``# file: NAME`` blocks written to their files first (a doc example that no longer
runs is worse than none)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import generalist

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
SOURCE = Path(generalist.__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
FILE = re.compile(r"# file: (\S+)\n")


def test_every_python_block_of_the_extending_doc_runs(tmp_path):
    script = []
    for block in BLOCK.findall(DOC.read_text()):
        named = FILE.match(block)
        if named:
            (tmp_path / named.group(1)).write_text(block[named.end() :])
        else:
            script.append(block)
    assert len(script) >= 4  # model, registered name, foreign weights, reader, merge rule
    (tmp_path / "doc_blocks.py").write_text("\n".join(script))
    done = subprocess.run(
        [sys.executable, "doc_blocks.py"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SOURCE)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_doc_has_the_four_sections():
    headings = re.findall(r"^## (.+)$", DOC.read_text(), re.MULTILINE)
    wanted = {"Add a model", "Add a dataset reader", "Add a task (loss)", "Add a merge rule"}
    assert wanted <= set(headings)
