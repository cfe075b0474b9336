"""Generated Markdown: tables written by scripts into marked blocks of README and docs pages."""

from __future__ import annotations

from pathlib import Path

from .packing import _atomic_write

MEASURED_END = "<!-- measured:end -->"


def write_block(path: str | Path, key: str, text: str, create: bool = True) -> None:
    """Put ``text`` between ``<!-- KEY:start -->`` and ``<!-- KEY:end -->`` in ``path`` (atomically).

    With ``create``, a missing block is added before ``<!-- measured:end -->``; without one of the two
    markers the error names what to add.
    """
    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    content = path.read_text()
    block = f"{start}\n{text}\n{end}"
    if start in content and end in content:
        head, rest = content.split(start, 1)
        content = head + block + rest.split(end, 1)[1]
    elif create and MEASURED_END in content:
        content = content.replace(MEASURED_END, f"{block}\n\n{MEASURED_END}")
    else:
        where = f"a {start} ... {end} block" + (f" or a {MEASURED_END} marker" if create else "")
        raise ValueError(f"{path} has no {where} to fill")
    _atomic_write(path, lambda tmp: Path(tmp).write_text(content))
