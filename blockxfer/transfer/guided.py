"""A restore guided by the catalog (`restore TARGET --snapshot [VOLUME@]SNAP` without
--tape): the chain `catalog where` names, oldest first, each image from its medium:
tapes brought by the caller's `bring` (a changer by barcode, a command, the
operator), stream files read, object-store snapshots pulled.

Before a tape is read its label is checked against the catalog (set id and
sequence number) and the image number against its image id, so a catalog that
is wrong or stale stops the restore before anything is written from that tape.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockxfer.catalog.query import Image, Medium
from blockxfer.errors import BlockxferError, FormatError, UsageError, VolumeError
from blockxfer.stream.receive import ReceiveResult, receive_stream

from .restore import OpenDevice, restore_images
from .tapeset import OpenTape, list_tape

Bring = Callable[[Medium], str]            # the tape wanted -> the path to open it at
OpenStore = Callable[[str], Any]           # s3://BUCKET/PREFIX -> Store


def describe(m: Medium) -> str:
    code = f", barcode {m.barcode}" if m.barcode else ""
    return f"tape {m.label!r} (tape {m.seq} of set {m.set_name!r}{code})"


def check_tape(path: str, m: Medium, open_tape: OpenTape) -> bool:
    """Does the tape at `path` carry the label the catalog names?"""
    tape = open_tape(path, False)
    try:
        lab = list_tape(tape).label
    except FormatError:
        return False
    finally:
        tape.close()
    return lab.set_id.hex() == m.set_id and lab.seq == m.seq


def bring_tapes(*, open_tape: OpenTape, command: str | None,
                ask: Callable[[str, Medium], None] | None) -> Bring:
    """Without a changer: the drive or virtual tape the tape was written through
    when it holds that tape now; else the operator's command (it prints the path;
    $BLOCKXFER_TAPE_LABEL/_BARCODE/_SET/_SEQ say which); else the operator at a
    terminal, asked to load it into that drive."""
    def bring(m: Medium) -> str:
        here = m.path if m.path and os.path.exists(m.path) else None
        if here is not None and check_tape(here, m, open_tape):
            return here
        if command is not None:
            return _run(command, m)
        if here is not None and not os.path.isfile(here) and ask is not None:
            ask(here, m)
            return here
        raise UsageError(f"the restore needs {describe(m)}, last seen at {m.path}: load it "
                         "there, or give --changer or --next-tape COMMAND; nothing more was "
                         "written")
    return bring


def _run(command: str, m: Medium) -> str:
    env = dict(os.environ, BLOCKXFER_TAPE_SET=m.set_name or "", BLOCKXFER_TAPE_SEQ=str(m.seq),
               BLOCKXFER_TAPE_LABEL=m.label or "", BLOCKXFER_TAPE_BARCODE=m.barcode or "")
    r = subprocess.run(command, shell=True, env=env, capture_output=True, text=True)
    path = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not path:
        raise UsageError(f"--next-tape command gave no path for {describe(m)} "
                         f"(exit {r.returncode}): {r.stderr.strip()[:200]}")
    return path


@dataclass
class GuidedStep:
    image: Image
    result: ReceiveResult

    def as_dict(self) -> dict[str, Any]:
        r = self.result
        return {"kind": self.image.kind, "expression": self.image.expression, "top": r.top,
                "blocks": r.blocks, "incomplete": list(r.incomplete),
                "media": [m.describe() for m in self.image.media]}


def _tape_step(img: Image, target: str, bring: Bring, open_tape: OpenTape,
               open_device: OpenDevice, force: bool,
               progress: Callable[[int], None] | None) -> ReceiveResult:
    by_seq = {m.seq: m for m in img.media}

    def fetch(m: Medium) -> str:
        path = bring(m)
        if not check_tape(path, m, open_tape):
            raise VolumeError(f"{path} does not hold {describe(m)} as the catalog says; "
                              "load that tape (or run 'blockxfer catalog import --tape' to "
                              "bring the catalog up to date)")
        return path

    def next_tape(set_name: str, seq: int) -> str:
        m = by_seq.get(seq)
        if m is None:
            raise UsageError(f"the catalog knows no tape {seq} of set {set_name!r} for image "
                             f"{img.expression!r}; import it with 'blockxfer catalog import "
                             "--tape'")
        return fetch(m)

    first = img.media[0]
    path = fetch(first)
    tape = open_tape(path, False)
    try:
        on_tape = next((i for i in list_tape(tape).images if i.number == img.number), None)
    finally:
        tape.close()
    if on_tape is None or on_tape.descriptor.image_id != img.image_id:
        raise VolumeError(f"image {img.number} of {describe(first)} is not the image the "
                          f"catalog names ({img.expression!r}); run 'blockxfer catalog import "
                          "--tape' on it")
    steps = restore_images(path, target, open_tape=open_tape, open_device=open_device,
                           next_tape=next_tape, image=img.number, force=force,
                           progress=progress)
    return steps[0].result


def _file_step(path: str, target: str, open_device: OpenDevice, force: bool,
               progress: Callable[[int], None] | None) -> ReceiveResult:
    with open(path, "rb") as f:
        return receive_stream(f, target, open_device, force=force, progress=progress,
                              source_hint=path)


def restore_chain(chain: list[Image], target: str, *, bring: Bring, open_tape: OpenTape,
                  open_device: OpenDevice, open_store: OpenStore, force: bool = False,
                  progress: Callable[[int], None] | None = None) -> list[GuidedStep]:
    """Apply the images in order (the first with `force`, the rest onto it). Stream
    files are looked for before anything is written; a target this restore created
    is removed again when a later image fails (nothing half restored is left behind),
    and an existing one keeps the images applied so far: the same restore, run
    again, continues after them."""
    for img in chain:
        path = str(img.media[0].path)
        if img.kind == "file" and not os.path.isfile(path):
            raise UsageError(f"the restore needs the stream file {path}, which is not there; "
                             "nothing was written")
    created = not os.path.exists(target)
    try:
        return _apply(chain, target, bring, open_tape, open_device, open_store, force,
                      progress)
    except BlockxferError:
        if created and os.path.isfile(target):
            os.remove(target)
        raise


def _apply(chain: list[Image], target: str, bring: Bring, open_tape: OpenTape,
           open_device: OpenDevice, open_store: OpenStore, force: bool,
           progress: Callable[[int], None] | None) -> list[GuidedStep]:
    from .objstore.restore import restore_snapshot
    out = []
    for img in chain:
        if img.kind == "tape":
            res = _tape_step(img, target, bring, open_tape, open_device, force, progress)
        elif img.kind == "store":
            store = open_store(str(img.media[0].path))
            res = restore_snapshot(store, str(img.store_volume), img.top, target, open_device,
                                   force=force, progress=progress)
        else:
            res = _file_step(str(img.media[0].path), target, open_device, force, progress)
        out.append(GuidedStep(img, res))
        force = False
    return out
