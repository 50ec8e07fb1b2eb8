/**
 * The mount-namespace check (src/daemon/mount-namespace.ts): the verdict on
 * a prepared /proc, the mountinfo parser (examples, then properties), the
 * real daemon started in a private mount namespace (`unshare`) warns and in
 * its parent's namespace does not, and detachOwnMounts really detaches a
 * mount in a private namespace (a tmpfs standing in for a ublk device: the
 * host has no ublk; the guest test tests/vm/guest-names-ns.sh has the real
 * one).
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { checkMountNamespace, mountNamespaceVerdict, parseMountinfo } from '../../src/daemon/mount-namespace.js';
import { tempDir } from '../engine/fixtures.js';
import { DAEMON, ROOT, requireBuild } from './helpers.js';

type Line = Record<string, unknown>;

function fakeProc(root: string, self: string, init: string | null): void {
  for (const [pid, ns] of [['self', self], ['1', init]] as const) {
    if (ns === null) continue;
    mkdirSync(join(root, pid, 'ns'), { recursive: true });
    symlinkSync(ns, join(root, pid, 'ns', 'mnt'));
  }
}

const UNSHARE = spawnSync('unshare', ['-p', '-f', '--mount-proc', 'true']).status === 0;

describe('mount namespace verdict', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('mntns'));
  });
  afterEach(() => cleanup());

  it('initial when /proc/self/ns/mnt equals /proc/1/ns/mnt, private when not, unknown when PID 1 cannot be read', () => {
    fakeProc(join(dir, 'a'), 'mnt:[4026531841]', 'mnt:[4026531841]');
    fakeProc(join(dir, 'b'), 'mnt:[4026532177]', 'mnt:[4026531841]');
    fakeProc(join(dir, 'c'), 'mnt:[4026532177]', null);
    expect(mountNamespaceVerdict(join(dir, 'a'))).toEqual({ self: 'mnt:[4026531841]', init: 'mnt:[4026531841]', initial: true });
    expect(mountNamespaceVerdict(join(dir, 'b'))).toEqual({ self: 'mnt:[4026532177]', init: 'mnt:[4026531841]', initial: false });
    const c = mountNamespaceVerdict(join(dir, 'c'));
    expect(c).toMatchObject({ self: 'mnt:[4026532177]', init: null, initial: null });
    expect(c.reason).toMatch(/ENOENT.*1\/ns\/mnt/);
    // The real /proc of this process: its own namespace is always readable.
    expect(mountNamespaceVerdict().self).toMatch(/^mnt:\[\d+\]$/);
  });

  it('logs a warning naming both namespaces and the unit options only for a private namespace', () => {
    fakeProc(join(dir, 'a'), 'mnt:[1]', 'mnt:[1]');
    fakeProc(join(dir, 'b'), 'mnt:[2]', 'mnt:[1]');
    fakeProc(join(dir, 'c'), 'mnt:[2]', null);
    const lines: Line[] = [];
    const log = pino({ level: 'info' }, { write: (s: string) => { lines.push(JSON.parse(s) as Line); } });
    checkMountNamespace(log, join(dir, 'a'));
    checkMountNamespace(log, join(dir, 'b'));
    checkMountNamespace(log, join(dir, 'c'));
    expect(lines.map((l) => [l.level, l.event])).toEqual([[30, 'mount-namespace'], [40, 'mount-namespace-private'], [30, 'mount-namespace']]);
    expect(lines[1]).toMatchObject({ mountNamespace: 'mnt:[2]', initMountNamespace: 'mnt:[1]' });
    expect(String(lines[1].msg)).toMatch(/ProtectSystem=.*PrivateTmp=/);
    expect(lines[2]).toMatchObject({ initial: null });
  });
});

describe('parseMountinfo', () => {
  it('reads the fields of proc(5) lines, with optional fields and octal escapes', () => {
    const text = [
      '36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue',
      '40 36 259:3 / /srv/my\\040data rw,relatime shared:7 master:2 - ext4 /dev/ublkb0 rw',
      '41 36 43:0 / /mnt/n rw - xfs /dev/nbd0 rw',
      'garbage line',
      '',
      '42 36 x:0 / /bad rw - ext4 /dev/x rw',
    ].join('\n');
    expect(parseMountinfo(text)).toEqual([
      { mountId: 36, parentId: 35, major: 98, minor: 0, root: '/mnt1', mountPoint: '/mnt/parent', fsType: 'ext3', source: '/dev/root' },
      { mountId: 40, parentId: 36, major: 259, minor: 3, root: '/', mountPoint: '/srv/my data', fsType: 'ext4', source: '/dev/ublkb0' },
      { mountId: 41, parentId: 36, major: 43, minor: 0, root: '/', mountPoint: '/mnt/n', fsType: 'xfs', source: '/dev/nbd0' },
    ]);
  });

  it('parses this process\'s own mountinfo, root included', () => {
    const m = parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8'));
    expect(m.length).toBeGreaterThan(0);
    expect(m.some((e) => e.mountPoint === '/')).toBe(true);
  });

  it('never throws, whatever the input (fuzz)', () => {
    fc.assert(fc.property(fc.array(fc.oneof(fc.string(), fc.string({ unit: 'binary' }), fc.constantFrom('1 2 3:4 / / rw - ', '1 2 3:4 / / rw - x', ' - - - - - - - -'))), (ls) => {
      const r = parseMountinfo(ls.join('\n'));
      expect(Array.isArray(r)).toBe(true);
    }), { numRuns: 2000 });
  });

  it('round-trips generated entries, mount points with spaces, tabs, newlines and backslashes included (property)', () => {
    const seg = fc.string({ unit: fc.constantFrom('a', 'b', ' ', '\t', '\n', '\\', 'é', '-'), minLength: 1, maxLength: 8 });
    const esc = (s: string): string => s.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
    const entry = fc.record({
      mountId: fc.nat(1e6), parentId: fc.nat(1e6), major: fc.nat(4095), minor: fc.nat(1 << 20),
      root: seg.map((s) => `/${s}`), mountPoint: fc.array(seg, { maxLength: 4 }).map((p) => `/${p.join('/')}`),
      fsType: fc.constantFrom('ext4', 'xfs', 'tmpfs', 'fuse.nbdfuse'), source: seg,
      optional: fc.array(fc.constantFrom('shared:1', 'master:2', 'propagate_from:3', 'unbindable'), { maxLength: 3 }),
    });
    fc.assert(fc.property(fc.array(entry, { maxLength: 8 }), (es) => {
      const text = es.map((e) => [e.mountId, e.parentId, `${e.major}:${e.minor}`, esc(e.root), esc(e.mountPoint), 'rw,relatime', ...e.optional, '-', e.fsType, esc(e.source), 'rw'].join(' ')).join('\n');
      expect(parseMountinfo(text)).toEqual(es.map(({ optional: _o, ...rest }) => rest));
    }));
  });
});

/** Runs the daemon through `sh -c` under unshare; resolves with its JSON log lines once `until` matches one (then kills the namespace). */
function daemonIn(dir: string, inner: string, until: (l: Line) => boolean): Promise<Line[]> {
  const sock = join(dir, `c${Math.random().toString(36).slice(2)}.sock`);
  const cmd = `${inner} ${process.execPath} ${DAEMON} --state-dir ${join(dir, 'state')} --control-socket ${sock} --config ${join(dir, 'cfg.json')}; exit $?`;
  // PID 1 of the new PID namespace is sh; its /proc is the namespace's own.
  const p = spawn('unshare', ['-p', '-f', '--mount-proc', '--kill-child=SIGKILL', 'sh', '-c', cmd], { stdio: ['ignore', 'pipe', 'pipe'], cwd: ROOT });
  const lines: Line[] = [];
  let buf = '';
  let stderr = '';
  p.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { p.kill('SIGKILL'); reject(new Error(`no matching log line in 20 s: ${JSON.stringify(lines)} ${stderr}`)); }, 20_000);
    p.stdout.setEncoding('utf8').on('data', (c: string) => {
      buf += c;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        try {
          lines.push(JSON.parse(buf.slice(0, nl)) as Line);
        } catch {
          lines.push({ nonJson: buf.slice(0, nl) });
        }
        buf = buf.slice(nl + 1);
        if (until(lines[lines.length - 1])) {
          clearTimeout(t);
          p.kill('SIGKILL');
          p.once('close', () => resolve(lines));
        }
      }
    });
    p.once('close', (code) => { clearTimeout(t); resolve(lines); void code; });
  });
}

