"""The option haggling phase over socketpair(): the server's real code, no port."""

from __future__ import annotations

from blockxfer.nbd import protocol as p
from blockxfer.nbd.exports import MAX_PAYLOAD
from blockxfer.nbd.server import Server
from tests.nbd.nbdclient import Client


def test_greeting_offers_fixed_newstyle_and_no_zeroes(server: Server) -> None:
    c = Client.attach(server)
    assert c.handshake() == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES


def test_list_names_live_volume_and_snapshots(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    replies = c.option(p.OPT_LIST)
    names = [d[4:4 + int.from_bytes(d[:4], "big")].decode()
             for t, d in replies if t == p.REP_SERVER]
    assert names == ["", "@s1"]
    assert replies[-1][0] == p.REP_ACK


def test_info_then_go_on_the_same_connection(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    replies = c.option(p.OPT_INFO, p.pack_info_request(
        "@s1", [p.INFO_BLOCK_SIZE, p.INFO_NAME, p.INFO_DESCRIPTION]))
    kinds = {int.from_bytes(d[:2], "big"): d for t, d in replies if t == p.REP_INFO}
    assert p.INFO_EXPORT in kinds and kinds[p.INFO_NAME][2:] == b"@s1"
    assert p.INFO_BLOCK_SIZE_BODY.unpack(kinds[p.INFO_BLOCK_SIZE]) == (3, 1, 4096, MAX_PAYLOAD)
    _, size, flags = p.INFO_EXPORT_BODY.unpack(kinds[p.INFO_EXPORT])
    assert size == 8 << 20 and flags & p.FLAG_READ_ONLY
    size, flags = c.go("active")
    assert not flags & p.FLAG_READ_ONLY
    assert flags & p.FLAG_SEND_TRIM and flags & p.FLAG_SEND_WRITE_ZEROES
    assert flags & p.FLAG_SEND_FLUSH and flags & p.FLAG_SEND_FUA


def test_unknown_export_and_option(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    assert c.option(p.OPT_GO, p.pack_info_request("@nope", []))[-1][0] == p.REP_ERR_UNKNOWN
    assert c.option(p.OPT_GO, p.pack_info_request("other", []))[-1][0] == p.REP_ERR_UNKNOWN
    assert c.option(99)[-1][0] == p.REP_ERR_UNSUP
    assert c.option(p.OPT_STARTTLS)[-1][0] == p.REP_ERR_POLICY   # TLS is off (--tls)
    c.go("")                                   # still usable afterwards


def test_options_in_the_wrong_order_or_malformed(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    meta = p.pack_meta_context_request("", [p.META_BASE_ALLOCATION])
    assert c.option(p.OPT_SET_META_CONTEXT, meta)[-1][0] == p.REP_ERR_INVALID
    assert c.option(p.OPT_LIST, b"junk")[-1][0] == p.REP_ERR_INVALID
    assert c.option(p.OPT_GO, b"\x00\x00\x00\x09ab")[-1][0] == p.REP_ERR_INVALID
    assert c.option(p.OPT_STRUCTURED_REPLY, b"x")[-1][0] == p.REP_ERR_INVALID
    assert c.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
    assert c.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ERR_INVALID
    replies = c.option(p.OPT_SET_META_CONTEXT, meta)
    assert replies[0] == (p.REP_META_CONTEXT, b"\x00\x00\x00\x01base:allocation")


def test_list_meta_context_queries(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    for queries in ([], ["base:"], ["base:allocation"]):
        r = c.option(p.OPT_LIST_META_CONTEXT, p.pack_meta_context_request("", queries))
        assert [t for t, _ in r] == [p.REP_META_CONTEXT, p.REP_ACK]
    r = c.option(p.OPT_LIST_META_CONTEXT, p.pack_meta_context_request("", ["qemu:dirty"]))
    assert [t for t, _ in r] == [p.REP_ACK]


def test_abort_acks_and_closes(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    assert c.option(p.OPT_ABORT)[-1][0] == p.REP_ACK
    assert c.closed()


def test_export_name_option_with_and_without_zeroes(server: Server) -> None:
    for cflags, tail in ((p.FLAG_C_FIXED_NEWSTYLE, 124), (p.FLAG_C_FIXED_NEWSTYLE
                                                          | p.FLAG_C_NO_ZEROES, 0)):
        c = Client.attach(server)
        c.handshake(cflags)
        c.sock.sendall(p.pack_option(p.OPT_EXPORT_NAME, b"@s1"))
        size, flags = p.EXPORT_NAME_REPLY.unpack(c.recv(10))
        assert size == 8 << 20 and flags & p.FLAG_READ_ONLY
        assert c.recv(tail) == bytes(tail)
        assert c.read(1 << 20, 8) == b"snapdata"


def test_export_name_unknown_closes(server: Server) -> None:
    c = Client.attach(server)
    c.handshake()
    c.sock.sendall(p.pack_option(p.OPT_EXPORT_NAME, b"nope"))
    assert c.closed()


def test_broken_handshakes_close_the_connection(server: Server) -> None:
    c = Client.attach(server)
    c.handshake(cflags=0x80)                     # unknown client flag
    assert c.closed()
    c = Client.attach(server)
    c.handshake()
    c.sock.sendall(b"NOTMAGIC" + b"\x00\x00\x00\x07\x00\x00\x00\x00")
    assert c.closed()
    c = Client.attach(server)
    c.handshake()
    c.sock.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_GO, 1 << 30))   # absurd option length
    assert c.closed()
    c = Client.attach(server)
    c.handshake(cflags=0)                        # not fixed newstyle: only EXPORT_NAME
    c.sock.sendall(p.pack_option(p.OPT_LIST))
    assert c.closed()
    c = Client.attach(server)                    # vanishes mid-option
    c.handshake()
    c.sock.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_GO, 100) + b"\x00" * 10)
    c.close()
    ok = Client.attach(server)                   # others are still served
    ok.handshake()
    ok.go("")
    assert ok.read(1 << 20, 8) == b"snapdata"
