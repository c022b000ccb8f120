"""A limit probe for bench/run.py: inflate the given gzip layers in-process with ISA-L, one process per core
(a layer is one deflate stream: it cannot be split), reading in the agent's chunk size, keeping nothing."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

from isal import igzip

CHUNK = 1 << 20


def inflate(path: str) -> int:
    total = 0
    with igzip.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
    return total


if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=min(len(sys.argv) - 1, os.cpu_count() or 1)) as pool:
        print(sum(pool.map(inflate, sys.argv[1:])))
