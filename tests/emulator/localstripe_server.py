"""Run the ``localstripe`` Stripe emulator on 127.0.0.1 only, with persistence off.

    python -m tests.emulator.localstripe_server --port N      (N=0: any free port)
    python tests/emulator/localstripe_server.py --port N

localstripe's own CLI (``python -m localstripe``) binds ``::`` (every interface) and
pickles its whole store to ``/tmp/localstripe.pickle`` after every write (from
``Store.__setitem__``/``__delitem__`` and a ``save_store_middleware`` on PUT/POST/DELETE),
and reloads it at start unless ``--from-scratch``. Here we import its aiohttp ``app``
instead, replace ``Store.dump_to_disk``/``try_load_from_disk`` with no-ops, and serve
the app with aiohttp's ``AppRunner`` on a socket bound to ``127.0.0.1``.

Webhook targets registered through ``POST /_config/webhooks/<id>`` must be loopback
URLs (anything else gets a 400), so the emulator never sends traffic elsewhere.

Once listening it prints one line to stdout and flushes it:

    LOCALSTRIPE_READY http://127.0.0.1:<port>

It stops on SIGTERM/SIGINT, and by itself if its parent process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
from urllib.parse import urlsplit

READY_PREFIX = "LOCALSTRIPE_READY"
_PARENT_AT_START = os.getppid()  # read before the slow imports, for the orphan check


def _disable_persistence() -> None:
    from localstripe import resources

    def _no_dump(self) -> None:  # noqa: ANN001 - replaces Store.dump_to_disk
        return None

    def _no_load(self) -> None:  # noqa: ANN001 - replaces Store.try_load_from_disk
        return None

    resources.Store.dump_to_disk = _no_dump
    resources.Store.try_load_from_disk = _no_load
    # The instance has no own attribute, but make sure nothing shadows the class one.
    resources.store.__dict__.pop("dump_to_disk", None)
    resources.store.__dict__.pop("try_load_from_disk", None)


def _is_loopback_url(url: str) -> bool:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _restrict_webhooks_to_loopback() -> None:
    from localstripe import server
    from localstripe.errors import UserError

    original = server.register_webhook

    def register_loopback_only(id, url, secret, events):  # noqa: ANN001, A002
        if not _is_loopback_url(url):
            raise UserError(400, "localstripe_server: webhook URL must be on 127.0.0.1/localhost")
        return original(id, url, secret, events)

    server.register_webhook = register_loopback_only


def build_app():
    """localstripe's aiohttp application, with persistence off and loopback-only webhooks."""
    _disable_persistence()
    _restrict_webhooks_to_loopback()
    from localstripe.server import app

    return app


async def serve(port: int, access_log: bool, parent_pid: int | None = None) -> None:
    from aiohttp import web

    app = build_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    actual_port = sock.getsockname()[1]

    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access") if access_log else None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    print(f"{READY_PREFIX} http://127.0.0.1:{actual_port}", flush=True)

    parent = parent_pid or _PARENT_AT_START
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                if os.getppid() != parent:  # orphaned: the test run is gone
                    break
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when no longer a child of this pid (default: the parent at start)"
    )
    args = parser.parse_args(argv)

    if not args.quiet:
        logger = logging.getLogger("aiohttp.access")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(logging.StreamHandler(sys.stderr))
    asyncio.run(serve(args.port, access_log=not args.quiet, parent_pid=args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