describe.skipIf(!UNSHARE)('the daemon in a private mount namespace (unshare)', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('mntns-d'));
    // Stable names off: this test is about the namespace, and must not touch /dev/disk.
    writeFileSync(join(dir, 'cfg.json'), JSON.stringify({ byRemapDir: null, udevNamesDir: null }));
  });
  afterEach(() => cleanup());

  it('warns (mount-namespace-private) before it is ready, and still serves', async () => {
    requireBuild();
    const lines = await daemonIn(dir, 'unshare -m', (l) => l.event === 'ready');
    const warn = lines.find((l) => l.event === 'mount-namespace-private');
    expect(warn, JSON.stringify(lines)).toBeDefined();
    expect(warn?.level).toBe(40);
    expect(warn?.mountNamespace).not.toBe(warn?.initMountNamespace);
    expect(lines.findIndex((l) => l.event === 'mount-namespace-private')).toBeLessThan(lines.findIndex((l) => l.event === 'ready'));
  });

  it('does not warn in the namespace of PID 1', async () => {
    requireBuild();
    const lines = await daemonIn(dir, '', (l) => l.event === 'ready');
    expect(lines.find((l) => l.event === 'ready'), JSON.stringify(lines)).toBeDefined();
    expect(lines.find((l) => l.event === 'mount-namespace')).toMatchObject({ initial: true, level: 30 });
    expect(lines.some((l) => l.event === 'mount-namespace-private')).toBe(false);
  });
});

