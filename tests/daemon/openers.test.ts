/**
 * Openers of a kernel block device (src/daemon/openers.ts): the parsers of
 * /proc/PID/mountinfo, sysfs `dev` files and /proc/swaps (property tests and
 * a fuzz of arbitrary input), and findOpeners over a real /proc- and
 * /sys-shaped tree of files, symlinks and block device nodes (the host kernel
 * has no ublk/nbd; tests/vm/guest-matrix.sh checks the real thing).
 */
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeOpeners, findOpeners, kernelDevices, parseDevNumber, parseMountinfo, parseSwaps, unescapeProc } from '../../src/daemon/openers.js';

function escapeProc(s: string): string {
  return s.replace(/[\\ \t\n]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
}

const pathArb = fc.string({ minLength: 1, maxLength: 40 }).map((s) => `/${s}`);
const entryArb = fc.record({
  major: fc.integer({ min: 0, max: 4095 }),
  minor: fc.integer({ min: 0, max: 1 << 20 }),
  mountPoint: pathArb,
  fsType: fc.constantFrom('ext4', 'xfs', 'tmpfs', 'fuse.sshfs'),
  source: pathArb,
  optional: fc.array(fc.constantFrom('shared:1', 'master:7', 'propagate_from:2', 'unbindable'), { maxLength: 3 }),
});

describe('openers: parsers', () => {
  it('parseMountinfo reads back what was written, escapes and optional fields included', () => {
    fc.assert(fc.property(fc.array(entryArb, { maxLength: 8 }), (entries) => {
      const text = entries.map((e, i) => [i + 20, 1, `${e.major}:${e.minor}`, '/', escapeProc(e.mountPoint), 'rw,relatime', ...e.optional, '-', e.fsType,
        escapeProc(e.source), 'rw'].join(' ')).join('\n');
      const got = parseMountinfo(`${text}\n`);
      expect(got).toEqual(entries.map((e) => ({ major: e.major, minor: e.minor, mountPoint: e.mountPoint, fsType: e.fsType, source: e.source })));
    }));
  });

  it('parseMountinfo on a real mountinfo finds the root mount', () => {
    const text = execFileSync('cat', ['/proc/self/mountinfo'], { encoding: 'utf8' });
    const got = parseMountinfo(text);
    expect(got.length).toBeGreaterThan(0);
    expect(got.some((m) => m.mountPoint === '/')).toBe(true);
  });

  it('malformed lines are skipped, never thrown on (fuzz)', () => {
    fc.assert(fc.property(fc.string({ maxLength: 300 }), fc.array(fc.constantFrom(' ', '-', ':', '\\', '\n', '0', '12', '\\040'), { maxLength: 40 }), (s, parts) => {
      const text = `${s}${parts.join('')}`;
      for (const m of parseMountinfo(text)) {
        expect(Number.isSafeInteger(m.major) && Number.isSafeInteger(m.minor)).toBe(true);
      }
      const d = parseDevNumber(text);
      if (d !== null) expect(/^\d+:\d+\s*$/.test(text)).toBe(true);
      expect(Array.isArray(parseSwaps(text))).toBe(true);
      expect(typeof unescapeProc(text)).toBe('string');
    }), { numRuns: 2000 });
  });

  it('parseDevNumber and parseSwaps', () => {
    expect(parseDevNumber('259:0\n')).toEqual({ major: 259, minor: 0 });
    expect(parseDevNumber('43:32')).toEqual({ major: 43, minor: 32 });
    expect(parseDevNumber('43')).toBeNull();
    expect(parseDevNumber('a:b')).toBeNull();
    expect(parseSwaps('Filename\tType\tSize\tUsed\tPriority\n/dev/ublkb0p2                            partition\t1048572\t0\t-2\n/swap\\040file file 1 0 -3\n'))
      .toEqual(['/dev/ublkb0p2', '/swap file']);
  });

  it('kernelDevices keeps /dev/ublkbN and /dev/nbdN only', () => {
    expect(kernelDevices(['nbd+unix:///x?socket=/run/a.sock', '/dev/nbd3', '/dev/ublkb12', '127.0.0.1:10809', '/dev/ublkc1'])).toEqual(['/dev/nbd3', '/dev/ublkb12']);
  });
});

describe('openers: findOpeners over a /proc and /sys tree', () => {
  let dir = '';
  let devDir = '';
  let proc = '';
  let sys = '';
  beforeAll(() => {
    dir = mkdtempSync('/tmp/dmr-openers-');
    // device nodes must live under /dev/ (only those fd targets are stat()ed): /dev/shm is a tmpfs
    devDir = mkdtempSync('/dev/shm/dmr-openers-');
    execFileSync('mknod', [join(devDir, 'fake0'), 'b', '250', '7']);
    execFileSync('mknod', [join(devDir, 'fake0p1'), 'b', '250', '8']);
    execFileSync('mknod', [join(devDir, 'other'), 'b', '250', '9']);
    proc = join(dir, 'proc');
    sys = join(dir, 'sys');
    const w = (p: string, s: string): void => {
      mkdirSync(join(p, '..'), { recursive: true });
      writeFileSync(p, s);
    };
    const l = (p: string, target: string): void => {
      mkdirSync(join(p, '..'), { recursive: true });
      symlinkSync(target, p);
    };
    w(join(sys, 'block/fake0/dev'), '250:7\n');
    w(join(sys, 'block/fake0/fake0p1/dev'), '250:8\n');
    w(join(sys, 'block/fake0/queue/dummy'), '');
    mkdirSync(join(sys, 'block/fake0/holders'), { recursive: true });
    mkdirSync(join(sys, 'block/fake0/fake0p1/holders'), { recursive: true });
    l(join(sys, 'block/fake0/fake0p1/holders/dm-3'), '../../../dm-3');
    w(join(sys, 'block/dm-3/dm/name'), 'vg-data\n');
    w(join(proc, 'swaps'), `Filename\tType\tSize\tUsed\tPriority\n${devDir}/fake0p1 partition 100 0 -2\n${devDir}/other partition 100 0 -3\n`);
    l(join(proc, 'self'), '400');
    // our namespace, seen from our root: the ext4 mount of the partition (pid 100, init, sees it under another root)
    w(join(proc, '400/mountinfo'), '22 1 0:21 / / rw - tmpfs tmpfs rw\n35 22 250:8 / /mnt/my\\040data rw,relatime shared:9 - ext4 /dev/fake0p1 rw\n');
    // pid 100: our namespace; fd 3 on an unrelated device, fd 4 on a file
    l(join(proc, '100/ns/mnt'), 'mnt:[4026531841]');
    w(join(proc, '100/comm'), 'init\n');
    w(join(proc, '100/mountinfo'), '22 1 0:21 / / rw - tmpfs tmpfs rw\n35 22 250:8 / /newroot/mnt/my\\040data rw,relatime shared:9 - ext4 /dev/fake0p1 rw\n');
    l(join(proc, '100/fd/3'), `${devDir}/other`);
    l(join(proc, '100/fd/4'), '/etc/hostname');
    // pid 200: same namespace (not read again), holds the whole device open
    l(join(proc, '200/ns/mnt'), 'mnt:[4026531841]');
    w(join(proc, '200/comm'), 'fio\n');
    w(join(proc, '200/mountinfo'), '35 22 250:7 / /never-read rw - ext4 /dev/fake0 rw\n');
    l(join(proc, '200/fd/0'), '/dev/null');
    l(join(proc, '200/fd/7'), `${devDir}/fake0`);
    l(join(proc, '200/fd/8'), 'socket:[1234]');
    // pid 300: another mount namespace that still has the device mounted
    l(join(proc, '300/ns/mnt'), 'mnt:[4026532999]');
    w(join(proc, '300/comm'), 'systemd-udevd\n');
    w(join(proc, '300/mountinfo'), '50 40 250:7 / /run/private rw - xfs /dev/fake0 rw\n');
    // pid 400: ignored (the daemon itself) although it holds the device
    l(join(proc, '400/ns/mnt'), 'mnt:[4026531841]');
    w(join(proc, '400/comm'), 'node\n');
    l(join(proc, '400/fd/9'), `${devDir}/fake0`);
    // pid 500 vanished halfway: a directory without readable parts
    mkdirSync(join(proc, '500'), { recursive: true });
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
    rmSync(devDir, { recursive: true, force: true });
  });

  it('names every mount, fd, holder and swap of the device and its partitions', async () => {
    const got = await findOpeners(['/dev/fake0'], { procRoot: proc, sysRoot: sys, ignorePids: [400] });
    const lines = got.map((x) => `${x.kind} ${x.device} ${x.pid ?? '-'} ${x.comm ?? '-'} ${x.detail}`).sort();
    expect(lines).toEqual([
      'fd /dev/fake0 200 fio open by pid 200 (fio) as fd 7',
      'holder /dev/fake0p1 - - held by dm-3 (device-mapper vg-data)',
      'mount /dev/fake0 300 systemd-udevd mounted at /run/private (xfs) in the mount namespace of pid 300 (systemd-udevd)',
      'mount /dev/fake0p1 - - mounted at /mnt/my data (ext4)',
      `swap /dev/fake0p1 - - swap on ${devDir}/fake0p1`,
    ]);
    expect(describeOpeners(got.filter((x) => x.kind === 'fd'))).toBe('/dev/fake0 open by pid 200 (fio) as fd 7');
  });

  it('without the ignore list the daemon pid is reported too; an unknown device has no openers', async () => {
    const got = await findOpeners(['/dev/fake0'], { procRoot: proc, sysRoot: sys, ignorePids: [] });
    expect(got.filter((x) => x.kind === 'fd').map((x) => x.pid).sort()).toEqual([200, 400]);
    expect(await findOpeners(['/dev/nosuch9'], { procRoot: proc, sysRoot: sys })).toEqual([]);
  });
});
