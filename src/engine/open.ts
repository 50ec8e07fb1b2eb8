import { readFileSync, realpathSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import pino, { type Logger } from 'pino';
import { ERRNO, RemapError } from '../errors.js';
import { BackingDevice } from '../native/backing.js';
import type { NativeBackingInfo } from '../native/binding.js';
import { RemapTable } from '../remap/remap-table.js';
import { BlockSet } from '../remap/block-set.js';
import { RecordType, type MetaRecord } from '../metadata/records.js';
import { formatSpare, loadSpare, type LoadedMetadata } from '../metadata/store.js';
import { MetadataWriter } from '../metadata/writer.js';
import { BlockEngine, type EngineParts } from './engine.js';
import { BackingMetaIO } from './meta-io.js';
import { describeIdentity, identityOf, sameMain } from './identity.js';

export interface OpenEngineOptions {
  /** Device name, used in logs and errors. */
  name: string;
  mainPath: string;
  /** A separate spare file or device... */
  sparePath?: string;
  /** ...or a reserved tail region of main, in bytes (a multiple of 4096). */
  spareTailBytes?: number;
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

function rebuild(records: readonly MetaRecord[]): { table: RemapTable; pending: BlockSet; badSpare: BlockSet; quarantined: BlockSet } {
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
      default:
        break;
    }
  }
  return { table, pending, badSpare, quarantined };
}

/**
 * Where a file or a loop device keeps its bytes: the file's dev/inode and
 * byte range (a loop device: its backing file, offset and size limit from
 * sysfs). Null when unknown (another kind of block device, a deleted backing
 * file).
 */
function backingRange(info: NativeBackingInfo): { file: string; dev: number; ino: number; start: number; end: number } | null {
  if (!info.isBlockDevice) return { file: info.path, dev: info.dev, ino: info.ino, start: 0, end: info.sizeBytes };
  try {
    const sys = `/sys/class/block/${basename(realpathSync(info.path))}/loop`;
    const file = readFileSync(`${sys}/backing_file`, 'utf8').trim();
    const st = statSync(file);
    const start = Number(readFileSync(`${sys}/offset`, 'utf8').trim());
    return { file, dev: st.dev, ino: st.ino, start, end: start + info.sizeBytes };
  } catch {
    return null;
  }
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
  const main = BackingDevice.open(o.mainPath, { direct, readOnly: o.readOnly, exclusive: true, queueDepth: o.queueDepth });
  let spare: BackingDevice = main;
  const cleanup = async (): Promise<void> => {
    await main.close(1000);
    if (spare !== main) await spare.close(1000);
  };
  try {
    let areaOffset = 0;
    let areaBytes: number;
    let exportedBytes: number;
    if (o.sparePath !== undefined) {
      spare = BackingDevice.open(o.sparePath, { direct, readOnly: o.readOnly, exclusive: true, queueDepth: o.queueDepth });
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
      await formatSpare(metaIO, {
        areaOffset, areaBytes, blockSize, journalBytes: o.journalBytes ?? defaultJournalBytes(areaBytes),
        identity: { main: found, name: o.name },
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
    const state = rebuild(loaded.records);
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
      ...state,
      writer, logger: log, metadataTimeoutMs: timeoutMs,
      readRetries: o.readRetries, breaker: o.breaker,
    };
    engine = new BlockEngine(parts);
    log.info({
      event: 'opened', device: o.name, main: main.info.path, spare: spare.info.path, openMode: engine.openMode,
      remapped: state.table.size, pending: state.pending.size, seq: loaded.seq,
    }, `device ${o.name} opened`);
    return engine;
  } catch (err) {
    await cleanup();
    throw err;
  }
}
