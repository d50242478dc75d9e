"""The catalog's part in other commands (docs/catalog.md): `dump --pool` and the
barcodes of the set it wrote, `restore --snapshot` without --tape (the media
`catalog where` names, in its order) and `tape erase` (refused while the catalog
keeps the tape's images)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from blockxfer.errors import DeviceError, UsageError, VolumeError

from .catalog import open_db, plan_where
from .spec import Arg, Report, arg

if TYPE_CHECKING:
    from blockxfer.catalog import query


def pool_arg() -> Arg:
    return arg("--pool", metavar="POOL", default=None,
               help="put the set's tapes in this pool of the catalog (its retention decides "
                    "when they may be recycled; see 'catalog pool create')")


def check_pool(a: argparse.Namespace) -> None:
    """Before a dump with --pool: the pool must exist (nothing written otherwise)."""
    from blockxfer.catalog import pools
    if a.pool is None:
        return
    db = open_db(a)
    try:
        pools.require_pool(db, a.pool)
    finally:
        db.close()


def note_dump_barcodes(a: argparse.Namespace, set_id: str, first_seq: int, ntapes: int,
                       barcodes: dict[int, str]) -> None:
    """The barcode of each tape of the set the dump used: what the changer saw, and
    the tape left in the drive (the changer's status, or the cartridge's MAM)."""
    from blockxfer.catalog import hooks

    from .tapealert import barcode_of
    hooks.use(a.catalog)
    codes = dict(barcodes)
    last = first_seq + ntapes - 1
    if last not in codes:
        code = None
        if a.changer:
            from blockxfer.drivers.changer import Changer
            try:
                code = Changer(a.changer).status().drive(a.changer_drive).barcode
            except DeviceError:
                code = None
        code = code or barcode_of(a.tape)
        if code:
            codes[last] = code
    hooks.note_barcodes(set_id, codes)
    if a.pool:
        hooks.note_pool(set_id, a.pool)


def set_barcodes_of(a: argparse.Namespace, drive: str) -> dict[tuple[str, int], str]:
    """A restore through a changer: the barcodes the catalog recorded for the set of
    the tape in the drive, so the changer loads each next tape by barcode rather
    than trying slots for their labels. Empty when the catalog does not know them."""
    from blockxfer.catalog import hooks, pools
    from blockxfer.errors import BlockxferError
    from blockxfer.transfer.tapeset import read_label

    from .tapedrive import tape_opener
    hooks.use(a.catalog)
    if not hooks.exists():
        return {}
    try:
        tape = tape_opener()(drive, False)
        try:
            label = read_label(tape)
        finally:
            tape.close()
        if label is None:
            return {}
        db = open_db(a)
        try:
            tapes = [t for t in pools.tape_states(db) if t.set_id == label.set_id.hex()]
        finally:
            db.close()
    except BlockxferError:
        return {}                    # the restore's own checks say what is wrong
    return {(t.set_name, t.seq): t.barcode for t in tapes if t.barcode}


def erase_check(a: argparse.Namespace, label: tuple[str, int] | None) -> bool:
    """`tape erase` of the tape labelled (set id, seq): refuse it when the catalog
    says it holds unexpired images (exit 5) unless --force; True when the catalog
    says it expired in its pool (recycling: erased without --force); False when the
    catalog does not know it (the tape's own rules apply)."""
    from blockxfer.catalog import hooks, pools
    hooks.use(a.catalog)
    if label is None or not hooks.exists():
        return False
    try:
        db = open_db(a)
    except DeviceError as e:      # an unreadable catalog leaves the tape's own rules
        print(f"blockxfer: warning: {e}", file=sys.stderr)
        return False
    try:
        state = pools.tape_state(db, *label)
    finally:
        db.close()
    if state is None:
        return False
    now = time.time()
    if state.images and not state.expired(now) and not a.force:
        until = ("never expire (no pool)" if state.expires is None else
                 "are kept until " + time.strftime("%Y-%m-%d %H:%M UTC",
                                                   time.gmtime(state.expires)))
        raise VolumeError(f"{a.tape} holds {state.images} image(s) of set {state.set_name!r} "
                          f"that the catalog says {until}; nothing was erased; use --force "
                          "to erase it anyway")
    return state.expired(now)


def forget_erased(a: argparse.Namespace, set_id: str, seq: int) -> None:
    from blockxfer.catalog import hooks
    hooks.use(a.catalog)
    if hooks.exists():
        hooks.forget_tape(set_id, seq)


def _bring(a: argparse.Namespace, chain: list[query.Image]) -> Any:
    """How the tapes the chain names come: the changer by barcode, else the drive,
    the --next-tape command, the virtual tape file, or the operator."""
    from blockxfer.transfer.guided import bring_tapes, describe

    from .tapedrive import tape_opener
    if a.changer:
        from blockxfer.drivers.changer import Changer, changer_next_tape, parse_tapes
        from blockxfer.drivers.tapes import eject_tape
        from blockxfer.transfer.tapeset import label_reader
        # the changer's drive: the one the set was written through
        drive = next(str(m.path) for img in chain for m in img.media if m.kind == "tape")
        codes = {(m.set_name or "", m.seq or 0): m.barcode for img in chain for m in img.media
                 if m.kind == "tape" and m.barcode}
        loader = changer_next_tape(Changer(a.changer), a.changer_drive, drive,
                                   barcodes=codes, eject=eject_tape,
                                   label_of=label_reader(tape_opener()),
                                   tapes=parse_tapes(a.changer_tapes) or ["*"], restore=True)
        return lambda m: loader(m.set_name or "", m.seq or 0)

    def ask(drive: str, m: query.Medium) -> None:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError(f"the restore needs {describe(m)} in {drive}: load it, or give "
                             "--changer or --next-tape COMMAND; nothing more was written")
        print(f"insert {describe(m)} into {drive}, then press Enter: ", end="",
              file=sys.stderr, flush=True)
        sys.stdin.readline()
    return bring_tapes(open_tape=tape_opener(), command=a.next_tape,
                       ask=ask)


def restore_by_catalog(a: argparse.Namespace, have: set[str]) -> Report:
    """`restore TARGET --snapshot [VOLUME@]SNAP` without --tape: what `catalog where`
    names, in its order, from whatever media hold it."""
    from blockxfer.catalog import hooks
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.guided import restore_chain
    from blockxfer.transfer.objstore.s3 import open_store

    from .common import progress
    from .tapedrive import tape_opener
    if not a.snapshot or a.vbns or a.only or a.image is not None:
        raise UsageError("without --tape only --snapshot [VOLUME@]SNAP restores (the catalog "
                         "names the media); --image, --only and --vbns need --tape")
    uuid, snap, chain = plan_where(open_db(a), a.snapshot, a.target, frozenset(have))
    if not chain:
        raise UsageError(f"{a.target} already holds {snap!r}; nothing to restore")
    plan = [f"{n}. {img.kind} {img.expression!r} on "
            + "; ".join(m.describe() for m in img.media) for n, img in enumerate(chain, 1)]
    if a.dry_run:
        return Report({"dry_run": True, "volume": a.target, "snapshot": snap,
                       "steps": [i.as_dict() for i in chain]},
                      [f"would restore {snap!r} of volume {uuid} into {a.target}:", *plan])
    prog = progress(a, "restore")
    steps = restore_chain(chain, a.target, bring=_bring(a, chain),
                          open_tape=tape_opener(), open_device=open_device,
                          open_store=lambda url: open_store(url, endpoint=a.s3_endpoint)[0],
                          force=a.force, progress=prog.add)
    prog.finish()
    text = [f"{a.target}: restored {st.image.kind} image {st.image.expression!r} up to "
            f"{st.result.top!r}, {st.result.blocks} blocks" for st in steps]
    return Report({"volume": a.target, "snapshot": snap, "catalog": hooks.current_path(),
                   "images": [st.as_dict() for st in steps]}, text)
