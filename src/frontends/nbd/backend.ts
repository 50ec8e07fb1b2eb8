import type { EngineRequest } from '../../engine/engine.js';
import type { RemapError } from '../../errors.js';
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_PAYLOAD,
  type BlockSizeConstraints,
} from './protocol.js';

export interface BackendCapabilities {
  flush: boolean;
  fua: boolean;
  discard: boolean;
  writeZeroes: boolean;
  readOnly: boolean;
}

/** What the NBD frontend needs from a device. BlockEngine satisfies it. */
export interface NbdBackend {
  readonly name: string;
  readonly sizeBytes: number;
  readonly blockSize: number;
  capabilities(): BackendCapabilities;
  submitCb(req: EngineRequest, done: (err: RemapError | null) => void): void;
}

/** The device as one connection sees it: capabilities fixed at negotiation time. */
export interface ExportView {
  backend: NbdBackend;
  caps: BackendCapabilities;
  /** The export is read-only (by option or because the device is). */
  readOnly: boolean;
}

export function exportView(backend: NbdBackend, readOnlyOption: boolean): ExportView {
  const caps = backend.capabilities();
  return { backend, caps, readOnly: readOnlyOption || caps.readOnly };
}

// One function per transmission flag ("Transmission flags"): what we
// advertise is derived from the backend here and nowhere else.

export function isReadOnly(v: ExportView): boolean {
  return v.readOnly;
}

export function canFlush(v: ExportView): boolean {
  return v.caps.flush;
}

/** FUA only means something for commands that write. */
export function canFua(v: ExportView): boolean {
  return v.caps.fua && !v.readOnly;
}

export function canTrim(v: ExportView): boolean {
  return v.caps.discard && !v.readOnly;
}

export function canZero(v: ExportView): boolean {
  return v.caps.writeZeroes && !v.readOnly;
}

/**
 * The spec lets a server advertise fast zero and then answer every
 * NBD_CMD_FLAG_FAST_ZERO with ENOTSUP. That is what we do: the engine cannot
 * tell in advance whether a zeroing will be a cheap fallocate/BLKZEROOUT or
 * real zero writes (remapped blocks, backing without ZERO_RANGE), so the
 * honest answer to "only if fast" is "no", quickly, and the client falls back
 * to its own strategy.
 */
export function canFastZero(v: ExportView): boolean {
  return canZero(v);
}

/** DF is only meaningful with structured replies; every READ is one OFFSET_DATA chunk anyway. */
export function canDf(_v: ExportView, structuredReplies: boolean): boolean {
  return structuredReplies;
}

/**
 * Multi-conn is safe: there is no per-connection cache; every connection
 * submits to the same engine, and FLUSH fdatasyncs the backing files (main
 * and spare), which covers writes completed on any connection; FUA writes use
 * RWF_DSYNC on the shared file.
 */
export function canMultiConn(v: ExportView): boolean {
  return v.caps.flush;
}

/** CACHE is accepted (range-checked, then a no-op success: I/O is O_DIRECT, there is nothing to prefetch into). */
export function canCache(_v: ExportView): boolean {
  return true;
}

export function transmissionFlags(v: ExportView, structuredReplies: boolean): number {
  let f = NBD_FLAG_HAS_FLAGS;
  if (isReadOnly(v)) f |= NBD_FLAG_READ_ONLY;
  if (canFlush(v)) f |= NBD_FLAG_SEND_FLUSH;
  if (canFua(v)) f |= NBD_FLAG_SEND_FUA;
  if (canTrim(v)) f |= NBD_FLAG_SEND_TRIM;
  if (canZero(v)) f |= NBD_FLAG_SEND_WRITE_ZEROES;
  if (canFastZero(v)) f |= NBD_FLAG_SEND_FAST_ZERO;
  if (canDf(v, structuredReplies)) f |= NBD_FLAG_SEND_DF;
  if (canMultiConn(v)) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (canCache(v)) f |= NBD_FLAG_SEND_CACHE;
  return f;
}

/**
 * Advertised size constraints: the engine's block is the minimum (it rejects
 * anything smaller), 4 KiB (or the block, if larger) is preferred (page size,
 * no read-modify-write in clients), 32 MiB is the largest payload we accept.
 */
export function blockSizeConstraints(backend: NbdBackend): BlockSizeConstraints {
  return { minimum: backend.blockSize, preferred: Math.max(backend.blockSize, 4096), maximum: NBD_MAX_PAYLOAD };
}
