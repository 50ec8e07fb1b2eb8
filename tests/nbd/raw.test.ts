/**
 * Hostile and unusual clients on a raw socket (node:net), the pure parsers
 * under random input, and the export's lifecycle (close with a deadline,
 * stale and live unix socket files).
 */
import { afterEach, describe, expect, it } from 'vitest';
import * as net from 'node:net';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import type { EngineRequest } from '../../src/engine/engine.js';
import type { RemapError } from '../../src/errors.js';
import { NbdExport, NbdHandshake, RequestParser, exportView, type NbdBackend } from '../../src/frontends/nbd/index.js';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NbdCmd, NbdErr, NbdOpt, NbdRep,
  decodeOptionReply, encodeInfoRequest, encodeOptionHeader, encodeRequestHeader,
} from '../../src/frontends/nbd/protocol.js';
import { startFixture, type Fixture } from './nbd-fixtures.js';

/** A socket with an exact-length reader. */
class Raw {
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  ended = false;
  readonly sock: net.Socket;
  readonly closed: Promise<void>;

  constructor(path: string) {
    this.sock = net.connect({ path });
    this.sock.on('data', (d: Buffer) => { this.buf = Buffer.concat([this.buf, d]); this.waiter?.(); });
    this.sock.on('error', () => undefined);
    this.closed = new Promise((resolve) => this.sock.once('close', () => { this.ended = true; this.waiter?.(); resolve(); }));
  }

