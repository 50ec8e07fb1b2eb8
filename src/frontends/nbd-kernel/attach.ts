/**
 * Kernel NBD attach: serves a device to the kernel's own NBD client as
 * /dev/nbdN. A unix socketpair joins the two: our end is served by the NBD
 * transmission code (no handshake: the kernel is told the size, block size
 * and transmission flags directly), the other end is handed to the kernel
 * with netlink NBD_CMD_CONNECT, or the legacy ioctls when netlink is not
 * available. detach() disconnects the device and closes the session.
 */
import { readdirSync, existsSync, readFileSync } from 'node:fs';
import { Socket } from 'node:net';
import type { Logger } from 'pino';
import { ERRNO, RemapError } from '../../errors.js';
import { closeFd, ioctlConnect, ioctlDisconnect, netlinkConnect, netlinkDisconnect, socketPair } from '../../native/nbd-attach.js';
import { exportView, serveTransmission, transmissionFlags, type NbdBackend, type TransmissionSession } from '../nbd/index.js';

export interface AttachOptions {
  /** '/dev/nbdN' or 'auto' (any free device). */
  device: string;
  readOnly?: boolean;
  logger: Logger;
  /** Kernel request timeout in seconds (0/undefined: the kernel's default, which never fails a request for slowness). */
  timeoutSec?: number;
  /** 'auto' (netlink, then ioctls), or force one path (tests). */
  method?: 'auto' | 'netlink' | 'ioctl';
}

export interface NbdKernelAttachment {
  /** '/dev/nbdN'. */
  readonly device: string;
  readonly index: number;
  readonly method: 'netlink' | 'ioctl';
  readonly session: TransmissionSession;
  /** Disconnects the kernel client and closes the session within deadlineMs. */
  detach(deadlineMs: number): Promise<{ connectionsClosed: number }>;
}

/** The index of '/dev/nbdN', -1 for 'auto'; throws on anything else. */
export function parseNbdDevice(device: string): number {
  if (device === 'auto') return -1;
  const m = /^\/dev\/nbd(\d{1,4})$/.exec(device);
  if (m === null) throw new RemapError(ERRNO.EINVAL, `nbd device must be /dev/nbdN or auto, got "${device}"`, { op: 'nbd-attach' });
  return Number(m[1]);
}

/** A /dev/nbdN with no client (no pid file in sysfs, size 0), for the ioctl path. */
function freeIoctlIndex(): number {
  const names = existsSync('/sys/block') ? readdirSync('/sys/block') : [];
  const idx = names.map((n) => /^nbd(\d+)$/.exec(n)).filter((m): m is RegExpExecArray => m !== null).map((m) => Number(m[1])).sort((a, c) => a - c);
  for (const i of idx) {
    if (existsSync(`/sys/block/nbd${i}/pid`)) continue;
    try {
      if (readFileSync(`/sys/block/nbd${i}/size`, 'utf8').trim() !== '0') continue;
    } catch {
      continue;
    }
    return i;
  }
  throw new RemapError(ERRNO.ENODEV, 'no free /dev/nbdN (is the nbd module loaded?)', { op: 'nbd-attach' });
}

/** Serves `backend` to the kernel NBD client; resolves when /dev/nbdN is configured. */
export async function attachNbdDevice(backend: NbdBackend, o: AttachOptions): Promise<NbdKernelAttachment> {
  const wanted = parseNbdDevice(o.device);
  const flags = transmissionFlags(exportView(backend, o.readOnly === true), false);
  const [ours, theirs] = socketPair();
  let socket: Socket;
  try {
    socket = new Socket({ fd: ours, readable: true, writable: true });
  } catch (e) {
    closeFd(ours);
    closeFd(theirs);
    throw e;
  }
  const log = o.logger.child({ component: 'nbd-kernel' });
  const session = serveTransmission(socket, backend, { flags, structuredReplies: false, logger: log });
  const params = { sockFd: theirs, sizeBytes: backend.sizeBytes, blockSize: backend.blockSize, serverFlags: flags, timeoutSec: o.timeoutSec ?? 0 };
  // DM_REMAPD_NBD_ATTACH=ioctl|netlink forces one path (tests of the fallback).
  const env = process.env.DM_REMAPD_NBD_ATTACH;
  const method = o.method ?? (env === 'ioctl' || env === 'netlink' ? env : 'auto');
  let index = -1;
  let used: 'netlink' | 'ioctl' = 'netlink';
  let err = 0;
  try {
    if (method !== 'ioctl') {
      const r = netlinkConnect({ ...params, index: wanted });
      if (r >= 0) index = r;
      else err = r;
    }
    // No netlink family (old kernel, or a kernel without it): the ioctls.
    if (index < 0 && (method === 'ioctl' || (method === 'auto' && (err === -ERRNO.ENOENT || err === -ERRNO.EOPNOTSUPP)))) {
      used = 'ioctl';
      const i = wanted >= 0 ? wanted : freeIoctlIndex();
      const r = ioctlConnect({ ...params, index: i });
      if (r === 0) index = i;
      else err = r;
    }
  } finally {
    // The kernel holds its own reference to its end.
    closeFd(theirs);
  }
  if (index < 0) {
    await session.shutdown(100);
    socket.destroy();
    throw new RemapError(-err, `cannot attach ${o.device === 'auto' ? 'an nbd device' : o.device} (${used})`, { device: backend.name, op: 'nbd-attach' });
  }
  const device = `/dev/nbd${index}`;
  log.info({ event: 'nbd-attached', nbdDevice: device, method: used, flags }, `${backend.name} attached as ${device} (${used})`);
  let detaching: Promise<{ connectionsClosed: number }> | null = null;
  const detach = (deadlineMs: number): Promise<{ connectionsClosed: number }> => {
    detaching ??= (async () => {
      const started = Date.now();
      const wasOpen = session.state !== 'closed';
      const r = used === 'netlink' ? netlinkDisconnect(index) : ioctlDisconnect(index, Math.max(0, Math.min(deadlineMs, 2000)));
      if (r < 0 && r !== -ERRNO.ENOENT) {
        log.warn({ event: 'nbd-disconnect-failed', nbdDevice: device, errno: -r }, `disconnecting ${device} failed (${-r}); closing our end`);
      }
      // The kernel sends NBD_CMD_DISC and shuts its end down: wait for our session to end.
      const remaining = Math.max(0, deadlineMs - (Date.now() - started));
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([session.closed, new Promise<void>((resolve) => { timer = setTimeout(resolve, remaining); })]);
      clearTimeout(timer);
      if (session.state !== 'closed') await session.shutdown(Math.max(0, deadlineMs - (Date.now() - started)));
      socket.destroy();
      log.info({ event: 'nbd-detached', nbdDevice: device, elapsedMs: Date.now() - started }, `${device} detached`);
      return { connectionsClosed: wasOpen ? 1 : 0 };
    })();
    return detaching;
  };
  return { device, index, method: used, session, detach };
}
