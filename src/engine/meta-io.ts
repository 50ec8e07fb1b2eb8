import { RemapError } from '../errors.js';
import { BackingOp, allocAligned, type BackingDevice } from '../native/backing.js';
import type { MetaIO } from '../metadata/io.js';

/**
 * Metadata I/O through the device's own ring (one ring per device): the
 * journal and checkpoints are O_DIRECT writes like any other, so a write
 * error on the metadata area is seen, not hidden in the page cache.
 */
export class BackingMetaIO implements MetaIO {
  constructor(private readonly dev: BackingDevice, readonly sizeBytes: number = dev.info.sizeBytes) {}

  describe(): string {
    return this.dev.info.path;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = allocAligned(length);
    const res = await this.dev.io(BackingOp.READ, buf, offset, length);
    if (res !== length) {
      throw new RemapError(res < 0 ? -res : 5, `metadata read of ${length} bytes failed${res >= 0 ? ` (short: ${res})` : ''}`, {
        device: this.dev.info.path, op: 'metadata-read', offset,
      });
    }
    return buf;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    // Copy into an aligned buffer: callers build metadata in ordinary memory.
    const buf = allocAligned(data.byteLength);
    buf.set(data);
    const res = await this.dev.io(BackingOp.WRITE, buf, offset, data.byteLength);
    if (res !== data.byteLength) {
      throw new RemapError(res < 0 ? -res : 5, `metadata write of ${data.byteLength} bytes failed${res >= 0 ? ` (short: ${res})` : ''}`, {
        device: this.dev.info.path, op: 'metadata-write', offset,
      });
    }
  }

  async sync(): Promise<void> {
    const res = await this.dev.io(BackingOp.FDATASYNC, null, 0, 0);
    if (res < 0) throw new RemapError(-res, 'metadata fdatasync failed', { device: this.dev.info.path, op: 'metadata-sync' });
  }
}
