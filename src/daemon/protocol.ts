/**
 * The control protocol of dm-remapd (docs/OPERATION.md): one JSON request per
 * line, `{id, cmd, args}`, and one JSON answer per line, `{id, ok: true,
 * result}` or `{id, ok: false, error: {code, message, errno?}}`.
 * Shared by the daemon (src/daemon/control.ts) and remapctl (src/cli).
 */
import { ERRNO, RemapError, errnoName } from '../errors.js';

/** Stable error codes. Never renumbered or renamed; new ones may be added. */
export const ERROR_CODES = [
  'BAD_REQUEST', // malformed JSON, a line over the limit, missing or mistyped arguments
  'UNKNOWN_COMMAND',
  'UNKNOWN_DEVICE',
  'DEVICE_EXISTS', // the name is already in use
  'BUSY', // main/spare used by another device, device starting/stopping/draining
  'NOT_FOUND', // a main or spare path does not exist
  'INVALID_ARGUMENT', // well-formed but refused (block size, tail size, ...)
  'NO_METADATA', // spare has no metadata and --format was not given
  'IDENTITY_MISMATCH', // spare belongs to another main
  'CORRUPT_METADATA', // metadata present but no copy usable
  'IO_ERROR',
  'PERMISSION_DENIED',
  'TIMEOUT',
  'SHUTTING_DOWN', // the daemon is stopping
  'UNSUPPORTED', // e.g. an NBD export requested but the frontend is unavailable
  'INTERNAL',
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

export interface ControlRequest {
  id: string | number | null;
  cmd: string;
  args?: Record<string, unknown>;
}

export interface ControlErrorBody {
  code: ErrorCode;
  message: string;
  errno?: number;
  errnoName?: string;
}

export type ControlAnswer =
  | { id: string | number | null; ok: true; result: unknown }
  | { id: string | number | null; ok: false; error: ControlErrorBody };

/** Maximum length of one request line (bytes, without the newline). */
export const MAX_LINE_BYTES = 1024 * 1024;

/** An error with a stable protocol code. */
export class ControlError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly errno?: number,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

/** The protocol code for an errno coming from the engine or the OS. */
export function codeForErrno(errno: number): ErrorCode {
  switch (errno) {
    case ERRNO.ENOENT:
    case ERRNO.ENOTDIR:
      return 'NOT_FOUND';
    case ERRNO.EBUSY:
    case ERRNO.EADDRINUSE: // an NBD socket or TCP port another server holds
      return 'BUSY';
    case ERRNO.ENODATA:
      return 'NO_METADATA';
    case ERRNO.EMEDIUMTYPE:
      return 'IDENTITY_MISMATCH';
    case ERRNO.EBADMSG:
    case ERRNO.EUCLEAN:
      return 'CORRUPT_METADATA';
    case ERRNO.EINVAL:
    case ERRNO.ERANGE:
      return 'INVALID_ARGUMENT';
    case ERRNO.EACCES:
    case ERRNO.EPERM:
    case ERRNO.EROFS:
      return 'PERMISSION_DENIED';
    case ERRNO.ETIMEDOUT:
      return 'TIMEOUT';
    case ERRNO.ESHUTDOWN:
      return 'SHUTTING_DOWN';
    case ERRNO.EOPNOTSUPP:
      return 'UNSUPPORTED';
    default:
      return 'IO_ERROR';
  }
}

/** Any thrown value as a protocol error body. */
export function errorBody(err: unknown): ControlErrorBody {
  if (err instanceof ControlError) {
    const b: ControlErrorBody = { code: err.code, message: err.message };
    if (err.errno !== undefined) {
      b.errno = err.errno;
      b.errnoName = errnoName(err.errno);
    }
    return b;
  }
  if (err instanceof RemapError) return { code: codeForErrno(err.errno), message: err.message, errno: err.errno, errnoName: err.code };
  if (typeof err === 'object' && err !== null && typeof (err as { code?: unknown }).code === 'string') {
    const code = (err as { code: string }).code;
    if (code in ERRNO) {
      const errno = ERRNO[code as keyof typeof ERRNO];
      return { code: codeForErrno(errno), message: err instanceof Error ? err.message : String(err), errno, errnoName: code };
    }
  }
  return { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) };
}

// ------------------------------------------------------------ arguments

function where(cmd: string, key: string): string {
  return `${cmd}: argument "${key}"`;
}

function describe(v: unknown): string {
  if (v === undefined) return 'nothing';
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

export function argString(cmd: string, args: Record<string, unknown>, key: string): string;
export function argString(cmd: string, args: Record<string, unknown>, key: string, optional: true): string | undefined;
export function argString(cmd: string, args: Record<string, unknown>, key: string, optional?: boolean): string | undefined {
  const v = args[key];
  if (v === undefined && optional === true) return undefined;
  if (typeof v !== 'string' || v.length === 0) throw new ControlError('BAD_REQUEST', `${where(cmd, key)} must be a non-empty string, got ${describe(v)}`);
  return v;
}

export function argInt(cmd: string, args: Record<string, unknown>, key: string, min: number, max: number): number | undefined {
  const v = args[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    throw new ControlError('BAD_REQUEST', `${where(cmd, key)} must be an integer in ${min}..${max}, got ${describe(v)}`);
  }
  return v;
}

export function argBool(cmd: string, args: Record<string, unknown>, key: string): boolean | undefined {
  const v = args[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') throw new ControlError('BAD_REQUEST', `${where(cmd, key)} must be true or false, got ${describe(v)}`);
  return v;
}

/** "HOST:PORT" or "[v6]:PORT". */
export function parseHostPort(s: string): { host: string; port: number } | null {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(s) ?? /^([^:]+):(\d+)$/.exec(s);
  if (m === null) return null;
  const port = Number(m[2]);
  if (!Number.isSafeInteger(port) || port < 0 || port > 65535) return null;
  return { host: m[1], port };
}

/** The optional "nbdDevice" argument of add: '/dev/nbdN' or 'auto'. */
export function argNbdDevice(cmd: string, args: Record<string, unknown>): string | undefined {
  const v = argString(cmd, args, 'nbdDevice', true);
  if (v !== undefined && v !== 'auto' && !/^\/dev\/nbd\d{1,4}$/.test(v)) {
    throw new ControlError('BAD_REQUEST', `${where(cmd, 'nbdDevice')} must be "/dev/nbdN" or "auto", got ${describe(v)}`);
  }
  return v;
}

/** A device name: letters, digits, '.', '_', '-'; 1..64 characters, not starting with '.' or '-'. */
export const DEVICE_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;
