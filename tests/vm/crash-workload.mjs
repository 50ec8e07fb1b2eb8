// tests/vm/crash-workload.mjs: the workload of the crash-consistency guest
// test (guest-crash.sh). Runs the engine (dist/) on a main and a spare that
// are dm-linear segments of one dm-log-writes target, so that the log orders
// every write of both; main has dm `error` segments, so writes remap.
//
//   node crash-workload.mjs MAIN SPARE WORKLOG WRITES SEED LOGDM ERRBLOCKS
//
// The run is sized by work, not time (the guest's speed varies tenfold with
// the host's load): it stops after WRITES acknowledged writes.
//
// ERRBLOCKS: comma-separated main blocks (4 KiB) under `error` segments; the
// manual remapper leaves them alone (reading them would only make them
// pending). Workers write random extents of 1 to 4 blocks (1 in 16 with FUA;
// no block in two writes at once), each block filled with the u32 tag+k and
// its block number at byte 4. FUA goes only to blocks whose earlier writes
// were all acknowledged before a completed flush began: dm-log-writes logs a
// FUA write when it completes but a plain one only at the next flush, so a
// plain write still unflushed when a FUA write to the same block completes
// would come after it in the log, and a replay would put the older data on
// top. A flusher flushes after every 10-50 acknowledged writes; a remapper
// remaps 1 or 2 random blocks by hand (engine.remapBlocks) after every 20-70.
// After each completed flush a dm-log-writes mark `flush-N` goes into the
// log (`dmsetup message LOGDM 0 mark flush-N`), after the open `ready`.
// Everything is logged to WORKLOG, one line each, synchronously:
//   I <tag> <fua 0|1> <block> <count> / A <tag> / E <tag> <msg>   a write
//   FS <n> / FD <n> / FE <n> <msg>                                a flush
//   MS <n>                     just before mark n goes in (0 = ready)
//   RI <id> <block>... / RA <id> <result>:<block>:<spare>... / RE <id> <msg>
//   END <remapped> <pending>   after the final flush, mark and close
import { execFile } from 'node:child_process';
import { openSync, writeSync } from 'node:fs';
import { promisify } from 'node:util';
import { openEngine } from '../../dist/src/engine/open.js';
import { allocAligned } from '../../dist/src/native/backing.js';

const run = promisify(execFile);
const [mainPath, sparePath, logPath, writesArg, seedArg, logDm, errArg] = process.argv.slice(2);
const log = openSync(logPath, 'w');
const line = (s) => writeSync(log, `${s}\n`);
const BS = 4096;
let seed = Number(seedArg) >>> 0;
const rand = (n) => { seed = (seed * 1103515245 + 12345) >>> 0; return (seed >>> 16) % n; };
const errorBlocks = new Set((errArg ?? '').split(',').filter((x) => x !== '').map(Number));

async function mark(n) {
  line(`MS ${n}`);
  await run('dmsetup', ['message', logDm, '0', 'mark', n === 0 ? 'ready' : `flush-${n}`]);
}

// A small journal (16 blocks a copy) makes checkpoints happen during the run.
const engine = await openEngine({ name: 'cc', mainPath, sparePath, format: true, journalBytes: 64 * 1024, metadataTimeoutMs: 60_000 });
const blocks = engine.status().sizeBytes / BS;
await mark(0);
process.stdout.write(`workload: ${blocks} blocks, ${errorBlocks.size} under error segments, ${writesArg} writes\n`);

const WRITES = Number(writesArg);
let stop = false;
// waiters on the number of acknowledged writes
const waiters = [];
function afterWrites(n) {
  return new Promise((resolve) => { if (writes >= n || stop) resolve(); else waiters.push({ n, resolve }); });
}
function wake() {
  for (let i = waiters.length - 1; i >= 0; i--) {
    if (writes >= waiters[i].n || stop) { waiters[i].resolve(); waiters.splice(i, 1); }
  }
}
let tag = 1;
const busy = new Set();
// event clock: when each block's last write was acknowledged, and when the
// latest completed flush began (FUA only where the first is before the second)
let clock = 0;
const ackedAt = new Float64Array(blocks).fill(-2); // never written: FUA allowed
let flushedBefore = -1;
let writes = 0;
let errors = 0;

