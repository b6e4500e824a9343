#!/usr/bin/env python3
"""Writes repair.jsonl: data directories with a damaged closed segment or an
offset gap, what start-up says of them, and what `--repair` leaves (PROTOCOL.md
section 6, the paragraphs on closed segments). Deterministic, stdlib only:
`python3 make_repair_vectors.py` rewrites the file byte for byte.

Each line: `name`, `segments` (the directory's segment files, oldest first,
as `name` and `hex`), `report` (the text of `damaged/report` before start, or
null), `start` (without --repair: `ok` with `next_offset` and the accepted
`gaps`, or `refuse` with strings the one-line error contains) and, for a
refused case, `repair`: the segment files afterwards, the files moved into
`damaged/`, the lines appended to `damaged/report`, and `next_offset`.
Closed segments here were written just now (inside any dedup window), so
start-up checks them record by record.
"""
import json
import os
import struct

_T = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _T.append(_c)


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283

SEG_HEADER = b"ESCLOG\0\0" + struct.pack("<II", 1, 0)
TS = 1_764_253_200_000_000_000
RECV = 1_764_253_260_000_000_000


def v1(event_id, priority=2, topic=b"orders/eu", payload=b"hello", partition=3, flags=1):
    ln = 40 + len(topic) + len(payload)
    body = b"ESC1" + struct.pack("<IBBBBIQQI", ln, 1, priority, flags, len(topic), partition, event_id,
                                 TS + event_id, len(payload)) + topic + payload
    return body + struct.pack("<I", crc32c(body))


def record(offset, frames, cls=1, kind=0):
    body = struct.pack("<QQBBH", offset, RECV + offset, kind, cls, len(frames)) + b"".join(frames)
    return struct.pack("<II", 4 + len(body), crc32c(body)) + body


def single(offset):
    """A transactional single-event record holding event id 1000 + offset."""
    return record(offset, [v1(1000 + offset, payload=b"event-%d" % offset)])


def seg_name(base):
    return "%020d.log" % base


def segment(base, offsets):
    return SEG_HEADER + b"".join(single(o) for o in offsets)


def seg(base, data):
    return {"name": seg_name(base), "hex": data.hex()}


def spoil(data, at):
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def pos_of(offsets, k):
    """Byte position of the record of offsets[k] in segment(_, offsets)."""
    return len(SEG_HEADER) + sum(len(single(o)) for o in offsets[:k])


def lost(first, end, nbytes, name):
    return "lost %d %d %d %s" % (first, end, nbytes, name)