  async read(n: number, timeoutMs = 2000): Promise<Buffer> {
    const until = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      if (Date.now() > until) throw new Error(`timeout waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 50);
        this.waiter = () => { clearTimeout(t); resolve(); };
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  write(b: Buffer): void { this.sock.write(b); }

  async optionReply(): Promise<{ option: number; replyType: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    const data = await this.read(len);
    const d = decodeOptionReply(Buffer.concat([h, data]));
    if (d === null) throw new Error('incomplete option reply');
    return { option: d.reply.option, replyType: d.reply.replyType, data };
  }

  /** Greeting, client flags, then NBD_OPT_GO on the default export. */
  async handshake(): Promise<void> {
    const g = await this.read(18);
    expect(g.readBigUInt64BE(8)).toBe(NBD_OPTS_MAGIC);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    this.write(flags);
    const go = encodeInfoRequest('', []);
    this.write(Buffer.concat([encodeOptionHeader(NbdOpt.GO, go.length), go]));
    for (;;) {
      const r = await this.optionReply();
      if (r.replyType === NbdRep.ACK) return;
      expect(r.replyType).toBe(NbdRep.INFO);
    }
  }

  async simpleReply(): Promise<{ error: number; handle: bigint }> {
    const r = await this.read(16);
    expect(r.readUInt32BE(0)).toBe(NBD_SIMPLE_REPLY_MAGIC);
    return { error: r.readUInt32BE(4), handle: r.readBigUInt64BE(8) };
  }

  close(): void { this.sock.destroy(); }
}

async function waitFor(cond: () => boolean, ms = 2000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond() && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
}

const req = (type: number, handle: number, offset: number, length: number, flags = 0): Buffer =>
  encodeRequestHeader({ type, handle: BigInt(handle), offset, length, flags });

describe('NBD export under hostile input', () => {
  let f: Fixture | null = null;
  const raws: Raw[] = [];
  afterEach(async () => {
    for (const r of raws.splice(0)) r.close();
    await f?.close();
    f = null;
  });
  const open = (path: string): Raw => { const r = new Raw(path); raws.push(r); return r; };

  it('garbage magic, a 33 MiB WRITE, a truncated frame and unknown commands never hurt the server or other connections', async () => {
    f = await startFixture({ sizeMiB: 16 });
    const healthy = open(f.sock);
    await healthy.handshake();

    // Unknown command and an over-long READ: EINVAL, framing survives.
    const a = open(f.sock);
    await a.handshake();
    a.write(req(99, 1, 0, 4096));
    expect(await a.simpleReply()).toEqual({ error: NbdErr.EINVAL, handle: 1n });
    a.write(req(NbdCmd.READ, 2, 0, 33 * 1024 * 1024));
    expect(await a.simpleReply()).toEqual({ error: NbdErr.EINVAL, handle: 2n });
    a.write(req(NbdCmd.BLOCK_STATUS, 3, 0, 4096));
    expect(await a.simpleReply()).toEqual({ error: NbdErr.EINVAL, handle: 3n });
    a.write(req(NbdCmd.FLUSH, 4, 4096, 0));
    expect(await a.simpleReply()).toEqual({ error: NbdErr.EINVAL, handle: 4n });
    a.write(req(NbdCmd.READ, 5, 0, 4096));
    expect(await a.simpleReply()).toEqual({ error: 0, handle: 5n });
    expect((await a.read(4096)).length).toBe(4096);
    // Garbage magic: framing is lost, the server hangs up.
    a.write(Buffer.alloc(28, 0x5a));
    await a.closed;

    // A WRITE announcing 33 MiB: disconnect rather than swallow it.
    const b = open(f.sock);
    await b.handshake();
    b.write(req(NbdCmd.WRITE, 7, 0, 33 * 1024 * 1024));
    b.write(Buffer.alloc(65536));
    await b.closed;

    // A truncated frame, then the client goes away.
    const c = open(f.sock);
    await c.handshake();
    c.write(req(NbdCmd.READ, 8, 0, 4096).subarray(0, 13));
    c.sock.end();
    await c.closed;

    // Garbage instead of client flags / option magic during the handshake.
    const d = open(f.sock);
    await d.read(18);
    d.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    await d.closed;

    // The connection opened first is still healthy.
    const w = Buffer.alloc(4096, 0x42);
    healthy.write(Buffer.concat([req(NbdCmd.WRITE, 10, 8192, 4096), w]));
    expect(await healthy.simpleReply()).toEqual({ error: 0, handle: 10n });
    healthy.write(req(NbdCmd.READ, 11, 8192, 4096));
    expect(await healthy.simpleReply()).toEqual({ error: 0, handle: 11n });
    expect((await healthy.read(4096)).equals(w)).toBe(true);
    await waitFor(() => f?.nbd.connectionCount() === 1);
    expect(f.nbd.connectionCount()).toBe(1);
    expect(f.logs.filter((l) => l.msg === 'protocol violation, disconnecting')).toHaveLength(2);
  });

  it('handshake: unknown options get ERR_UNSUP, long ones ERR_TOO_BIG, absurd ones a disconnect; EXPORT_NAME honours NO_ZEROES', async () => {
    f = await startFixture({ sizeMiB: 16 });
    const a = open(f.sock);
    await a.read(18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE);
    a.write(flags);
    a.write(Buffer.concat([encodeOptionHeader(200, 5), Buffer.from('hello')]));
    expect(await a.optionReply()).toMatchObject({ option: 200, replyType: NbdRep.ERR_UNSUP });
    a.write(Buffer.concat([encodeOptionHeader(NbdOpt.LIST, 100 * 1024), Buffer.alloc(100 * 1024)]));
    expect(await a.optionReply()).toMatchObject({ option: NbdOpt.LIST, replyType: NbdRep.ERR_TOO_BIG });
    a.write(encodeOptionHeader(NbdOpt.STARTTLS, 0));
    expect(await a.optionReply()).toMatchObject({ replyType: NbdRep.ERR_UNSUP });
    // Without NO_ZEROES: 8 size + 2 flags + 124 zeroes.
    a.write(Buffer.concat([encodeOptionHeader(NbdOpt.EXPORT_NAME, 5), Buffer.from('disk0')]));
    const info = await a.read(134);
    expect(Number(info.readBigUInt64BE(0))).toBe(16 * 1024 * 1024);
    expect(info.subarray(10).every((x) => x === 0)).toBe(true);
    a.write(req(NbdCmd.READ, 1, 0, 4096));
    expect(await a.simpleReply()).toEqual({ error: 0, handle: 1n });

    const b = open(f.sock);
    await b.read(18);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    b.write(flags);
    b.write(encodeOptionHeader(NbdOpt.EXPORT_NAME, 0));
    expect((await b.read(10)).readUInt16BE(8) & 1).toBe(1);
    b.write(req(NbdCmd.DISC, 2, 0, 0));
    await b.closed;

    const c = open(f.sock);
    await c.read(18);
    c.write(flags);
    c.write(encodeOptionHeader(NbdOpt.GO, 0x7fffffff));
    await c.closed;

    const d = open(f.sock);
    await d.read(18);
    d.write(flags);
    d.write(Buffer.concat([encodeOptionHeader(NbdOpt.EXPORT_NAME, 4), Buffer.from('nope')]));
    await d.closed;

    const e = open(f.sock);
    await e.read(18);
    const bad = Buffer.alloc(4);
    bad.writeUInt32BE(0x80);
    e.write(bad);
    await e.closed;
  });

  it('the pure parsers survive random input', () => {
    const backend: NbdBackend = {
      name: 'x', sizeBytes: 1 << 20, blockSize: 4096,
      capabilities: () => ({ flush: true, fua: true, discard: true, writeZeroes: true, readOnly: false }),
      submitCb: () => undefined,
    };
    const cfg = {
      lookup: (n: string) => (n === '' || n === 'x' ? { name: 'x', view: exportView(backend, false) } : null),
      list: () => [{ name: 'x', view: exportView(backend, false) }],
    };
    const chunks = fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 });
    fc.assert(fc.property(chunks, (cs) => {
      const hs = new NbdHandshake(cfg);
      hs.receive(Buffer.from([0, 0, 0, 3]));
      for (const c of cs) hs.receive(c);
      const p = new RequestParser((n) => new Uint8Array(n), 1 << 16);
      for (const c of cs) p.push(c);
    }), { numRuns: 500 });
    // Valid options with random payloads, and requests with a valid magic and random fields.
    fc.assert(fc.property(fc.integer({ min: 0, max: 20 }), fc.uint8Array({ maxLength: 40 }), (opt, data) => {
      const hs = new NbdHandshake(cfg);
      hs.receive(Buffer.from([0, 0, 0, 3]));
      const step = hs.receive(Buffer.concat([encodeOptionHeader(opt, data.length), data]));
      expect(step.out.length + (step.outcome !== undefined ? 1 : 0)).toBeGreaterThan(0);
    }), { numRuns: 500 });
    fc.assert(fc.property(fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 1 << 17 }), (type, flags, length) => {
      const p = new RequestParser((n) => new Uint8Array(n), 1 << 16);
      const h = encodeRequestHeader({ type, flags, handle: 1n, offset: 0, length });
      const ev = p.push(h);
      if (type === NbdCmd.WRITE && length > 0) {
        if (length > 1 << 16) expect(ev).toEqual([expect.objectContaining({ kind: 'fatal' })]);
        else expect(ev).toEqual([]);
      } else {
        expect(ev).toHaveLength(1);
      }
      expect(NBD_REQUEST_MAGIC).toBe(0x25609513);
    }), { numRuns: 300 });
  });
});

describe('NBD export lifecycle', () => {
  it('close(): in-flight requests past the deadline get ESHUTDOWN, new ones too; the socket file goes; within the deadline', async () => {
    let holdAll = false;
    const f = await startFixture({
      sizeMiB: 16,
      wrap: (engine): NbdBackend => ({
        name: engine.name, sizeBytes: engine.sizeBytes, blockSize: engine.blockSize,
        capabilities: () => engine.capabilities(),
        submitCb(r: EngineRequest, done: (err: RemapError | null) => void): void {
          if (holdAll) { setTimeout(() => engine.submitCb(r, done), 3000).unref(); return; }
          engine.submitCb(r, done);
        },
      }),
    });
    const a = new Raw(f.sock);
    await a.handshake();
    holdAll = true;
    a.write(req(NbdCmd.READ, 1, 0, 4096));
    await new Promise((r) => setTimeout(r, 50));
    const t0 = Date.now();
    const closing = f.nbd.close(300);
    // A request arriving while closing is refused at once.
    a.write(req(NbdCmd.READ, 2, 4096, 4096));
    const replies = [await a.simpleReply(), await a.simpleReply()];
    expect(replies).toEqual(expect.arrayContaining([{ error: NbdErr.ESHUTDOWN, handle: 1n }, { error: NbdErr.ESHUTDOWN, handle: 2n }]));
    expect(await closing).toEqual({ connectionsClosed: 1 });
    expect(Date.now() - t0).toBeLessThan(300 + 600);
    await a.closed;
    expect(existsSync(f.sock)).toBe(false);
    expect(f.nbd.connectionCount()).toBe(0);
    await f.close();
  });

  it('removes a stale socket file, refuses a live one and a non-socket', async () => {
    const f = await startFixture({ sizeMiB: 16 });
    const logger = pino({ level: 'silent' });
    // Live: the fixture's export answers on it.
    await expect(NbdExport.start({ backend: f.engine, unixPath: f.sock, logger })).rejects.toThrow(/another server is listening/);
    // Stale: a socket file nobody listens on.
    const stale = join(f.dir, 'stale.sock');
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(stale, r));
    (srv as unknown as { _handle: { close(): void } | null })._handle?.close(); // leave the file behind, as a crash would
    const e = await NbdExport.start({ backend: f.engine, unixPath: stale, logger });
    expect(e.endpoints[0]).toBe(`nbd+unix:///disk0?socket=${stale}`);
    await e.close(100);
    expect(existsSync(stale)).toBe(false);
    // Not a socket.
    const plain = join(f.dir, 'plain');
    writeFileSync(plain, 'x');
    await expect(NbdExport.start({ backend: f.engine, unixPath: plain, logger })).rejects.toThrow(/not a socket/);
    await f.close();
  });
});