async function worker() {
  while (!stop) {
    const count = 1 + (rand(3) === 0 ? rand(4) : 0);
    let block = rand(blocks - count + 1);
    const free = (b) => { for (let k = 0; k < count; k++) if (busy.has(b + k)) return false; return true; };
    while (!free(block)) block = rand(blocks - count + 1);
    for (let k = 0; k < count; k++) busy.add(block + k);
    const t = tag;
    tag += count;
    let fua = rand(16) === 0;
    for (let k = 0; k < count && fua; k++) if (ackedAt[block + k] >= flushedBefore) fua = false;
    const buf = allocAligned(count * BS);
    for (let k = 0; k < count; k++) {
      const v = buf.subarray(k * BS, (k + 1) * BS);
      for (let i = 0; i < BS; i += 4) v.writeUInt32LE(t + k, i);
      v.writeUInt32LE(block + k, 4);
    }
    line(`I ${t} ${fua ? 1 : 0} ${block} ${count}`);
    try {
      await engine.submit({ op: 'write', offset: block * BS, length: count * BS, buffer: buf, fua });
      line(`A ${t}`);
      clock++;
      for (let k = 0; k < count; k++) ackedAt[block + k] = clock;
      writes++;
      if (writes >= WRITES) stop = true;
      wake();
    } catch (e) {
      line(`E ${t} ${String(e?.message ?? e).replace(/\n/g, ' ')}`);
      errors++;
      if (errors > 20) { stop = true; wake(); }
    }
    for (let k = 0; k < count; k++) busy.delete(block + k);
  }
}

let flushN = 0;
async function flushOnce() {
  const n = ++flushN;
  line(`FS ${n}`);
  const began = ++clock;
  try {
    await engine.submit({ op: 'flush', offset: 0, length: 0 });
    line(`FD ${n}`);
    flushedBefore = Math.max(flushedBefore, began);
  } catch (e) {
    line(`FE ${n} ${String(e?.message ?? e).replace(/\n/g, ' ')}`);
    errors++;
    return;
  }
  await mark(n);
}
async function flusher() {
  while (!stop) {
    await afterWrites(writes + 10 + rand(41));
    if (!stop) await flushOnce();
  }
}

let remapId = 0;
async function remapper() {
  while (!stop) {
    await afterWrites(writes + 20 + rand(51));
    if (stop) break;
    const want = [];
    const n = 1 + rand(2);
    while (want.length < n) {
      const b = rand(blocks);
      if (!errorBlocks.has(b) && !want.includes(b)) want.push(b);
    }
    const id = ++remapId;
    line(`RI ${id} ${want.join(' ')}`);
    try {
      const res = await engine.remapBlocks(want);
      line(`RA ${id} ${res.map((r) => `${r.result}:${r.block}:${r.spare ?? -1}`).join(' ')}`);
    } catch (e) {
      line(`RE ${id} ${String(e?.message ?? e).replace(/\n/g, ' ')}`);
      errors++;
    }
  }
}

await Promise.all([worker(), worker(), worker(), worker(), flusher(), remapper()]);
// Everything acknowledged so far must be in the final state: one last flush and mark.
await flushOnce();
const st = engine.status();
const report = await engine.close();
line(`END ${st.remappedBlocks} ${st.pendingBlocks}`);
process.stdout.write(`workload: ${writes} writes acknowledged, ${errors} errors, ${flushN} flushes, ${remapId} manual remap calls, `
  + `remapped ${st.remappedBlocks}, pending ${st.pendingBlocks}, metadata seq ${st.metadataSeq}; close ${report.elapsedMs} ms synced=${report.synced}\n`);
process.exit(errors > 0 ? 1 : 0);
