#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus (corpus/TARGET/NAME) from the test
vectors in tests/vectors. Deterministic: rerun after the vectors change."""
import hashlib
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "vectors")


def lines(name):
    with open(os.path.join(VECTORS, name)) as f:
        return [json.loads(l) for l in f if l.strip()]


def put(target, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def main():
    shutil.rmtree(os.path.join(HERE, "corpus"), ignore_errors=True)
    for v in lines("frames.jsonl"):
        data = bytes.fromhex(v["hex"])
        if v["dialect"] == "v1":
            put("frame", data)
        if v["dialect"] in ("v1", "v1-stream", "detect"):
            put("stream", bytes([128]) + data)
        if v["dialect"] == "legacy":
            put("legacy", data)
            put("stream", bytes([64]) + data)
    for v in lines("log_records.jsonl"):
        if v.get("type") == "record":
            put("record", bytes.fromhex(v["hex"]))
        if v.get("type") == "recovery":
            base = int(v["segment_name"][:-4])
            put("recover", bytes([1 | (min(base, 127) << 1)]) + bytes.fromhex(v["segment_hex"]))
    for v in lines("repair.jsonl"):
        for s in v["segments"]:
            put("recover", bytes([1]) + bytes.fromhex(s["hex"]))


if __name__ == "__main__":
    main()
