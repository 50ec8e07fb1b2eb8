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
import { BS, lcg, taggedWriter } from './crash-writes.mjs';

const [mainPath, sparePath, blocksArg, format, seedArg, logPath, dir, extrasJson] = process.argv.slice(2);
const log = openSync(logPath, 'w');
const blocks = Number(blocksArg);
const rand = lcg(seedArg);

const engine = await openEngine({ name: 'crash', mainPath, sparePath, format: format === 'format', poolReserveBytes: 8 << 20, extraSpares: JSON.parse(extrasJson), metadataTimeoutMs: 5000 });
writeSync(1, 'READY\n');
// a manual remap of a block nobody writes meanwhile (the block is still reserved), for one write in three
const writer = taggedWriter(engine, log, blocks, rand, seedArg, async (block) => {
  if (rand() % 3 === 0) await engine.remapBlocks([block]);
});
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
