#!/usr/bin/env node
/**
 * remapctl: the operator's interface to dm-remapd (docs/OPERATION.md).
 */
import { resolve } from 'node:path';
import { Command, CommanderError } from 'commander';
import { EXIT, EXIT_HELP, Output, deviceArgs, deviceOptions, exitCodeFor, intArg, sizeArg, table, type CommandContext, type DeviceFlags, type Globals } from './common.js';
import type { DeviceStatus, RemoveReport } from '../daemon/devices.js';
import type { ManualRemapResult } from '../engine/engine.js';
import { RemapError } from '../errors.js';
import { codeForErrno } from '../daemon/protocol.js';
import { RequestError, UnreachableError, request } from './client.js';
import { formatInspect, inspectPath } from './inspect.js';
import { formatSize } from './size.js';
import { registerDmr4Commands } from './cmd-dmr4.js';
import { registerScanCommands } from './cmd-scan.js';
import { registerDdrescueCommands } from './cmd-ddrescue.js';
import { registerUnremapCommands } from './cmd-unremap.js';
import { registerSpareCommands, spareLines } from './cmd-spare.js';
import { registerOpenersCommands } from './cmd-openers.js';

function n(v: number | null): string {
  return v === null ? '-' : String(v);
}

function statusTable(devs: DeviceStatus[]): string {
  if (devs.length === 0) return 'no devices';
  const rows = [['NAME', 'STATE', 'HEALTH', 'MODE', 'SIZE', 'BS', 'REMAPPED', 'PENDING', 'SPARE USED', 'RERR', 'WERR', 'SEQ', 'EXPORTS']];
  for (const d of devs) {
    rows.push([d.name, d.state, d.health ?? '-', d.openMode ?? '-', formatSize(d.sizeBytes), n(d.blockSize), n(d.remappedBlocks), n(d.pendingBlocks),
      d.spareBlocksTotal === null ? '-' : `${d.spareBlocksUsed}/${d.spareBlocksTotal}`, n(d.readErrors), n(d.writeErrors), n(d.metadataSeq),
      d.exports.length > 0 ? d.exports.join(',') : '-']);
  }
  return table(rows);
}

function statusDetail(d: DeviceStatus): string {
  const kv: Array<[string, string]> = [
    ['name', d.name], ['state', d.state],
    ['health', `${d.health ?? '-'}${d.healthReasons.length > 0 ? ` (${d.healthReasons.join('; ')})` : ''}`], ['main', d.main],
    ['spare', d.spare ?? (d.spareTailBytes !== null ? `tail of main, ${d.spareTailBytes} bytes` : '-')],
    ...spareLines(d.spares ?? null),
    ['open mode', d.openMode ?? '-'], ['size', d.sizeBytes === null ? '-' : `${d.sizeBytes} bytes (${formatSize(d.sizeBytes)})`],
    ['block size', n(d.blockSize)], ['remapped blocks', n(d.remappedBlocks)], ['pending blocks', n(d.pendingBlocks)],
    ['bad spare blocks', n(d.badSpareBlocks)], ['quarantined spare blocks', n(d.quarantinedSpareBlocks)],
    ['spare blocks', d.spareBlocksTotal === null ? '-' : `${d.spareBlocksUsed} used of ${d.spareBlocksTotal}${d.spareExhausted ? ' (EXHAUSTED)' : ''}`],
    ['read errors', n(d.readErrors)], ['write errors', n(d.writeErrors)], ['metadata seq', n(d.metadataSeq)],
    ['exports', d.exports.length > 0 ? d.exports.join(', ') : '-'], ['connections', String(d.connections)],
  ];
  const u = d.ublk ?? null;
  if (u !== null) kv.push(['ublk queues', `${u.queues} x depth ${u.depth} (${u.device})`]);
  if (d.breakerTripped === true) kv.push(['breaker', 'TRIPPED']);
  if (d.failReason !== null) kv.push(['fail reason', d.failReason]);
  const w = Math.max(...kv.map(([k]) => k.length)) + 1;
  return kv.map(([k, v]) => `${`${k}:`.padEnd(w)} ${v}`).join('\n');
}

function remapLine(device: string, r: ManualRemapResult): string {
  switch (r.result) {
    case 'remapped':
      return `${device}: block ${r.block} remapped to spare block ${r.spare}`;
    case 'already-remapped':
      return `${device}: block ${r.block} already remapped (spare block ${r.spare})`;
    case 'pending':
      return `${device}: block ${r.block} not remapped: ${r.reason}`;
    default:
      return `${device}: block ${r.block} failed: ${r.reason}`;
  }
}

