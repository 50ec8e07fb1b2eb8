# nbdkit python plugin: a file-backed disk with injectable faults.
#
# Used by tests/helpers/faultdisk.ts. Run as:
#   nbdkit -f -U NBD.sock python faultdisk_plugin.py file=IMG size=BYTES control=JSON socket=SOCK
#
# control (JSON, replaced atomically by the test helper):
#   {"bad": {"read": [[off, len], ...], "write": [[off, len], ...]},
#    "hang": "none" | "all" | "writes",
#    "hangRanges": [[off, len], ...]   (optional: only requests overlapping
#                                      these hang; flush then never hangs),
#    "delayMs": {"read": N, "write": N}}
# The file is re-read whenever its (inode, mtime, size) changes; a request
# checks that with one stat() call. The helper also sends "reload" on the
# control socket so a change is applied before setBad()/setHang() resolve.
#
# socket: a unix socket served by a background thread, one line per request:
#   "hello"  -> {"pid": nbdkit pid}
#   "stats"  -> counters
#   "reload" -> re-read the control file now, then {"ok": true}
#   "powercut [SEED]" -> (volatile=1 only) a simulated power cut: drop the
#              volatile cache; with SEED, first persist a seeded random
#              subset of the unflushed writes (see below); then
#              {"dropped": N, "kept": N, "torn": N}
#
# volatile=1 (optional parameter): a disk with a volatile write cache. A
# write (pwrite, zero, trim) without FUA goes to an in-memory cache only:
# reads see it, the backing file does not. FLUSH persists the whole cache
# (then fdatasync); a FUA write persists the cache's view of its own range
# (the write itself) at once. "powercut" drops the cache. With a seed, each
# unflushed write (in the order they came) is first either dropped, kept
# whole, or torn (each 4 KiB piece kept or not), because a disk may persist
# any subset of what it has not flushed; later writes then overwrite
# earlier ones as they would have. Zero and trim are cached as writes of
# zeroes (fine for the small disks of the tests).
#
# A request overlapping a bad range fails whole with EIO (the granularity is
# the NBD request, i.e. whatever nbdfuse sends for one FUSE request).
# Reads check bad.read; writes, zero and trim check bad.write. Flush never
# fails. While hang is "all", every data request and flush blocks; while it
# is "writes", pwrite/zero/trim/flush block and reads pass.

import builtins
import bisect
import ctypes
import errno
import json
import os
import socket
import threading
import time

import nbdkit

API_VERSION = 2

_cfg = {"file": None, "size": None, "control": None, "socket": None, "volatile": None}
_fd = -1
_lock = threading.Lock()
_control_key = None
_state = {
    "read": ([], []),   # (starts, ends), merged and sorted
    "write": ([], []),
    "hang": "none",
    "hang_ranges": None,   # None: every request; else (starts, ends)
    "delay_read": 0.0,
    "delay_write": 0.0,
}
_stats = {
    "reads": 0, "writes": 0, "flushes": 0, "trims": 0, "zeros": 0,
    "readBytes": 0, "writeBytes": 0,
    "readErrors": 0, "writeErrors": 0,
    "blocked": 0,
    "unflushedWrites": 0, "powerCuts": 0,
}


def _merge(ranges):
    spans = sorted((int(o), int(o) + int(n)) for o, n in ranges if int(n) > 0)
    starts, ends = [], []
    for s, e in spans:
        if ends and s <= ends[-1]:
            if e > ends[-1]:
                ends[-1] = e
        else:
            starts.append(s)
            ends.append(e)
    return (starts, ends)


def _load_control(force=False):
    global _control_key
    path = _cfg["control"]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if not force and key == _control_key:
        return
    with _lock:
        if not force and key == _control_key:
            return
        with builtins.open(path, "r") as f:
            doc = json.load(f)
        bad = doc.get("bad") or {}
        delay = doc.get("delayMs") or {}
        _state["read"] = _merge(bad.get("read") or [])
        _state["write"] = _merge(bad.get("write") or [])
        _state["hang"] = doc.get("hang") or "none"
        hr = doc.get("hangRanges")
        _state["hang_ranges"] = None if hr is None else _merge(hr)
        _state["delay_read"] = float(delay.get("read") or 0) / 1000.0
        _state["delay_write"] = float(delay.get("write") or 0) / 1000.0
        _control_key = key


def _overlaps(kind, offset, count):
    starts, ends = _state[kind]
    i = bisect.bisect_left(starts, offset + count) - 1
    return i >= 0 and ends[i] > offset


def _count(name, n=1):
    with _lock:
        _stats[name] += n


def _wait_while_hung(is_write, offset=None, count=0):
    _load_control()
    if not _hung(is_write, offset, count):
        return
    _count("blocked", 1)
    try:
        while True:
            time.sleep(0.005)
            _load_control()
            if not _hung(is_write, offset, count):
                return
    finally:
        _count("blocked", -1)


