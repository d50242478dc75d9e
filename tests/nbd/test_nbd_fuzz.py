"""Hypothesis fuzz of the option and request parsers, and of a live server."""

from __future__ import annotations

import contextlib
import struct
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from blockxfer.nbd import protocol as p
from blockxfer.nbd.server import Server
from tests.nbd.fakes import FakeVolume
from tests.nbd.nbdclient import Client


@given(st.binary(min_size=28, max_size=28))
def test_request_parser_only_raises_protocol_error(raw: bytes) -> None:
    try:
        req = p.parse_request(raw)
    except p.ProtocolError:
        return
    assert p.pack_request(req) == raw


@given(st.binary(max_size=300))
def test_option_payload_parsers(raw: bytes) -> None:
    for parse in (p.parse_info_request, p.parse_meta_context_request):
        with contextlib.suppress(p.ProtocolError):
            parse(raw)


@given(st.text(max_size=40), st.lists(st.integers(0, 0xFFFF), max_size=8))
def test_info_request_round_trip(name: str, infos: list[int]) -> None:
    name = name.replace("\0", "")
    assert p.parse_info_request(p.pack_info_request(name, infos)) == (name, infos)


_requests = st.builds(
    lambda flags, typ, off, n: struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, typ, 1, off,
                                           n % 70000),
    st.integers(0, 0xFFFF), st.integers(0, 10), st.sampled_from([0, 4096, (1 << 20) - 1,
                                                                 1 << 20, 2**64 - 1]),
    st.integers(0, 2**32 - 1))


def _wait_idle(server: Server) -> None:
    """Until the server has finished every connection (bounded: 10 s)."""
    deadline = time.monotonic() + 10
    while server.stats()["clients"] and time.monotonic() < deadline:
        time.sleep(0.005)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(_requests, st.binary(max_size=40)), max_size=6),
       st.booleans())
def test_live_server_survives_garbage(chunks: list[bytes], structured: bool) -> None:
    vol = FakeVolume(1 << 20)
    server = Server(vol)
    try:
        bad = Client.attach(server)
        bad.handshake()
        bad.go("", structured=structured)
        bad.sock.sendall(b"".join(chunks))
        bad.close()
        _wait_idle(server)   # the garbage may hold a valid TRIM or WRITE still running
        good = Client.attach(server)
        good.handshake()
        good.go("")
        assert good.request(p.CMD_WRITE, 0, 4, payload=b"okay") == 0
        assert good.read(0, 4) == b"okay"
    finally:
        server.shutdown(timeout=10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=64)), max_size=6))
def test_live_server_survives_option_garbage(options: list[tuple[int, bytes]]) -> None:
    server = Server(FakeVolume(1 << 20))
    try:
        bad = Client.attach(server)
        bad.handshake()
        bad.sock.sendall(b"".join(p.pack_option(o, d) for o, d in options))
        bad.close()
        good = Client.attach(server)
        good.handshake()
        good.go("")
        assert good.read(0, 4) == bytes(4)
    finally:
        server.shutdown(timeout=10)
