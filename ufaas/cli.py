"""The ``ufaas`` command: starts the server with options from flags, UFAAS_* or TOML; and
``ufaas run|ls|show|cancel``, thin commands over :class:`ufaas.client.Client`.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import json
import logging
import os
import posixpath
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO

import trio

from ufaas import __version__

from .client import Client, ClientError, SyncClient

COMMANDS = ("run", "ls", "show", "cancel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ufaas", description="Run submitted code in warm Docker containers. Every "
        "option can also be set as UFAAS_<NAME> in the environment or in the --config file.",
        epilog="Client commands, for a running server: ufaas run IMAGE [-f FILE] [-e K=V] "
        "-- COMMAND..., ufaas ls, ufaas show ID, ufaas cancel ID (see ufaas run --help). "
        "ufaas node serves this machine's engine to a front (see ufaas node --help).")
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


def node_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ufaas node", description="Serve this machine's Docker engine as warm pools to "
        "ufaas fronts (their [cluster] section names it), over an authenticated WebSocket. "
        "Settings as the server's: --config, UFAAS_<NAME>, UFAAS_CLUSTER_<NAME>.")
    parser.add_argument("--config", help="TOML file: [cluster] and the pools' settings")
    parser.add_argument("--host", help="address to listen on (cluster.listen, 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (cluster.node_port, "
                        "8001; 0 picks one)")
    parser.add_argument("--name", help="this node's name (cluster.name; the engine's name)")
    parser.add_argument("--token-file", help="file holding the cluster's token "
                        "(cluster.token_file; a Docker secret)")
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    return parser.parse_args(argv)


def node_main(argv: list[str]) -> int:
    """``ufaas node``: serve until SIGTERM or SIGINT."""
    from .config import Config, ConfigError
    from .node import NodeError, NodeServer

    args = node_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = {"listen": args.host, "node_port": args.port, "name": args.name,
             "token_file": args.token_file}

    async def serve(node: NodeServer) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve)
            await _until_signal()
            nursery.cancel_scope.cancel()

    try:
        config = Config.load(args.config, cluster={k: v for k, v in given.items()
                                                   if v is not None})
        trio.run(serve, NodeServer(config))
    except (ConfigError, NodeError) as exc:
        print(f"ufaas node: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return client_main(argv)
    if argv and argv[0] == "node":
        return node_main(argv[1:])
    # Imported here: the client commands should start fast.
    from .config import Config, ConfigError
    from .server import InsecureBind, serve

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


# -- client commands ------------------------------------------------------------------------

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_NOT_RUN = 125  # as docker run: ufaas could not run the function
EXIT_CANCELLED = 130
READ_CHUNK = 65536


def client_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the server (UFAAS_URL, else http://127.0.0.1:8000); "
                        "its token is read from UFAAS_TOKEN")
    parser = argparse.ArgumentParser(prog="ufaas", description="Client commands for a "
                                     "running ufaas server.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", parents=[common], help="run a function, streaming its output",
        usage="ufaas run IMAGE [-f FILE ...] [-e K=V ...] [--timeout S] [--after ID] "
        "-- COMMAND...",
        description="Run COMMAND in IMAGE on the server: its stdout and stderr stream to "
        "ours as it runs, our stdin is forwarded (as UTF-8 text) when it is not a terminal, "
        "and we exit with its exit code (128+N for signal N, 124 on timeout, 130 when "
        "cancelled, 125 when it could not run).")
    run.add_argument("image")
    run.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                     help="a local file to put in the working directory (a relative path "
                     "keeps its directories, any other its name); repeatable")
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                     help="an environment variable; repeatable")
    run.add_argument("--timeout", type=float, help="seconds before the function is killed")
    run.add_argument("--after", metavar="ID", help="run in the container and working "
                     "directory of function ID")
    run.add_argument("--network", action="store_true", help="give the function a network")
    run.add_argument("-o", "--output", action="append", default=[], metavar="PATH",
                     help="once it ends, copy PATH (relative to its working directory; a "
                     "glob such as 'out/*.csv' too) here, to the same relative path "
                     "(repeatable)")
    run.add_argument("argv", nargs="*", metavar="COMMAND", help=argparse.SUPPRESS)
    ls = sub.add_parser("ls", parents=[common], help="list functions")
    ls.add_argument("--status", help="all, or one status (default: the active ones)")
    ls.add_argument("--limit", type=int, help="at most this many (100)")
    show = sub.add_parser("show", parents=[common], help="print a function's record")
    show.add_argument("id")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a function")
    cancel.add_argument("id")
    return parser


def client_main(argv: list[str]) -> int:
    # Everything after the first "--" is the command, as given (argparse would drop a
    # second "--").
    command: list[str] = []
    if argv[0] == "run" and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = client_parser().parse_args(argv)
    try:
        if args.command == "run":
            args.argv = args.argv + command
            if not args.argv:
                print("ufaas run: give the command after --", file=sys.stderr)
                return 2
            return trio.run(run_command, args, _spec(args))
        with SyncClient(args.url) as client:
            if args.command == "ls":
                _print_table(client.list(args.status, args.limit))
            elif args.command == "show":
                print(json.dumps(client.get(args.id), indent=2))
            else:
                print(client.cancel(args.id)["status"])
    except (ClientError, ValueError, OSError) as exc:
        print(f"ufaas {args.command}: {exc}", file=sys.stderr)
        return EXIT_NOT_RUN if args.command == "run" else 1
    return 0


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"image": args.image, "command": args.argv}
    if args.file:
        spec["resources"] = [_resource(path) for path in args.file]
    if args.env:
        env = {}
        for item in args.env:
            name, eq, value = item.partition("=")
            if not eq or not name:
                raise ValueError(f"-e {item!r}: give NAME=VALUE")
            env[name] = value
        spec["env"] = env
    if args.timeout is not None:
        spec["timeout"] = args.timeout
    if args.network:
        spec["network"] = True
    if args.output:
        spec["outputs"] = args.output
    return spec


def _resource(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    name = path if (not os.path.isabs(path) and posixpath.normpath(path) == path
                    and ".." not in path.split("/")) else os.path.basename(path)
    resource: dict[str, Any] = {"path": name,
                                "mode": "0755" if os.access(path, os.X_OK) else "0644"}
    try:
        resource["text"] = data.decode("utf-8")
    except UnicodeDecodeError:
        resource["base64"] = base64.b64encode(data).decode()
    return resource


def _print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'ID':36}  {'STATUS':9}  {'CREATED':24}  {'IMAGE':24}  COMMAND")
    for r in records:
        command = r["spec"].get("command")
        shown = command if isinstance(command, str) else " ".join(command or [])
        print(f"{r['id']:36}  {r['status']:9}  {r['created_at'] or '':24}  "
              f"{r['spec'].get('image') or '':24}  {shown[:60]}")


async def run_command(args: argparse.Namespace, spec: dict[str, Any]) -> int:
    """``ufaas run``: the function's exit code. The first Ctrl-C cancels the function."""
    created: list[str] = []
    stdin = None if sys.stdin is None or sys.stdin.isatty() else _read_stdin()
    end: dict[str, Any] | None = None
    failure: ClientError | None = None
    async with Client(args.url) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_interrupt, client, created, nursery.cancel_scope)
            try:
                end = await client.run(spec, after=args.after, stdin=stdin,
                                       created=created.append,
                                       stdout=_writer(sys.stdout.buffer),
                                       stderr=_writer(sys.stderr.buffer))
            except ClientError as exc:  # raised outside the nursery, not in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if end is not None and end.get("files"):  # -o: the output files, here
            await client.save_files(end["id"], ".", end["files"])
    if failure is not None:
        raise failure
    if end is None:  # interrupted before the server had it, or twice
        return EXIT_CANCELLED
    if end.get("files_truncated") or any(f["truncated"] for f in end.get("files") or ()):
        print(f"ufaas run: some output files were cut or left out (see ufaas show "
              f"{end['id']})", file=sys.stderr)
    status = end["status"]
    if status in ("succeeded", "failed"):
        if end.get("signal"):
            return 128 + int(end["signal"])
        if end.get("exit_code") is not None:
            return int(end["exit_code"])
    message = f"ufaas run: function {end['id']} {status}"
    print(message + (f": {end['error']}" if end.get("error") else ""), file=sys.stderr)
    return {"timeout": EXIT_TIMEOUT, "cancelled": EXIT_CANCELLED}.get(status, EXIT_NOT_RUN)


async def _read_stdin() -> AsyncIterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = sys.stdin.fileno()
    while data := await trio.to_thread.run_sync(os.read, fd, READ_CHUNK,
                                                 abandon_on_cancel=True):
        yield decoder.decode(data)
    yield decoder.decode(b"", final=True)


def _writer(stream: BinaryIO) -> Callable[[str], Awaitable[None]]:
    def write(text: str) -> None:
        stream.write(text.encode())
        stream.flush()

    async def write_in_thread(text: str) -> None:
        # A slow terminal or pipe must not stall the event loop.
        await trio.to_thread.run_sync(write, text)
    return write_in_thread


async def _cancel_on_interrupt(client: Client, created: list[str],
                               scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        asked = False
        async for _ in interrupts:
            if not created or asked:
                scope.cancel()  # not created yet, or a second Ctrl-C: leave now
                return
            asked = True
            print(f"ufaas run: cancelling {created[0]}", file=sys.stderr)
            try:
                await client.cancel(created[0])
            except ClientError as exc:
                print(f"ufaas run: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
