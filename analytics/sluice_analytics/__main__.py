"""``python -m sluice_analytics``: ``sluice analytics`` without the installed entry point (tests
start the collector this way, from the source tree on ``PYTHONPATH``)."""

from __future__ import annotations

import argparse

from sluice_analytics import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="sluice analytics", description=cli.HELP)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
