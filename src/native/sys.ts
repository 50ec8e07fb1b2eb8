/**
 * System calls Node lacks, from native/sys.cc: peer credentials of a unix
 * socket, sd_notify, the size of a block device, and _exit.
 */
import type { Socket } from 'node:net';
import { RemapError } from '../errors.js';
import { loadBinding } from './binding.js';

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
  /** Supplementary groups (SO_PEERGROUPS); empty when the kernel does not report them. */
  groups: number[];
}

interface SysBinding {
  peerCredentials(fd: number): PeerCredentials | number;
  sdNotify(state: string, socketPath?: string): boolean;
  blockDeviceSize(path: string): number;
  exitNow(code: number): never;
}

function sys(): SysBinding {
  return loadBinding() as unknown as SysBinding;
}

/** SO_PEERCRED (+ SO_PEERGROUPS) of a connected unix socket fd. Throws RemapError on failure. */
export function peerCredentials(fd: number): PeerCredentials {
  const r = sys().peerCredentials(fd);
  if (typeof r === 'number') throw new RemapError(-r, 'cannot read the peer credentials of the control connection', { op: 'SO_PEERCRED' });
  return r;
}

/** The fd of an accepted net.Socket (a libuv pipe handle), or -1 when it has none. */
export function socketFd(socket: Socket): number {
  const handle = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle;
  const fd = handle?.fd;
  return typeof fd === 'number' ? fd : -1;
}

/**
 * sd_notify: one datagram to $NOTIFY_SOCKET (or `socketPath`), e.g.
 * 'READY=1', 'STOPPING=1', 'STATUS=...'. '@' names the abstract namespace.
 * False when there is no notify socket or the send failed.
 */
export function sdNotify(state: string, socketPath?: string): boolean {
  return socketPath === undefined ? sys().sdNotify(state) : sys().sdNotify(state, socketPath);
}

/** Size in bytes of a block device (BLKGETSIZE64) or a regular file. Throws RemapError. */
export function blockDeviceSize(path: string): number {
  const r = sys().blockDeviceSize(path);
  if (r < 0) throw new RemapError(-r, `cannot get the size of ${path}`, { device: path, op: 'size' });
  return r;
}

/**
 * Ends the process at once with `code` (_exit(2)): no exit handlers, and no
 * wait for libuv's thread pool, where a write to a stalled pipe can block forever.
 */
export function exitNow(code: number): never {
  return sys().exitNow(code);
}
