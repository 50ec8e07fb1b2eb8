import { open, type FileHandle } from 'node:fs/promises';
import { ERRNO, RemapError, errnoOf } from '../errors.js';

/** Metadata I/O unit: every offset and length is a multiple of this. */
export const META_BLOCK = 4096;

/**
 * Byte-addressed I/O on the spare device, as the metadata layer needs it.
 * Offsets and lengths are multiples of 4096. Failures reject with a
 * RemapError carrying the errno.
 */
export interface MetaIO {
  readonly sizeBytes: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  sync(): Promise<void>;
  describe(): string;
}

export function checkAligned(io: { describe(): string }, op: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset % META_BLOCK !== 0 || !Number.isSafeInteger(length) || length < 0 || length % META_BLOCK !== 0)
    throw new RemapError(ERRNO.EINVAL, `unaligned metadata ${op}: offset ${offset}, length ${length} (must be multiples of ${META_BLOCK})`, {
      device: io.describe(),
      op: `metadata-${op}`,
      offset,
    });
}

/**
 * MetaIO over a regular file (or a block device opened buffered) with
 * node:fs/promises; sync is fdatasync. For tests and offline inspection.
 * Reads past the end of the file return zeros (as a sparse file would).
 */
export class FileMetaIO implements MetaIO {
  private closed = false;

  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly sizeBytes: number,
    readonly readOnly: boolean,
  ) {}

  /**
   * Opens `path`. With `create`, the file is created (or extended) to
   * `create` bytes. With `readOnly`, writes and syncs fail with EROFS.
   * `sizeBytes` overrides the size taken from stat() (needed for block devices).
   */
  static async open(path: string, opts: { create?: number; readOnly?: boolean; sizeBytes?: number } = {}): Promise<FileMetaIO> {
    let fh: FileHandle;
    try {
      fh = await open(path, opts.readOnly ? 'r' : opts.create !== undefined ? 'a+' : 'r+');
      if (opts.create !== undefined && !opts.readOnly) {
        await fh.close();
        fh = await open(path, 'r+');
        const st0 = await fh.stat();
        if (st0.size < opts.create) await fh.truncate(opts.create);
      }
    } catch (e) {
      throw new RemapError(errnoOf(e), `cannot open metadata device`, { device: path, op: 'open' }, { cause: e });
    }
    // stat() reports 0 for block devices: callers pass the size they got from
    // BLKGETSIZE64 (the engine) as `sizeBytes`.
    const size = opts.sizeBytes ?? (await fh.stat()).size;
    return new FileMetaIO(fh, path, size, opts.readOnly === true);
  }

  describe(): string {
    return this.path;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkAligned(this, 'read', offset, length);
    const buf = new Uint8Array(length);
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) break; // EOF: rest stays zero
        done += bytesRead;
      }
    } catch (e) {
      throw new RemapError(errnoOf(e), 'metadata read failed', { device: this.path, op: 'metadata-read', offset }, { cause: e });
    }
    return buf;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    checkAligned(this, 'write', offset, data.length);
    if (this.readOnly) throw new RemapError(ERRNO.EROFS, 'metadata device opened read-only', { device: this.path, op: 'metadata-write', offset });
    let done = 0;
    try {
      while (done < data.length) {
        const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw new RemapError(errnoOf(e), 'metadata write failed', { device: this.path, op: 'metadata-write', offset }, { cause: e });
    }
  }

  async sync(): Promise<void> {
    if (this.readOnly) throw new RemapError(ERRNO.EROFS, 'metadata device opened read-only', { device: this.path, op: 'metadata-sync' });
    try {
      await this.fh.datasync();
    } catch (e) {
      throw new RemapError(errnoOf(e), 'metadata fdatasync failed', { device: this.path, op: 'metadata-sync' }, { cause: e });
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}