describe('serveTransmission without a handshake (the kernel-client path)', () => {
  it('serves a socket already in transmission and bounds the bytes in flight when the client does not read replies', async () => {
    const f = await startFixture({ sizeMiB: 16 });
    const { serveTransmission, newStats, transmissionFlags, exportView: view } = await import('../../src/frontends/nbd/index.js');
    const stats = newStats();
    let session: ReturnType<typeof serveTransmission> | null = null;
    const path = join(f.dir, 'kernel.sock');
    const srv = net.createServer({ allowHalfOpen: true }, (s) => {
      session = serveTransmission(s, f.engine, {
        flags: transmissionFlags(view(f.engine, false), false), structuredReplies: false,
        logger: pino({ level: 'silent' }), stats, maxBytesInFlight: 1024 * 1024,
      });
    });
    await new Promise<void>((r) => srv.listen(path, r));
    const c = new Raw(path);
    c.sock.pause(); // never read: replies pile up in the socket buffers
    const burst = Buffer.concat(Array.from({ length: 2000 }, (_, i) => req(NbdCmd.READ, i + 1, 0, 65536)));
    c.sock.write(burst);
    await new Promise((r) => setTimeout(r, 500));
    // 2000 x 64 KiB = 125 MiB asked for; the server stopped reading well before.
    expect(stats.requests).toBeGreaterThan(0);
    expect(stats.requests).toBeLessThan(2000);
    c.sock.resume();
    let got = 0;
    for (let i = 0; i < 2000; i++) {
      const r = await c.simpleReply();
      expect(r.error).toBe(0);
      await c.read(65536);
      got++;
    }
    expect(got).toBe(2000);
    expect(stats.requests).toBe(2000);
    c.write(req(NbdCmd.DISC, 0, 0, 0));
    await c.closed;
    await (session as ReturnType<typeof serveTransmission> | null)?.closed;
    await new Promise<void>((r) => srv.close(() => r()));
    await f.close();
  });
});
