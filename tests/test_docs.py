"""Every ```python block in docs/ and README.md runs (in a subprocess per file, fresh namespace per block)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
RUNNER = """
import json, sys
for i, block in enumerate(json.loads(sys.stdin.read())):
    try:
        exec(compile(block, f"<block {i}>", "exec"), {"__name__": "__doc_block__"})
    except Exception as err:
        raise SystemExit(f"block {i} failed: {err!r}\\n{block}")
"""


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_doc_code_blocks_run(path, tmp_path):
    blocks = python_blocks(path)
    assert blocks, f"{path.name} has no python blocks"
    out = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
