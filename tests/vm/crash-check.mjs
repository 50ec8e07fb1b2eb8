// tests/vm/crash-check.mjs: the checker of the crash-consistency guest test
// (guest-crash.sh). Replays the dm-log-writes log of crash-workload.mjs
// (log-writes.mjs) into images of main and spare and checks every state a
// crash could have left:
//  - the prefix of the log up to every FLUSH or FUA entry (inclusive);
//  - after each of those, DMR_CC_SUBSETS random subsets of the data entries
//    that follow it up to the next FLUSH entry (a disk may persist any subset
//    of unflushed writes), a quarter of the multi-block ones torn at 4 KiB.
// Each state (replay-main.img + replay-spare.img in WORKDIR): `remapctl
// inspect` (its function in-process for every state, the remapctl process
// itself for DMR_CC_CLI of them and the whole log) says the metadata is
// valid; the engine opens it (allowIdentityChange: the main is now a file;
// read-only, so the files stay as replayed, except for the remapctl-process
// states where it opens read-write as a restart would), counts what inspect
// counts, maps no spare block twice, and every remap acknowledged before the
// last completed flush (the last `flush-N` mark in the state) is in its
// table; every block reads back whole, holding its last durable write
// or a write issued after it (durable: acknowledged before flush N began,
// or acknowledged before mark N with FUA or as the write that remapped a
// block under an error segment, whose data and commit are synced first).
//
//   node crash-check.mjs LOGIMG WORKLOG MAINBYTES SPAREBYTES ERRBLOCKS WORKDIR [LOGBYTES]
//
// LOGBYTES: read at most this much of LOGIMG (the log file is large and
// sparse; the target's status tells how far it got).
//
// Exit 0 when every state passed. The last line printed holds the figures.
import { spawnSync } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LOG_FLUSH, LOG_FUA, applyEntry, changesData, parseLogWrites } from './log-writes.mjs';
import { openEngine } from '../../dist/src/engine/open.js';
import { allocAligned } from '../../dist/src/native/backing.js';
import { inspectPath } from '../../dist/src/cli/inspect.js';
import { FileMetaIO } from '../../dist/src/metadata/io.js';
import { loadSpare } from '../../dist/src/metadata/store.js';
import { doubleMappedSpares, reduce } from '../../dist/src/metadata/reduce.js';

const REMAPCTL = fileURLToPath(new URL('../../dist/src/cli/remapctl.js', import.meta.url));
const [logImg, workLog, mainArg, spareArg, errArg, workDir, logBytesArg] = process.argv.slice(2);
const MAIN = Number(mainArg);
const SPARE = Number(spareArg);
const BS = 4096;
const BLOCKS = MAIN / BS;
const SUBSETS = Number(process.env.DMR_CC_SUBSETS ?? 1);
const CLI_STATES = Number(process.env.DMR_CC_CLI ?? 2);
let seed = Number(process.env.DMR_CC_SEED ?? 20261125) >>> 0;
const rand = (n) => { seed = (seed * 1103515245 + 12345) >>> 0; return (seed >>> 16) % n; };
const errorBlocks = new Set((errArg ?? '').split(',').filter((x) => x !== '').map(Number));
const mainFile = join(workDir, 'replay-main.img');
const spareFile = join(workDir, 'replay-spare.img');
const t0 = Date.now();

// ------------------------------------------------------------ the workload's log
const writes = new Map();
const perBlock = Array.from({ length: BLOCKS }, () => []);
const flushStart = new Map();
const markLine = new Map();
const manual = [];
const workErrors = [];
let ended = false;
readFileSync(workLog, 'utf8').split('\n').forEach((text, i) => {
  if (text === '') return;
  const f = text.split(' ');
  switch (f[0]) {
    case 'I': {
      const w = { tag: Number(f[1]), fua: f[2] === '1', block: Number(f[3]), count: Number(f[4]), issued: i, acked: null };
      writes.set(w.tag, w);
      for (let k = 0; k < w.count; k++) perBlock[w.block + k].push(w);
      break;
    }
    case 'A': writes.get(Number(f[1])).acked = i; break;
    case 'FS': flushStart.set(Number(f[1]), i); break;
    case 'MS': markLine.set(Number(f[1]), i); break;
    case 'RA':
      manual.push({ id: Number(f[1]), line: i, results: f.slice(2).map((r) => { const [result, b, s] = r.split(':'); return { result, block: Number(b), spare: Number(s) }; }) });
      break;
    case 'END': ended = true; break;
    case 'E': case 'FE': case 'RE': workErrors.push(text); break;
    case 'FD': case 'RI': break;
    default: throw new Error(`workload log line ${i}: unknown: ${text}`);
  }
});
// The first acknowledged write to a block under an error segment is the one
// that remapped it: its data and its commit were synced before the ack.
const remappingWrite = new Map();
for (const b of errorBlocks) {
  const w = perBlock[b].find((x) => x.acked !== null);
  if (w !== undefined) remappingWrite.set(b, w);
}