def cases():
    out = []
    # 1. One flipped byte inside the third record of a closed segment.
    a = list(range(0, 5))
    bad = pos_of(a, 2)
    a_bytes = spoil(segment(0, a), bad + 40)
    out.append({
        "name": "repair/a damaged record in a closed segment",
        "segments": [seg(0, a_bytes), seg(5, segment(5, [5, 6]))],
        "report": None,
        "start": {"result": "refuse", "error_contains": [seg_name(0), "position %d" % bad, "offsets 2..3"]},
        "repair": {
            "segments": [seg(0, segment(0, [0, 1])), seg(3, segment(3, [3, 4])), seg(5, segment(5, [5, 6]))],
            "damaged": [seg_name(0)],
            "report_lines": [lost(2, 3, len(single(2)), seg_name(0))],
            "next_offset": 7,
        },
    })
    # 2. A middle segment deleted.
    out.append({
        "name": "repair/a missing middle segment",
        "segments": [seg(0, segment(0, [0, 1, 2])), seg(6, segment(6, [6, 7]))],
        "report": None,
        "start": {"result": "refuse", "error_contains": [seg_name(0), seg_name(6), "offsets 3..6"]},
        "repair": {
            "segments": [seg(0, segment(0, [0, 1, 2])), seg(6, segment(6, [6, 7]))],
            "damaged": [],
            "report_lines": [lost(3, 6, 0, seg_name(3))],
            "next_offset": 8,
        },
    })
    # 3. The last record of a closed segment garbled: the loss runs to the
    # next segment's base.
    a = [0, 1, 2, 3]
    bad = pos_of(a, 3)
    a_bytes = spoil(segment(0, a), bad + 30)
    out.append({
        "name": "repair/the last record of a closed segment damaged",
        "segments": [seg(0, a_bytes), seg(4, segment(4, [4]))],
        "report": None,
        "start": {"result": "refuse", "error_contains": [seg_name(0), "position %d" % bad, "offsets 3..4"]},
        "repair": {
            "segments": [seg(0, segment(0, [0, 1, 2])), seg(4, segment(4, [4]))],
            "damaged": [seg_name(0)],
            "report_lines": [lost(3, 4, len(single(3)), seg_name(0))],
            "next_offset": 5,
        },
    })
    # 4. The first record of a closed segment damaged: the kept run starts
    # later, in a file named by its own base.
    a = [10, 11, 12]
    a_bytes = spoil(segment(10, a), pos_of(a, 0) + 50)
    out.append({
        "name": "repair/the first record of a closed segment damaged",
        "segments": [seg(10, a_bytes), seg(13, segment(13, [13]))],
        "report": None,
        "start": {"result": "refuse", "error_contains": [seg_name(10), "position 16", "offsets 10..11"]},
        "repair": {
            "segments": [seg(11, segment(11, [11, 12])), seg(13, segment(13, [13]))],
            "damaged": [seg_name(10)],
            "report_lines": [lost(10, 11, len(single(10)), seg_name(10))],
            "next_offset": 14,
        },
    })
    # 5. A repaired directory: the listed gap is accepted and reported.
    report = "# eventstream repair report\n" + lost(3, 6, 0, seg_name(3)) + "\n"
    out.append({
        "name": "repair/a repaired directory starts with its listed gap",
        "segments": [seg(0, segment(0, [0, 1, 2])), seg(6, segment(6, [6, 7]))],
        "report": report,
        "start": {"result": "ok", "next_offset": 8, "gaps": [[3, 6]]},
    })
    # 6. A gap other than the one listed is still refused.
    report = "# eventstream repair report\n" + lost(3, 5, 0, seg_name(3)) + "\n"
    out.append({
        "name": "repair/a gap the report does not list is refused",
        "segments": [seg(0, segment(0, [0, 1, 2])), seg(6, segment(6, [6, 7]))],
        "report": report,
        "start": {"result": "refuse", "error_contains": [seg_name(0), seg_name(6), "offsets 3..6"]},
        "repair": {
            "segments": [seg(0, segment(0, [0, 1, 2])), seg(6, segment(6, [6, 7]))],
            "damaged": [],
            "report_lines": [lost(3, 6, 0, seg_name(3))],
            "next_offset": 8,
        },
    })
    # 8. A power cut after a roll: the closed segment's last record torn,
    # the newest segment (its name durable, its header not) empty. The log
    # ends at the tear: the closed segment is cut there and the empty one
    # removed.
    a = [0, 1, 2, 3]
    torn = segment(0, a)[: pos_of(a, 3) + 20]
    out.append({
        "name": "repair/a torn closed segment before empty ones ends the log",
        "segments": [seg(0, torn), {"name": seg_name(4), "hex": ""}],
        "report": None,
        "start": {"result": "ok", "next_offset": 3, "gaps": [],
                  "segments_after": [seg(0, segment(0, [0, 1, 2]))]},
    })
    # 9. Every byte of the closed segment after its header lost, two empty
    # segments after it.
    out.append({
        "name": "repair/a closed segment left header-only by a power cut",
        "segments": [seg(0, SEG_HEADER), seg(5, SEG_HEADER), {"name": seg_name(9), "hex": ""}],
        "report": None,
        "start": {"result": "ok", "next_offset": 0, "gaps": [],
                  "segments_after": [seg(0, SEG_HEADER)]},
    })
    # 7. A clean directory of three segments.
    out.append({
        "name": "repair/clean closed segments start as they are",
        "segments": [seg(0, segment(0, [0, 1])), seg(2, segment(2, [2, 3, 4])), seg(5, segment(5, []))],
        "report": None,
        "start": {"result": "ok", "next_offset": 5, "gaps": []},
    })
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "repair.jsonl"), "w") as f:
        for case in cases():
            f.write(json.dumps(case) + "\n")


if __name__ == "__main__":
    main()
