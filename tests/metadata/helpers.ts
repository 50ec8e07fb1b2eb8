import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { FileMetaIO, type MetaIO } from '../../src/metadata/io.js';
import { formatSpare, loadSpare, type FormatOptions, type LoadedMetadata } from '../../src/metadata/store.js';
import { RecordType, type MetaRecord } from '../../src/metadata/records.js';
import { ERRNO, RemapError } from '../../src/errors.js';

export function tempDir(tag: string): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join('/var/tmp', `dm-remapd-meta-${tag}-`));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export const IDENTITY = {
  main: { kind: 'file' as const, sizeBytes: 1 << 30, dev: 2049, ino: 12345, stableId: '' },
  name: 'test0',
};

/** A small area: 1 MiB, 64 KiB journals, so that wrap-around is quick. */
export async function freshSpare(
  path: string,
  opts: Partial<FormatOptions> & { fileBytes?: number } = {},
): Promise<{ io: FileMetaIO; loaded: LoadedMetadata }> {
  const fileBytes = opts.fileBytes ?? 1 << 20;
  const io = await FileMetaIO.open(path, { create: fileBytes });
  await formatSpare(io, {
    areaOffset: 0,
    areaBytes: fileBytes,
    blockSize: 4096,
    identity: IDENTITY,
    journalBytes: 64 * 1024,
    ...opts,
  });
  return { io, loaded: await loadSpare(io) };
}

export const remap = (logical: number, spare: number, dataCrc = 0): MetaRecord => ({ type: RecordType.REMAP, logical, spare, dataCrc });
export const pendingAdd = (logical: number): MetaRecord => ({ type: RecordType.PENDING_ADD, logical, spare: 0, dataCrc: 0 });
export const quarantine = (spare: number): MetaRecord => ({ type: RecordType.QUARANTINE, logical: 0, spare, dataCrc: 0 });

/** Wraps a MetaIO: can hold writes (they land when released), count operations, or capture writes without applying them. */
export class TestIO implements MetaIO {
  hold = false;
  capture = false;
  held: { offset: number; data: Uint8Array; resolve: () => void; reject: (e: unknown) => void }[] = [];
  captured: { offset: number; data: Uint8Array }[] = [];
  writes: { offset: number; length: number }[] = [];
  syncs = 0;
  holdSync = false;
  /** When set, writes fail with this errno. */
  failWrites: number | undefined;
  private heldSyncs: (() => void)[] = [];

  constructor(readonly inner: MetaIO) {}
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  describe(): string {
    return `test(${this.inner.describe()})`;
  }
  read(offset: number, length: number): Promise<Uint8Array> {
    return this.inner.read(offset, length);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    this.writes.push({ offset, length: data.length });
    const copy = data.slice();
    if (this.failWrites !== undefined) return Promise.reject(new RemapError(this.failWrites, 'injected write error', { device: this.describe(), op: 'metadata-write', offset }));
    if (this.capture) {
      this.captured.push({ offset, data: copy });
      return Promise.resolve();
    }
    if (this.hold) return new Promise<void>((resolve, reject) => this.held.push({ offset, data: copy, resolve, reject }));
    return this.inner.write(offset, copy);
  }
  sync(): Promise<void> {
    this.syncs++;
    if (this.capture) return Promise.resolve();
    if (this.holdSync) return new Promise<void>((r) => this.heldSyncs.push(r));
    return this.inner.sync();
  }
  /** Lets the held writes land (in order), then resolves them. */
  async release(): Promise<void> {
    const h = this.held;
    this.held = [];
    for (const w of h) {
      await this.inner.write(w.offset, w.data);
      w.resolve();
    }
    await this.inner.sync();
    const s = this.heldSyncs;
    this.heldSyncs = [];
    for (const r of s) r();
  }
}

export function timeoutCount(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'Timeout' || r === 'Immediate').length;
}

/** The RemapError `p` rejects with; fails the test when it resolves or rejects with anything else. */
export async function rejection(p: Promise<unknown>): Promise<RemapError> {
  try {
    await p;
  } catch (e) {
    if (!(e instanceof RemapError)) throw new Error(`expected a RemapError, got ${String(e)}`);
    return e;
  }
  throw new Error('expected a rejection');
}

/** Passes the first `limit` writes through; then "crashes": that write and every later write or sync throws, nothing lands. */
export class CrashIO implements MetaIO {
  writes = 0;
  crashed = false;
  constructor(
    readonly inner: MetaIO,
    readonly limit: number,
  ) {}
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  describe(): string {
    return this.inner.describe();
  }
  read(offset: number, length: number): Promise<Uint8Array> {
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.crashed || this.writes >= this.limit) {
      this.crashed = true;
      throw new RemapError(ERRNO.EIO, 'crashed (test)', { device: this.describe(), op: 'metadata-write', offset });
    }
    this.writes++;
    await this.inner.write(offset, data);
  }
  async sync(): Promise<void> {
    if (this.crashed) throw new RemapError(ERRNO.EIO, 'crashed (test)', { device: this.describe(), op: 'metadata-sync' });
    await this.inner.sync();
  }
}
