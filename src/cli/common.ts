/**
 * What every remapctl command shares: exit codes, argument parsers, the
 * output switch between human text and --json, and the context a command
 * handler gets. Feature commands live in their own cmd-*.ts files and are
 * registered from remapctl.ts.
 */
import { resolve } from 'node:path';
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { parseHostPort, type ErrorCode } from '../daemon/protocol.js';
import { UBLK_MAX_DEPTH, UBLK_MAX_QUEUES } from '../daemon/state.js';
import { parseSize } from './size.js';

export const EXIT = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  UNREACHABLE: 3,
  NO_DEVICE: 4,
  IN_USE: 5,
  DENIED: 6,
  METADATA: 7,
  NOT_FOUND: 8,
} as const;

export const EXIT_HELP = `
Exit codes:
  0  success
  1  the operation failed (I/O error, timeout, a block that could not be remapped)
  2  usage error (unknown option, bad size, bad block number, request refused as malformed)
  3  dm-remapd is not running or its control socket cannot be reached
  4  no device of that name
  5  in use: the device name exists, main/spare belongs to another device, its NBD socket is taken, the device is busy, or the daemon is stopping
  6  permission denied (control socket: root or the control group only; or a file's permissions)
  7  metadata refused: spare without metadata (use --format), spare of another main, or corrupt metadata
  8  a main or spare path does not exist

Environment:
  DM_REMAPD_SOCKET  control socket (default /run/dm-remapd/control.sock)
`;

export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'BAD_REQUEST':
    case 'UNKNOWN_COMMAND':
    case 'INVALID_ARGUMENT':
      return EXIT.USAGE;
    case 'UNKNOWN_DEVICE':
      return EXIT.NO_DEVICE;
    case 'DEVICE_EXISTS':
    case 'BUSY':
    case 'SHUTTING_DOWN':
      return EXIT.IN_USE;
    case 'PERMISSION_DENIED':
      return EXIT.DENIED;
    case 'NO_METADATA':
    case 'IDENTITY_MISMATCH':
    case 'CORRUPT_METADATA':
      return EXIT.METADATA;
    case 'NOT_FOUND':
      return EXIT.NOT_FOUND;
    default:
      return EXIT.FAILED;
  }
}

export interface Globals {
  socket: string;
  json?: boolean;
}

export function sizeArg(v: string): number {
  try {
    return parseSize(v);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
}

export function intArg(what: string, min: number, max: number): (v: string) => number {
  return (v: string) => {
    const n = /^\d+$/.test(v) ? Number(v) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw new InvalidArgumentError(`${what} must be an integer in ${min}..${max}, got "${v}"`);
    return n;
  };
}

export function blockSizeArg(v: string): number {
  if (v !== '4096' && v !== '512') throw new InvalidArgumentError(`block size must be 4096 or 512, got "${v}"`);
  return Number(v);
}

export function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}

export class Output {
  code: number = EXIT.OK;
  constructor(readonly json: boolean) {}
  print(human: string, data: unknown): void {
    process.stdout.write(this.json ? `${JSON.stringify(data, null, 2)}\n` : `${human}\n`);
  }
}

/** Gives a command its global options and its output (and records the output for the exit code). */
export type CommandContext = (cmd: Command) => { g: Globals; o: Output };

export function hostPortArg(v: string): string {
  if (parseHostPort(v) === null) throw new InvalidArgumentError(`expected HOST:PORT (port 0..65535), got "${v}"`);
  return v;
}

export function nbdDeviceArg(v: string): string {
  if (v !== 'auto' && !/^\/dev\/nbd\d{1,4}$/.test(v)) throw new InvalidArgumentError(`expected /dev/nbdN or auto, got "${v}"`);
  return v;
}

/** The device flags `add` and `import-dmr4` share: spare, format, block size, exports, metadata timeout. */
export interface DeviceFlags {
  spare?: string;
  spareTail?: number;
  format?: boolean;
  blockSize?: number;
  nbdUnix?: string;
  nbdTcp?: string;
  nbdDevice?: string;
  ublk?: boolean;
  ublkQueues?: number;
  ublkDepth?: number;
  metadataTimeout?: number;
}

/** Declares the DeviceFlags options on `cmd` (`spareWhat` names the spare in the help: "separate spare", "new spare"). */
export function deviceOptions(cmd: Command, spareWhat: string): Command {
  return cmd
    .option('--spare <path>', `${spareWhat} disk or file`)
    .option('--spare-tail <size>', `use a reserved tail of main as the ${spareWhat} (K/M/G suffixes)`, sizeArg)
    .option('--format', 'format a spare that has no metadata (never overwrites existing metadata)')
    .option('--block-size <bytes>', 'remap unit: 4096 (default) or 512', blockSizeArg)
    .option('--nbd-unix <path>', 'export over NBD on this unix socket')
    .option('--nbd-tcp <host:port>', 'export over NBD on this TCP address', hostPortArg)
    .option('--nbd-device <dev>', 'attach the kernel NBD client: /dev/nbdN or auto (prints the device)', nbdDeviceArg)
    .option('--ublk', 'serve the device as /dev/ublkbN (prints the device)')
    .option('--ublk-queues <n>', `with --ublk: hardware queues, 1..${UBLK_MAX_QUEUES} (default 1; the kernel caps them at its CPU count)`,
      intArg('ublk queues', 1, UBLK_MAX_QUEUES))
    .option('--ublk-depth <n>', `with --ublk: tags per queue, 1..${UBLK_MAX_DEPTH} (default 128)`, intArg('ublk depth', 1, UBLK_MAX_DEPTH))
    .option('--metadata-timeout <ms>', 'metadata commit timeout, also the default removal deadline', intArg('metadata timeout', 1, 3_600_000));
}

/** The control-request arguments of DeviceFlags (paths made absolute); `what` names the command and device in usage errors ("add d0"). */
export function deviceArgs(opts: DeviceFlags, what: string): Record<string, unknown> {
  if (opts.ublk !== true) {
    const flag = opts.ublkQueues !== undefined ? '--ublk-queues' : opts.ublkDepth !== undefined ? '--ublk-depth' : null;
    if (flag !== null) throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `${what}: ${flag} needs --ublk`);
  }
  const args: Record<string, unknown> = {};
  if (opts.spare !== undefined) args.spare = resolve(opts.spare);
  if (opts.spareTail !== undefined) args.spareTailBytes = opts.spareTail;
  if (opts.format === true) args.format = true;
  if (opts.blockSize !== undefined) args.blockSize = opts.blockSize;
  if (opts.nbdUnix !== undefined) args.nbdUnix = resolve(opts.nbdUnix);
  if (opts.nbdTcp !== undefined) args.nbdTcp = opts.nbdTcp;
  if (opts.nbdDevice !== undefined) args.nbdDevice = opts.nbdDevice;
  if (opts.ublk === true) args.ublk = true;
  if (opts.ublkQueues !== undefined) args.ublkQueues = opts.ublkQueues;
  if (opts.ublkDepth !== undefined) args.ublkDepth = opts.ublkDepth;
  if (opts.metadataTimeout !== undefined) args.metadataTimeoutMs = opts.metadataTimeout;
  return args;
}