describe.skipIf(!UNSHARE)('detachOwnMounts (in a private namespace)', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('mntns-det'));
  });
  afterEach(() => cleanup());

  it('lazily unmounts every mount of the given devices in its own namespace, deepest first, and nothing else', () => {
    requireBuild();
    // A child in its own mount namespace mounts two tmpfs (one inside the
    // other) and a third, then asks detachOwnMounts for the first device's
    // mounts: its MAJ:MIN goes into a fake /sys/block/ublkb0/dev.
    const script = `
      import { execFileSync } from 'node:child_process';
      import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
      import { createRequire } from 'node:module';
      import { detachOwnMounts, parseMountinfo } from '${join(ROOT, 'dist', 'src', 'daemon', 'mount-namespace.js')}';
      const pino = createRequire(${JSON.stringify(join(ROOT, 'package.json'))})('pino');
      const d = ${JSON.stringify(dir)};
      for (const m of ['a', 'other']) mkdirSync(d + '/' + m);
      execFileSync('mount', ['--make-rprivate', '/']);
      execFileSync('mount', ['-t', 'tmpfs', 'dmr-a', d + '/a']);
      mkdirSync(d + '/a/b');
      execFileSync('mount', ['--bind', d + '/a', d + '/a/b']);
      execFileSync('mount', ['-t', 'tmpfs', 'dmr-other', d + '/other']);
      const mi = () => parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8'));
      const a = mi().find((m) => m.mountPoint === d + '/a');
      mkdirSync(d + '/sys/ublkb0', { recursive: true });
      writeFileSync(d + '/sys/ublkb0/dev', a.major + ':' + a.minor + '\\n');
      const lines = [];
      const log = pino({}, { write: (s) => lines.push(JSON.parse(s)) });
      const done = await detachOwnMounts(['/dev/ublkb0'], log, { sysBlockDir: d + '/sys' });
      const left = mi().filter((m) => m.mountPoint.startsWith(d)).map((m) => m.mountPoint);
      console.log(JSON.stringify({ done, left, events: lines.map((l) => l.event) }));
    `;
    writeFileSync(join(dir, 't.mjs'), script);
    const r = spawnSync('unshare', ['-m', process.execPath, join(dir, 't.mjs')], { encoding: 'utf8', cwd: ROOT, timeout: 20_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { done: string[]; left: string[]; events: string[] };
    expect(out.done).toEqual([join(dir, 'a', 'b'), join(dir, 'a')]);
    expect(out.left).toEqual([join(dir, 'other')]);
    expect(out.events).toEqual(['own-mount-detached', 'own-mount-detached']);
    // This process's namespace never saw those mounts.
    expect(parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8')).some((m) => m.mountPoint.startsWith(dir))).toBe(false);
  });
});

describe('systemd/dm-remapd.service', () => {
  const unit = readFileSync(join(ROOT, 'systemd', 'dm-remapd.service'), 'utf8');
  const directives = unit.split('\n').filter((l) => /^[A-Za-z]+=/.test(l)).map((l) => l.slice(0, l.indexOf('=')));

  it('uses no option that gives the service its own mount namespace', () => {
    // systemd.exec(5): each of these sets up a private mount namespace.
    const namespacing = ['ProtectSystem', 'ProtectHome', 'PrivateTmp', 'PrivateDevices', 'PrivateMounts', 'PrivateNetwork',
      'ProtectKernelTunables', 'ProtectKernelModules', 'ProtectKernelLogs', 'ProtectControlGroups', 'ProtectProc', 'ProcSubset',
      'ReadOnlyPaths', 'ReadWritePaths', 'InaccessiblePaths', 'ExecPaths', 'NoExecPaths', 'TemporaryFileSystem', 'BindPaths',
      'BindReadOnlyPaths', 'RootDirectory', 'RootImage', 'MountAPIVFS', 'MountFlags', 'LogNamespace', 'MountImages',
      'ExtensionImages', 'ExtensionDirectories', 'DynamicUser'];
    expect(directives.filter((d) => namespacing.includes(d))).toEqual([]);
  });

  it('starts before local-fs-pre.target without the default dependencies, after udev and the module loader', () => {
    expect(unit).toMatch(/^DefaultDependencies=no$/m);
    expect(unit).toMatch(/^Before=.*\blocal-fs-pre\.target\b/m);
    expect(unit).toMatch(/^After=.*\bsystemd-udevd\.service\b.*\bsystemd-modules-load\.service\b/m);
    expect(unit).toMatch(/^WantedBy=local-fs-pre\.target$/m);
  });

  it('systemd-analyze verify accepts it (ExecStart pointed at a real file)', () => {
    const which = spawnSync('systemd-analyze', ['--version']);
    if (which.status !== 0) {
      console.warn('*** systemd-analyze not installed: verify skipped ***');
      return;
    }
    const { dir, cleanup } = tempDir('unit');
    try {
      const bin = join(dir, 'dm-remapd');
      writeFileSync(bin, `#!/bin/sh\nexec ${process.execPath} ${DAEMON} "$@"\n`, { mode: 0o755 });
      const copy = join(dir, 'dm-remapd.service');
      writeFileSync(copy, unit.replace(/^ExecStart=.*$/m, `ExecStart=${bin}`));
      const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
    } finally {
      cleanup();
    }
  });
});
