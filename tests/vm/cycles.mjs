// tests/vm/cycles.mjs (guest): rapid add/remove cycles of one device through
// a single control client (node start-up over 9p costs seconds per remapctl
// call, so the loop runs in one process), with I/O in every cycle:
//   add (ublk or kernel NBD) -> the previous cycle's 64 KiB reads back -> a new
//   64 KiB pattern written (O_DIRECT, fsync) and read back -> remove.
// The daemon's fd count, thread count (io_uring workers "iou-*" counted apart:
// they come and go on their own) and RSS are printed after a warm-up and at
// the end, and must stay flat.
//
//   node cycles.mjs SOCKET ublk|nbd COUNT DAEMON_PID WORKDIR
// Prints "RESULT name PASS|FAIL detail" lines; exits with the failure count.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';

const [sock, kind, countText, pidText, dir] = process.argv.slice(2);
const { request } = await import(new URL('../../dist/src/cli/client.js', import.meta.url).href);
const count = Number(countText);
const dpid = Number(pidText);
const WARMUP = 3;
const RM_TIMEOUT = 5000;
let fails = 0;
const pass = (name, detail = '') => console.log(`RESULT ${name} PASS ${detail}`);
const fail = (name, detail = '') => {
  console.log(`RESULT ${name} FAIL ${detail}`);
  fails++;
};

function stats() {
  const fds = readdirSync(`/proc/${dpid}/fd`).length;
  let threads = 0;
  let iou = 0;
  for (const t of readdirSync(`/proc/${dpid}/task`)) {
    let comm = '';
    try {
      comm = readFileSync(`/proc/${dpid}/task/${t}/comm`, 'utf8').trim();
    } catch {
      continue; // exited meanwhile
    }
    if (comm.startsWith('iou-')) iou++;
    else threads++;
  }
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${dpid}/status`, 'utf8'))?.[1] ?? NaN);
  return { fds, threads, iou, rssKb };
}
const show = (s) => `fds ${s.fds} threads ${s.threads} (+${s.iou} io_uring workers) rss ${(s.rssKb / 1024).toFixed(1)} MiB`;

const main = `${dir}/cyc-main.img`;
const spare = `${dir}/cyc-spare.img`;
writeFileSync(main, '');
writeFileSync(spare, '');
truncateSync(main, 64 << 20);
truncateSync(spare, 16 << 20);
const CHUNK = 65536;
const SLOTS = (64 << 20) / CHUNK;

function dd(args, input) {
  return execFileSync('dd', [...args, 'status=none'], { input, maxBuffer: 4 << 20 });
}

let prev = null; // { slot, data } written by the previous cycle
async function cycle(i) {
  const args = { name: 'cyc', main, spare, format: true };
  if (kind === 'ublk') args.ublk = true;
  else args.nbdDevice = 'auto';
  const st = await request(sock, 'add', args, 60_000);
  const dev = st.exports.find((e) => /^\/dev\/(ublkb|nbd)\d+$/.test(e));
  if (dev === undefined) throw new Error(`cycle ${i}: add printed no kernel device (${st.exports.join(',')})`);
  if (prev !== null) {
    const back = dd([`if=${dev}`, `bs=${CHUNK}`, `skip=${prev.slot}`, 'count=1', 'iflag=direct']);
    if (!back.equals(prev.data)) throw new Error(`cycle ${i}: the data of cycle ${i - 1} (slot ${prev.slot}) did not survive remove + add on ${dev}`);
  }
  const slot = (i * 7) % SLOTS;
  const data = randomBytes(CHUNK);
  writeFileSync(`${dir}/cyc.pat`, data);
  dd([`if=${dir}/cyc.pat`, `of=${dev}`, `bs=${CHUNK}`, `seek=${slot}`, 'oflag=direct', 'conv=fsync']);
  const back = dd([`if=${dev}`, `bs=${CHUNK}`, `skip=${slot}`, 'count=1', 'iflag=direct']);
  if (!back.equals(data)) throw new Error(`cycle ${i}: 64 KiB written to ${dev} slot ${slot} read back different`);
  prev = { slot, data };
  const r = await request(sock, 'remove', { name: 'cyc', timeoutMs: RM_TIMEOUT }, RM_TIMEOUT + 10_000);
  if (r.timedOut) throw new Error(`cycle ${i}: remove of ${dev} timed out (${r.elapsedMs} ms): ${r.cancelled.join('; ')}`);
  return { dev, removeMs: r.elapsedMs };
}

const t0 = performance.now();
let i = 0;
let maxRemove = 0;
const devs = new Set();
try {
  for (; i < WARMUP; i++) await cycle(i);
  const start = stats();
  console.log(`CYCLES start (after ${WARMUP} warm-up cycles): ${show(start)}`);
  const tLoop = performance.now();
  for (let k = 0; k < count; k++, i++) {
    const c = await cycle(i);
    devs.add(c.dev);
    maxRemove = Math.max(maxRemove, c.removeMs);
    if ((k + 1) % 10 === 0) console.log(`CYCLES ${k + 1}/${count} ${((performance.now() - tLoop) / 1000).toFixed(1)}s ${show(stats())}`);
  }
  const loopS = (performance.now() - tLoop) / 1000;
  // the last control connection may still be closing in the daemon
  await new Promise((r) => setTimeout(r, 300));
  const end = stats();
  console.log(`CYCLES end: ${show(end)}`);
  pass(`${kind}-cycles`, `${count} add/remove cycles with I/O in ${loopS.toFixed(1)}s (${(loopS / count).toFixed(2)}s each, slowest remove ${maxRemove} ms, devices ${[...devs].join(',')})`);
  // +2: a control connection or an io_uring worker's fd may be in transit; a leak grows with the cycles
  end.fds <= start.fds + 2 ? pass(`${kind}-cycles-fds-flat`, `${start.fds} -> ${end.fds}`) : fail(`${kind}-cycles-fds-flat`, `${start.fds} -> ${end.fds}`);
  end.threads <= start.threads ? pass(`${kind}-cycles-threads-flat`, `${start.threads} -> ${end.threads}`) : fail(`${kind}-cycles-threads-flat`, `${start.threads} -> ${end.threads}`);
  const rssLimit = start.rssKb + Math.max(32 * 1024, start.rssKb / 4);
  end.rssKb <= rssLimit
    ? pass(`${kind}-cycles-rss-flat`, `${start.rssKb} -> ${end.rssKb} kB (limit ${Math.round(rssLimit)})`)
    : fail(`${kind}-cycles-rss-flat`, `${start.rssKb} -> ${end.rssKb} kB (limit ${Math.round(rssLimit)})`);
} catch (e) {
  fail(`${kind}-cycles`, `after ${i} cycles: ${e instanceof Error ? e.message : String(e)}`);
}
console.log(`CYCLES total ${((performance.now() - t0) / 1000).toFixed(1)}s`);
process.exit(fails);
