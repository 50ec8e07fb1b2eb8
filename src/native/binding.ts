/**
 * Loader for the native addon (build/Release/dm_remapd.node, built by
 * node-gyp from binding.gyp). Works from src/native (vitest, tsx) and from
 * dist/src/native (tsc output): the project root is the nearest folder
 * upwards that holds a package.json.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeBackingInfo {
  path: string;
  sizeBytes: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  isBlockDevice: boolean;
  openMode: 'direct' | 'buffered';
  readOnly: boolean;
  dev: number;
  ino: number;
  rdev: number;
  /** Which io_uring setup the kernel accepted: 'defer_taskrun', 'coop_taskrun' or 'plain'. */
  ringSetup: string;
  /** Buffer address alignment enforced in direct mode (statx dio_mem_align, else the logical block size). */
  dioMemAlign: number;
}

/** One native device. Every method returns errors as negative errnos; none throws. */
export interface NativeBackingHandle {
  /** 0 or -errno; on failure errorStage() names the step that failed. */
  open(path: string, direct: boolean, readOnly: boolean, exclusive: boolean, queueDepth: number): number;
  errorStage(): string;
  info(): NativeBackingInfo;
  /**
   * Queue `count` ops described by desc[5*i .. 5*i+4] = [op, id, offset, length, flags]
   * (buffers in bufs[i]) and enter the kernel once. Returns count or -errno.
   * Per-op errors come back as completions, never from this call.
   */
  submit(desc: Float64Array, bufs: (Uint8Array | null)[], count: number): number;
  /** A new close-on-exec descriptor of the open device (the ublk fast path's), or -errno. */
  dupFd(): number;
  /** Submit one IORING_OP_ASYNC_CANCEL (ANY|ALL). Its completion comes back with id 0. */
  cancel(): number;
  /** Tear down poll, ring, eventfd, fd, worker. Waits at most workerWaitMs for the ioctl worker. */
  close(workerWaitMs: number): { workerAbandoned: number; workerDetached: boolean };
  /** Allows op 100 (the ioctl worker sleeps `length` ms), for tests of hung ioctls. */
  enableTestHooks(): void;
}

export interface NativeBackingConstructor {
  /** onComplete(count): completions[2*i] = id, completions[2*i+1] = res, for i < count. */
  new (onComplete: (count: number) => void, completions: Float64Array): NativeBackingHandle;
}

export interface NativeBinding {
  NativeBacking: NativeBackingConstructor;
  /** A zeroed Buffer over posix_memalign'd memory, or a negative errno. */
  allocAligned(size: number, alignment: number, hugePages?: boolean): Buffer | number;
}

/** Nearest folder at or above `start` that holds a package.json. */
export function findProjectRoot(start: string = dirname(fileURLToPath(import.meta.url))): string {
  let dir = start;
  for (;;) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`dm-remapd: no package.json above ${start}`);
    dir = parent;
  }
}

export function addonPath(): string {
  return process.env.DM_REMAPD_ADDON ?? join(findProjectRoot(), 'build', 'Release', 'dm_remapd.node');
}

let cached: NativeBinding | undefined;

export function loadBinding(): NativeBinding {
  if (cached === undefined) {
    const require = createRequire(import.meta.url);
    const path = addonPath();
    if (!existsSync(path)) {
      throw new Error(`dm-remapd native addon not built: ${path} is missing (run "npm rebuild")`);
    }
    cached = require(path) as NativeBinding;
  }
  return cached;
}
