// Child process for the spare pool kill -9 test: opens the engine (compiled
// JS in dist/) with the extra spares given, and forever writes random
// blocks, remaps some of them by hand, and now and then adds a new extra
// spare. Log lines (synchronous writes to a file, so that nothing
// acknowledged is lost when the parent kills it): "I <block> <tag>" before a
// write, "A <block> <tag>" once acknowledged, "S <path>" before a spare add,
// "SA <path> <ordinal>" once it returned.
import { openSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { openEngine } from '../../dist/src/engine/open.js';
import { allocAligned } from '../../dist/src/native/backing.js';

const [mainPath, sparePath, blocksArg, format, seedArg, logPath, dir, extrasJson] = process.argv.slice(2);
const log = openSync(logPath, 'w');
const BS = 4096;
const blocks = Number(blocksArg);
let seed = Number(seedArg) >>> 0;
const rand = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed >>> 16; };

const engine = await openEngine({ name: 'crash', mainPath, sparePath, format: format === 'format', poolReserveBytes: 8 << 20, extraSpares: JSON.parse(extrasJson), metadataTimeoutMs: 5000 });
writeSync(1, 'READY\n');
let tag = (Number(seedArg) * 100000) >>> 0;
const busy = new Set();
async function writer() {
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
    // a manual remap of a block nobody writes meanwhile (the block is still busy)
    if (rand() % 3 === 0) await engine.remapBlocks([block]);
    busy.delete(block);
  }
}
async function adder() {
  for (let n = 0; ; n++) {
    await new Promise((r) => setTimeout(r, 5 + (rand() % 40)));
    const path = join(dir, `x-${seedArg}-${n}.img`);
    writeFileSync(path, '');
    truncateSync(path, 4096 + 8 * BS);
    if (engine.spareRoom() === 0) return; // the pool reserve is used up
    writeSync(log, `S ${path}\n`);
    const info = await engine.addSpare(path, { format: true });
    writeSync(log, `SA ${path} ${info.ordinal}\n`);
  }
}
await Promise.all([writer(), writer(), writer(), writer(), adder()]);
