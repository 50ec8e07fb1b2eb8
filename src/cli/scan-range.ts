/**
 * The --range of `remapctl scan`: "A-B" or "A-", half-open [A, B). A bound
 * is a block number (plain digits: "100") or a byte offset with a K, M, G
 * or T suffix (powers of 1024, optionally "iB"/"B": "1G", "512KiB"), which
 * must fall on a block boundary. "100-200" scans blocks 100..199; "1G-2G"
 * the second GiB; "100-" from block 100 to the end. Pure: parsing needs
 * nothing, resolving needs the device's block size and block count.
 */

export type RangeBound = { kind: 'block'; value: number } | { kind: 'byte'; value: number };

export interface ParsedRange {
  start: RangeBound;
  /** null: to the end of the device. */
  end: RangeBound | null;
}

const BOUND = /^(\d{1,20})(?:([kmgt])(?:i?b)?)?$/i;
const MULT: Record<string, number> = { k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

function parseBound(text: string, range: string): RangeBound {
  const m = BOUND.exec(text);
  if (m === null) {
    throw new RangeError(`range "${range}": "${text}" is neither a block number nor a size with a K, M, G or T suffix`);
  }
  const n = Number(m[1]);
  const value = m[2] === undefined ? n : n * MULT[m[2].toLowerCase()];
  if (!Number.isSafeInteger(value)) throw new RangeError(`range "${range}": "${text}" is too large`);
  return m[2] === undefined ? { kind: 'block', value } : { kind: 'byte', value };
}

/** Syntax only; throws a RangeError whose message names the range. */
export function parseScanRange(text: string): ParsedRange {
  const dash = text.indexOf('-');
  if (dash <= 0 || text.indexOf('-', dash + 1) >= 0) {
    throw new RangeError(`range "${text}" must be START-END or START- (blocks, or sizes such as 1G-2G)`);
  }
  const start = parseBound(text.slice(0, dash), text);
  const rest = text.slice(dash + 1);
  return { start, end: rest === '' ? null : parseBound(rest, text) };
}

function toBlock(b: RangeBound, blockSize: number, range: string): number {
  if (b.kind === 'block') return b.value;
  if (b.value % blockSize !== 0) {
    throw new RangeError(`range "${range}": byte offset ${b.value} is not a multiple of the ${blockSize}-byte block size`);
  }
  return b.value / blockSize;
}

/**
 * The range in blocks, [startBlock, endBlock), checked against a device of
 * `blocks` blocks: not empty, not reversed, not past the end.
 */
export function resolveScanRange(r: ParsedRange, range: string, blockSize: number, blocks: number): { startBlock: number; endBlock: number } {
  const startBlock = toBlock(r.start, blockSize, range);
  const endBlock = r.end === null ? blocks : toBlock(r.end, blockSize, range);
  if (startBlock >= blocks) {
    throw new RangeError(`range "${range}" starts at block ${startBlock}, past the end of the device (${blocks} blocks of ${blockSize} bytes)`);
  }
  if (endBlock <= startBlock) {
    throw new RangeError(`range "${range}" is ${endBlock < startBlock ? 'reversed' : 'empty'} (blocks ${startBlock}..${endBlock}, end exclusive)`);
  }
  if (endBlock > blocks) {
    throw new RangeError(`range "${range}" ends at block ${endBlock}, past the end of the device (${blocks} blocks of ${blockSize} bytes)`);
  }
  return { startBlock, endBlock };
}
