# NBD client for tests/reliability (kill-loop, fault-matrix; python3-libnbd; run
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
#   nbd_client.py churn URI BLOCKS SEED STOPFILE
#     A healthy-device workload for tests/reliability/fault-matrix.test.ts:
#     until STOPFILE exists, writes one tagged block at a time (every 8th
#     with FUA), reads it back, reads another block written before and
#     checks it still holds its last tag, and flushes every 16 writes.
#     Prints "P <ops> <errors> <mismatches> <maxLatencyMs>" about every
#     100 ms (max latency since the last line), and at the end one line
#     "DONE <json>" with the totals and the first errors.
#
#   nbd_client.py op URI OP OFFSET LENGTH
#     One request (OP: read, write, flush); prints "OK <ms>" or
#     "ERR <errno name> <ms> <message>". OP writes: LENGTH one-block writes
#     from OFFSET on, then "BURST <ok> <errno counts as JSON> <ms> <first
#     error>". Exits 0 either way.
#
#   nbd_client.py soak URI BLOCKS SEED STOPFILE MODEL [QD]
#     The mixed workload of tests/reliability/soak.test.ts, at queue depth
#     QD (aio), until STOPFILE exists: writes of 1-4 tagged blocks (some
#     with FUA), reads (each block checked against the model), trims,
#     write-zeroes and flushes; never two requests over one block at once.
#     The model holds, per block, the values it may hold: after an
#     acknowledged write its tags, after write-zeroes 0, after a trim its
#     old values or 0 (trim is advisory). Then every block is read and
#     checked, MODEL gets the model (JSON: block -> allowed values, for
#     blocks that may hold anything but zeroes), and one line
#     "DONE <json>" gives the counts and every error answer (trims that
#     failed EIO apart, with their blocks: a trim over a block that fails
#     writes fails).
#
#   nbd_client.py check URI BLOCKS MODEL
#     Reads every block and checks it against MODEL; prints one JSON line.
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


def churn(uri, blocks, seed, stop_file):
    import time
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    print("READY", flush=True)
    model = {}
    tag = seed * 1_000_000
    ops = errors = mismatches = 0
    first_errors = []
    max_lat = 0.0
    window_max = 0.0
    last_print = time.monotonic()

    def timed(fn):
        nonlocal max_lat, window_max
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            dt = (time.monotonic() - t0) * 1000
            max_lat = max(max_lat, dt)
            window_max = max(window_max, dt)

    writes = 0
    while not os.path.exists(stop_file):
        block = rng.randrange(blocks)
        tag += 1
        try:
            data = block_data(tag, block)
            flags = nbd.CMD_FLAG_FUA if writes % 8 == 0 else 0
            timed(lambda: h.pwrite(data, block * BS, flags))
            writes += 1
            model[block] = tag
            back = timed(lambda: h.pread(BS, block * BS))
            if back != data:
                mismatches += 1
                if len(first_errors) < 5:
                    first_errors.append("block %d: read back differs after write of tag %d" % (block, tag))
            other = rng.choice(list(model.keys()))
            back = timed(lambda: h.pread(BS, other * BS))
            if back != block_data(model[other], other):
                mismatches += 1
                if len(first_errors) < 5:
                    first_errors.append("block %d: does not hold its last tag %d" % (other, model[other]))
            if writes % 16 == 0:
                timed(lambda: h.flush())
            ops += 3 + (1 if writes % 16 == 0 else 0)
        except nbd.Error as e:
            errors += 1
            if len(first_errors) < 5:
                first_errors.append("block %d: %s (%s)" % (block, e.string, errno.errorcode.get(e.errnum, e.errnum)))
        now = time.monotonic()
        if now - last_print >= 0.1:
            print("P %d %d %d %.1f" % (ops, errors, mismatches, window_max), flush=True)
            window_max = 0.0
            last_print = now
    # the final check: every block written holds its last tag
    for block, t in sorted(model.items()):
        try:
            if h.pread(BS, block * BS) != block_data(t, block):
                mismatches += 1
                if len(first_errors) < 5:
                    first_errors.append("final: block %d does not hold its last tag %d" % (block, t))
        except nbd.Error as e:
            errors += 1
            if len(first_errors) < 5:
                first_errors.append("final: block %d: %s" % (block, e.string))
    h.shutdown()
    print("DONE " + json.dumps({"ops": ops, "writes": writes, "blocksVerified": len(model), "errors": errors,
                                 "mismatches": mismatches, "maxLatencyMs": round(max_lat, 1), "firstErrors": first_errors}), flush=True)
    return 0


