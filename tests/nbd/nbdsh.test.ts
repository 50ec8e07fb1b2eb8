/**
 * The export driven by libnbd (python bindings, as nbdsh uses them): every
 * command and flag, every error case, the handshake options, structured
 * replies with DF, out-of-order replies and multi-conn.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import type { EngineRequest } from '../../src/engine/engine.js';
import type { RemapError } from '../../src/errors.js';
import type { NbdBackend } from '../../src/frontends/nbd/index.js';
import { have, nbdPython, startFixture, SYSTEM_PYTHON, type Fixture } from './nbd-fixtures.js';

const ok = have('nbdsh') && existsSync(SYSTEM_PYTHON);

describe.skipIf(!ok)('NBD export via libnbd (nbdsh)', () => {
  let f: Fixture | null = null;
  afterEach(async () => {
    await f?.close();
    f = null;
  });

  it('serves every command and flag, and answers each error case with the spec errno', async () => {
    f = await startFixture({ sizeMiB: 16 });
    const r = await nbdPython(`
h = nbd.NBD()
h.connect_uri(URI)
r = {}
r['structured'] = h.get_structured_replies_negotiated()
size = h.get_size()
data = os.urandom(65536)
h.pwrite(data, 4096)
r['read_back'] = h.pread(65536, 4096) == data
h.pwrite(data, 131072, nbd.CMD_FLAG_FUA)
r['fua_read_back'] = h.pread(65536, 131072) == data
h.flush()
h.zero(65536, 4096)
r['zeroed'] = h.pread(65536, 4096) == bytes(65536)
h.pwrite(data, 4096)
h.zero(8192, 4096, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
r['zero_no_hole'] = h.pread(8192, 4096) == bytes(8192) and h.pread(65536 - 8192, 4096 + 8192) == data[8192:]
r['fast_zero'] = err_of(h.zero, 4096, 4096 + 16384, nbd.CMD_FLAG_FAST_ZERO)
r['fast_zero_left_data'] = h.pread(4096, 4096 + 16384) == data[16384:16384 + 4096]
h.trim(65536, 131072)
h.trim(4096, 131072, nbd.CMD_FLAG_FUA)
h.cache(65536, 0)
chunks = []
def chunk(buf, off, status, err):
    chunks.append([off, len(buf), status, bytes(buf) == data])
    return 0
h.pwrite(data, 409600)
got = bytearray(65536)
h.pread_structured(65536, 409600, chunk, nbd.CMD_FLAG_DF)
r['df_chunks'] = chunks
h.set_strict_mode(0)
r['read_past_end'] = err_of(h.pread, 8192, size - 4096)
r['read_beyond_size'] = err_of(h.pread, 4096, size)
r['write_past_end'] = err_of(h.pwrite, bytes(8192), size - 4096)
r['zero_past_end'] = err_of(h.zero, 8192, size - 4096)
r['trim_past_end'] = err_of(h.trim, 8192, size - 4096)
r['cache_past_end'] = err_of(h.cache, 8192, size - 4096)
r['read_misaligned_offset'] = err_of(h.pread, 4096, 512)
r['read_misaligned_length'] = err_of(h.pread, 1000, 0)
r['write_misaligned'] = err_of(h.pwrite, bytes(512), 4096)
r['zero_misaligned'] = err_of(h.zero, 512, 4096)
r['read_zero_length'] = err_of(h.pread, 0, 0)
r['read_too_big'] = err_of(h.pread, 33 * 1024 * 1024, 0)
r['read_bad_flag'] = err_of(h.pread, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
r['still_serving'] = h.pread(65536, 409600) == data
h.shutdown()
print(json.dumps(r))
`, f);
    expect(r).toEqual({
      structured: true,
      read_back: true,
      fua_read_back: true,
      zeroed: true,
      zero_no_hole: true,
      fast_zero: 'ENOTSUP',
      fast_zero_left_data: true,
      df_chunks: [[409600, 65536, 1, true]],
      read_past_end: 'EINVAL',
      read_beyond_size: 'EINVAL',
      write_past_end: 'ENOSPC',
      zero_past_end: 'ENOSPC',
      trim_past_end: 'ENOSPC',
      cache_past_end: 'EINVAL',
      read_misaligned_offset: 'EINVAL',
      read_misaligned_length: 'EINVAL',
      write_misaligned: 'EINVAL',
      zero_misaligned: 'EINVAL',
      read_zero_length: 'EINVAL',
      read_too_big: 'EINVAL',
      read_bad_flag: 'EINVAL',
      still_serving: true,
    });
    // The operator sees each failure with its handle, offset, length and errno.
    const failed = f.logs.filter((l) => l.msg === 'request failed');
    expect(failed.length).toBeGreaterThanOrEqual(14);
    expect(failed.find((l) => l.errno === 'ENOSPC' && l.cmd === 'write')).toMatchObject({ offset: 16 * 1024 * 1024 - 4096, length: 8192 });
    expect(failed.every((l) => typeof l.handle === 'string' && l.device === 'disk0')).toBe(true);
    expect(f.nbd.stats()).toMatchObject({ connections: 1, bytesWritten: 4 * 65536 });
  });

  it('answers with simple replies when structured replies are not negotiated', async () => {
    f = await startFixture({ sizeMiB: 16 });
    const r = await nbdPython(`
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(URI)
data = os.urandom(8192)
h.pwrite(data, 8192)
r = {'structured': h.get_structured_replies_negotiated(), 'can_df': h.can_df()}
r['read_back'] = h.pread(8192, 8192) == data
h.set_strict_mode(0)
r['read_past_end'] = err_of(h.pread, 8192, h.get_size())
r['after_error'] = h.pread(8192, 8192) == data
h.shutdown()
print(json.dumps(r))
`, f);
    expect(r).toEqual({ structured: false, can_df: false, read_back: true, read_past_end: 'EINVAL', after_error: true });
  });

  it('handshake: OPT_LIST lists the export, OPT_INFO gives every field, unknown names are refused, "" is the device', async () => {
    f = await startFixture({ sizeMiB: 16, description: 'spinning rust, 3 bad blocks' });
    const r = await nbdPython(`
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(URI)
names = []
h.opt_list(lambda n, d: names.append([n, d]))
h.set_export_name(NAME)
h.opt_info()
info = {'size': h.get_size(), 'min': h.get_block_size(nbd.SIZE_MINIMUM), 'preferred': h.get_block_size(nbd.SIZE_PREFERRED),
        'max': h.get_block_size(nbd.SIZE_MAXIMUM), 'description': h.get_export_description(),
        'name': h.get_canonical_export_name(), 'ro': h.is_read_only(), 'flush': h.can_flush(), 'multi_conn': h.can_multi_conn()}
h.set_export_name('no-such-disk')
unknown_info = err_of(h.opt_info)
unknown_go = err_of(h.opt_go)
h.set_export_name('')
h.opt_go()
default = {'size': h.get_size(), 'name': h.get_canonical_export_name(), 'read': len(h.pread(4096, 0))}
h.shutdown()
print(json.dumps({'names': names, 'info': info, 'unknown_info': unknown_info, 'unknown_go': unknown_go, 'default': default}))
`, f);
    expect(r).toEqual({
      names: [['disk0', 'spinning rust, 3 bad blocks']],
      info: {
        size: 16 * 1024 * 1024, min: 4096, preferred: 4096, max: 32 * 1024 * 1024,
        description: 'spinning rust, 3 bad blocks', name: 'disk0', ro: false, flush: true, multi_conn: true,
      },
      unknown_info: expect.stringMatching(/^(ENOENT|EINVAL|ERR)/),
      unknown_go: expect.stringMatching(/^(ENOENT|EINVAL|ERR)/),
      default: { size: 16 * 1024 * 1024, name: 'disk0', read: 4096 },
    });
  });

  it('a read-only export refuses writes, trims and zeroes with EPERM and still serves reads', async () => {
    f = await startFixture({ sizeMiB: 16, readOnly: true });
    const r = await nbdPython(`
h = nbd.NBD()
h.connect_uri(URI)
r = {'ro': h.is_read_only(), 'can_trim': h.can_trim(), 'can_zero': h.can_zero(), 'can_fua': h.can_fua()}
r['client_side'] = err_of(h.pwrite, bytes(4096), 0)
h.set_strict_mode(0)
r['write'] = err_of(h.pwrite, bytes(4096), 0)
r['trim'] = err_of(h.trim, 4096, 0)
r['zero'] = err_of(h.zero, 4096, 0)
r['read'] = len(h.pread(4096, 0))
h.shutdown()
print(json.dumps(r))
`, f);
    expect(r).toEqual({ ro: true, can_trim: false, can_zero: false, can_fua: false, client_side: 'EPERM', write: 'EPERM', trim: 'EINVAL', zero: 'EINVAL', read: 4096 });
    // The server itself refused the write (not only libnbd).
    expect(f.logs.some((l) => l.msg === 'request failed' && l.cmd === 'write' && l.errno === 'EPERM')).toBe(true);
  });

  it('replies out of order: a later request on the same connection is answered first', async () => {
    const held: Array<{ offset: number; at: number }> = [];
    f = await startFixture({
      sizeMiB: 16,
      wrap: (engine): NbdBackend => ({
        name: engine.name,
        sizeBytes: engine.sizeBytes,
        blockSize: engine.blockSize,
        capabilities: () => engine.capabilities(),
        submitCb(req: EngineRequest, done: (err: RemapError | null) => void): void {
          // Hold anything touching the first 64 KiB for 300 ms.
          if (req.op === 'read' && req.offset < 65536) {
            held.push({ offset: req.offset, at: Date.now() });
            setTimeout(() => engine.submitCb(req, done), 300);
            return;
          }
          engine.submitCb(req, done);
        },
      }),
    });
    const r = await nbdPython(`
h = nbd.NBD()
h.connect_uri(URI)
order = []
def done(tag):
    def cb(err):
        order.append([tag, time.time()])
        return 1
    return cb
b1 = nbd.Buffer(4096)
b2 = nbd.Buffer(4096)
t0 = time.time()
h.aio_pread(b1, 0, completion=done('slow'))
h.aio_pread(b2, 1048576, completion=done('fast'))
while h.aio_in_flight() > 0:
    h.poll(-1)
print(json.dumps({'order': [o[0] for o in order], 'fast_ms': (order[0][1] - t0) * 1000, 'slow_ms': (order[1][1] - t0) * 1000}))
`, f) as { order: string[]; fast_ms: number; slow_ms: number };
    expect(held).toHaveLength(1);
    expect(r.order).toEqual(['fast', 'slow']);
    expect(r.fast_ms).toBeLessThan(250);
    expect(r.slow_ms).toBeGreaterThanOrEqual(280);
  });

  it('multi-conn: two connections at once, a FLUSH on one covers writes completed on the other', async () => {
    f = await startFixture({ sizeMiB: 16, tcp: true });
    const tcpUri = f.nbd.endpoints[1];
    const r = await nbdPython(`
h1 = nbd.NBD(); h1.connect_uri(URI)
h2 = nbd.NBD(); h2.connect_uri(${JSON.stringify(tcpUri)})
a = os.urandom(65536); b = os.urandom(65536)
h1.pwrite(a, 0)
h2.flush()
h2.pwrite(b, 65536)
h1.flush()
r = {'multi': h1.can_multi_conn() and h2.can_multi_conn(), 'a_on_2': h2.pread(65536, 0) == a, 'b_on_1': h1.pread(65536, 65536) == b}
# interleaved concurrent traffic on both
bufs = []
for i in range(32):
    d = os.urandom(4096)
    (h1 if i % 2 else h2).aio_pwrite(d, 131072 + i * 4096)
    bufs.append(d)
while h1.aio_in_flight() > 0 or h2.aio_in_flight() > 0:
    if h1.aio_in_flight() > 0: h1.poll(-1)
    if h2.aio_in_flight() > 0: h2.poll(-1)
h1.flush()
r['concurrent'] = h2.pread(32 * 4096, 131072) == b''.join(bufs)
h1.shutdown(); h2.shutdown()
print(json.dumps(r))
`, f);
    expect(r).toEqual({ multi: true, a_on_2: true, b_on_1: true, concurrent: true });
    expect(f.nbd.stats().connections).toBe(2);
    expect(f.logs.filter((l) => l.msg === 'handshake complete').map((l) => l.client)).toEqual(['unix', expect.stringMatching(/^127\.0\.0\.1:/)]);
  });
});
