/**
 * FUA on backings whose kernel drops RWF_DSYNC.
 *
 * The engine turns a FUA write into an io_uring write carrying RWF_DSYNC.
 * On a block device that becomes REQ_FUA, and on ext4/xfs files the
 * direct-I/O completion syncs; but a FUSE file (nbdfuse, sshfs, ...)
 * completes an asynchronous O_DIRECT write without the FUSE fsync that
 * O_DSYNC asks for: measured on Linux 6.18 through nbdfuse 1.14, an
 * io_uring RWF_DSYNC write reaches the NBD server as a plain write, no
 * FLUSH, while the same pwritev2(RWF_DSYNC) from a synchronous caller and
 * every fdatasync do reach it as FLUSH (tests/harness/volatile-cache.test.ts).
 * A FUA write acknowledged to a client was then lost on a power cut
 * (tests/reliability/power-loss.test.ts).
 *
 * On such a backing, a FUA write is done as the write followed by an
 * fdatasync of the device; the request completes with the write's result,
 * or the fdatasync's error. Other backings are left untouched, so their
 * path costs nothing more.
 */
import { statfsSync } from 'node:fs';
import { BackingOp, IO_FUA, type BackingDevice } from '../native/backing.js';

/** statfs f_type of FUSE mounts (linux/magic.h). */
export const FUSE_SUPER_MAGIC = 0x65735546;

/** Whether RWF_DSYNC on this backing's asynchronous writes cannot be trusted (a regular file on FUSE). */
export function dsyncUnreliable(dev: BackingDevice): boolean {
  if (dev.info.isBlockDevice) return false;
  try {
    return statfsSync(dev.info.path).type === FUSE_SUPER_MAGIC;
  } catch {
    return false;
  }
}

/**
 * Open hook: on a backing where RWF_DSYNC cannot be trusted, every WRITE
 * with IO_FUA submitted to `dev` (submit() and io() alike) becomes the
 * write without the flag, then an fdatasync. Returns `dev`.
 */
export function withReliableFua(dev: BackingDevice): BackingDevice {
  if (!dsyncUnreliable(dev)) return dev;
  const submit = dev.submit.bind(dev);
  dev.submit = (op, buf, offset, length, flags, cb): void => {
    if (op !== BackingOp.WRITE || (flags & IO_FUA) === 0) {
      submit(op, buf, offset, length, flags, cb);
      return;
    }
    submit(op, buf, offset, length, flags & ~IO_FUA, (res) => {
      if (res !== length) {
        cb(res);
        return;
      }
      submit(BackingOp.FDATASYNC, null, 0, 0, 0, (s) => cb(s < 0 ? s : res));
    });
  };
  return dev;
}
