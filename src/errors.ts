import { constants as osConstants } from 'node:os';

/**
 * Positive errno values by name: the platform's table plus the Linux values
 * Node leaves out (asm-generic/errno.h).
 */
export const ERRNO = {
  ...osConstants.errno,
  ESHUTDOWN: 108,
  EUCLEAN: 117,
  EMEDIUMTYPE: 124,
  EREMOTEIO: 121,
} as const;

const NAME_BY_ERRNO = new Map<number, string>(
  Object.entries(ERRNO).map(([name, n]) => [n as number, name]),
);

/** 'EIO' for 5 (or -5); 'E?123' for unknown numbers. */
export function errnoName(errno: number): string {
  const n = Math.abs(errno);
  return NAME_BY_ERRNO.get(n) ?? `E?${n}`;
}

export interface ErrorContext {
  /** Device name (daemon level) or backing path (I/O level). */
  device?: string;
  /** Logical block (or spare block, see `op`) the error is about. */
  block?: number;
  /** What was being done: 'read', 'write', 'flush', 'metadata-commit', ... */
  op?: string;
  /** Byte offset on the backing device, when known. */
  offset?: number;
}

/**
 * Every failure that must reach a client carries an errno (positive, as in
 * errno.h) for the wire and a human message for the operator.
 */
export class RemapError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly context: ErrorContext;

  constructor(errno: number, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    const n = Math.abs(errno);
    const where = describeContext(context);
    super(`${message}${where ? ` (${where})` : ''}: ${errnoName(n)}`, options);
    this.name = 'RemapError';
    this.errno = n;
    this.code = errnoName(n);
    this.context = context;
  }
}

export function describeContext(c: ErrorContext): string {
  const parts: string[] = [];
  if (c.device !== undefined) parts.push(`device ${c.device}`);
  if (c.op !== undefined) parts.push(c.op);
  if (c.block !== undefined) parts.push(`block ${c.block}`);
  if (c.offset !== undefined) parts.push(`offset ${c.offset}`);
  return parts.join(', ');
}

/** Turn any thrown value into an errno for the wire (EIO when unknown). */
export function errnoOf(err: unknown): number {
  if (err instanceof RemapError) return err.errno;
  if (typeof err === 'object' && err !== null) {
    const e = err as { errno?: unknown; code?: unknown };
    if (typeof e.errno === 'number') return Math.abs(e.errno);
    if (typeof e.code === 'string' && e.code in ERRNO) return ERRNO[e.code as keyof typeof ERRNO];
  }
  return ERRNO.EIO;
}
