/**
 * npm run bench:nbd [-- --json] [-- --profile]
 *
 * One run, compared within itself (shared machines are noisy): fio's nbd
 * engine over a unix socket against
 *   dm-remapd        the real daemon (node dist/src/daemon/main.js), device added with remapctl
 *   nbdkit cache=none  nbdkit's file plugin, cache=none
 *   nbdkit (cache)   nbdkit's file plugin, default page cache
 *   qemu-nbd         --cache=none --aio=io_uring (native aio if io_uring fails to start)
 * and raw fio (io_uring, O_DIRECT) on the file as the ceiling, run first and
 * again at the end (drift control); then the ceiling peer, bench/nbd-ceiling.c
 * (compiled with gcc at start; skipped with a note if gcc or liburing-dev is
 * missing): the least NBD server, sleeping between completions and
 * busy-polling, i.e. what any NBD server can reach here with this client.
 * Same file for all; caches dropped (sync; echo 3 > /proc/sys/vm/drop_caches)
 * before each fio run.
 *
 * Environment: BENCH_SECONDS (per workload, default 5), BENCH_FILE_GB (file,
 * default 2), BENCH_RAMP_SECONDS (untimed warm-up per workload, default 1),
 * BENCH_NBD_JOBS (fio jobs for the 4k random workloads, default 1; QD32 is
 * split as iodepth=32/jobs per job, one NBD connection per job),
 * BENCH_DAEMON_LOG_LEVEL (default info, the production default).
 * --profile: the daemon runs under node --cpu-prof; the top self-time
 * functions are printed (its figures then include the profiler's cost).
 * Files live in a temp folder under /var/tmp, removed at the end, on errors and on Ctrl-C.
 */
import os from 'node:os';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fillFile, fioVersion, runFio, type FioJob, type FioResult } from './fio.js';
import {
  buildCeiling, nbdkitVersion, processCpuSeconds, profileFiles, qemuNbdVersion, startCeiling, startDmRemapd, startNbdkit, startQemuNbd,
  type DmRemapdServer, type NbdServer,
} from './nbd-servers.js';
import { summarizeProfiles } from './nbd-profile.js';
import { fmt, fmtInt, fmtRatio, makeTempDir, removeTempDir, table, verdict, MiB, GiB, envNumber } from './util.js';


const SECONDS = envNumber('BENCH_SECONDS', 5, 1);
const FILE_BYTES = Math.floor((envNumber('BENCH_FILE_GB', 2, 0.0625) * GiB) / MiB) * MiB;
const RAMP = envNumber('BENCH_RAMP_SECONDS', 1, 0);
const JOBS = Math.floor(envNumber('BENCH_NBD_JOBS', 1, 1));
const LOG_LEVEL = process.env.BENCH_DAEMON_LOG_LEVEL || 'info';
const SPARE_BYTES = 256 * MiB;
const JSON_OUT = process.argv.includes('--json');
const PROFILE = process.argv.includes('--profile');
const ROOT = join(new URL('.', import.meta.url).pathname, '..', '..');

interface NbdWorkload {
  label: string;
  rw: FioJob['rw'];
  bs: number;
  /** Total queue depth = iodepth x numjobs. */
  iodepth: number;
  numjobs: number;
}

if (32 % JOBS !== 0) throw new Error(`BENCH_NBD_JOBS=${JOBS}: must divide 32`);
const WORKLOADS: NbdWorkload[] = [
  { label: 'randread 4k QD32', rw: 'randread', bs: 4096, iodepth: 32 / JOBS, numjobs: JOBS },
  { label: 'randwrite 4k QD32', rw: 'randwrite', bs: 4096, iodepth: 32 / JOBS, numjobs: JOBS },
  { label: 'seqread 1M QD4', rw: 'read', bs: MiB, iodepth: 4, numjobs: 1 },
  { label: 'seqwrite 1M QD4', rw: 'write', bs: MiB, iodepth: 4, numjobs: 1 },
];