def op(uri, what, offset, length):
    import time
    h = nbd.NBD()
    h.connect_uri(uri)
    t0 = time.monotonic()
    try:
        if what == "read":
            h.pread(length, offset)
        elif what == "write":
            h.pwrite(b"\xa5" * length, offset)
        elif what == "flush":
            h.flush()
        elif what == "writes":
            # LENGTH single-block writes from OFFSET on; one summary line
            ok = 0
            errs = {}
            first = ""
            for k in range(length):
                try:
                    h.pwrite(b"\x5a" * BS, offset + k * BS)
                    ok += 1
                except nbd.Error as e:
                    name = errno.errorcode.get(e.errnum, str(e.errnum))
                    errs[name] = errs.get(name, 0) + 1
                    first = first or e.string
            print("BURST %d %s %d %s" % (ok, json.dumps(errs, separators=(",", ":")), (time.monotonic() - t0) * 1000, first), flush=True)
            h.shutdown()
            return 0
        else:
            raise ValueError("unknown op " + what)
        print("OK %d" % ((time.monotonic() - t0) * 1000), flush=True)
    except nbd.Error as e:
        print("ERR %s %d %s" % (errno.errorcode.get(e.errnum, e.errnum), (time.monotonic() - t0) * 1000, e.string), flush=True)
    try:
        h.shutdown()
    except nbd.Error:
        pass
    return 0


def block_value(b, block):
    """The tag of one whole tagged block of `block`, 0 for zeroes, -1 otherwise."""
    tag = struct.unpack_from("<I", b, 0)[0]
    want = block_data(tag, block) if tag != 0 else bytes(BS)
    return tag if b == want else -1


