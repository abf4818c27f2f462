"""Bytecode only, for the image: the Dockerfile's build stage runs this on the virtualenv's
packages, hack/image/build.sh on the runtime base's standard library, each with the image's
own Python. Every module becomes a sourceless ``.pyc`` where its ``.py`` was; the packages
named by ``--keep-source`` (Sluice's own) keep their source, with their bytecode in
``__pycache__``; those named by ``--no-docstrings`` lose their docstrings (the kubernetes client:
~6 MB of generated API documentation, which nothing reads at run time: its watch helper reads a
method's return type from its annotation first, and every generated method has one).

Why: the image's user cannot write ``__pycache__``, so every imported module needs bytecode made
at build time, and the source beside it (~54 MB in the virtualenv, the kubernetes client alone
~32 MB; ~10 MB of standard library) only serves traceback lines. Sluice's frames keep theirs
(a crash report names the line); another frame shows its file and line number without the
text, which the pinned version's source gives. The bytecode is compiled without column tables
(``-X no_debug_ranges`` is required: tracebacks lose the ``^^^`` marks, the files ~9 % of
their size). Sourceless files are loaded without any check against a source; Sluice's are
``unchecked-hash`` (nothing in the image changes them).

    python -X no_debug_ranges hack/image/bytecode.py TREE [--keep-source PKG ...] [--no-docstrings PKG ...]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import marshal
from pathlib import Path

# PEP 552 flags of a hash-based pyc that is never checked against its source
UNCHECKED_HASH = (1).to_bytes(4, "little")


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The module with the docstrings of itself, its classes and functions left out (``-OO``
    would also drop every assert: not that)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                node.body = node.body[1:] or [ast.copy_location(ast.Pass(), first)]
    return tree


def pyc_bytes(source: bytes, path: Path, *, docstrings: bool = True) -> bytes:
    parsed = ast.parse(source, str(path)) if not docstrings else None
    code = compile(without_docstrings(parsed) if parsed else source, str(path), "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + UNCHECKED_HASH + importlib.util.source_hash(source) + marshal.dumps(code)


def has_column_tables() -> bool:
    """True unless Python runs with -X no_debug_ranges (or PYTHONNODEBUGRANGES)."""
    (_line, _end, column, _end_column), *_ = compile("x", "<probe>", "eval").co_positions()
    return column is not None


def compile_tree(tree: Path, keep_source: set[str], no_docstrings: set[str]) -> tuple[int, int]:
    """Compile every .py under ``tree``; returns (sourceless, with source) counts."""
    sourceless = kept = 0
    for py in sorted(tree.rglob("*.py")):
        top = py.relative_to(tree).parts[0]
        data = pyc_bytes(py.read_bytes(), py, docstrings=top not in no_docstrings)
        if top in keep_source:
            cached = Path(importlib.util.cache_from_source(str(py)))
            cached.parent.mkdir(exist_ok=True)
            cached.write_bytes(data)
            kept += 1
        else:
            py.with_suffix(".pyc").write_bytes(data)
            py.unlink()
            sourceless += 1
    return sourceless, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", type=Path)
    ap.add_argument("--keep-source", nargs="*", default=[], metavar="PKG")
    ap.add_argument("--no-docstrings", nargs="*", default=[], metavar="PKG")
    args = ap.parse_args()
    if has_column_tables():
        raise SystemExit("run with python -X no_debug_ranges (see the docstring)")
    tree: Path = args.tree
    # bytecode pip or a previous run left: stale for a sourceless module, and made by rules
    # other than these
    for stale in tree.rglob("__pycache__"):
        for pyc in stale.glob("*.pyc"):
            pyc.unlink()
        stale.rmdir()
    sourceless, kept = compile_tree(tree, set(args.keep_source), set(args.no_docstrings))
    print(f"bytecode: {sourceless} modules sourceless, {kept} with their source")


if __name__ == "__main__":
    main()
