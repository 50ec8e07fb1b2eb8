// Child process for the kill -9 test: opens the engine (compiled JS in dist/)
// and writes random blocks forever. It prints "I <block> <tag>" before each
// write is submitted and "A <block> <tag>" once it was acknowledged, with
// synchronous writes to a log file so that nothing acknowledged is lost from the
// log when the parent kills it.
import { openSync, writeSync } from 'node:fs';
import { openEngine } from '../../dist/src/engine/open.js';
import { allocAligned } from '../../dist/src/native/backing.js';

const [mainPath, sparePath, blocksArg, format, seedArg, logPath] = process.argv.slice(2);
// A regular file: writeSync never returns EAGAIN (a pipe can), and what was
// written survives the kill in the page cache.
const log = openSync(logPath, 'w');
const BS = 4096;
const blocks = Number(blocksArg);
let seed = Number(seedArg) >>> 0;
// the high bits: an LCG's low bits have a short period
const rand = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed >>> 16; };

const engine = await openEngine({ name: 'crash', mainPath, sparePath, format: format === 'format', metadataTimeoutMs: 5000 });
writeSync(1, 'READY\n');
let tag = (Number(seedArg) * 100000) >>> 0;
const QD = 8;
// No two writes to the same block are in flight at once, so the parent knows
// the block holds either the last acknowledged tag or the one in flight.
const busy = new Set();
async function worker() {
  for (;;) {
    let block = rand() % blocks;
    while (busy.has(block)) block = rand() % blocks;
    busy.add(block);
    const t = ++tag;
    const buf = allocAligned(BS);
    for (let i = 0; i < BS; i += 4) buf.writeUInt32LE(t, i);
    buf.writeUInt32LE(block, 4);
    writeSync(log, `I ${block} ${t}\n`);
    await engine.submit({ op: 'write', offset: block * BS, length: BS, buffer: buf });
    writeSync(log, `A ${block} ${t}\n`);
    busy.delete(block);
  }
}
await Promise.all(Array.from({ length: QD }, worker));