// ------------------------------------------------------------ the dm-log-writes log
function readPrefix(path, max) {
  const fd = openSync(path, 'r');
  try {
    const n = Math.min(fstatSync(fd).size, max);
    const b = Buffer.alloc(n);
    let got = 0;
    while (got < n) {
      const r = readSync(fd, b, got, n - got, got);
      if (r === 0) break;
      got += r;
    }
    return b.subarray(0, got);
  } finally {
    closeSync(fd);
  }
}
const log = readPrefix(logImg, logBytesArg === undefined ? Number.MAX_SAFE_INTEGER : Number(logBytesArg));
const { sectorSize, entries } = parseLogWrites(log, { deviceBytes: MAIN + SPARE });
const count = { data: 0, flush: 0, fua: 0, marks: 0, dataBytes: 0 };
const markEntry = new Map();
for (const e of entries) {
  if (changesData(e)) { count.data++; count.dataBytes += e.length; }
  if (e.flags & LOG_FLUSH) count.flush++;
  if (e.flags & LOG_FUA) count.fua++;
  if (e.mark !== null) {
    count.marks++;
    const m = e.mark === 'ready' ? 0 : /^flush-(\d+)$/.exec(e.mark)?.[1];
    if (m !== undefined && m !== null) markEntry.set(Number(m), e.index);
  }
}
const isBase = (e) => (e.flags & (LOG_FLUSH | LOG_FUA)) !== 0;
const nextFlush = new Array(entries.length + 1).fill(entries.length);
for (let i = entries.length - 1; i >= 0; i--) nextFlush[i] = entries[i].flags & LOG_FLUSH ? i : nextFlush[i + 1];

const failures = [];
const fail = (label, msg) => { failures.push(`${label}: ${msg}`); };
// Sanity of the run itself: the test must be able to fail.
if (!ended) fail('workload', 'no END line: the workload did not finish');
for (const l of workErrors) fail('workload', `an operation failed: ${l}`);
if (count.flush === 0) fail('log', 'no FLUSH entry: flushes did not reach dm-log-writes');
if (count.fua === 0) fail('log', 'no FUA entry: FUA writes did not reach dm-log-writes');
for (const n of markLine.keys()) if (!markEntry.has(n)) fail('log', `mark ${n} was sent but is not in the log`);
if (remappingWrite.size === 0) fail('workload', 'no write hit an error segment: nothing was remapped automatically');
if (!manual.some((m) => m.results.some((r) => r.result === 'remapped'))) fail('workload', 'no manual remap');
const lastFlush = Math.max(...markEntry.keys());

// ------------------------------------------------------------ one state
const fig = { rw: 0, same: 0, prefix: 0, subsets: 0, torn: 0, preReady: 0, cli: 0, blocks: 0, blocksDurable: 0, blocksLater: 0, remapsPresent: 0, finalExact: 0, maxRemapped: 0 };
const preReady = {};

const ZERO = Buffer.alloc(BS);
const want = Buffer.alloc(BS);
const word = Buffer.alloc(4);
/** The tag a block holds: 0 (never written), -1 torn or foreign, -2 another block's data. */
function tagOf(buf, block) {
  const t = buf.readUInt32LE(0);
  if (t === 0) return buf.equals(ZERO) ? 0 : -1;
  if (buf.readUInt32LE(4) !== block) return -2;
  word.writeUInt32LE(t, 0);
  want.fill(word);
  want.writeUInt32LE(block, 4);
  return buf.equals(want) ? t : -1;
}

/** What each block may hold in a state whose last completed flush is n (the same for every state of n). */
const allowedCache = new Map();
function allowed(b, n) {
  let per = allowedCache.get(n);
  if (per === undefined) {
    per = Array.from({ length: BLOCKS }, (_, x) => allowedNow(x, n));
    allowedCache.set(n, per);
  }
  return per[b];
}
function allowedNow(b, n) {
  const fsLine = n > 0 ? flushStart.get(n) : -1;
  const msLine = markLine.get(n);
  const list = perBlock[b];
  let d = -1;
  list.forEach((w, j) => {
    if (w.acked === null) return;
    if (w.acked < fsLine || ((w.fua || remappingWrite.get(b) === w) && w.acked < msLine)) d = j;
  });
  const vals = new Set();
  if (d < 0) vals.add(0);
  for (let j = Math.max(d, 0); j < list.length; j++) vals.add(list[j].tag + (b - list[j].block));
  return { vals, durable: d >= 0 ? list[d].tag + (b - list[d].block) : null };
}

