"""`blockxfer stdio-serve` and `blockxfer tls-serve`: the far end of ssh:// and tls://."""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys
import threading
from typing import Any

from blockxfer.errors import UsageError
from blockxfer.service.endpoint import OPERATIONS, Policy, serve_request

log = logging.getLogger("blockxfer.endpoint")
DRAIN_SECONDS = 5.0


def _allow(text: str) -> frozenset[str]:
    ops = frozenset(t.strip() for t in text.split(",") if t.strip())
    bad = ops - set(OPERATIONS)
    if bad:
        raise argparse.ArgumentTypeError(f"unknown operation {', '.join(sorted(bad))}; "
                                         "use send, receive or send,receive")
    return ops


def _policy(a: argparse.Namespace) -> Policy:
    return Policy(frozenset(a.volume) if a.volume else None, a.allow)


def cmd_stdio_serve(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="blockxfer stdio-serve: %(message)s")
    err = serve_request(sys.stdin.buffer, sys.stdout.buffer, _policy(a), "ssh peer")
    return err.exit_code if err else 0


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


def cmd_tls_serve(a: argparse.Namespace) -> int:
    from blockxfer.transport.tls import peer_name, server_context
    logging.basicConfig(level=logging.INFO, format="blockxfer tls-serve: %(message)s")
    ctx = server_context(a.tls_dir)
    peers = _peers(a.peer or [])
    host, port = _listen_address(a.listen)
    srv = socket.create_server((host, port), reuse_port=False)
    log.info("listening on %s:%d", host, srv.getsockname()[1])

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
                if serve_request(r, w, policy, who) is not None:
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


def _add_common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--volume", action="append", metavar="PATH",
                    help="the only volume a peer may name (repeatable; default: any)")
    sp.add_argument("--allow", type=_allow, default=frozenset(OPERATIONS), metavar="OPS",
                    help="operations allowed: send, receive or send,receive (default both)")


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "stdio-serve", help="answer one ssh:// stream request on standard input and output",
        description="The far end of ssh:// URLs. Put it in authorized_keys as a forced "
        "command to pin one volume: command=\"blockxfer stdio-serve --volume /srv/vol.img "
        "--allow send\",restrict ssh-ed25519 AAAA...")
    _add_common(sp)
    sp.set_defaults(func=cmd_stdio_serve)

    sp = sub.add_parser(
        "tls-serve", help="answer tls:// stream requests from peers with certificates",
        description="Mutual TLS: clients need a certificate signed by ca-cert.pem in "
        "--tls-dir. Example: blockxfer tls-serve --listen 0.0.0.0:10811 --tls-dir /etc/"
        "blockxfer/tls --peer backup1=/srv/vol.img --allow send")
    sp.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on")
    sp.add_argument("--tls-dir", metavar="DIR",
                    help="ca-cert.pem, server-cert.pem, server-key.pem (default "
                    "$BLOCKXFER_TLS_DIR or /etc/blockxfer/tls)")
    _add_common(sp)
    sp.add_argument("--peer", action="append", metavar="NAME=PATH",
                    help="a certificate common name and a volume it may use (repeatable); "
                    "with any --peer, other certificates are refused")
    sp.set_defaults(func=cmd_tls_serve)
