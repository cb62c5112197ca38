"""The ``ufaas`` command: parses options and starts the server."""

from __future__ import annotations

import argparse
import sys

from ufaas import __version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ufaas", description="Run submitted code in warm Docker containers."
    )
    parser.add_argument("--version", action="version", version=f"ufaas {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (%(default)s)")
    parser.add_argument("--db", help="SQLite file holding the service's state")
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--token", help="bearer token callers must present")
    parser.add_argument("--insecure", action="store_true", help="accept requests without a token")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    print("server not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