def _hung(is_write, offset=None, count=0):
    h = _state["hang"]
    if not (h == "all" or (h == "writes" and is_write)):
        return False
    if _state["hang_ranges"] is None:
        return True
    return offset is not None and _overlaps("hang_ranges", offset, count)


def _fail_eio():
    nbdkit.set_error(errno.EIO)
    raise OSError(errno.EIO, "faultdisk: injected I/O error")


# ---- volatile write cache (volatile=1) --------------------------------------

_PAGE = 4096
_vlock = threading.Lock()
_vpages = {}   # page index -> bytearray(_PAGE): the cached view of that page
_vlog = []     # unflushed writes in arrival order: (offset, bytes)


def _volatile():
    return _cfg["volatile"] == "1"


def _backing_read(offset, n):
    out = bytearray(n)
    done = 0
    while done < n:
        chunk = os.pread(_fd, n - done, offset + done)
        if not chunk:  # past the end of a shorter backing file: zeros
            break
        out[done:done + len(chunk)] = chunk
        done += len(chunk)
    return out


def _backing_write(offset, data):
    # never past the exported size (the last page may be partial)
    end = min(offset + len(data), _cfg["size"])
    if end <= offset:
        return
    view = memoryview(data)[:end - offset]
    done = 0
    while done < len(view):
        done += os.pwrite(_fd, view[done:], offset + done)


def _vpage(i):
    # the cached page, filled from the backing file on first touch; the
    # backing file only changes under _vlock by persisting this cache, so
    # the copy stays right
    p = _vpages.get(i)
    if p is None:
        p = _backing_read(i * _PAGE, _PAGE)
        _vpages[i] = p
    return p


def _vwrite(offset, data):
    # with _vlock held
    n = len(data)
    pos = 0
    while pos < n:
        o = offset + pos
        i, r = divmod(o, _PAGE)
        m = min(_PAGE - r, n - pos)
        _vpage(i)[r:r + m] = data[pos:pos + m]
        pos += m
    _vlog.append((offset, bytes(data)))
    _stats["unflushedWrites"] = len(_vlog)


def _vread(buf, offset):
    # with _vlock held: backing file overlaid with cached pages
    n = len(buf)
    buf[0:n] = _backing_read(offset, n)
    first = offset // _PAGE
    last = (offset + n - 1) // _PAGE
    if len(_vpages) < last - first + 1:
        idx = [i for i in _vpages if first <= i <= last]
    else:
        idx = [i for i in range(first, last + 1) if i in _vpages]
    for i in idx:
        p = _vpages[i]
        s = max(offset, i * _PAGE)
        e = min(offset + n, (i + 1) * _PAGE)
        buf[s - offset:e - offset] = p[s - i * _PAGE:e - i * _PAGE]


def _vpersist_range(offset, count):
    # with _vlock held: write the cached view of [offset, offset+count) through
    first = offset // _PAGE
    last = (offset + count - 1) // _PAGE
    for i in range(first, last + 1):
        p = _vpages.get(i)
        if p is None:
            continue
        s = max(offset, i * _PAGE)
        e = min(offset + count, (i + 1) * _PAGE)
        _backing_write(s, p[s - i * _PAGE:e - i * _PAGE])
    os.fdatasync(_fd)


def _vflush():
    with _vlock:
        for i in sorted(_vpages):
            _backing_write(i * _PAGE, _vpages[i])
        os.fdatasync(_fd)
        _vpages.clear()
        _vlog.clear()
        _stats["unflushedWrites"] = 0


def _vpowercut(seed):
    import random
    with _vlock:
        dropped = kept = torn = 0
        if seed is not None:
            rng = random.Random(seed)
            for offset, data in _vlog:
                mode = rng.randrange(3)
                if mode == 0:
                    dropped += 1
                elif mode == 1 or len(data) <= _PAGE:
                    _backing_write(offset, data)
                    kept += 1
                else:
                    # torn: each 4 KiB piece (by its offset on the disk) or not
                    torn += 1
                    pos = 0
                    while pos < len(data):
                        m = min(_PAGE - (offset + pos) % _PAGE, len(data) - pos)
                        if rng.randrange(2):
                            _backing_write(offset + pos, data[pos:pos + m])
                        pos += m
            os.fdatasync(_fd)
        else:
            dropped = len(_vlog)
        _vpages.clear()
        _vlog.clear()
        _stats["unflushedWrites"] = 0
        _stats["powerCuts"] += 1
        return {"dropped": dropped, "kept": kept, "torn": torn}


# ---- control socket -------------------------------------------------------

