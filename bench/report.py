"""Writing a benchmark's figures into its docs page: the block between its two markers is
replaced, the rest of the page (the prose that reads the figures) is kept."""

from __future__ import annotations

from pathlib import Path


def write_block(out: Path, begin: str, end: str, block: str) -> None:
    """Replace ``begin``…``end`` in ``out`` with ``block`` (which carries both markers); a page
    without the markers gets the block appended, a missing page is created with it."""
    text = out.read_text() if out.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    out.write_text(text)
    print(f"\nwritten to {out}")
