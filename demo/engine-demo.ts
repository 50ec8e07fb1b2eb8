/**
 * Engine demo on file-backed images: a main image served through nbdkit
 * (so that bad blocks can be injected at exact places) and a spare image.
 * It shows a write over bad blocks succeeding by remapping, an unreadable
 * block becoming pending, a manual remap, and the remaps surviving a reopen.
 *
 *   node dist/demo/engine-demo.js [STATE_DIR]
 */
import { mkdirSync, existsSync, truncateSync, writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { openEngine } from '../src/engine/open.js';
import type { BlockEngine } from '../src/engine/engine.js';
import { allocAligned } from '../src/native/backing.js';
import { startFaultDisk, type FaultDisk } from '../tests/helpers/faultdisk.js';

const BS = 4096;
const stateDir = process.argv[2] ?? process.env.DM_REMAPD_DEMO_DIR ?? '/var/tmp/dm-remapd-demo';
const out = (s: string): void => { process.stdout.write(s); };
const say = (s: string): void => out(`\n== ${s}\n`);

function sparse(path: string, bytes: number): void {
  if (!existsSync(path)) writeFileSync(path, '');
  truncateSync(path, bytes);
}

function fill(blocks: number, tag: number): Buffer {
  const b = allocAligned(blocks * BS);
  for (let i = 0; i < blocks; i++) b.fill((tag + i) & 0xff, i * BS, (i + 1) * BS);
  return b;
}

function showStatus(e: BlockEngine): void {
  const s = e.status();
  const rows: Array<[string, string | number]> = [
    ['device', s.name], ['state', s.state], ['size', `${s.sizeBytes} bytes`], ['block size', s.blockSize],
    ['open mode', s.openMode], ['remapped blocks', s.remappedBlocks], ['pending blocks', s.pendingBlocks],
    ['spare blocks used/total', `${s.spareBlocksUsed}/${s.spareBlocksTotal}`], ['read errors', s.stats.readErrors],
    ['write errors', s.stats.writeErrors], ['metadata seq', s.metadataSeq],
  ];
  for (const [k, v] of rows) out(`   ${k.padEnd(24)} ${v}\n`);
}

async function main(): Promise<void> {
  rmSync(stateDir, { recursive: true, force: true });
  mkdirSync(stateDir, { recursive: true });
  const mainImg = join(stateDir, 'main.img');
  const spareImg = join(stateDir, 'spare.img');
  sparse(mainImg, 1024 * 1024 * 1024);
  sparse(spareImg, 64 * 1024 * 1024);
  // Synchronous, so the JSON log lines and the narration stay in order.
  const logger = pino({ base: undefined }, pino.destination({ dest: 1, sync: true }));

  say(`main ${mainImg} (1 GiB, served through nbdkit + nbdfuse for fault injection), spare ${spareImg} (64 MiB)`);
  const disk: FaultDisk = await startFaultDisk({ dir: stateDir, name: 'main', sizeBytes: 1024 * 1024 * 1024, backingFile: mainImg });
  let engine: BlockEngine | undefined;
  try {
    engine = await openEngine({ name: 'demo', mainPath: disk.path, sparePath: spareImg, format: true, logger });
    showStatus(engine);

    say('write 16 blocks at block 1000, then make blocks 1003 and 1010 bad (reads and writes fail with EIO), and block 1014 fail writes only');
    await engine.submit({ op: 'write', offset: 1000 * BS, length: 16 * BS, buffer: fill(16, 1) });
    await disk.setBad({ read: [[1003 * BS, BS], [1010 * BS, BS]], write: [[1003 * BS, BS], [1010 * BS, BS], [1014 * BS, BS]] });

    say('read the 16 blocks: block 1003 is unreadable -> EIO, and it becomes pending');
    const r = allocAligned(16 * BS);
    const err = await engine.submit({ op: 'read', offset: 1000 * BS, length: 16 * BS, buffer: r }).catch((x: unknown) => x);
    out(`   read answered: ${err instanceof Error ? err.message : 'success'}\n`);

    say('rewrite the 16 blocks: pending blocks go straight to the spare, block 1014 is remapped on its write error, the client sees success');
    const w = fill(16, 50);
    await engine.submit({ op: 'write', offset: 1000 * BS, length: 16 * BS, buffer: w, fua: true });
    await engine.submit({ op: 'read', offset: 1000 * BS, length: 16 * BS, buffer: r });
    out(`   read back ${r.equals(w) ? 'matches' : 'DOES NOT MATCH'}; block 1003 -> spare ${engine.lookup(1003)}, block 1010 -> spare ${engine.lookup(1010)}, block 1014 -> spare ${engine.lookup(1014)}\n`);

    say('manual remap of block 42 (readable: its data is copied)');
    out(`   ${JSON.stringify(await engine.remapBlocks([42]))}\n`);
    showStatus(engine);
    const report = await engine.close();
    engine = undefined;
    out(`   closed in ${report.elapsedMs} ms\n`);

    say('reopen from the spare alone: every remap is still there');
    engine = await openEngine({ name: 'demo', mainPath: disk.path, sparePath: spareImg, logger });
    await engine.submit({ op: 'read', offset: 1000 * BS, length: 16 * BS, buffer: r });
    out(`   read back after reopen ${r.equals(w) ? 'matches' : 'DOES NOT MATCH'}\n`);
    showStatus(engine);
  } finally {
    if (engine !== undefined) await engine.close();
    await disk.stop();
  }
  say(`done; images are in ${stateDir}`);
}

main().catch((err: unknown) => {
  out(`demo failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exitCode = 1;
});