const spent = { write: 0, inspect: 0, cli: 0, open: 0, table: 0, read: 0, close: 0 };
let tick = 0;
const lap = (k) => { const now = performance.now(); spent[k] += now - tick; tick = now; };

// The replay files stay between states: only the 4 KiB chunks that differ
// from what they hold are written (`onDisk` mirrors them; null: unknown,
// write everything). Most states open the engine read-only, so it cannot
// change them; the `full` ones (the remapctl-process picks and the whole log)
// open it read-write, as a restart would, and the mirror is dropped after.
writeFileSync(mainFile, Buffer.alloc(0));
writeFileSync(spareFile, Buffer.alloc(0));
const fdMain = openSync(mainFile, 'r+');
const fdSpare = openSync(spareFile, 'r+');
let onDisk = null;
let bytesWritten = 0;
function putRange(image, from, to) {
  for (const [fd, base, end] of [[fdMain, 0, MAIN], [fdSpare, MAIN, MAIN + SPARE]]) {
    const a = Math.max(from, base);
    const b = Math.min(to, end);
    let done = 0;
    while (a + done < b) done += writeSync(fd, image, a + done, b - a - done, a + done - base);
    bytesWritten += Math.max(0, b - a);
  }
}
function syncFiles(image) {
  if (onDisk === null) {
    putRange(image, 0, image.length);
    onDisk = Buffer.from(image);
    return;
  }
  const SPAN = 64 * 1024;
  let run = -1;
  const flush = (to) => {
    if (run < 0) return;
    putRange(image, run, to);
    image.copy(onDisk, run, run, to);
    run = -1;
  };
  for (let span = 0; span < image.length; span += SPAN) {
    const spanEnd = Math.min(image.length, span + SPAN);
    if (image.compare(onDisk, span, spanEnd, span, spanEnd) === 0) { flush(span); continue; }
    for (let off = span; off < spanEnd; off += BS) {
      const differs = image.compare(onDisk, off, off + BS, off, off + BS) !== 0;
      if (differs && run < 0) run = off;
      if (!differs) flush(off);
    }
  }
  flush(image.length);
}

async function checkState(image, label, n, full) {
  tick = performance.now();
  syncFiles(image);
  lap('write');
  const r = await inspectPath(spareFile);
  lap('inspect');
  if (!r.ok) { fail(label, `remapctl inspect: metadata not valid: ${r.error?.message}`); return; }
  if (full) {
    fig.cli++;
    const p = spawnSync(process.execPath, [REMAPCTL, 'inspect', spareFile, '--json'], { encoding: 'utf8' });
    let j = null;
    try { j = JSON.parse(p.stdout); } catch { /* reported below */ }
    if (p.status !== 0 || j?.ok !== true) fail(label, `remapctl inspect exit ${p.status}: ${p.stderr.trim()}`);
    else if (JSON.stringify(j.counts) !== JSON.stringify(r.counts)) fail(label, `remapctl inspect counts ${JSON.stringify(j.counts)}, in-process ${JSON.stringify(r.counts)}`);
    lap('cli');
  }
  let engine;
  try {
    engine = await openEngine({ name: 'replay', mainPath: mainFile, sparePath: spareFile, allowIdentityChange: true, readOnly: !full, metadataTimeoutMs: 60_000 });
  } catch (e) {
    fail(label, `the engine refuses to open: ${e?.message ?? e}`);
    // what the offline view says about it
    const io = await FileMetaIO.open(spareFile, { readOnly: true });
    try {
      const dup = doubleMappedSpares(reduce((await loadSpare(io)).records));
      if (dup.length > 0) fail(label, `spare blocks mapped twice: ${dup.slice(0, 10).join(', ')}`);
    } catch (e2) {
      fail(label, `offline load: ${e2?.message ?? e2}`);
    } finally {
      await io.close();
    }
    return;
  }
  if (full) fig.rw++;
  lap('open');
  try {
    // the table the engine loaded: no spare block twice, every remap acknowledged before mark n
    const state = reduce(engine.snapshotRecords());
    const dup = doubleMappedSpares(state);
    if (dup.length > 0) fail(label, `spare blocks mapped twice: ${dup.slice(0, 10).join(', ')}`);
    const st = engine.status();
    if (st.remappedBlocks !== r.counts.remapped || st.pendingBlocks !== r.counts.pending || state.remaps.size !== r.counts.remapped) {
      fail(label, `engine counts remapped ${st.remappedBlocks} pending ${st.pendingBlocks}, inspect ${r.counts.remapped} / ${r.counts.pending}`);
    }
    const msLine = markLine.get(n);
    const mustMap = new Set();
    for (const m of manual) if (m.line < msLine) for (const x of m.results) if (x.result === 'remapped' || x.result === 'already-remapped') mustMap.add(x.block);
    for (const [b, w] of remappingWrite) if (w.acked < msLine) mustMap.add(b);
    for (const b of mustMap) {
      if (!state.remaps.has(b) || engine.lookup(b) < 0) fail(label, `block ${b}: remap acknowledged before flush ${n} completed is missing`);
      else fig.remapsPresent++;
    }
    lap('table');
    const CH = 256;
    const buf = allocAligned(CH * BS);
    for (let b0 = 0; b0 < BLOCKS; b0 += CH) {
      const nb = Math.min(CH, BLOCKS - b0);
      let ok = true;
      try { await engine.submit({ op: 'read', offset: b0 * BS, length: nb * BS, buffer: buf.subarray(0, nb * BS) }); } catch { ok = false; }
      for (let k = 0; k < nb; k++) {
        const b = b0 + k;
        const one = buf.subarray(k * BS, (k + 1) * BS);
        if (!ok) {
          try { await engine.submit({ op: 'read', offset: b * BS, length: BS, buffer: one }); } catch (e) { fail(label, `block ${b}: read fails: ${e?.message ?? e}`); continue; }
        }
        const v = tagOf(one, b);
        const a = allowed(b, n);
        fig.blocks++;
        if (!a.vals.has(v)) {
          fail(label, `block ${b} holds ${v < 0 ? (v === -1 ? 'a torn or foreign block' : 'another block\'s data') : `tag ${v}`}; allowed ${a.durable === null ? '0 or' : `${a.durable} (durable) or`} later: ${[...a.vals].filter((x) => x !== a.durable).slice(0, 6).join(',')}`);
        } else if (a.durable !== null) {
          if (v === a.durable) fig.blocksDurable++; else fig.blocksLater++;
        }
      }
    }
    lap('read');
  } finally {
    await engine.close();
    if (full) onDisk = null;
    lap('close');
  }
}

