# O_DIRECT probe for tests: one aligned read or write, reports the exact errno.
#
#   python3 dio_probe.py read  PATH OFFSET LENGTH
#   python3 dio_probe.py write PATH OFFSET LENGTH BYTE
#
# Prints one JSON line: {"ok": true, "bytes": N, "sha256": "..."} (sha256 of
# the data read or written) or {"ok": false, "errno": "EIO", "phase": "open"|"io"}.
# The buffer comes from an anonymous mmap, so it is page aligned as O_DIRECT
# requires. Exit code is 0 either way; only bad usage exits non-zero.

import errno
import hashlib
import json
import mmap
import os
import sys


def main():
    if len(sys.argv) < 5 or sys.argv[1] not in ("read", "write"):
        sys.stderr.write(__doc__ or "usage: dio_probe.py read|write PATH OFFSET LENGTH [BYTE]\n")
        return 2
    op, path = sys.argv[1], sys.argv[2]
    offset, length = int(sys.argv[3]), int(sys.argv[4])
    buf = mmap.mmap(-1, length)
    if op == "write":
        fill = int(sys.argv[5]) if len(sys.argv) > 5 else 0xA5
        buf.write(bytes([fill]) * length)
    try:
        fd = os.open(path, (os.O_RDONLY if op == "read" else os.O_RDWR) | os.O_DIRECT)
    except OSError as e:
        print(json.dumps({"ok": False, "errno": errno.errorcode.get(e.errno, str(e.errno)), "phase": "open"}))
        return 0
    try:
        if op == "read":
            n = os.preadv(fd, [buf], offset)
        else:
            n = os.pwritev(fd, [buf], offset)
        print(json.dumps({"ok": True, "bytes": n, "sha256": hashlib.sha256(buf[:n]).hexdigest()}))
    except OSError as e:
        print(json.dumps({"ok": False, "errno": errno.errorcode.get(e.errno, str(e.errno)), "phase": "io"}))
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
