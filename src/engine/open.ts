import pino, { type Logger } from 'pino';
import { ERRNO, RemapError, errnoName } from '../errors.js';
import { BackingDevice } from '../native/backing.js';
import { RemapTable } from '../remap/remap-table.js';
import { BlockSet } from '../remap/block-set.js';
import { RecordType, type MetaRecord } from '../metadata/records.js';
import { FormatInterruptedError, formatSpare, loadSpare, type LoadedMetadata } from '../metadata/store.js';
import { computeLayout } from '../metadata/layout.js';
import { MetadataWriter } from '../metadata/writer.js';
import { BlockEngine, type EngineParts } from './engine.js';
import { BackingMetaIO } from './meta-io.js';
import { describeIdentity, identityOf, sameMain } from './identity.js';
import { backingRange, readLabel, storageClash, type PoolSpareInput } from './spare-pool.js';
import { withReliableFua } from './fua-emulation.js';
import { stackOverlap } from './stack-overlap.js';

export interface OpenEngineOptions {
  /** Device name, used in logs and errors. */
  name: string;
  mainPath: string;
  /** A separate spare file or device... */
  sparePath?: string;
  /** ...or a reserved tail region of main, in bytes (a multiple of 4096). */
  spareTailBytes?: number;
  /**
   * Spare pool: the paths of the extra spares, in the order they were
   * added (spare 1, 2, ...). Every extra spare the metadata records must be
   * given and carry its label; the device refuses to open otherwise.
   */
  extraSpares?: readonly string[];
  /**
   * Spare pool, at format only: make the checkpoints big enough to also
   * describe extra spares of this many bytes in all (docs/FORMAT.md
   * section 10). Costs about 4.7 % of it (4 KiB blocks) in the primary's
   * metadata area. Without it, spare add has almost no room.
   */
  poolReserveBytes?: number;
  /** Format a spare that has no metadata. Never overwrites existing metadata. */
  format?: boolean;
  /** Remap unit in bytes (4096 default, or 512). On reopen it must match the metadata. */
  blockSize?: number;
  /** O_DIRECT (default). Buffered I/O hides write errors until fsync: only by explicit choice. */
  direct?: boolean;
  readOnly?: boolean;
  /** Metadata commit timeout in ms (5000 default); also the default removal deadline. */
  metadataTimeoutMs?: number;
  /** Accept a main whose identity differs from the one recorded (e.g. after replacing it). */
  allowIdentityChange?: boolean;
  journalBytes?: number;
  readRetries?: number;
  breaker?: { maxRemaps: number; windowMs: number };
  queueDepth?: number;
  logger?: Logger;
}

function rebuild(records: readonly MetaRecord[]): {
  table: RemapTable; pending: BlockSet; badSpare: BlockSet; quarantined: BlockSet; spares: Map<number, { blocks: number; labelCrc: number }>;
} {
  const spares = new Map<number, { blocks: number; labelCrc: number }>();
  const table = new RemapTable();
  const pending = new BlockSet();
  const badSpare = new BlockSet();
  const quarantined = new BlockSet();
  for (const r of records) {
    switch (r.type) {
      case RecordType.REMAP:
        table.set(r.logical, r.spare);
        pending.delete(r.logical);
        break;
      case RecordType.UNMAP:
        table.delete(r.logical);
        break;
      case RecordType.PENDING_ADD:
        pending.add(r.logical);
        break;
      case RecordType.PENDING_CLEAR:
        pending.delete(r.logical);
        break;
      case RecordType.SPARE_BAD:
        badSpare.add(r.spare);
        break;
      case RecordType.QUARANTINE:
        quarantined.add(r.spare);
        break;
      case RecordType.SPARE_ADD:
        spares.set(r.logical, { blocks: r.spare, labelCrc: r.dataCrc }); // a later record of the same spare wins
        break;
      default:
        break;
    }
  }
  return { table, pending, badSpare, quarantined, spares };
}

/**
 * The journal takes at most 1/16 of a small spare area per copy, between
 * 64 KiB and 8 MiB: big journals make checkpoints rare, small spares still fit.
 */
export function defaultJournalBytes(areaBytes: number): number {
  const sixteenth = Math.floor(areaBytes / 16 / 4096) * 4096;
  return Math.min(8 * 1024 * 1024, Math.max(64 * 1024, sixteenth));
}

/**
 * Open (or, when asked, format) a remapped device: open main and spare with
 * O_DIRECT, load and validate the metadata, check that it belongs to this
 * main, rebuild the table, and start the metadata writer.
 */
