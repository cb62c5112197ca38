"""The ``ufaas`` command: starts the server with options from flags, UFAAS_* or TOML."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from ufaas import __version__

from .config import Config, ConfigError
from .server import InsecureBind, serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ufaas", description="Run submitted code in warm Docker containers. Every "
        "option can also be set as UFAAS_<NAME> in the environment or in the --config file.")
    parser.add_argument("--version", action="version", version=f"ufaas {__version__}")
    parser.add_argument("--host", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (8000; 0 picks one)")
    parser.add_argument("--db", help="SQLite file holding the records "
                        "(~/.local/share/ufaas/ufaas.db)")
    parser.add_argument("--config", help="TOML file: settings and [[pools]]")
    parser.add_argument("--token", help="bearer token callers must present (UFAAS_TOKEN)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow a non-loopback address without a token")
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    return parser.parse_args(argv)


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = Config.load(args.config, host=args.host, port=args.port, db=args.db,
                             token=args.token, insecure=args.insecure)
        trio.run(lambda: serve(config, shutdown_trigger=_until_signal))
    except (ConfigError, InsecureBind) as exc:
        print(f"ufaas: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