function removeSummary(r: RemoveReport): string {
  const head = `removed ${r.name} in ${r.elapsedMs} ms (deadline ${r.deadlineMs} ms)${r.synced ? ', final sync done' : ', no final sync'}`;
  return r.cancelled.length === 0 ? `${head}; nothing was cancelled` : `${head}; cancelled: ${r.cancelled.join('; ')}`;
}

function buildProgram(out: { current: Output | null }): Command {
  const defaultSocket = process.env.DM_REMAPD_SOCKET !== undefined && process.env.DM_REMAPD_SOCKET !== ''
    ? process.env.DM_REMAPD_SOCKET : '/run/dm-remapd/control.sock';
  const program = new Command('remapctl')
    .description('Control dm-remapd: add, remove, list, status, remap, inspect')
    .option('--socket <path>', 'control socket of dm-remapd (env DM_REMAPD_SOCKET)', defaultSocket)
    .option('--json', 'machine-readable output')
    .exitOverride()
    .showHelpAfterError('(run remapctl --help for usage)')
    .addHelpText('after', EXIT_HELP);

  const ctx: CommandContext = (cmd: Command) => {
    const g = cmd.optsWithGlobals<Globals>();
    const o = new Output(g.json === true);
    out.current = o;
    return { g, o };
  };

  deviceOptions(program.command('add')
    .description('add a device (reopens existing metadata; formats a blank spare only with --format)')
    .argument('<name>', 'device name')
    .requiredOption('--main <path>', 'main (failing) disk or image'), 'separate spare')
    .option('--allow-identity-change', 'accept a spare whose recorded main differs (after replacing the main)')
    .option('--extra-spare <path>', 'an extra spare of the pool (repeat, in the order they were added; see spare add)', (v: string, prev: string[]) => [...prev, v], [] as string[])
    .option('--pool-reserve <size>', 'with --format: metadata room for extra spares of this size in all (spare add; K/M/G suffixes)', sizeArg)
    .action(async (name: string, opts: DeviceFlags & { main: string; allowIdentityChange?: boolean; extraSpare: string[]; poolReserve?: number }, cmd: Command) => {
      const { g, o } = ctx(cmd);
      if ((opts.spare === undefined) === (opts.spareTail === undefined)) {
        throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `add ${name}: give exactly one of --spare PATH or --spare-tail SIZE`);
      }
      const args: Record<string, unknown> = { name, main: resolve(opts.main), ...deviceArgs(opts, `add ${name}`) };
      if (opts.extraSpare.length > 0) args.spares = opts.extraSpare.map((p) => resolve(p));
      if (opts.poolReserve !== undefined) args.poolReserveBytes = opts.poolReserve;
      if (opts.allowIdentityChange === true) args.allowIdentityChange = true;
      const d = (await request(g.socket, 'add', args, 600_000)) as DeviceStatus;
      o.print(`added ${d.name}: ${formatSize(d.sizeBytes)}, block size ${d.blockSize}, ${d.remappedBlocks} remapped, ${d.pendingBlocks} pending, `
        + `spare ${d.spareBlocksUsed}/${d.spareBlocksTotal} blocks used, ${d.openMode}${d.exports.length > 0 ? `; exports: ${d.exports.join(', ')}` : ''}`
        + (opts.nbdDevice !== undefined ? `\n${d.exports.find((e) => e.startsWith('/dev/nbd')) ?? ''}` : '')
        + (opts.ublk === true ? `\n${d.exports.find((e) => e.startsWith('/dev/ublkb')) ?? ''}` : ''), d);
    });

  program.command('remove')
    .description('remove a device within one deadline (default: its metadata timeout)')
    .argument('<name>', 'device name')
    .option('--timeout <ms>', 'deadline for the whole removal', intArg('timeout', 0, 3_600_000))
    .option('--force', 'remove even when its /dev/ublkbN or /dev/nbdN is mounted or open (refused otherwise, naming the openers; exit 5)')
    .action(async (name: string, opts: { timeout?: number; force?: boolean }, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const args: Record<string, unknown> = { name };
      if (opts.timeout !== undefined) args.timeoutMs = opts.timeout;
      if (opts.force === true) args.force = true;
      const r = (await request(g.socket, 'remove', args, (opts.timeout ?? 60_000) + 5_000)) as RemoveReport;
      o.print(removeSummary(r), r);
      if (r.timedOut) o.code = EXIT.FAILED;
    });

  program.command('list')
    .description('list devices')
    .action(async (_opts: unknown, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const devs = (await request(g.socket, 'list', {}, 30_000)) as DeviceStatus[];
      const rows = [['NAME', 'STATE', 'SIZE', 'MAIN', 'EXPORTS']];
      for (const d of devs) rows.push([d.name, d.state, formatSize(d.sizeBytes), d.main, d.exports.join(',') || '-']);
      o.print(devs.length === 0 ? 'no devices' : table(rows), devs);
    });

  program.command('status')
    .description('status of one device or of all')
    .argument('[name]', 'device name')
    .action(async (name: string | undefined, _opts: unknown, cmd: Command) => {
      const { g, o } = ctx(cmd);
      if (name === undefined) {
        const devs = (await request(g.socket, 'status', {}, 30_000)) as DeviceStatus[];
        o.print(statusTable(devs), devs);
      } else {
        const d = (await request(g.socket, 'status', { name }, 30_000)) as DeviceStatus;
        o.print(statusDetail(d), d);
      }
    });

  program.command('remap')
    .description('remap blocks by hand (live): their data is copied to the spare')
    .argument('<name>', 'device name')
    .argument('<block...>', 'logical block numbers (in units of the block size)')
    .action(async (name: string, blocksText: string[], _opts: unknown, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const blocks = blocksText.map((b) => {
        if (!/^\d+$/.test(b) || !Number.isSafeInteger(Number(b))) {
          throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `remap ${name}: "${b}" is not a block number (a non-negative integer)`);
        }
        return Number(b);
      });
      const r = (await request(g.socket, 'remap', { name, blocks }, 600_000)) as { name: string; results: ManualRemapResult[] };
      o.print(r.results.map((x) => remapLine(name, x)).join('\n'), r);
      if (r.results.some((x) => x.result === 'failed' || x.result === 'pending')) o.code = EXIT.FAILED;
    });

  program.command('inspect')
    .description('decode the metadata of a spare offline (no daemon needed)')
    .argument('<spare>', 'spare file or device (or, with --spare-tail, the main that holds the tail)')
    .option('--spare-tail <size>', 'the spare is the last SIZE bytes of this path (K/M/G suffixes)', sizeArg)
    .action(async (path: string, opts: { spareTail?: number }, cmd: Command) => {
      const { o } = ctx(cmd);
      const r = await inspectPath(resolve(path), opts.spareTail);
      o.print(formatInspect(r), r);
      if (!r.ok) {
        const code = codeForErrno(r.error?.errno ?? 5);
        o.code = exitCodeFor(code);
        process.stderr.write(`remapctl: inspect ${path}: ${r.error?.message ?? 'metadata not usable'}\n`);
      }
    });
  // Feature commands (one register call per cmd-*.ts file).
  registerDmr4Commands(program, ctx);
  registerScanCommands(program, ctx);
  registerDdrescueCommands(program, ctx);
  registerUnremapCommands(program, ctx);
  registerSpareCommands(program, ctx);
  registerOpenersCommands(program, ctx);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const out: { current: Output | null } = { current: null };
  const program = buildProgram(out);
  const json = argv.includes('--json');
  try {
    await program.parseAsync(argv);
    return out.current?.code ?? EXIT.OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help' || err.exitCode === 0) return EXIT.OK;
      if (err.code === 'remapctl.usage') process.stderr.write(`remapctl: ${err.message}\n`);
      return EXIT.USAGE;
    }
    let code: number;
    let body: { code: string; message: string; errno?: number };
    if (err instanceof UnreachableError) {
      code = err.denied ? EXIT.DENIED : EXIT.UNREACHABLE;
      body = { code: err.denied ? 'PERMISSION_DENIED' : 'UNREACHABLE', message: err.message };
    } else if (err instanceof RequestError) {
      code = exitCodeFor(err.body.code);
      body = err.body;
    } else if (err instanceof RemapError) {
      const c = codeForErrno(err.errno);
      code = exitCodeFor(c);
      body = { code: c, message: err.message, errno: err.errno };
    } else {
      code = EXIT.FAILED;
      body = { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) };
    }
    process.stderr.write(`remapctl: ${body.message}\n`);
    if (json) process.stdout.write(`${JSON.stringify({ ok: false, error: body }, null, 2)}\n`);
    return code;
  }
}

main(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`remapctl: internal error: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    process.exitCode = 1;
  },
);