// ------------------------------------------------------------ walk the log
const bases = entries.filter(isBase).map((e) => e.index);
const readyEntry = markEntry.get(0) ?? Infinity;
// the points the walk below checks (same rule: data or a mark since the last one)
const postReady = [];
{
  let d = true;
  let lastMarkSeen = -1;
  let markAt = -1;
  for (const e of entries) {
    if (changesData(e)) d = true;
    if (e.mark !== null) markAt = e.index;
    if (!isBase(e) || e.index < readyEntry) continue;
    if (!d && markAt === lastMarkSeen) continue;
    d = false;
    lastMarkSeen = markAt;
    postReady.push(e.index);
  }
}
const cliPick = new Set();
if (postReady.length > 0) {
  cliPick.add(postReady[0]);
  for (let k = 1; k < CLI_STATES; k++) cliPick.add(postReady[Math.floor((k * (postReady.length - 1)) / Math.max(1, CLI_STATES - 1))]);
}
const image = Buffer.alloc(MAIN + SPARE);
let mark = -1;
// Negative controls (the checker must catch a lost write): DMR_CC_SABOTAGE=journal
// never applies journal blocks written after the open (as if commits were
// acknowledged without reaching the disk); =data drops every 7th write to main.
const SABOTAGE = process.env.DMR_CC_SABOTAGE ?? '';
let sabotaged = 0;
let mainWrites = 0;
function sabotage(e) {
  if (mark < 0 || !changesData(e) || e.dataPos < 0) return false;
  if (SABOTAGE === 'journal') return e.offset >= MAIN && log.toString('latin1', e.dataPos, e.dataPos + 4) === 'DRJB';
  if (SABOTAGE === 'data') return e.offset < MAIN && ++mainWrites % 7 === 0;
  return false;
}
process.stdout.write(`log: ${entries.length} entries (${count.data} writes, ${(count.dataBytes / 1048576).toFixed(1)} MiB; FLUSH ${count.flush}, FUA ${count.fua}, marks ${count.marks}), sector size ${sectorSize}; `
  + `${bases.length} FLUSH/FUA points, ${postReady.length} after the open; ${SUBSETS} random subset(s) after each\n`);