def _serve_control(sock):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        try:
            conn.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            cmd = data.decode().strip()
            if cmd == "hello":
                reply = {"pid": os.getpid()}
            elif cmd == "stats":
                with _lock:
                    reply = dict(_stats)
            elif cmd == "reload":
                _load_control(force=True)
                reply = {"ok": True}
            elif cmd == "powercut" or cmd.startswith("powercut "):
                if not _volatile():
                    raise RuntimeError("powercut needs volatile=1")
                arg = cmd[len("powercut"):].strip()
                reply = _vpowercut(int(arg) if arg else None)
            else:
                reply = {"error": "unknown command: " + cmd}
            conn.sendall((json.dumps(reply) + "\n").encode())
        except Exception as e:  # keep serving whatever one client did
            try:
                conn.sendall((json.dumps({"error": str(e)}) + "\n").encode())
            except OSError:
                pass
        finally:
            conn.close()


# ---- nbdkit callbacks ------------------------------------------------------

def config(key, value):
    if key not in _cfg:
        raise RuntimeError("faultdisk: unknown parameter " + key)
    _cfg[key] = value


def config_complete():
    for k in ("file", "size", "control", "socket"):
        if _cfg[k] is None:
            raise RuntimeError("faultdisk: missing parameter " + k + "=")
    _cfg["size"] = int(_cfg["size"])
    if _cfg["volatile"] not in (None, "0", "1"):
        raise RuntimeError("faultdisk: volatile= must be 0 or 1")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


_ctl_sock = None


def get_ready():
    # Runs in nbdkit's main thread before it switches stdin/stdout to
    # /dev/null (close(0); close(1); open() twice, expecting fds 0 and 1 back),
    # which nbdkit does assuming it is still single-threaded. So no thread may
    # be started here: a thread blocked in accept() has already reserved the
    # lowest free fd in the kernel, and if it gets there between nbdkit's
    # close(0) and open("/dev/null"), it takes fd 0, open() returns 1 and
    # nbdkit dies with "open: Resource temporarily unavailable" (perror with
    # a stale errno). Bind and listen here (so bind errors fail startup, and
    # a client connecting as soon as the pidfile exists is queued in the
    # backlog); start the serving thread in after_fork.
    global _fd, _ctl_sock
    _fd = os.open(_cfg["file"], os.O_RDWR)
    _load_control(force=True)
    path = _cfg["socket"]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    _ctl_sock = sock


def after_fork():
    # nbdkit calls this after switching stdio, forking (not with -f) and
    # writing the pidfile: the place for background threads (nbdkit-plugin(3)).
    t = threading.Thread(target=_serve_control, args=(_ctl_sock,), daemon=True)
    t.start()


def open(readonly):
    return {}


def get_size(h):
    return _cfg["size"]


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    _wait_while_hung(False, offset, len(buf))
    _count("reads")
    n = len(buf)
    if _state["delay_read"] > 0:
        time.sleep(_state["delay_read"])
    if _overlaps("read", offset, n):
        _count("readErrors")
        _fail_eio()
    if _volatile():
        with _vlock:
            _vread(buf, offset)
        _count("readBytes", n)
        return
    done = 0
    while done < n:
        chunk = os.pread(_fd, n - done, offset + done)
        if not chunk:  # past the end of a shorter backing file: zeros
            buf[done:n] = bytes(n - done)
            break
        buf[done:done + len(chunk)] = chunk
        done += len(chunk)
    _count("readBytes", n)


def _write_checks(name, offset, count):
    _wait_while_hung(True, offset, count)
    _count(name)
    if _state["delay_write"] > 0:
        time.sleep(_state["delay_write"])
    if _overlaps("write", offset, count):
        _count("writeErrors")
        _fail_eio()


def _fua(flags):
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def _vwrite_fua(offset, data, flags):
    with _vlock:
        _vwrite(offset, data)
        if flags & nbdkit.FLAG_FUA:
            _vpersist_range(offset, len(data))


def pwrite(h, buf, offset, flags):
    n = len(buf)
    _write_checks("writes", offset, n)
    if _volatile():
        _vwrite_fua(offset, buf, flags)
        _count("writeBytes", n)
        return
    view = memoryview(buf)
    done = 0
    while done < n:
        done += os.pwrite(_fd, view[done:], offset + done)
    _count("writeBytes", n)
    _fua(flags)


def _write_zeros(count, offset):
    block = bytes(min(count, 1 << 20))
    done = 0
    while done < count:
        m = min(len(block), count - done)
        done += os.pwrite(_fd, block[:m], offset + done)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _punch(count, offset):
    rc = _libc.fallocate(_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                         offset, count)
    if rc != 0:
        _write_zeros(count, offset)


def zero(h, count, offset, flags):
    _write_checks("zeros", offset, count)
    if _volatile():
        _vwrite_fua(offset, bytes(count), flags)
        return
    if flags & nbdkit.FLAG_MAY_TRIM:
        _punch(count, offset)
    else:
        _write_zeros(count, offset)
    _fua(flags)


def trim(h, count, offset, flags):
    _write_checks("trims", offset, count)
    if _volatile():
        _vwrite_fua(offset, bytes(count), flags)
        return
    _punch(count, offset)
    _fua(flags)


def flush(h, flags):
    _wait_while_hung(True)
    _count("flushes")
    if _volatile():
        _vflush()
        return
    os.fdatasync(_fd)
