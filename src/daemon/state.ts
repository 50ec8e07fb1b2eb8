/**
 * `<stateDir>/devices.json`: the devices to reassemble at start. Written
 * atomically (temp file, fsync, rename, fsync of the folder).
 */
import { open, readFile, rename, unlink } from 'node:fs/promises';
import { mkdirTree } from './mkdir.js';
import { join } from 'node:path';
import { ControlError } from './protocol.js';

export interface DeviceSpec {
  name: string;
  /** Absolute path of the main device or image. */
  main: string;
  /** Absolute path of a separate spare... */
  spare?: string;
  /** ...or the size of a reserved tail region of main, in bytes. */
  spareTailBytes?: number;
  /** Spare pool: absolute paths of the extra spares, in the order they were added (spare 1, 2, ...). */
  spares?: string[];
  /** Spare pool, at format only: metadata room for this many bytes of extra spares. */
  poolReserveBytes?: number;
  blockSize?: number;
  metadataTimeoutMs?: number;
  /** Kept, so that a main replaced on purpose is still accepted at the next start. */
  allowIdentityChange?: boolean;
  readOnly?: boolean;
  nbdUnix?: string;
  nbdTcp?: { host: string; port: number };
  /** Attach the kernel NBD client: '/dev/nbdN' or 'auto'. */
  nbdDevice?: string;
  /** Serve the device as /dev/ublkbN (docs/UBLK.md). */
  ublk?: boolean;
  /** With ublk: hardware queues asked of the kernel (1..UBLK_MAX_QUEUES; default 1; the kernel caps them at its CPU count). */
  ublkQueues?: number;
  /** With ublk: tags per queue (1..UBLK_MAX_DEPTH; default 128). */
  ublkDepth?: number;
  description?: string;
}

/** Limits of `ublkQueues` and `ublkDepth` (docs/UBLK.md "Queues"); the kernel's queue depth limit is UBLK_MAX_QUEUE_DEPTH = 4096. */
export const UBLK_MAX_QUEUES = 16;
export const UBLK_MAX_DEPTH = 4096;
export const UBLK_DEFAULT_QUEUES = 1;
export const UBLK_DEFAULT_DEPTH = 128;

interface StateFileV1 {
  version: 1;
  devices: DeviceSpec[];
}

export const STATE_FILE = 'devices.json';

function isSpec(v: unknown): v is DeviceSpec {
  if (typeof v !== 'object' || v === null) return false;
  const s = v as Record<string, unknown>;
  return typeof s.name === 'string' && typeof s.main === 'string'
    && (typeof s.spare === 'string' || typeof s.spareTailBytes === 'number')
    && (s.spares === undefined || (Array.isArray(s.spares) && s.spares.every((p) => typeof p === 'string')));
}

export class StateFile {
  readonly path: string;
  private chain: Promise<void> = Promise.resolve();

  constructor(readonly dir: string) {
    this.path = join(dir, STATE_FILE);
  }

  /** The remembered devices; [] when the file does not exist. Throws ControlError on a corrupt file. */
  async load(): Promise<DeviceSpec[]> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return [];
      throw e;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (e) {
      throw new ControlError('INTERNAL', `${this.path} is not valid JSON: ${(e as Error).message}`);
    }
    const f = parsed as Partial<StateFileV1>;
    if (typeof f !== 'object' || f === null || f.version !== 1 || !Array.isArray(f.devices)) {
      throw new ControlError('INTERNAL', `${this.path}: expected {"version": 1, "devices": [...]}`);
    }
    const out: DeviceSpec[] = [];
    f.devices.forEach((d, i) => {
      if (!isSpec(d)) throw new ControlError('INTERNAL', `${this.path}: devices[${i}] is not a device (needs name, main, and spare or spareTailBytes)`);
      out.push(d);
    });
    return out;
  }

  /** Writes the list atomically; concurrent saves are serialized (the last one wins). */
  save(devices: DeviceSpec[]): Promise<void> {
    const body: StateFileV1 = { version: 1, devices };
    const text = `${JSON.stringify(body, null, 2)}\n`;
    const next = this.chain.then(() => this.write(text));
    this.chain = next.catch(() => undefined);
    return next;
  }

  private async write(text: string): Promise<void> {
    mkdirTree(this.dir, 0o755);
    const tmp = `${this.path}.tmp-${process.pid}`;
    const fh = await open(tmp, 'w', 0o644);
    try {
      await fh.writeFile(text, 'utf8');
      await fh.sync();
    } catch (e) {
      await fh.close();
      await unlink(tmp).catch(() => undefined);
      throw e;
    }
    await fh.close();
    await rename(tmp, this.path);
    const dh = await open(this.dir, 'r');
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  }
}