// A FLUSH/FUA point with no data applied and no mark passed since the last
// one checked is the same state (dm sends a flush to each segment's device,
// so flushes come in runs): counted, not checked again.
let dirty = true;
let checkedMark = null;
for (const e of entries) {
  if (sabotage(e)) sabotaged++; else if (applyEntry(image, log, e) > 0) dirty = true;
  if (e.mark !== null) {
    const m = e.mark === 'ready' ? 0 : /^flush-(\d+)$/.exec(e.mark)?.[1];
    if (m !== undefined && m !== null) mark = Number(m);
  }
  if (!isBase(e)) continue;
  if (!dirty && mark === checkedMark) { fig.same++; continue; }
  dirty = false;
  checkedMark = mark;
  if (mark < 0) {
    // before the engine's open returned (format in progress): nothing was promised yet; tally what inspect says
    syncFiles(image);
    const r = await inspectPath(spareFile);
    const k = r.ok ? 'valid' : r.error?.errnoName ?? 'error';
    preReady[k] = (preReady[k] ?? 0) + 1;
    fig.preReady++;
    continue;
  }
  await checkState(image, `prefix through entry ${e.index} (mark ${mark})`, mark, cliPick.has(e.index));
  fig.prefix++;
  const window = [];
  for (let j = e.index + 1; j < nextFlush[e.index + 1]; j++) if (changesData(entries[j])) window.push(entries[j]);
  if (window.length === 0) continue;
  for (let s = 0; s < SUBSETS; s++) {
    const img = Buffer.from(image);
    let kept = 0;
    let torn = 0;
    for (const w of window) {
      if (rand(2) === 0) continue;
      kept++;
      if (w.length > BS && rand(4) === 0) { torn++; applyEntry(img, log, w, () => rand(2) === 0); } else applyEntry(img, log, w);
    }
    fig.torn += torn;
    await checkState(img, `entry ${e.index} (mark ${mark}) + ${kept} of the next ${window.length} writes (${torn} torn)`, mark, false);
    fig.subsets++;
  }
}
// The last state is the whole log (the engine closed, the target torn down):
// after the final flush every acknowledged write holds exactly (the model's
// durable write of each block is its last acknowledged one, checked below).
if (mark !== lastFlush) fail('log', `the log ends at mark ${mark}, not at the final flush ${lastFlush}`);
await checkState(image, 'the whole log', mark, true);
fig.prefix++;
for (let b = 0; b < BLOCKS; b++) {
  const acked = perBlock[b].filter((w) => w.acked !== null);
  if (acked.length === 0) continue;
  const a = allowed(b, lastFlush);
  const last = acked[acked.length - 1];
  if (a.durable !== last.tag + (b - last.block)) fail('final', `block ${b}: the model's durable write ${a.durable} is not the last acknowledged ${last.tag + (b - last.block)}`);
  else fig.finalExact++;
}

const states = fig.prefix + fig.subsets;
const acked = [...writes.values()].filter((w) => w.acked !== null).length;
const manualRemapped = manual.reduce((s, m) => s + m.results.filter((x) => x.result === 'remapped').length, 0);
if (SABOTAGE !== '') process.stdout.write(`SABOTAGE ${SABOTAGE}: ${sabotaged} log entries never applied\n`);
for (const f of failures.slice(0, 25)) process.stdout.write(`FAIL ${f}\n`);
if (failures.length > 25) process.stdout.write(`... ${failures.length - 25} more failures\n`);
process.stdout.write(`time per part (s): ${Object.entries(spent).map(([k, v]) => `${k} ${(v / 1000).toFixed(1)}`).join(', ')}; replay files: ${(bytesWritten / 1048576).toFixed(0)} MiB written\n`);
process.stdout.write(`during the format (before the open returned): ${fig.preReady} FLUSH/FUA points, inspect: ${JSON.stringify(preReady)}\n`);
process.stdout.write(`crash consistency: states checked ${states} (prefixes at FLUSH/FUA points ${fig.prefix}, random subsets after them ${fig.subsets} with ${fig.torn} torn writes; `
  + `${fig.same} points repeating the state before skipped), `
  + `remapctl inspect processes ${fig.cli} (the engine opened read-write there, read-only elsewhere: ${fig.rw}); log entries ${entries.length} (FLUSH ${count.flush}, FUA ${count.fua}, marks ${count.marks}); `
  + `writes acknowledged ${acked}, flushes ${lastFlush}, remaps automatic ${remappingWrite.size} manual ${manualRemapped}; `
  + `block checks ${fig.blocks} (holding the durable write ${fig.blocksDurable}, a later one ${fig.blocksLater}), acknowledged remaps found ${fig.remapsPresent}, `
  + `final blocks exact ${fig.finalExact}; failures ${failures.length}; ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
process.exit(failures.length > 0 ? 1 : 0);
