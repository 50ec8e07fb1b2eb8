# NBD client for tests/reliability/kill-loop.test.ts (python3-libnbd; run
# with Debian's /usr/bin/python3, which has the bindings).
#
#   nbd_client.py write URI BLOCKS SEED LOG [QD]
#     Writes random extents of 1 to 4 blocks with aio_pwrite, QD at once,
#     never two in flight over the same block, until the connection breaks
#     (the daemon was killed). Block k of a write tagged T holds the 32-bit
#     little-endian T + k in every word but the second, which holds the
#     block number. Appends to LOG, one unbuffered write per line:
#       I <tag> <block> <count>   before the write is issued
#       A <tag>                   the server acknowledged it
#       E <tag> <errno>           the server answered it with an error
#       L <tag> <errno>           the connection broke while it was in flight
#     Prints READY once connected, and exits 0 when the connection breaks.
#
#   nbd_client.py dump URI BLOCKS
#     Reads every block and prints one JSON array: per block its tag (0: all
#     zeroes), -1 when the block is not one whole tagged block (torn, or
#     another block's data), -2 when it cannot be read.

import errno
import json
import os
import random
import struct
import sys

import nbd

BS = 4096
_CONN_LOST = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN}


def block_data(tag, block):
    b = bytearray(struct.pack("<I", tag) * (BS // 4))
    b[4:8] = struct.pack("<I", block)
    return b


def write(uri, blocks, seed, log_path, qd):
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def out(line):
        os.write(log, (line + "\n").encode())

    h = nbd.NBD()
    h.connect_uri(uri)
    print("READY", flush=True)
    tag = seed * 1_000_000
    busy = set()
    inflight = {}  # cookie -> (tag, block, count)
    try:
        while True:
            while len(inflight) < qd:
                count = 1 + (rng.randrange(4) if rng.randrange(4) == 0 else 0)
                while True:
                    block = rng.randrange(blocks - count + 1)
                    if not any(block + k in busy for k in range(count)):
                        break
                data = bytearray()
                for k in range(count):
                    data += block_data(tag + k, block + k)
                out("I %d %d %d" % (tag, block, count))
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(data), block * BS)
                inflight[cookie] = (tag, block, count)
                for k in range(count):
                    busy.add(block + k)
                tag += count
            h.poll(-1)
            for cookie in list(inflight):
                t, block, count = inflight[cookie]
                try:
                    if not h.aio_command_completed(cookie):
                        continue
                    out("A %d" % t)
                except nbd.Error as e:
                    # the connection broke under it (in flight at the kill),
                    # or the server answered it with an error
                    kind = "L" if e.errnum in _CONN_LOST else "E"
                    out("%s %d %s" % (kind, t, e.errnum))
                del inflight[cookie]
                for k in range(count):
                    busy.discard(block + k)
    except nbd.Error:
        return 0  # the connection broke: the daemon is gone
    finally:
        os.close(log)


def dump(uri, blocks):
    h = nbd.NBD()
    h.connect_uri(uri)
    tags = []
    chunk = 64
    for first in range(0, blocks, chunk):
        n = min(chunk, blocks - first)
        try:
            data = h.pread(n * BS, first * BS)
            parts = [(first + i, data[i * BS:(i + 1) * BS]) for i in range(n)]
        except nbd.Error:
            parts = []
            for i in range(n):
                try:
                    parts.append((first + i, h.pread(BS, (first + i) * BS)))
                except nbd.Error:
                    parts.append((first + i, None))
        for block, b in parts:
            if b is None:
                tags.append(-2)
                continue
            tag = struct.unpack_from("<I", b, 0)[0]
            want = block_data(tag, block) if tag != 0 else bytes(BS)
            tags.append(tag if b == want else -1)
    h.shutdown()
    print(json.dumps(tags))
    return 0


def main():
    if len(sys.argv) >= 6 and sys.argv[1] == "write":
        qd = int(sys.argv[6]) if len(sys.argv) > 6 else 8
        return write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], qd)
    if len(sys.argv) == 4 and sys.argv[1] == "dump":
        return dump(sys.argv[2], int(sys.argv[3]))
    sys.stderr.write("usage: nbd_client.py write URI BLOCKS SEED LOG [QD] | dump URI BLOCKS\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