export async function openEngine(o: OpenEngineOptions): Promise<BlockEngine> {
  const log = o.logger ?? pino({ level: 'silent' });
  const direct = o.direct ?? true;
  const timeoutMs = o.metadataTimeoutMs ?? 5000;
  if ((o.sparePath === undefined) === (o.spareTailBytes === undefined)) {
    throw new RemapError(ERRNO.EINVAL, 'give exactly one of a spare path or a spare tail size', { device: o.name, op: 'open' });
  }
  if (o.blockSize !== undefined && o.blockSize !== 4096 && o.blockSize !== 512) {
    throw new RemapError(ERRNO.EINVAL, `block size ${o.blockSize} must be 4096 or 512`, { device: o.name, op: 'open' });
  }
  if (o.sparePath !== undefined) refuseStackOverlap(o.name, o.mainPath, o.sparePath);
  const main = withReliableFua(BackingDevice.open(o.mainPath, { direct, readOnly: o.readOnly, exclusive: true, queueDepth: o.queueDepth }));
  let spare: BackingDevice = main;
  const extras: BackingDevice[] = [];
  const cleanup = async (): Promise<void> => {
    await main.close(1000);
    if (spare !== main) await spare.close(1000);
    for (const x of extras) await x.close(1000);
  };
  try {
    let areaOffset = 0;
    let areaBytes: number;
    let exportedBytes: number;
    if (o.sparePath !== undefined) {
      spare = withReliableFua(BackingDevice.open(o.sparePath, { direct, readOnly: o.readOnly, exclusive: true, queueDepth: o.queueDepth }));
      const a = main.info;
      const b = spare.info;
      const same = a.isBlockDevice ? b.isBlockDevice && a.rdev === b.rdev : !b.isBlockDevice && a.dev === b.dev && a.ino === b.ino;
      if (same) {
        throw new RemapError(ERRNO.EINVAL, `spare ${o.sparePath} is the main ${o.mainPath} itself; use a tail region instead`, { device: o.name, op: 'open' });
      }
      const ma = backingRange(a);
      const sb = backingRange(b);
      if (ma !== null && sb !== null && ma.dev === sb.dev && ma.ino === sb.ino && ma.start < sb.end && sb.start < ma.end) {
        throw new RemapError(ERRNO.EINVAL, `spare ${o.sparePath} overlaps the main ${o.mainPath}: both are stored in ${ma.file} (bytes ${sb.start}..${sb.end} and ${ma.start}..${ma.end})`, {
          device: o.name, op: 'open',
        });
      }
      areaBytes = spare.info.sizeBytes;
      exportedBytes = main.info.sizeBytes;
    } else {
      const tail = o.spareTailBytes as number;
      if (!Number.isSafeInteger(tail) || tail <= 0 || tail % 4096 !== 0 || tail >= main.info.sizeBytes) {
        throw new RemapError(ERRNO.EINVAL, `spare tail of ${tail} bytes must be a positive multiple of 4096 below the main size ${main.info.sizeBytes}`, {
          device: o.name, op: 'open',
        });
      }
      areaOffset = main.info.sizeBytes - tail;
      areaBytes = tail;
      exportedBytes = areaOffset;
    }
    const metaIO = new BackingMetaIO(spare);
    const found = identityOf(main.info);
    let loaded: LoadedMetadata;
    try {
      loaded = await loadSpare(metaIO, { areaOffset, areaBytes });
    } catch (err) {
      if (!(err instanceof RemapError) || err.errno !== ERRNO.ENODATA || o.format !== true) {
        // An interrupted format: its message names the spare, when it started and what to run.
        if (err instanceof FormatInterruptedError) throw err;
        if (err instanceof RemapError && err.errno === ERRNO.ENODATA) {
          throw new RemapError(ERRNO.ENODATA, `spare ${spare.info.path} has no dm-remapd metadata; format it explicitly (--format)`, {
            device: o.name, op: 'open',
          });
        }
        throw err;
      }
      const blockSize = o.blockSize ?? 4096;
      if (blockSize < main.info.logicalBlockSize) {
        throw new RemapError(ERRNO.EINVAL, `block size ${blockSize} is below the main's logical sector size ${main.info.logicalBlockSize}`, {
          device: o.name, op: 'format',
        });
      }
      const journalBytes = o.journalBytes ?? defaultJournalBytes(areaBytes);
      await formatSpare(metaIO, {
        areaOffset, areaBytes, blockSize, journalBytes, maxPending: pendingWithPoolReserve(o, areaOffset, areaBytes, blockSize, journalBytes),
        identity: { main: found, name: o.name },
        onRedo: (note, m) => log.warn({ event: 'format-redone', device: o.name, spare: spare.info.path, interruptedUuid: m.deviceUuid, startedAtMs: m.startedAtMs }, note),
      });
      log.info({ event: 'formatted', device: o.name, spare: spare.info.path, blockSize }, `formatted spare ${spare.info.path}`);
      loaded = await loadSpare(metaIO, { areaOffset, areaBytes });
    }
    for (const w of loaded.warnings) log.warn({ event: 'metadata-warning', device: o.name }, w);
    const id = loaded.identity;
    if (o.blockSize !== undefined && o.blockSize !== id.blockSize) {
      throw new RemapError(ERRNO.EINVAL, `block size ${o.blockSize} differs from the ${id.blockSize} recorded in the metadata`, { device: o.name, op: 'open' });
    }
    if (id.blockSize < main.info.logicalBlockSize) {
      throw new RemapError(ERRNO.EINVAL, `recorded block size ${id.blockSize} is below the main's logical sector size ${main.info.logicalBlockSize}`, {
        device: o.name, op: 'open',
      });
    }
    if (!sameMain(id.main, found)) {
      const msg = `spare ${spare.info.path} belongs to another main: recorded ${describeIdentity(id.main)}, found ${describeIdentity(found)}`;
      if (o.allowIdentityChange !== true) {
        throw new RemapError(ERRNO.EMEDIUMTYPE, `${msg}; pass the identity override to accept this main`, { device: o.name, op: 'open' });
      }
      log.warn({ event: 'identity-override', device: o.name }, msg);
    }
    const { spares: recordedSpares, ...state } = rebuild(loaded.records);
    const extraSpares = await openExtraSpares(o, id.deviceUuid, id.blockSize, recordedSpares, [main, spare], extras, log);
    const layout = loaded.layout;
    let engine: BlockEngine | undefined;
    const writer = new MetadataWriter(metaIO, loaded, {
      timeoutMs,
      snapshot: () => (engine as BlockEngine).snapshotRecords(),
      logger: log.child({ device: o.name, component: 'metadata' }),
    });
    const parts: EngineParts = {
      name: o.name, main, spare,
      sizeBytes: Math.floor(exportedBytes / id.blockSize) * id.blockSize,
      blockSize: id.blockSize,
      spareDataOffset: layout.dataOffset,
      spareDataBlocks: layout.dataBlocks,
      extraSpares, deviceUuid: id.deviceUuid, spareOpen: { direct, queueDepth: o.queueDepth }, checkpointCapacity: layout.checkpointCapacity,
      ...state,
      writer, logger: log, metadataTimeoutMs: timeoutMs,
      readRetries: o.readRetries, breaker: o.breaker,
    };
    engine = new BlockEngine(parts);
    log.info({
      event: 'opened', device: o.name, main: main.info.path, spare: spare.info.path, openMode: engine.openMode,
      remapped: state.table.size, pending: state.pending.size, seq: loaded.seq, spares: 1 + extraSpares.length,
    }, `device ${o.name} opened`);
    return engine;
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/**
 * A spare on the same storage as the main through another block device (a
 * partition of the main's disk, the whole disk of a main partition, a loop
 * device over the main's image): refused before either is opened, so the
 * error says why instead of the EBUSY the exclusive open would give.
 * Different paths of the very same device are left to the check after the
 * open (which tells "is the main itself").
 */
function refuseStackOverlap(name: string, mainPath: string, sparePath: string): void {
  const c = stackOverlap(mainPath, sparePath);
  if (c === null || c.sameDevice) return;
  throw new RemapError(ERRNO.EINVAL, `spare ${sparePath} overlaps the main ${mainPath}: both are stored on ${c.layer} `
    + `(bytes ${c.b[0]}..${c.b[1]} and ${c.a[0]}..${c.a[1]})`, { device: name, op: 'open' });
}

/**
 * Spare pool: the maxPending to format with so that the checkpoints also
 * hold 2 records per reserved pool block (poolRoom): the default pending
 * reserve (the data blocks without the reserve) plus twice the reserve in
 * blocks. Undefined (the default sizing) without a reserve.
 */
function pendingWithPoolReserve(o: OpenEngineOptions, areaOffset: number, areaBytes: number, blockSize: number, journalBytes: number): number | undefined {
  const r = o.poolReserveBytes;
  if (r === undefined || r === 0) return undefined;
  if (!Number.isSafeInteger(r) || r < 0) {
    throw new RemapError(ERRNO.EINVAL, `pool reserve of ${r} bytes must be a non-negative integer`, { device: o.name, op: 'format' });
  }
  const base = computeLayout(areaOffset, areaBytes, blockSize, { journalBytes });
  return base.dataBlocks + 2 * Math.ceil(r / blockSize) + 2; // + the SPARE_ADD records of a couple of spares
}

/**
 * Spare pool: opens the extra spares the metadata records (ordinals 1..K,
 * from `o.extraSpares`, in order) and checks each one's label against the
 * record (device UUID, ordinal, block size, block count, label CRC32C), so
 * that a missing spare, or another file in its place, stops the device
 * instead of serving wrong data. Opened devices go to `opened` (closed by
 * the caller on failure). Paths beyond K (an add that never committed) are
 * left alone, with a warning.
 */
async function openExtraSpares(o: OpenEngineOptions, uuid: string, blockSize: number, recorded: Map<number, { blocks: number; labelCrc: number }>,
  base: BackingDevice[], opened: BackingDevice[], log: Logger): Promise<PoolSpareInput[]> {
  const paths = o.extraSpares ?? [];
  const k = recorded.size;
  for (let i = 1; i <= k; i++) {
    if (!recorded.has(i)) {
      throw new RemapError(ERRNO.EBADMSG, `the metadata records ${k} extra spare(s) but not spare ${i}; refusing to start rather than serve wrong data`, {
        device: o.name, op: 'open',
      });
    }
  }
  if (paths.length < k) {
    const missing = [...recorded.entries()].filter(([n]) => n > paths.length).map(([n, r]) => `spare ${n} (${r.blocks} blocks)`);
    throw new RemapError(ERRNO.ENOENT, `the metadata records ${k} extra spare(s) but ${paths.length} path(s) were given: ${missing.join(', ')} missing; `
      + 'refusing to start rather than serve wrong data', { device: o.name, op: 'open' });
  }
  for (const [i, p] of paths.entries()) {
    if (i + 1 > k) log.warn({ event: 'spare-unrecorded', device: o.name, spare: p, ordinal: i + 1 }, `spare ${p} is not recorded in the metadata (an add that did not commit); not used`);
  }
  const out: PoolSpareInput[] = [];
  const refuse = (errno: number, ordinal: number, path: string, why: string): RemapError =>
    new RemapError(errno, `spare ${ordinal} ${path}: ${why} (${errnoName(errno)}); refusing to start rather than serve wrong data`, { device: o.name, op: 'open' });
  for (let ordinal = 1; ordinal <= k; ordinal++) {
    const path = paths[ordinal - 1];
    const rec = recorded.get(ordinal) as { blocks: number; labelCrc: number };
    let dev: BackingDevice;
    try {
      dev = withReliableFua(BackingDevice.open(path, { direct: o.direct ?? true, readOnly: o.readOnly, exclusive: true, queueDepth: o.queueDepth }));
    } catch (err) {
      const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
      throw refuse(errno, ordinal, path, errno === ERRNO.ENOENT ? 'it does not exist' : 'it cannot be opened');
    }
    opened.push(dev);
    for (const other of [...base, ...opened.slice(0, -1)]) {
      const clash = storageClash(other.info, dev.info);
      if (clash !== null) throw refuse(ERRNO.EBUSY, ordinal, path, `it shares storage with another part of the device: ${clash}`);
    }
    let found;
    try {
      found = await readLabel(dev);
    } catch (err) {
      const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
      throw refuse(errno, ordinal, path, 'its label cannot be read');
    }
    if (!found.ok) throw refuse(ERRNO.EMEDIUMTYPE, ordinal, path, `it is not the recorded spare: ${found.reason}`);
    const l = found.label;
    if (l.deviceUuid !== uuid) throw refuse(ERRNO.EMEDIUMTYPE, ordinal, path, `it is a spare of another device (UUID ${l.deviceUuid}, this device ${uuid})`);
    if (l.ordinal !== ordinal) throw refuse(ERRNO.EMEDIUMTYPE, ordinal, path, `it is spare ${l.ordinal} of this device, not spare ${ordinal}: give the paths in the order the spares were added`);
    if (found.crc !== rec.labelCrc || l.dataBlocks !== rec.blocks || l.blockSize !== blockSize) {
      throw refuse(ERRNO.EMEDIUMTYPE, ordinal, path, `its label (${l.dataBlocks} blocks, CRC 0x${found.crc.toString(16)}) is not the recorded one `
        + `(${rec.blocks} blocks, CRC 0x${rec.labelCrc.toString(16)}): another labelling of this spare`);
    }
    if (l.dataOffset + l.dataBlocks * blockSize > dev.info.sizeBytes) {
      throw refuse(ERRNO.EMEDIUMTYPE, ordinal, path, `it is ${dev.info.sizeBytes} bytes, smaller than its ${l.dataBlocks} blocks after the label (truncated?)`);
    }
    out.push({ ordinal, dev, path, dataOffset: l.dataOffset, blocks: l.dataBlocks, labelCrc: found.crc });
  }
  return out;
}
