"""`blockxfer stdio-serve` and `blockxfer tls-serve`: the far end of ssh:// and tls://.

Standard output is the wire protocol here, so these commands take no --json or -q.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blockxfer.errors import UsageError
from blockxfer.service.endpoint import MAX_KEEP, OPERATIONS, Policy, preload, serve_session
from blockxfer.units import parse_duration

from .common import syslog_arg
from .spec import Arg, Command, Report, arg

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("blockxfer.endpoint")
DRAIN_SECONDS = 5.0


def _allow(text: str) -> frozenset[str]:
    ops = frozenset(t.strip() for t in text.split(",") if t.strip())
    bad = ops - set(OPERATIONS)
    if bad:
        raise argparse.ArgumentTypeError(f"unknown operation {', '.join(sorted(bad))}; "
                                         "use any of send, receive, replicate (comma-separated)")
    return ops


def _policy(a: argparse.Namespace) -> Policy:
    return Policy(frozenset(a.volume) if a.volume else None, a.allow)


def _alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError


@contextlib.contextmanager
def _stdio_idle(seconds: float) -> Iterator[None]:
    """TimeoutError in the read of the next request once `seconds` pass (stdio-serve
    reads on its main thread, where the signal is handled)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _socket_idle(sock: socket.socket, seconds: float) -> Iterator[None]:
    """TimeoutError in the read of the next request once `seconds` pass (tls-serve: a
    socket timeout, per connection thread)."""
    sock.settimeout(seconds)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


def cmd_stdio_serve(a: argparse.Namespace) -> Report:
    from blockxfer.transport.wire import widen_pipe
    widen_pipe(sys.stdin.fileno())
    widen_pipe(sys.stdout.fileno())
    preload()
    err = serve_session(sys.stdin.buffer, sys.stdout.buffer, _policy(a), "ssh peer",
                        max_keep=a.idle_timeout, idle=_stdio_idle)
    return Report({}, code=err.exit_code if err else 0)


def _peers(items: list[str]) -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for item in items:
        name, sep, volume = item.partition("=")
        if not sep or not name or not volume:
            raise UsageError(f"--peer {item!r}: give NAME=VOLUME (the client certificate's "
                             "common name and a volume it may use)")
        out.setdefault(name, set()).add(volume)
    return {k: frozenset(v) for k, v in out.items()}


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen {text!r}: give HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_tls_serve(a: argparse.Namespace) -> Report:
    import ssl

    from blockxfer.transport.tls import peer_name, server_context
    ctx = server_context(a.tls_dir)
    peers = _peers(a.peer or [])
    host, port = _listen_address(a.listen)
    srv = socket.create_server((host, port), reuse_port=False)
    log.info("listening on %s:%d", host, srv.getsockname()[1])
    preload()                     # the first request need not wait for the imports

    def handle(conn: socket.socket, addr: Any) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                name = peer_name(tls) or "?"
                who = f"{name}@{addr[0]}"
                policy = _policy(a)
                if peers:
                    policy = Policy(peers.get(name, frozenset()), a.allow,
                                    denied=None if name in peers else
                                    f"certificate {name!r} has no --peer entry here")
                r, w = tls.makefile("rb"), tls.makefile("wb")
                if serve_session(r, w, policy, who, max_keep=a.idle_timeout,
                                 idle=lambda seconds: _socket_idle(tls, seconds)) is not None:
                    _drain(tls)
        except (ssl.SSLError, OSError) as e:
            log.warning("%s: connection failed: %s", addr[0], getattr(e, "reason", None) or e)

    while True:
        conn, addr = srv.accept()
        threading.Thread(target=handle, args=(conn, addr), daemon=True).start()


def _drain(sock: ssl.SSLSocket) -> None:
    """After an error reply, read what the peer still sends for a while so it reads
    our answer rather than a reset."""
    sock.settimeout(DRAIN_SECONDS)
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


def _common() -> tuple[Arg, ...]:
    return (syslog_arg(),
            arg("--volume", action="append", metavar="VOLUME",
                help="the only volume a peer may name (repeatable; default: any)"),
            arg("--allow", type=_allow, default=frozenset(OPERATIONS), metavar="OPS",
                help="operations allowed, comma-separated: send, receive, replicate "
                      "(default all)"),
            arg("--idle-timeout", type=_idle_timeout, default=MAX_KEEP, metavar="DURATION",
                help="the longest a peer may keep the connection open between requests "
                     f"(a scheduled pull's session; default {MAX_KEEP:g}s, 0: one request "
                     "per connection)"))


def _idle_timeout(text: str) -> float:
    """0 (one request per connection) or a duration (units.parse_duration)."""
    if text.strip() == "0":
        return 0.0
    try:
        return parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


COMMANDS = (
    Command("stdio-serve", "answer ssh:// stream requests on standard input and output",
            "The far end of ssh:// URLs: answers a send, receive or replicate request on "
            "standard input and output (and the next ones of a session a scheduled pull "
            "keeps open, up to --idle-timeout apart). Put it in authorized_keys as a "
            "forced command to pin one volume.",
            ('command="blockxfer stdio-serve --volume /srv/vol.img --allow send",restrict '
             'ssh-ed25519 AAAA...   # in ~/.ssh/authorized_keys',
             'command="blockxfer stdio-serve --volume /srv/vol.img --allow replicate",restrict '
             'ssh-ed25519 AAAA...   # a replication destination\'s key'),
            cmd_stdio_serve, _common(), common=False),
    Command("tls-serve", "answer tls:// stream requests from peers with certificates",
            "The far end of tls:// URLs. Mutual TLS: clients need a certificate signed by "
            "ca-cert.pem in --tls-dir.",
            ("blockxfer tls-serve --listen 0.0.0.0:10811 --tls-dir /etc/blockxfer/tls "
             "--peer backup1=/srv/vol.img --allow send",),
            cmd_tls_serve,
            (arg("--listen", required=True, metavar="HOST:PORT", help="address to listen on"),
             arg("--tls-dir", metavar="DIR",
                 help="ca-cert.pem, server-cert.pem, server-key.pem (default "
                      "$BLOCKXFER_TLS_DIR or /etc/blockxfer/tls)"),
             *_common(),
             arg("--peer", action="append", metavar="NAME=VOLUME",
                 help="a certificate common name and a volume it may use (repeatable); "
                      "with any --peer, other certificates are refused")),
            common=False, log_level="info"),
)
