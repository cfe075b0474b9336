"""Every ```python block in docs/ runs, each in a fresh namespace (the README's is a synopsis with placeholders).

The blocks run in the test's process, from a temporary directory: a subprocess per file paid about 10 s of
``import torch`` and ``lightning`` for blocks that take a second or two."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_doc_code_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    assert blocks, f"{path.name} has no python blocks"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):  # a failure's traceback names the file and block
        exec(compile(block, f"<{path.name} block {i}>", "exec"), {"__name__": "__doc_block__"})
