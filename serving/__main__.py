"""``python -m serving --model-dir exported/NAME --host 127.0.0.1 --port 8000``.

Every option is a flag and an ``EED_*`` environment variable (see
serving/settings.py; ``python -m serving --help`` lists them). The manifest and its
checksums are verified before the server binds, so a wrong folder fails at once
with exit status 2, as do invalid settings and a host or port it cannot listen on;
a failure while loading graphs makes the server exit with 1.
SIGTERM drains first (``EED_DRAIN_SECONDS``, serving/drain.py), then exits with 0.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import replace
from typing import Any

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .drain import SHUTDOWN_TIMEOUT_S, DrainingServer
from .errors import ServingError
from .fastpath import server_protocol
from .manifest import Manifest, ManifestError, load_manifest
from .policy import CostTable, plan_request
from .requestlog import configure_logging
from .settings import ServerSettings


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Settings from CLI flags over ``EED_*`` environment variables over defaults."""
    return ServerSettings(
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="python -m serving",
        _cli_kebab_case=True,
        _cli_implicit_flags=True,
        _cli_exit_on_error=True,
    )


def cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (a name that does not resolve, an address
    not on this machine, a port in use), or None. Bound as uvicorn's ``loop.create_server`` binds
    (every address the name resolves to, IPv6 ones IPv6-only) and released at once."""
    try:
        # '' is every interface, as asyncio reads it (getaddrinfo itself refuses '').
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the host does not resolve ({exc.strerror})"
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 turned off): skipped, as asyncio does
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for sock in sockets:
            sock.close()
    return None if sockets else "no address of it can be used on this machine"


def default_policy_problem(settings: ServerSettings, manifest: Manifest) -> str | None:
    """Why the default policy cannot run on this model by its costs alone (an exit it lacks, a policy
    it has not calibrated, a budget below its cheapest exit), or None. Whether a deadline fits needs
    the graphs' measured times: that is checked once they are loaded (exit status 1)."""
    params = replace(settings.default_policy_params, budget_ms=None)
    if params.is_empty():
        return None
    try:
        plan_request(params, CostTable.from_manifest(manifest))
    except ServingError as exc:
        return f"default_policy {settings.default_policy!r} does not fit {manifest.name}: {exc.detail}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; returns the process exit status."""
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        manifest = load_manifest(settings.model_dir, verify=True)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = default_policy_problem(settings, manifest)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = cannot_listen(settings.host, settings.port)
    if problem is not None:  # before the model loads: uvicorn's own message names neither setting
        print(
            f"error: cannot listen on {settings.host}:{settings.port}: {problem}; check --host/EED_HOST and "
            "--port/EED_PORT",
            file=sys.stderr,
        )
        return 2

    app = create_app(settings)
    # JSON logs: uvicorn's loggers go through the root handler instead of its own text config.
    log_config: dict[str, Any] = {"log_config": None} if settings.log_format == "json" else {}
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # per-request logs cost more than small models' inference
        # One socket write per response and a batch's answers together (serving/transport.py), one
        # timer per connection for its timeouts (serving/keepalive.py); the common POST /classify
        # answered by the protocol itself, past ASGI (serving/fastpath.py).
        http=server_protocol(app.state.eed),
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        **log_config,
    )
    state = app.state.eed

    def mark_draining() -> None:  # in the signal handler: only a flag
        state.draining = True

    server = DrainingServer(config, settings.drain_seconds, mark_draining, on_drain=lambda: state.metrics.ready.set(0))
    failure: list[str] = []

    def stop_on_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    state.on_load_failure = stop_on_failure
    server.run()
    if failure:
        print(f"error: cannot serve {settings.model_dir}: {failure[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
