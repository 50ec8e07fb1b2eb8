// Child process of power-loss.test.ts: opens the engine (compiled JS in
// dist/) on a main and a spare with volatile write caches, writes random
// extents of 1 to 4 blocks (some with FUA) from a few workers, and flushes
// now and then, until the parent kills it. Everything it does is logged,
// with synchronous writes to a log file (a regular file on the host: it
// survives the kill, and the simulated power cut is only of the disks):
//   I <tag> <fua 0|1> <block> <count>   before a write is submitted
//                                       (block k of it carries tag + k)
//   A <tag>                              the write was acknowledged
//   E <tag> <message>                    the write failed
//   FS <n> / FD <n>                      a flush started / completed
//   FE <n> <message>                     a flush failed
import { openSync, writeSync } from 'node:fs';
import { openEngine } from '../../dist/src/engine/open.js';
import { allocAligned } from '../../dist/src/native/backing.js';

const [mainPath, sparePath, blocksArg, format, seedArg, logPath] = process.argv.slice(2);
const log = openSync(logPath, 'w');
const BS = 4096;
const blocks = Number(blocksArg);
let seed = Number(seedArg) >>> 0;
// the high bits: an LCG's low bits have a short period
const rand = (n) => { seed = (seed * 1103515245 + 12345) >>> 0; return (seed >>> 16) % n; };

const engine = await openEngine({ name: 'powerloss', mainPath, sparePath, format: format === 'format', metadataTimeoutMs: 10_000 });
writeSync(1, 'READY\n');
// tags are unique across cycles: the parent gives each child its own range
let tag = Number(seedArg) * 1_000_000;
const QD = 6;
// No block is in two writes in flight at once, so a block's writes form a
// sequence the parent can reason about.
const busy = new Set();
async function worker() {
  for (;;) {
    const count = 1 + (rand(4) === 0 ? rand(4) : 0);
    let block = rand(blocks - count + 1);
    const free = (b) => { for (let k = 0; k < count; k++) if (busy.has(b + k)) return false; return true; };
    while (!free(block)) block = rand(blocks - count + 1);
    for (let k = 0; k < count; k++) busy.add(block + k);
    const t = tag;
    tag += count;
    // rare: on FUSE a FUA write is an fdatasync, which persists every cached write
    const fua = rand(64) === 0;
    const buf = allocAligned(count * BS);
    for (let k = 0; k < count; k++) {
      const v = buf.subarray(k * BS, (k + 1) * BS);
      for (let i = 0; i < BS; i += 4) v.writeUInt32LE(t + k, i);
      v.writeUInt32LE(block + k, 4);
    }
    writeSync(log, `I ${t} ${fua ? 1 : 0} ${block} ${count}\n`);
    try {
      await engine.submit({ op: 'write', offset: block * BS, length: count * BS, buffer: buf, fua });
      writeSync(log, `A ${t}\n`);
    } catch (e) {
      writeSync(log, `E ${t} ${String(e?.message ?? e).replace(/\n/g, ' ')}\n`);
    }
    for (let k = 0; k < count; k++) busy.delete(block + k);
  }
}
async function flusher() {
  for (let n = 1; ; n++) {
    await new Promise((r) => setTimeout(r, 20 + rand(200)));
    writeSync(log, `FS ${n}\n`);
    try {
      await engine.submit({ op: 'flush', offset: 0, length: 0 });
      writeSync(log, `FD ${n}\n`);
    } catch (e) {
      writeSync(log, `FE ${n} ${String(e?.message ?? e).replace(/\n/g, ' ')}\n`);
    }
  }
}
await Promise.all([...Array.from({ length: QD }, worker), flusher()]);
