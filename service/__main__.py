"""`python -m service [--flags]`: serve a model repository with uvicorn.

Flags override `HYDRA_*` environment variables (see `service.settings.Settings`). SIGTERM/SIGINT:
uvicorn and the gRPC server stop accepting, finish in-flight requests and calls, the lifespan
drains the batchers, exit 0.
A start with no loadable model exits non-zero with the reason.
`--workers N` (N > 1, or 0 = one per core): this process supervises N such servers on the same
ports (`service.workers`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, SettingsError

from service.errors import describe_validation_errors
from service.http_protocol import CoalescingHttpToolsProtocol
from service.settings import Settings
from service.workers import Supervisor, worker_count


def cli_source() -> CliSettingsSource[Settings]:
    """The command line: one `--some-flag` per `Settings` field, written by pydantic-settings' CLI
    source from the fields (types, choices, descriptions, defaults), and `--pin` for
    `--model-versions`. Its argparse parser is `.root_parser`."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=__doc__.splitlines()[0],
        epilog="Each --some-flag can also be set as HYDRA_SOME_FLAG in the environment; flags win. "
        "Pinned versions: HYDRA_MODEL_VERSIONS='{\"digits\": 1}' or --pin digits=1 (repeatable).",
    )
    return CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_kebab_case=True,  # --max-batch-size
        cli_implicit_flags=False,  # booleans take a value: --run-when-idle false
        cli_avoid_json=True,  # dicts as NAME=VERSION pairs
        cli_hide_none_type=True,
        cli_shortcuts={"model-versions": "pin"},
    )


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Settings from `HYDRA_*` variables with `argv` (default: the process's arguments) on top; a
    bad value exits with the reason (argparse's own errors exit 2 before this)."""
    try:
        return Settings(_cli_settings_source=cli_source()(args=sys.argv[1:] if argv is None else argv))
    except ValidationError as exc:
        raise SystemExit(f"invalid settings: {describe_validation_errors(exc.errors())}") from exc
    except SettingsError as exc:  # e.g. --pin without "=VERSION"
        raise SystemExit(f"invalid settings: {exc}") from exc


# How long, after the listening sockets close on SIGTERM, keep-alive connections may still deliver
# a request before uvicorn's shutdown closes every connection it sees idle.
SHUTDOWN_READ_GRACE_S = 0.05


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown closes at once every keep-alive connection with no request in
    progress; a request whose bytes are already in that socket's buffer (a client that sent just as
    the signal came) is then answered with a TCP reset. Stop accepting first, read for a moment,
    then shut down as uvicorn does: those requests are answered, and no new connection gets in."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # gRPC stops taking calls now too, and drains in parallel with HTTP (the lifespan awaits it)
        state = getattr(self.config.app, "state", None)
        worker_group = getattr(state, "worker_group", None)
        if worker_group is not None:  # the server stops being ready now, as this worker drains
            worker_group.mark_unready()
        grpc_server = getattr(state, "grpc_server", None)
        if grpc_server is not None:
            grpc_server.begin_stop()
        for server in self.servers:
            server.close()
        await asyncio.sleep(SHUTDOWN_READ_GRACE_S)
        await super().shutdown(sockets)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal it handled once it has shut down gracefully; landing here means a
    # clean drain, which is exit status 0 (and SIGTERM before uvicorn starts means nothing to drain).
    sys.exit(0)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")


def serve(app: Any, settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Run `app` until SIGTERM/SIGINT has drained it: exit status 0, or 3 when its start-up failed.
    `sockets`: listen on these (a worker's SO_REUSEPORT socket) instead of binding host:port."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        backlog=settings.listen_backlog,
        access_log=False,
        http=CoalescingHttpToolsProtocol,  # each response's head and body in one write
    )
    server = DrainingServer(config)
    server.run(sockets=sockets)
    # not started: lifespan start-up failed (e.g. no loadable model); uvicorn has logged the reason
    return 0 if server.started else 3


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_args(argv)
    configure_logging(settings)
    count = worker_count(settings)
    if count > 1:
        sys.exit(Supervisor(settings, count).run())
    from service.app import create_app  # here: a supervisor never imports the server it starts

    status = serve(create_app(settings), settings)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
