// Shared by the kill -9 children (crash-child.mjs, spare-pool-crash-child.mjs):
// random single-block writes, each tagged and logged around its submission
// with synchronous writes to a log file, so that nothing acknowledged is lost
// from the log when the parent kills the child.
import { writeSync } from 'node:fs';
import { allocAligned } from '../../dist/src/native/backing.js';

export const BS = 4096;

/** A seeded LCG; the high bits (an LCG's low bits have a short period). */
export function lcg(seedArg) {
  let seed = Number(seedArg) >>> 0;
  return () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed >>> 16; };
}

/**
 * Tagged writes of random blocks, never two in flight to the same block (so
 * the parent knows a block holds its last acknowledged tag or the one in
 * flight). "I <block> <tag>" before each write, "A <block> <tag>" once
 * acknowledged; afterWrite(block) runs while the block is still reserved.
 */
export function taggedWriter(engine, log, blocks, rand, seedArg, afterWrite = async () => {}) {
  let tag = (Number(seedArg) * 100000) >>> 0;
  const busy = new Set();
  return async function writer() {
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
      await afterWrite(block);
      busy.delete(block);
    }
  };
}
