/**
 * Kernel NBD attach, from native/nbd_attach.cc: a unix socketpair (Node cannot
 * make one), NBD_CMD_CONNECT/DISCONNECT over generic netlink, and the legacy
 * ioctls (NBD_SET_SOCK ... NBD_DO_IT on a native thread). None throws: the raw
 * binding returns negative errnos; these wrappers throw RemapError.
 */
import { RemapError } from '../errors.js';
import { loadBinding } from './binding.js';

interface NbdAttachBinding {
  nbdSocketPair(): [number, number] | number;
  nbdCloseFd(fd: number): number;
  nbdNetlinkConnect(index: number, sockFd: number, sizeBytes: number, blockSize: number, serverFlags: number, timeoutSec: number): number;
  nbdNetlinkDisconnect(index: number): number;
  nbdIoctlConnect(index: number, sockFd: number, sizeBytes: number, blockSize: number, serverFlags: number, timeoutSec: number): number;
  nbdIoctlDisconnect(index: number, waitMs: number): number;
}

function b(): NbdAttachBinding {
  return loadBinding() as unknown as NbdAttachBinding;
}

export interface NbdConnectParams {
  /** Device index, or -1 for any free device (netlink only). */
  index: number;
  /** The kernel's end of the socketpair. */
  sockFd: number;
  sizeBytes: number;
  blockSize: number;
  /** NBD transmission flags (16 bits). */
  serverFlags: number;
  /** Kernel request timeout in seconds; 0 leaves the kernel's default (no failing on timeout). */
  timeoutSec?: number;
}

/** An AF_UNIX stream socketpair, close-on-exec. */
export function socketPair(): [number, number] {
  const r = b().nbdSocketPair();
  if (typeof r === 'number') throw new RemapError(-r, 'cannot create a socketpair', { op: 'socketpair' });
  return r;
}

export function closeFd(fd: number): void {
  b().nbdCloseFd(fd);
}

/** NBD_CMD_CONNECT over generic netlink: the device index, or -errno (-ENOENT: no nbd netlink family). */
export function netlinkConnect(p: NbdConnectParams): number {
  return b().nbdNetlinkConnect(p.index, p.sockFd, p.sizeBytes, p.blockSize, p.serverFlags, p.timeoutSec ?? 0);
}

/** NBD_CMD_DISCONNECT: 0 or -errno. */
export function netlinkDisconnect(index: number): number {
  return b().nbdNetlinkDisconnect(index);
}

/** The ioctl path (the index must be given): 0 or -errno. NBD_DO_IT runs on its own native thread. */
export function ioctlConnect(p: NbdConnectParams): number {
  return b().nbdIoctlConnect(p.index, p.sockFd, p.sizeBytes, p.blockSize, p.serverFlags, p.timeoutSec ?? 0);
}

/** NBD_DISCONNECT, then waits up to waitMs for NBD_DO_IT to return: 0, -ETIMEDOUT, -ENOENT or -errno. */
export function ioctlDisconnect(index: number, waitMs: number): number {
  return b().nbdIoctlDisconnect(index, waitMs);
}
