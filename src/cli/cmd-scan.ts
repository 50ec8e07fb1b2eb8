/**
 * `remapctl scan NAME`: a surface read scan run by the daemon as a job, which
 * remapctl follows (progress bar in a terminal, JSON events with --json,
 * plain lines otherwise). Ctrl-C cancels the job. `--status` shows the last
 * job and the background scrub; `--cancel` cancels a running job.
 * docs/OPERATION.md, "Scan and scrub".
 */
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import type { DeviceStatus } from '../daemon/devices.js';
import type { ScanStatusResult } from '../daemon/handlers-scan.js';
import type { ScanSnapshot } from '../daemon/scan.js';
import type { ScrubStatus } from '../daemon/scrub.js';
import { request } from './client.js';
import { EXIT, type CommandContext, type Output } from './common.js';
import { parseScanRange, resolveScanRange } from './scan-range.js';
import { formatSize } from './size.js';

/** Exit code of a scan cancelled with Ctrl-C (128 + SIGINT, as shells report it). */
export const EXIT_INTERRUPTED = 130;
const POLL_MS = 250;
const PLAIN_EVERY_MS = 5000;
const MIB = 1024 * 1024;

function rateArg(v: string): number {
  const x = /^\d+(\.\d+)?$/.test(v) ? Number(v) : NaN;
  if (!(x > 0) || x > 100_000) throw new InvalidArgumentError(`rate must be a number of MiB/s in (0, 100000], got "${v}"`);
  return x;
}

function usage(message: string): CommanderError {
  return new CommanderError(EXIT.USAGE, 'remapctl.usage', message);
}