def soak(uri, blocks, seed, stop_file, model_path, qd):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    print("READY", flush=True)
    allowed = {}  # block -> set of values; absent: {0}
    busy = set()
    inflight = {}  # cookie -> (kind, block, count, tag, buf)
    n = {"write": 0, "fua": 0, "read": 0, "trim": 0, "zero": 0, "flush": 0}
    blocks_read_checked = 0
    bytes_written = 0
    bad = []
    trim_errors = []
    tag = seed * 1_000_000
    flushing = False

    def fail(msg):
        if len(bad) < 10:
            bad.append(msg)

    def issue():
        nonlocal tag, flushing
        r = rng.random()
        if r < 0.04:
            if flushing:
                return
            cookie = h.aio_flush()
            inflight[cookie] = ("flush", 0, 0, 0, None)
            flushing = True
            return
        count = 1 + (rng.randrange(4) if rng.randrange(3) == 0 else 0)
        for _ in range(20):
            block = rng.randrange(blocks - count + 1)
            if not any(block + k in busy for k in range(count)):
                break
        else:
            return
        off = block * BS
        if r < 0.50:
            kind = "fua" if rng.random() < 0.08 else "write"
            data = bytearray()
            for k in range(count):
                data += block_data(tag + k, block + k)
            buf = nbd.Buffer.from_bytearray(data)
            cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if kind == "fua" else 0)
            inflight[cookie] = (kind, block, count, tag, buf)
            tag += count
        elif r < 0.85:
            buf = nbd.Buffer(count * BS)
            cookie = h.aio_pread(buf, off)
            inflight[cookie] = ("read", block, count, 0, buf)
        elif r < 0.93:
            cookie = h.aio_trim(count * BS, off)
            inflight[cookie] = ("trim", block, count, 0, None)
        else:
            cookie = h.aio_zero(count * BS, off)
            inflight[cookie] = ("zero", block, count, 0, None)
        for k in range(count):
            busy.add(block + k)

    def complete():
        nonlocal flushing, blocks_read_checked, bytes_written
        for cookie in list(inflight):
            kind, block, count, t, buf = inflight[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
                ok = True
            except nbd.Error as e:
                ok = False
                if kind == "trim" and e.errnum == errno.EIO:
                    trim_errors.append([block, count])  # the test checks these against the blocks it made bad
                else:
                    fail("%s of blocks %d+%d: %s (%s)" % (kind, block, count, e.string, errno.errorcode.get(e.errnum, e.errnum)))
            del inflight[cookie]
            n[kind] += 1
            if kind == "flush":
                flushing = False
                continue
            for k in range(count):
                b = block + k
                busy.discard(b)
                if kind in ("write", "fua"):
                    allowed[b] = {t + k} if ok else allowed.get(b, {0}) | {t + k}
                elif kind == "zero":
                    allowed[b] = {0} if ok else allowed.get(b, {0}) | {0}
                elif kind == "trim":
                    allowed[b] = allowed.get(b, {0}) | {0}
                elif ok:
                    v = block_value(bytes(buf.to_bytearray()[k * BS:(k + 1) * BS]), b)
                    blocks_read_checked += 1
                    if v not in allowed.get(b, {0}):
                        fail("read of block %d: holds %s, allowed %s" % (b, v, sorted(allowed.get(b, {0}))))
            if kind in ("write", "fua") and ok:
                bytes_written += count * BS

    while not os.path.exists(stop_file):
        while len(inflight) < qd:
            before = len(inflight)
            issue()
            if len(inflight) == before:
                break
        h.poll(100)
        complete()
    while inflight:
        h.poll(1000)
        complete()
    final = check_all(h, blocks, allowed)
    h.shutdown()
    model = {str(b): sorted(v) for b, v in allowed.items() if v != {0}}
    with open(model_path, "w") as f:
        json.dump(model, f)
    print("DONE " + json.dumps({"ops": n, "bytesWritten": bytes_written, "readBlocksChecked": blocks_read_checked,
                                 "finalBlocksChecked": final["checked"], "finalNonZero": final["nonZero"],
                                 "errors": bad, "trimErrors": trim_errors, "finalMismatches": final["bad"]}), flush=True)
    return 0


def check_all(h, blocks, allowed):
    checked = 0
    non_zero = 0
    bad = []
    chunk = 64
    for first in range(0, blocks, chunk):
        cnt = min(chunk, blocks - first)
        try:
            data = h.pread(cnt * BS, first * BS)
        except nbd.Error as e:
            bad.append("read of blocks %d+%d: %s" % (first, cnt, e.string))
            continue
        for i in range(cnt):
            b = first + i
            v = block_value(data[i * BS:(i + 1) * BS], b)
            checked += 1
            if v != 0:
                non_zero += 1
            if v not in allowed.get(b, {0}):
                if len(bad) < 10:
                    bad.append("block %d: holds %s, allowed %s" % (b, v, sorted(allowed.get(b, {0}))))
    return {"checked": checked, "nonZero": non_zero, "bad": bad}


def check(uri, blocks, model_path):
    with open(model_path) as f:
        model = {int(k): set(v) for k, v in json.load(f).items()}
    h = nbd.NBD()
    h.connect_uri(uri)
    r = check_all(h, blocks, model)
    h.shutdown()
    print(json.dumps(r))
    return 0


def main():
    if len(sys.argv) >= 6 and sys.argv[1] == "write":
        qd = int(sys.argv[6]) if len(sys.argv) > 6 else 8
        return write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], qd)
    if len(sys.argv) == 6 and sys.argv[1] == "churn":
        return churn(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    if len(sys.argv) == 6 and sys.argv[1] == "op":
        return op(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    if len(sys.argv) >= 7 and sys.argv[1] == "soak":
        qd = int(sys.argv[7]) if len(sys.argv) > 7 else 8
        return soak(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], qd)
    if len(sys.argv) == 5 and sys.argv[1] == "check":
        return check(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    if len(sys.argv) == 4 and sys.argv[1] == "dump":
        return dump(sys.argv[2], int(sys.argv[3]))
    sys.stderr.write("usage: nbd_client.py write URI BLOCKS SEED LOG [QD] | churn URI BLOCKS SEED STOPFILE"
                     " | op URI read|write|flush|writes OFFSET LENGTH | soak URI BLOCKS SEED STOPFILE MODEL [QD]"
                     " | check URI BLOCKS MODEL | dump URI BLOCKS\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