type TargetId = 'raw' | 'dmr' | 'nbdkitNone' | 'nbdkitCache' | 'qemu' | 'rawAgain' | 'ceilSleep' | 'ceilSpin';

interface Measurement {
  fio: FioResult;
  /** Server CPU over the whole fio invocation, in cores (1.0 = one CPU busy); NaN for raw fio. */
  serverCores: number;
  /** serverCores spread over the measured IOPS, µs of server CPU per I/O. */
  serverUsPerIo: number;
  cachesDropped: boolean;
}

const t0All = Date.now();
function progress(msg: string): void {
  process.stderr.write(`[${((Date.now() - t0All) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`);
}

let dropWarned = false;
function dropCaches(): boolean {
  spawnSync('sync');
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch (err) {
    if (!dropWarned) {
      dropWarned = true;
      process.stderr.write(`warning: cannot drop caches (${err instanceof Error ? err.message : String(err)}); figures include warm caches\n`);
    }
    return false;
  }
}

function perSec(w: NbdWorkload, r: FioResult): string {
  return w.bs >= MiB ? `${fmt(r.bytesPerSec / MiB, 0)} MiB/s` : `${fmtInt(r.iops)} IOPS`;
}

async function measure(w: NbdWorkload, job: Omit<FioJob, 'rw' | 'bs' | 'iodepth' | 'numjobs' | 'sizeBytes' | 'seconds' | 'rampSeconds'>, out: string, serverCpu?: () => number): Promise<Measurement> {
  const cachesDropped = dropCaches();
  const c0 = serverCpu !== undefined ? serverCpu() : NaN;
  const w0 = performance.now();
  const fio = await runFio(
    { ...job, rw: w.rw, bs: w.bs, iodepth: w.iodepth, numjobs: w.numjobs, sizeBytes: FILE_BYTES, seconds: SECONDS, rampSeconds: RAMP },
    out,
  );
  const wallS = (performance.now() - w0) / 1000;
  const c1 = serverCpu !== undefined ? serverCpu() : NaN;
  const serverCores = (c1 - c0) / wallS;
  return { fio, serverCores, serverUsPerIo: (serverCores * 1e6) / fio.iops, cachesDropped };
}

interface Goal {
  name: string;
  goal: string;
  value: string;
  pass: boolean;
}

