import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { allocAligned } from '../../src/native/backing.js';
import { openEngine, type OpenEngineOptions } from '../../src/engine/open.js';
import type { BlockEngine } from '../../src/engine/engine.js';
import { FileMetaIO } from '../../src/metadata/io.js';
import { loadSpare } from '../../src/metadata/store.js';
import { reduce, doubleMappedSpares } from '../../src/metadata/reduce.js';

export const BS = 4096;

/** A temp folder on a real disk (O_DIRECT), not tmpfs. */
export function tempDir(prefix: string): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join('/var/tmp', `dmr-${prefix}-`));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export function sparseFile(path: string, bytes: number): string {
  writeFileSync(path, '');
  truncateSync(path, bytes);
  return path;
}

/** Block-sized aligned buffer filled with a recognisable pattern. */
export function pattern(blocks: number, seed: number): Buffer {
  const b = allocAligned(blocks * BS);
  for (let i = 0; i < blocks; i++) {
    const v = b.subarray(i * BS, (i + 1) * BS);
    v.fill((seed * 31 + i * 7) & 0xff);
    v.writeUInt32LE(seed >>> 0, 0);
    v.writeUInt32LE(i, 4);
  }
  return b;
}

export function randomBlocks(blocks: number): Buffer {
  const b = allocAligned(blocks * BS);
  b.set(randomBytes(blocks * BS));
  return b;
}

export async function readBack(engine: BlockEngine, offset: number, length: number): Promise<Buffer> {
  const b = allocAligned(length);
  await engine.submit({ op: 'read', offset, length, buffer: b });
  return b;
}

/** Collects the JSON log lines of an engine, for assertions on what the operator sees. */
export function captureLogger(): { logger: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino({ level: 'debug' }, { write: (s: string) => { lines.push(JSON.parse(s) as Record<string, unknown>); } });
  return { logger, lines };
}

export async function open(o: Partial<OpenEngineOptions> & Pick<OpenEngineOptions, 'mainPath'>): Promise<BlockEngine> {
  return openEngine({ name: 'test', metadataTimeoutMs: 2000, ...o });
}

/** Offline view of a spare: the reduced state and any spare block mapped twice. */
export async function offlineState(sparePath: string, opts: { areaOffset?: number; areaBytes?: number } = {}) {
  const io = await FileMetaIO.open(sparePath, { readOnly: true });
  try {
    const m = await loadSpare(io, opts);
    const state = reduce(m.records);
    return { metadata: m, state, doubleMapped: doubleMappedSpares(state) };
  } finally {
    await io.close();
  }
}
