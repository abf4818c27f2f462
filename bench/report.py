"""Writing a benchmark's figures into its docs page: the block between its two markers is
replaced, the rest of the page (the prose that reads the figures) is kept."""

from __future__ import annotations

import argparse
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


def scaled_args(doc: str | None, out: Path, what: str, suite_scale: int) -> argparse.Namespace:
    """The flags of a benchmark that the test suite runs scaled down: ``--out`` (its docs page)
    and ``--scale`` (divide ``what`` by it; the suite uses ``suite_scale``)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--out", default=str(out))
    ap.add_argument("--scale", type=int, default=1,
                    help=f"divide {what} by this (the test suite runs it with {suite_scale} to check that "
                         "the benchmark still runs; its figures are then meaningless)")
    return ap.parse_args()
