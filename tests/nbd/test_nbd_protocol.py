"""Every NBD message we send or parse, byte for byte against the spec's layouts."""

from __future__ import annotations

import pytest

from blockxfer.nbd import protocol as p


def test_magics_spell_the_spec() -> None:
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert p.REPLY_MAGIC == 0x3E889045565A9
    assert (p.REQUEST_MAGIC, p.SIMPLE_REPLY_MAGIC, p.STRUCTURED_REPLY_MAGIC) == (
        0x25609513, 0x67446698, 0x668E33EF)


def test_constant_values() -> None:
    assert [p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS, p.OPT_INFO, p.OPT_GO,
            p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT] == [
        1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert [p.REP_ACK, p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT] == [1, 2, 3, 4]
    assert p.REP_ERR_UNSUP == 0x80000001 and p.REP_ERR_INVALID == 0x80000003
    assert p.REP_ERR_UNKNOWN == 0x80000006 and p.REP_ERR_TOO_BIG == 0x80000009
    assert list(range(8)) == [p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH, p.CMD_TRIM,
                              p.CMD_CACHE, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS]
    assert (p.CMD_FLAG_FUA, p.CMD_FLAG_NO_HOLE, p.CMD_FLAG_DF, p.CMD_FLAG_REQ_ONE,
            p.CMD_FLAG_FAST_ZERO) == (1, 2, 4, 8, 16)
    assert (p.FLAG_HAS_FLAGS, p.FLAG_READ_ONLY, p.FLAG_SEND_FLUSH, p.FLAG_SEND_FUA,
            p.FLAG_SEND_TRIM, p.FLAG_SEND_WRITE_ZEROES, p.FLAG_SEND_DF,
            p.FLAG_CAN_MULTI_CONN) == (1, 2, 4, 8, 32, 64, 128, 256)
    assert (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE, p.REPLY_TYPE_BLOCK_STATUS,
            p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET) == (1, 2, 5, 32769, 32770)
    assert (p.EPERM, p.EIO, p.ENOMEM, p.EINVAL, p.ENOSPC, p.EOVERFLOW, p.ENOTSUP,
            p.ESHUTDOWN) == (1, 5, 12, 22, 28, 75, 95, 108)
    assert (p.INFO_EXPORT, p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE) == (0, 1, 2, 3)
    assert (p.STATE_HOLE, p.STATE_ZERO) == (1, 2)


def test_greeting_bytes() -> None:
    raw = p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
    assert raw == b"NBDMAGICIHAVEOPT\x00\x03"


def test_option_bytes() -> None:
    assert p.pack_option(p.OPT_GO, b"xy") == (
        b"IHAVEOPT" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x02" + b"xy")
    assert p.parse_option_header(p.pack_option(p.OPT_LIST)) == (3, 0)


def test_option_reply_bytes() -> None:
    assert p.pack_option_reply(p.OPT_GO, p.REP_ERR_UNKNOWN, b"no") == (
        bytes.fromhex("0003e889045565a9") + b"\x00\x00\x00\x07" + b"\x80\x00\x00\x06"
        + b"\x00\x00\x00\x02" + b"no")


def test_info_bodies() -> None:
    assert p.pack_info_export(1 << 30, 0x10D) == (
        b"\x00\x00" + b"\x00\x00\x00\x00\x40\x00\x00\x00" + b"\x01\x0d")
    assert p.pack_info_block_size(1, 4096, 32 << 20) == (
        b"\x00\x03" + b"\x00\x00\x00\x01" + b"\x00\x00\x10\x00" + b"\x02\x00\x00\x00")
    assert p.pack_info_name("@a") == b"\x00\x01@a"
    assert p.pack_rep_server("@s", "x") == b"\x00\x00\x00\x02@sx"
    assert p.pack_rep_meta_context(1, "base:allocation") == b"\x00\x00\x00\x01base:allocation"
    assert p.EXPORT_NAME_REPLY.pack(512, 3) == b"\x00" * 6 + b"\x02\x00\x00\x03"


def test_info_request_round_trip() -> None:
    raw = p.pack_info_request("@snap", [p.INFO_BLOCK_SIZE, p.INFO_NAME])
    assert raw == b"\x00\x00\x00\x05@snap\x00\x02\x00\x03\x00\x01"
    assert p.parse_info_request(raw) == ("@snap", [3, 1])


def test_meta_context_request_round_trip() -> None:
    raw = p.pack_meta_context_request("", ["base:allocation"])
    assert raw == b"\x00\x00\x00\x00" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x0fbase:allocation"
    assert p.parse_meta_context_request(raw) == ("", ["base:allocation"])


@pytest.mark.parametrize("raw", [
    b"\x00\x00\x00\x09ab",                         # name longer than the data
    b"\x00\x00\x00\x01a\x00\x05\x00\x01",          # 5 infos announced, 1 given
    b"\x00\x00\x00\x01a\x00\x00extra",             # trailing bytes
    b"\x00\x00\x00\x02\xff\xfe\x00\x00",           # not UTF-8
    b"\x00\x00\x00\x01\x00\x00\x00",               # NUL in the name
    b"\x00\x00\x20\x00" + b"a" * 8192 + b"\x00\x00",  # over 4096 bytes
])
def test_info_request_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_info_request(raw)


def test_meta_context_rejects_absurd_count() -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_meta_context_request(b"\x00\x00\x00\x00\xff\xff\xff\xff")


def test_request_bytes_and_round_trip() -> None:
    req = p.Request(p.CMD_FLAG_FUA, p.CMD_WRITE, 0x1122334455667788, 4096, 512)
    raw = p.pack_request(req)
    assert raw == (b"\x25\x60\x95\x13" + b"\x00\x01" + b"\x00\x01"
                   + bytes.fromhex("1122334455667788") + bytes.fromhex("0000000000001000")
                   + b"\x00\x00\x02\x00")
    assert p.parse_request(raw) == req


def test_request_bad_magic() -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_request(b"\x00" * 28)


def test_simple_reply_bytes() -> None:
    assert p.pack_simple_reply(7, p.EPERM) == (
        b"\x67\x44\x66\x98" + b"\x00\x00\x00\x01" + b"\x00" * 7 + b"\x07")


def test_structured_chunks_bytes() -> None:
    magic = b"\x66\x8e\x33\xef"
    assert p.pack_offset_data_header(9, 512, 4) == (
        magic + b"\x00\x01" + b"\x00\x01" + b"\x00" * 7 + b"\x09" + b"\x00\x00\x00\x0c"
        + b"\x00" * 6 + b"\x02\x00")
    assert p.pack_offset_hole(9, 0, 4096, done=False) == (
        magic + b"\x00\x00" + b"\x00\x02" + b"\x00" * 7 + b"\x09" + b"\x00\x00\x00\x0c"
        + b"\x00" * 8 + b"\x00\x00\x10\x00")
    assert p.pack_chunk_error(9, p.EINVAL, "bad") == (
        magic + b"\x00\x01" + b"\x80\x01" + b"\x00" * 7 + b"\x09" + b"\x00\x00\x00\x09"
        + b"\x00\x00\x00\x16" + b"\x00\x03" + b"bad")
    assert p.pack_chunk(9, p.REPLY_TYPE_NONE) == (
        magic + b"\x00\x01" + b"\x00\x00" + b"\x00" * 7 + b"\x09" + b"\x00" * 4)


def test_block_status_chunk_bytes() -> None:
    raw = p.pack_block_status(3, 1, [(8192, 0), (4096, p.STATE_HOLE | p.STATE_ZERO)])
    assert raw == (b"\x66\x8e\x33\xef" + b"\x00\x01" + b"\x00\x05" + b"\x00" * 7 + b"\x03"
                   + b"\x00\x00\x00\x14" + b"\x00\x00\x00\x01"
                   + b"\x00\x00\x20\x00" + b"\x00\x00\x00\x00"
                   + b"\x00\x00\x10\x00" + b"\x00\x00\x00\x03")