async function main(): Promise<void> {
  const dir = makeTempDir('dm-remapd-nbd-bench');
  const file = join(dir, 'main.img');
  const spare = join(dir, 'spare.img');
  const out = join(dir, 'fio.json');
  const fioVer = await fioVersion();
  const results = new Map<TargetId, Measurement[]>();
  const labels = new Map<TargetId, string>();
  const commands: string[] = [];
  const notes: string[] = [];
  let dmrStatus: Record<string, unknown> | undefined;
  let dmrProfileFiles: string[] = [];

  console.log('dm-remapd NBD export benchmark (one run; compare figures within this run only)');
  console.log(
    `host: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Linux ${os.release()}, node ${process.version}; ${fioVer}, ${nbdkitVersion()}, ${qemuNbdVersion()}\n` +
      `file: ${fmt(FILE_BYTES / GiB, 2)} GiB, written once (fio, sequential, O_DIRECT) in ${dir} (removed at the end); dm-remapd spare: separate ${SPARE_BYTES / MiB} MiB file\n` +
      `per workload: ${RAMP} s untimed warm-up + ${SECONDS} s timed; caches dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every fio run\n` +
      `QD: 4k random QD32 = fio iodepth=${32 / JOBS} x numjobs=${JOBS}` +
      `${JOBS === 1 ? ' (one NBD connection)' : ` (${JOBS} NBD connections)`}; 1M sequential QD4 = iodepth=4 x numjobs=1; fio --thread --norandommap --randrepeat=0 (BENCH_NBD_JOBS)\n` +
      `clients: NBD targets via fio --ioengine=nbd --uri=nbd+unix:///?socket=...; raw via fio --ioengine=io_uring --direct=1 on the file` +
      (PROFILE ? '\nPROFILING: the daemon runs under node --cpu-prof; its figures include the profiler overhead' : ''),
  );

  const ceiling = buildCeiling(dir);
  console.log(
    ceiling.bin !== undefined
      ? `ceiling peer: bench/nbd-ceiling.c built (${ceiling.command})`
      : `note: ceiling peer skipped, ${ceiling.note ?? '?'} (${ceiling.command}); its rows and ratios are left out`,
  );

  progress(`writing the ${fmt(FILE_BYTES / GiB, 2)} GiB file and the ${SPARE_BYTES / MiB} MiB spare once`);
  const f0 = performance.now();
  const fill = await fillFile(file, FILE_BYTES, out);
  await fillFile(spare, SPARE_BYTES, out, true);
  console.log(`file written in ${fmt((performance.now() - f0) / 1000, 1)} s (${fmt(fill.bytesPerSec / MiB, 0)} MiB/s)`);

  const runRaw = async (id: TargetId, label: string): Promise<void> => {
    labels.set(id, label);
    const ms: Measurement[] = [];
    for (const w of WORKLOADS) {
      progress(`${label.padEnd(30)} ${w.label}`);
      ms.push(await measure(w, { ioengine: 'io_uring', filename: file, direct: true }, out));
    }
    results.set(id, ms);
  };

  const runServer = async (id: TargetId, start: () => Promise<NbdServer>): Promise<NbdServer> => {
    const srv = await start();
    labels.set(id, srv.label);
    commands.push(`${srv.label}: ${srv.command}`);
    notes.push(...srv.notes);
    try {
      const ms: Measurement[] = [];
      for (const w of WORKLOADS) {
        progress(`${srv.label.padEnd(30)} ${w.label}`);
        ms.push(await measure(w, { ioengine: 'nbd', uri: srv.uri }, out, srv.cpuSeconds ?? (() => processCpuSeconds(srv.pid))));
      }
      results.set(id, ms);
      if (id === 'dmr') dmrStatus = (srv as DmRemapdServer).status();
    } finally {
      await srv.stop();
    }
    return srv;
  };

  await runRaw('raw', 'raw fio io_uring O_DIRECT');
  const dmr = (await runServer('dmr', () => startDmRemapd(dir, file, spare, { profile: PROFILE, logLevel: LOG_LEVEL }))) as DmRemapdServer;
  if (dmr.profileDir !== undefined) dmrProfileFiles = profileFiles(dmr.profileDir);
  await runServer('nbdkitNone', () => startNbdkit(dir, file, true));
  await runServer('nbdkitCache', () => startNbdkit(dir, file, false));
  await runServer('qemu', () => startQemuNbd(dir, file, Math.max(2, JOBS)));
  await runRaw('rawAgain', 'raw fio again (drift control)');
  const ceilingBin = ceiling.bin;
  if (ceilingBin !== undefined) {
    await runServer('ceilSleep', () => startCeiling(dir, ceilingBin, file, false));
    await runServer('ceilSpin', () => startCeiling(dir, ceilingBin, file, true));
  }

  const order: TargetId[] = ['raw', 'dmr', 'nbdkitNone', 'nbdkitCache', 'qemu', 'rawAgain', ...(ceilingBin !== undefined ? (['ceilSleep', 'ceilSpin'] as const) : [])];
  const get = (id: TargetId, i: number): Measurement => (results.get(id) as Measurement[])[i];
  /** IOPS of a target over another's, or NaN when one of them did not run (ceiling skipped). */
  const ratio = (a: TargetId, b: TargetId, i: number): number =>
    results.has(a) && results.has(b) ? get(a, i).fio.iops / get(b, i).fio.iops : NaN;

  console.log('\nservers:');
  for (const c of commands) console.log(`  ${c}`);
  for (const n of notes) console.log(`  note: ${n}`);
  const openMode = dmrStatus !== undefined ? String(dmrStatus.openMode ?? '?') : '?';
  console.log(
    `open modes: dm-remapd openMode=${openMode} (engine O_DIRECT on main and spare); raw fio direct=1; qemu-nbd --cache=none = O_DIRECT; ` +
      'nbdkit cache=none is not O_DIRECT (it evicts what it read/wrote from the page cache); nbdkit default = page cache' +
      (ceiling.bin !== undefined ? '; nbd-ceiling O_DIRECT' : ''),
  );

  for (const [i, w] of WORKLOADS.entries()) {
    console.log(`\n== ${w.label} (fio ${w.rw} bs=${w.bs >= MiB ? `${w.bs / MiB}M` : `${w.bs / 1024}k`} iodepth=${w.iodepth} numjobs=${w.numjobs})`);
    console.log(
      table(
        ['target', 'IOPS', 'MiB/s', 'clat p50', 'clat p99', 'fio CPU µs/IO', 'server CPU', 'server CPU µs/IO'],
        order.map((id) => {
          const m = get(id, i);
          return [
            labels.get(id) ?? id, fmtInt(m.fio.iops), fmt(m.fio.bytesPerSec / MiB, 0), `${fmt(m.fio.clatP50Us, 0)} µs`, `${fmt(m.fio.clatP99Us, 0)} µs`,
            fmt(m.fio.cpuUsPerIo, 1), Number.isFinite(m.serverCores) ? `${fmt(m.serverCores * 100, 0)}%` : '-', fmt(m.serverUsPerIo, 1),
          ];
        }),
      ),
    );
  }
  console.log(
    '\n   fio CPU µs/IO: usr+sys of fio\'s job thread(s). server CPU: usr+sys of the whole server process (all threads) over the fio run\n' +
      '   (warm-up and connect included), as % of one CPU; server CPU µs/IO = that / IOPS. Client and server share the same CPUs.',
  );

  const goals: Goal[] = [];
  console.log('\n== Ratios (dm-remapd / peer, same workload; raw = the first raw fio run)');
  console.log(
    table(
      ['workload', 'dm-remapd', '/ nbdkit none', 'goal >= 2x', '/ raw fio', 'goal >= 0.9x', '/ nbdkit cache', '/ qemu-nbd', 'raw again/raw', 'ceiling sleep / raw', 'dm-remapd / ceiling sleep'],
      WORKLOADS.map((w, i) => {
        const d = get('dmr', i).fio;
        const rNone = d.iops / get('nbdkitNone', i).fio.iops;
        const rRaw = d.iops / get('raw', i).fio.iops;
        const okNone = rNone >= 2;
        const okRaw = rRaw >= 0.9;
        goals.push({ name: `${w.label}: dm-remapd / nbdkit cache=none`, goal: '>= 2.00x', value: fmtRatio(rNone), pass: okNone });
        goals.push({ name: `${w.label}: dm-remapd / raw fio`, goal: '>= 0.90x', value: fmtRatio(rRaw), pass: okRaw });
        return [
          w.label, perSec(w, d), fmtRatio(rNone), verdict(okNone), fmtRatio(rRaw), verdict(okRaw),
          fmtRatio(d.iops / get('nbdkitCache', i).fio.iops), fmtRatio(d.iops / get('qemu', i).fio.iops),
          fmtRatio(get('rawAgain', i).fio.iops / get('raw', i).fio.iops),
          fmtRatio(ratio('ceilSleep', 'raw', i)), fmtRatio(ratio('dmr', 'ceilSleep', i)),
        ];
      }),
    ),
  );
  console.log('   / nbdkit cache and / qemu-nbd are reported, not goals. raw again/raw: how far the disk itself drifted during the run.');
  console.log(
    ceilingBin !== undefined
      ? '   ceiling (reported, not goals): bench/nbd-ceiling.c, the least NBD server (a process per connection, one thread, io_uring for socket and file,\n' +
          '   batched out-of-order simple replies) under the same fio nbd client: ceiling sleep / raw = what the socket hop and wake-ups leave of raw;\n' +
          `   busy-polling (burns a core) reaches ${WORKLOADS.map((w, i) => `${w.label.split(' ')[0]} ${fmtRatio(ratio('ceilSpin', 'raw', i))}`).join(', ')} of raw.`
      : `   ceiling columns: - (ceiling peer skipped: ${ceiling.note ?? '?'})`,
  );

  if (dmrStatus !== undefined) {
    const s = dmrStatus;
    const stats = typeof s.stats === 'object' && s.stats !== null ? (s.stats as Record<string, unknown>) : {};
    console.log(
      `\ndm-remapd after its runs: state ${String(s.state)}, openMode ${openMode}, ${fmtInt(Number(stats.reads))} reads, ${fmtInt(Number(stats.writes))} writes, ` +
        `read errors ${String(s.readErrors)}, write errors ${String(s.writeErrors)}, remapped ${String(s.remappedBlocks)}, connections ${String(s.connections)}`,
    );
  }

  if (dmrProfileFiles.length > 0) {
    const p = summarizeProfiles(dmrProfileFiles, ROOT, 20);
    const busy = p.totalMs - p.idleMs;
    console.log(`\n== dm-remapd main-thread CPU profile (node --cpu-prof, whole daemon life; ${fmt(busy / 1000, 1)} s busy of ${fmt(p.totalMs / 1000, 1)} s)`);
    console.log(
      `by kind: ${Object.entries(p.byKind).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${fmt((v / busy) * 100, 1)}%`).join(', ')}`,
    );
    console.log(
      table(
        ['self %', 'self ms', 'function', 'where'],
        p.hotspots.map((h) => [`${fmt(h.share * 100, 1)}%`, fmt(h.selfMs, 0), h.name, h.where]),
      ),
    );
  } else if (PROFILE) {
    console.log('\n(profile requested but no .cpuprofile was written; see the daemon log)');
  }

  console.log('\n== Goals');
  console.log(table(['goal', 'target', 'measured', ''], goals.map((g) => [g.name, g.goal, g.value, verdict(g.pass)])));
  const dropped = [...results.values()].every((ms) => ms.every((m) => m.cachesDropped));
  console.log(
    `${goals.filter((g) => g.pass).length}/${goals.length} goals met; caches dropped before every run: ${dropped ? 'yes' : 'NO'}; ` +
      `total run time ${fmt((Date.now() - t0All) / 1000, 0)} s`,
  );

  if (JSON_OUT) {
    const summary = {
      config: { seconds: SECONDS, rampSeconds: RAMP, fileBytes: FILE_BYTES, jobs: JOBS, fio: fioVer, node: process.version, kernel: os.release(), cpus: os.cpus().length },
      openMode,
      commands,
      ceiling: {
        built: ceilingBin !== undefined,
        note: ceiling.note,
        ratios: WORKLOADS.map((w, i) => ({
          workload: w.label,
          ceilingSleepOverRaw: ratio('ceilSleep', 'raw', i),
          ceilingSpinOverRaw: ratio('ceilSpin', 'raw', i),
          dmrOverCeilingSleep: ratio('dmr', 'ceilSleep', i),
          dmrOverCeilingSpin: ratio('dmr', 'ceilSpin', i),
        })),
      },
      notes,
      workloads: WORKLOADS.map((w, i) => ({
        ...w,
        results: Object.fromEntries(order.map((id) => [id, get(id, i)])),
      })),
      dmrStatus,
      goals,
    };
    console.log('\n== JSON');
    console.log(JSON.stringify(summary, null, 2));
  }
  removeTempDir(dir);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
    process.exit(1); // the 'exit' handler kills the servers and removes the temp folder
  },
);
