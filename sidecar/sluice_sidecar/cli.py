"""``sluice sidecar``: run the sidecar until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from sluice_sidecar.settings import add_arguments as _add_settings
from sluice_sidecar.settings import from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_settings(parser)


def setup_event_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings_args: argparse.Namespace) -> int:
    from sluice_sidecar.server import Sidecar

    settings = from_args(settings_args)
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.stop()  # release the ports and connections already opened
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.drain()
    return 0


def run(args: argparse.Namespace) -> int:
    """Start-up errors are one line on stderr, ``sluice sidecar: <what>: <reason>``, and a
    non-zero exit: 2 for a refused flag value or flags that contradict each other, 1 for what
    cannot be started."""
    from sluice_sidecar.server import StartupError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_event_loop()
    try:
        return asyncio.run(serve(args))
    except StartupError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return 2
