import { ERRNO } from '../errors.js';

/**
 * What an errno from the backing store means for the error policy
 * (ARCHITECTURE.md, "Errors: classify before acting").
 *
 * - media: the device answered and said the sectors are bad. Only these remap.
 * - gone: the device vanished or stopped answering. Never remap: a remap storm
 *   over a dead disk would burn the spare and commit nonsense.
 * - nospace: the host filesystem under a file-backed disk is full.
 * - unsupported: the operation is not offered (discard on some devices).
 * - other: programming errors (EINVAL, EFAULT, EBADF ...) and anything unknown.
 */
export type ErrorClass = 'media' | 'gone' | 'nospace' | 'unsupported' | 'other';

const MEDIA = new Set<number>([ERRNO.EIO, ERRNO.ENODATA, ERRNO.EILSEQ, ERRNO.EBADMSG]);
const GONE = new Set<number>([
  ERRNO.ENODEV, ERRNO.ENXIO, ERRNO.ETIMEDOUT, ERRNO.ENOLINK, ERRNO.ESHUTDOWN,
  ERRNO.ENOTCONN, ERRNO.ECONNABORTED, ERRNO.ECONNRESET, ERRNO.EPIPE,
]);
const NOSPACE = new Set<number>([ERRNO.ENOSPC, ERRNO.EDQUOT]);
const UNSUPPORTED = new Set<number>([ERRNO.EOPNOTSUPP, ERRNO.ENOTSUP, ERRNO.ENOTTY]);

export function classifyErrno(errno: number): ErrorClass {
  const n = Math.abs(errno);
  if (MEDIA.has(n)) return 'media';
  if (GONE.has(n)) return 'gone';
  if (NOSPACE.has(n)) return 'nospace';
  if (UNSUPPORTED.has(n)) return 'unsupported';
  return 'other';
}
