/**
 * `<stateDir>/ublk/<name>.json`: the kernel ublk device a daemon serves for a
 * device, so that the next daemon (after kill -9 or a stop) can find it
 * again: recover it (USER_RECOVERY) or delete it (docs/UBLK.md, "Crash
 * recovery"). Written after ADD_DEV and after a recovery, removed after
 * DEL_DEV. Written atomically (temp file, fsync, rename).
 */
import { open, readFile, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { mkdirTree } from '../../daemon/mkdir.js';

export interface UblkRecord {
  /** The kernel's device id: /dev/ublkbN, /dev/ublkcN. */
  devId: number;
  /** UBLK_F_* the device was added with (as ADD_DEV answered). */
  flags: number;
  /** The server that started or recovered it (GET_DEV_INFO's ublksrv_pid). */
  pid: number;
  queues: number;
  depth: number;
  maxIoBytes: number;
  /** The engine's geometry the device was started with (its params cannot change). */
  sizeBytes: number;
  blockSize: number;
  readOnly: boolean;
}

const INT_FIELDS = ['devId', 'flags', 'pid', 'queues', 'depth', 'maxIoBytes', 'sizeBytes', 'blockSize'] as const;

/** A record from JSON text, or null when the text is not one (never throws). */
export function parseUblkRecord(text: string): UblkRecord | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return null;
  const o = v as Record<string, unknown>;
  if (o.version !== 1) return null;
  for (const k of INT_FIELDS) {
    const x = o[k];
    if (typeof x !== 'number' || !Number.isSafeInteger(x)) return null;
  }
  if (typeof o.readOnly !== 'boolean') return null;
  const r: UblkRecord = {
    devId: o.devId as number, flags: o.flags as number, pid: o.pid as number, queues: o.queues as number,
    depth: o.depth as number, maxIoBytes: o.maxIoBytes as number, sizeBytes: o.sizeBytes as number,
    blockSize: o.blockSize as number, readOnly: o.readOnly,
  };
  // The kernel's limits: ids below 2^20 (MINORBITS), at most 4096 queues of 4096 tags.
  if (r.devId < 0 || r.devId >= 1 << 20 || r.queues < 1 || r.queues > 4096 || r.depth < 1 || r.depth > 4096
    || r.maxIoBytes < 1 || r.sizeBytes < 0 || r.blockSize < 512 || r.flags < 0) return null;
  return r;
}

export function formatUblkRecord(r: UblkRecord): string {
  return `${JSON.stringify({ version: 1, ...r }, null, 2)}\n`;
}

export class UblkRecordStore {
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'ublk');
  }

  pathOf(name: string): string {
    return join(this.dir, `${name}.json`);
  }

  /** The record of device `name`; null when there is none or it is unreadable (the caller logs). */
  async load(name: string): Promise<{ record: UblkRecord | null; error?: string }> {
    let text: string;
    try {
      text = await readFile(this.pathOf(name), 'utf8');
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return { record: null };
      return { record: null, error: `${this.pathOf(name)}: ${(e as Error).message}` };
    }
    const record = parseUblkRecord(text);
    return record === null ? { record, error: `${this.pathOf(name)} is not a ublk device record` } : { record };
  }

  async save(name: string, r: UblkRecord): Promise<void> {
    mkdirTree(this.dir, 0o755);
    const path = this.pathOf(name);
    const tmp = `${path}.tmp-${process.pid}`;
    const fh = await open(tmp, 'w', 0o644);
    try {
      await fh.writeFile(formatUblkRecord(r), 'utf8');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  }

  async remove(name: string): Promise<void> {
    await unlink(this.pathOf(name)).catch((e: unknown) => {
      if ((e as { code?: string }).code !== 'ENOENT') throw e;
    });
  }
}