function duration(ms: number | null): string {
  if (ms === null) return '?';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

function rate(bps: number): string {
  return `${(bps / MIB).toFixed(1)} MiB/s`;
}

function blockList(blocks: number[], total: number): string {
  const shown = blocks.slice(0, 20).join(', ');
  return total > 20 ? `${shown}, ... (${total} in all)` : shown;
}

/** The job's one-line progress (plain lines and the terminal bar's text). */
function progressText(s: ScanSnapshot): string {
  const paused = s.state === 'paused' ? ` (paused: ${s.pauseReason ?? ''})` : '';
  return `${s.percent.toFixed(1)}% ${rate(s.rateBytesPerSec)} ETA ${duration(s.etaMs)} errors ${s.unreadable}${s.zeroed > 0 ? ` zeroed ${s.zeroed}` : ''}${paused}`;
}

function bar(s: ScanSnapshot, width: number): string {
  const filled = Math.min(width, Math.floor((s.percent / 100) * width));
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}

export function scanSummary(s: ScanSnapshot): string {
  const head = `${s.kind} ${s.device} ${s.state}: ${s.blocksDone}/${s.blocksTotal} blocks (${formatSize(s.bytesDone)}) of ${s.startBlock}..${s.endBlock - 1}`
    + ` in ${duration(s.elapsedMs)} (${rate(s.rateBytesPerSec)}${s.limitBytesPerSec !== null ? `, limit ${rate(s.limitBytesPerSec)}` : ''})`;
  const lines = [head];
  if (s.unreadable === 0) lines.push('no unreadable blocks');
  else {
    lines.push(`${s.unreadable} unreadable: ${blockList(s.unreadableBlocks, s.unreadable)}`);
    if (s.remapUnreadable === 'zero') lines.push(`${s.zeroed} remapped with zeroed data`);
    else lines.push(`${s.pending} pending: each is remapped on its next write (or rerun with --remap-unreadable --zero --yes-destroy-unreadable-data)`);
  }
  for (const f of s.remapFailed.slice(0, 20)) lines.push(`block ${f.block} not remapped: ${f.reason}`);
  if (s.cancelReason !== null) lines.push(`cancelled: ${s.cancelReason}`);
  if (s.error !== null) lines.push(`failed: ${s.error.message}`);
  return lines.join('\n');
}

function scrubText(name: string, r: ScrubStatus | null): string {
  if (r === null) return `${name}: scrub off (no "scrub" in the daemon's config)`;
  const when = r.state === 'waiting' && r.nextPassAt !== null ? `, next pass at ${r.nextPassAt}` : '';
  const paused = r.state === 'paused' ? ` (${r.pauseReason ?? ''})` : '';
  const cur = r.current !== null ? `, ${r.current.percent}% of this pass` : '';
  return `${name}: scrub ${r.state}${paused}${when}${cur}; ${r.passesDone} pass(es) done, next block ${r.nextBlock}, `
    + `${r.unreadable} unreadable found, ${r.pauses} pause(s), limit ${rate(r.limitBytesPerSec)}, idle ${r.idleMs} ms`;
}

/** Exit code of a finished job. */
export function scanExitCode(s: ScanSnapshot, interrupted: boolean): number {
  if (s.state === 'cancelled') return interrupted ? EXIT_INTERRUPTED : EXIT.FAILED;
  if (s.state !== 'done') return EXIT.FAILED;
  if (s.remapFailed.length > 0) return EXIT.FAILED;
  if (s.unreadable === 0) return EXIT.OK;
  return s.remapUnreadable === 'zero' && s.zeroed + s.remapFailed.length >= s.unreadable ? EXIT.OK : EXIT.FAILED;
}

function progressEvent(s: ScanSnapshot): Record<string, unknown> {
  return {
    event: 'progress', jobId: s.jobId, device: s.device, state: s.state, pauseReason: s.pauseReason, percent: s.percent,
    blocksDone: s.blocksDone, blocksTotal: s.blocksTotal, nextBlock: s.nextBlock, bytesDone: s.bytesDone,
    rateBytesPerSec: s.rateBytesPerSec, etaMs: s.etaMs, elapsedMs: s.elapsedMs, throttledMs: s.throttledMs,
    unreadable: s.unreadable, zeroed: s.zeroed,
  };
}

/** Polls the job to its end, drawing progress; Ctrl-C cancels it. */
async function follow(socket: string, name: string, first: ScanSnapshot, json: boolean, o: Output): Promise<void> {
  const tty = !json && process.stdout.isTTY === true;
  const out = (s: string): void => { process.stdout.write(s); };
  let interrupted = false;
  const onSigint = (): void => {
    if (interrupted) process.exit(EXIT_INTERRUPTED); // a second Ctrl-C: leave now, the daemon ends the job anyway
    interrupted = true;
    if (!json) out(`${tty ? '\r\x1b[K' : ''}cancelling the scan of ${name} ...\n`);
    request(socket, 'scanCancel', { name, jobId: first.jobId }, 10_000).catch(() => undefined);
  };
  process.on('SIGINT', onSigint);
  let s = first;
  let shownBlocks = 0;
  let lastDone = -1;
  let lastState = '';
  let lastPlain = 0;
  let lastTenth = -1;
  try {
    if (json) out(`${JSON.stringify({ ...progressEvent(s), event: 'started', startBlock: s.startBlock, endBlock: s.endBlock, blockSize: s.blockSize, limitBytesPerSec: s.limitBytesPerSec, remapUnreadable: s.remapUnreadable })}\n`);
    else out(`scan ${name}: blocks ${s.startBlock}..${s.endBlock - 1} (${formatSize((s.endBlock - s.startBlock) * s.blockSize)})`
      + `${s.limitBytesPerSec !== null ? ` at most ${rate(s.limitBytesPerSec)}` : ''}, job ${s.jobId}\n`);
    for (;;) {
      // New unreadable blocks, as they are found.
      for (; shownBlocks < s.unreadableBlocks.length; shownBlocks++) {
        const b = s.unreadableBlocks[shownBlocks];
        if (json) out(`${JSON.stringify({ event: 'unreadable', jobId: s.jobId, device: name, block: b })}\n`);
        else out(`${tty ? '\r\x1b[K' : ''}${name}: block ${b} is unreadable\n`);
      }
      const active = s.state === 'running' || s.state === 'paused';
      if (json) {
        if (s.blocksDone !== lastDone || s.state !== lastState) out(`${JSON.stringify(progressEvent(s))}\n`);
      } else if (tty) {
        if (active) {
          const cols = process.stdout.columns ?? 80;
          const text = progressText(s);
          out(`\r\x1b[K${bar(s, Math.max(10, Math.min(40, cols - text.length - 2)))} ${text}`);
        }
      } else {
        const tenth = Math.floor(s.percent / 10);
        if (active && s.blocksDone > 0 && (Date.now() - lastPlain >= PLAIN_EVERY_MS || tenth > lastTenth)) {
          out(`scan ${name}: ${progressText(s)}\n`);
          lastPlain = Date.now();
          lastTenth = tenth;
        }
      }
      lastDone = s.blocksDone;
      lastState = s.state;
      if (!active) break;
      await new Promise((r) => setTimeout(r, POLL_MS));
      s = ((await request(socket, 'scanStatus', { jobId: first.jobId }, 10_000)) as { job: ScanSnapshot }).job;
    }
  } finally {
    process.off('SIGINT', onSigint);
  }
  if (tty) out('\r\x1b[K');
  o.code = scanExitCode(s, interrupted);
  if (json) out(`${JSON.stringify({ event: 'result', ...s, exitCode: o.code })}\n`);
  else out(`${scanSummary(s)}\n`);
}

interface ScanOpts {
  range?: string;
  rate?: number;
  remapUnreadable?: boolean;
  zero?: boolean;
  yesDestroyUnreadableData?: boolean;
  status?: boolean;
  cancel?: boolean;
}

export function registerScanCommands(program: Command, ctx: CommandContext): void {
  program.command('scan')
    .description('surface read scan of a device through the daemon: unreadable blocks become pending, or with --remap-unreadable --zero '
      + '--yes-destroy-unreadable-data are remapped with zeroed data')
    .argument('<name>', 'device name')
    .option('--range <A-B>', 'blocks A..B-1 (plain numbers), or byte offsets with K/M/G/T suffixes (1G-2G); "A-" runs to the end [default: whole device]')
    .option('--rate <MiB/s>', 'read at most this many MiB (1048576 bytes) per second; decimals allowed', rateArg)
    .option('--remap-unreadable', 'remap each unreadable block (needs --zero and --yes-destroy-unreadable-data)')
    .option('--zero', 'with --remap-unreadable: the remapped block holds zeroes (its old data is unreadable, so lost)')
    .option('--yes-destroy-unreadable-data', 'confirm --remap-unreadable --zero: unreadable blocks read back as zeroes from then on')
    .option('--status', 'show the device\'s last scan job and its background scrub, and exit')
    .option('--cancel', 'cancel the device\'s running scan job, and exit')
    .addHelpText('after', `
Exit codes of scan:
  0    completed, nothing unreadable (or every unreadable block remapped with zeroes)
  1    completed with unreadable blocks (now pending), or failed, or cancelled by someone else
  2    usage (bad --range/--rate, missing --yes-destroy-unreadable-data, ...)
  3/4/5  daemon unreachable / no such device / device busy or already being scanned
  130  cancelled with Ctrl-C
`)
    .action(async (name: string, opts: ScanOpts, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const scanOnly = opts.range !== undefined || opts.rate !== undefined || opts.remapUnreadable === true || opts.zero === true
        || opts.yesDestroyUnreadableData === true;
      if (opts.status === true && opts.cancel === true) throw usage(`scan ${name}: give --status or --cancel, not both`);
      if ((opts.status === true || opts.cancel === true) && scanOnly) {
        throw usage(`scan ${name}: --${opts.status === true ? 'status' : 'cancel'} takes no scan options (--range, --rate, --remap-unreadable, --zero)`);
      }
      if (opts.zero === true && opts.remapUnreadable !== true) throw usage(`scan ${name}: --zero goes with --remap-unreadable`);
      if (opts.remapUnreadable === true && opts.zero !== true) {
        throw usage(`scan ${name}: --remap-unreadable needs --zero (the data of an unreadable block is gone; zeroes are the only data it can get)`);
      }
      if (opts.remapUnreadable === true && opts.yesDestroyUnreadableData !== true) {
        throw usage(`scan ${name}: --remap-unreadable --zero replaces every unreadable block of ${name} with zeroes for good; `
          + 'add --yes-destroy-unreadable-data to confirm');
      }
      if (opts.yesDestroyUnreadableData === true && opts.remapUnreadable !== true) {
        throw usage(`scan ${name}: --yes-destroy-unreadable-data confirms --remap-unreadable --zero, which was not given`);
      }
      if (opts.status === true) {
        const r = (await request(g.socket, 'scanStatus', { name }, 30_000)) as ScanStatusResult;
        const job = r.job === null ? `${name}: no scan job since the device was added` : `${name}: last scan job ${r.job.jobId}\n${scanSummary(r.job)}`;
        o.print(`${job}\n${scrubText(name, r.scrub)}`, r);
        return;
      }
      if (opts.cancel === true) {
        const r = (await request(g.socket, 'scanCancel', { name }, 30_000)) as { name: string; cancelled: boolean; job: ScanSnapshot | null };
        o.print(r.cancelled ? `${name}: scan job ${r.job?.jobId ?? '?'} cancelled` : `${name}: no scan job running`, r);
        if (!r.cancelled) o.code = EXIT.FAILED;
        return;
      }
      const args: Record<string, unknown> = { name };
      if (opts.range !== undefined) {
        let parsed;
        try {
          parsed = parseScanRange(opts.range);
        } catch (e) {
          throw usage(`scan ${name}: --range: ${(e as Error).message}`);
        }
        const d = (await request(g.socket, 'status', { name }, 30_000)) as DeviceStatus;
        if (d.blockSize === null || d.sizeBytes === null) throw usage(`scan ${name}: the device is ${d.state}; its size is unknown`);
        try {
          const r = resolveScanRange(parsed, opts.range, d.blockSize, Math.floor(d.sizeBytes / d.blockSize));
          args.startBlock = r.startBlock;
          args.endBlock = r.endBlock;
        } catch (e) {
          throw usage(`scan ${name}: --range: ${(e as Error).message}`);
        }
      }
      if (opts.rate !== undefined) args.rateBytesPerSec = Math.max(1, Math.round(opts.rate * MIB));
      if (opts.remapUnreadable === true) {
        args.remapUnreadable = 'zero';
        args.confirmDestroyUnreadableData = true;
      }
      const first = (await request(g.socket, 'scanStart', args, 30_000)) as ScanSnapshot;
      await follow(g.socket, name, first, g.json === true, o);
    });
}
