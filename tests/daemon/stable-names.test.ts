/**
 * Stable names (/dev/disk/by-remap/NAME, src/daemon/stable-names.ts) on real
 * folders: the link folder, the udev name files and the sysfs `uevent`
 * files are given as temporary paths, so everything here runs on any host.
 * The real kernel devices (/dev/ublkbN, /dev/nbdN) are proven in the guest
 * (tests/vm/guest-names-ns.sh); here the DeviceManager runs real engines over
 * files with an export that reports a kernel device path.
 */
import { existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, readlinkSync, renameSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ConfigError, DEFAULTS, applyConfig } from '../../src/daemon/config.js';
import { DeviceManager, type ExportStarter } from '../../src/daemon/devices.js';
import { StableNames, attachStableNames, kernelDeviceOf, type StableNamesHandle } from '../../src/daemon/stable-names.js';
import { openEngine } from '../../src/engine/open.js';
import { sparseFile, tempDir } from '../engine/fixtures.js';

type Line = Record<string, unknown>;

function logger(lines: Line[]): pino.Logger {
  return pino({ level: 'debug' }, { write: (s: string) => { lines.push(JSON.parse(s) as Line); } });
}

/** A fake sysfs disk folder with a `uevent` file (and partitions), as /sys/block/<kname> has. */
function sysDisk(sys: string, kname: string, parts = 0): void {
  mkdirSync(join(sys, kname), { recursive: true });
  writeFileSync(join(sys, kname, 'uevent'), '');
  for (let i = 1; i <= parts; i++) {
    mkdirSync(join(sys, kname, `${kname}p${i}`));
    writeFileSync(join(sys, kname, `${kname}p${i}`, 'uevent'), '');
  }
}

describe('StableNames', () => {
  let dir: string;
  let cleanup: () => void;
  let links: string;
  let udev: string;
  let sys: string;
  let dev: string;
  let lines: Line[];
  let names: StableNames;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('names'));
    links = join(dir, 'dev', 'disk', 'by-remap');
    udev = join(dir, 'run', 'udev');
    sys = join(dir, 'sys', 'block');
    dev = join(dir, 'dev');
    lines = [];
    names = new StableNames({ linkDir: links, udevDir: udev, sysBlockDir: sys, logger: logger(lines) });
  });
  afterEach(() => cleanup());

  it('links NAME to the device with a relative link, writes the udev name file, sends change uevents to the disk and its partitions', () => {
    sysDisk(sys, 'ublkb3', 2);
    mkdirSync(dev, { recursive: true });
    writeFileSync(join(dev, 'ublkb3'), 'the device');
    const old = process.umask(0o077); // the unit's UMask
    try {
      expect(names.link('d0', join(dev, 'ublkb3'))).toBe(true);
    } finally {
      process.umask(old);
    }
    const link = join(links, 'd0');
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
    expect(readlinkSync(link)).toBe('../../ublkb3'); // as udev writes them
    expect(readFileSync(link, 'utf8')).toBe('the device');
    expect(statSync(links).mode & 0o777).toBe(0o755); // listable by users despite the umask
    expect(readFileSync(join(udev, 'ublkb3'), 'utf8')).toBe('DM_REMAPD_NAME=d0\n');
    for (const f of ['ublkb3/uevent', 'ublkb3/ublkb3p1/uevent', 'ublkb3/ublkb3p2/uevent']) expect(readFileSync(join(sys, f), 'utf8')).toBe('change');
    expect(lines.find((l) => l.event === 'stable-name')).toMatchObject({ device: 'd0', path: link, kernelDevice: join(dev, 'ublkb3') });
    expect(names.links()).toEqual([{ name: 'd0', device: join(dev, 'ublkb3') }]);
  });

  it('re-linking to another device replaces the link atomically and leaves no temporary file', () => {
    expect(names.link('d0', '/dev/ublkb0')).toBe(true);
    expect(names.link('d0', '/dev/ublkb7')).toBe(true);
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb7');
    expect(readdirSync(links)).toEqual(['d0']);
    expect(readdirSync(udev).sort()).toEqual(['ublkb0', 'ublkb7']); // the stale one goes at unlink/reconcile
  });

  it('never clobbers a file or folder that is not a symlink', () => {
    mkdirSync(links, { recursive: true });
    writeFileSync(join(links, 'd0'), 'operator notes');
    mkdirSync(join(links, 'd1'));
    expect(names.link('d0', '/dev/ublkb0')).toBe(false);
    expect(names.link('d1', '/dev/nbd1')).toBe(false);
    expect(readFileSync(join(links, 'd0'), 'utf8')).toBe('operator notes');
    expect(statSync(join(links, 'd1')).isDirectory()).toBe(true);
    const warn = lines.filter((l) => l.event === 'stable-name-failed');
    expect(warn.map((l) => l.device)).toEqual(['d0', 'd1']);
    expect(String(warn[0].msg)).toContain('is not a symlink');
    expect(existsSync(udev)).toBe(false); // no udev name for a device without a link
  });

  it('refuses names and devices it does not own: "..", slashes, a device that is not ublkbN or nbdN', () => {
    for (const [n, d] of [['..', '/dev/ublkb0'], ['.', '/dev/ublkb0'], ['a/b', '/dev/ublkb0'], ['', '/dev/ublkb0'], ['d', '/dev/sda'], ['d', '/dev/ublkc0'], ['d', '/dev/nbd0p1']]) {
      expect(names.link(n, d), `${n} -> ${d}`).toBe(false);
    }
    expect(() => readdirSync(links)).toThrow(/ENOENT/);
  });

  it('unlink removes the link only while it points to the device, and the udev file only when it names the device', () => {
    sysDisk(sys, 'nbd2');
    names.link('n', '/dev/nbd2');
    writeFileSync(join(sys, 'nbd2', 'uevent'), '');
    names.unlink('n', '/dev/nbd2');
    expect(() => lstatSync(join(links, 'n'))).toThrow(/ENOENT/);
    expect(() => readFileSync(join(udev, 'nbd2'))).toThrow(/ENOENT/);
    expect(readFileSync(join(sys, 'nbd2', 'uevent'), 'utf8')).toBe('change'); // udev drops its link too
    expect(names.links()).toEqual([]);

    names.link('m', '/dev/nbd3');
    symlinkSync('../../nbd9', join(links, '.tmp'));
    // someone pointed m elsewhere meanwhile, and nbd3's name file now names another device
    renameSync(join(links, '.tmp'), join(links, 'm'));
    writeFileSync(join(udev, 'nbd3'), 'DM_REMAPD_NAME=other\n');
    names.unlink('m', '/dev/nbd3');
    expect(readlinkSync(join(links, 'm'))).toBe('../../nbd9');
    expect(readFileSync(join(udev, 'nbd3'), 'utf8')).toBe('DM_REMAPD_NAME=other\n');
  });

  it('reconcile links the current devices, fixes wrong targets, removes stale links and name files, and leaves foreign entries alone', () => {
    mkdirSync(links, { recursive: true });
    mkdirSync(udev, { recursive: true });
    sysDisk(sys, 'nbd5');
    symlinkSync('../../ublkb9', join(links, 'old')); // a device removed while the daemon was down
    symlinkSync('../../ublkb1', join(links, 'd0')); // d0 came back as ublkb0
    symlinkSync('../../sda', join(links, 'disk-by-hand')); // not ours
    writeFileSync(join(links, 'README'), 'x');
    symlinkSync('../../ublkb0', join(links, '.d0.dm-remapd-4242')); // a crash between symlink and rename
    writeFileSync(join(udev, 'nbd5'), 'DM_REMAPD_NAME=old-nbd\n');
    writeFileSync(join(udev, 'not-a-disk'), 'x');
    writeFileSync(join(udev, 'ublkb0.tmp-4242'), 'DM_REMAPD_NAME=d0\n');
    const r = names.reconcile([{ name: 'd0', device: '/dev/ublkb0' }, { name: 'n1', device: '/dev/nbd2' }]);
    expect(r).toEqual({ linked: ['d0', 'n1'], removed: ['old'] });
    expect(readdirSync(links).sort()).toEqual(['README', 'd0', 'disk-by-hand', 'n1']);
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb0');
    expect(resolve(links, readlinkSync(join(links, 'n1')))).toBe('/dev/nbd2');
    expect(readlinkSync(join(links, 'disk-by-hand'))).toBe('../../sda');
    expect(readdirSync(udev).sort()).toEqual(['nbd2', 'not-a-disk', 'ublkb0']);
    expect(readFileSync(join(sys, 'nbd5', 'uevent'), 'utf8')).toBe('change');
    expect(lines.filter((l) => l.event === 'stable-name-removed').map((l) => l.path).sort())
      .toEqual([join(links, '.d0.dm-remapd-4242'), join(links, 'old')]);
    // Idempotent: nothing more to do.
    expect(names.reconcile([{ name: 'd0', device: '/dev/ublkb0' }, { name: 'n1', device: '/dev/nbd2' }])).toEqual({ linked: ['d0', 'n1'], removed: [] });
  });

  it('without a udev folder it only manages the links', () => {
    const plain = new StableNames({ linkDir: links, udevDir: null, sysBlockDir: sys, logger: logger(lines) });
    expect(plain.link('d0', '/dev/ublkb0')).toBe(true);
    expect(() => readdirSync(udev)).toThrow(/ENOENT/);
    plain.unlink('d0', '/dev/ublkb0');
    expect(readdirSync(links)).toEqual([]);
  });

  it('any sequence of link/unlink/reconcile leaves exactly the links of the last state (property)', () => {
    const nameArb = fc.constantFrom('a', 'b', 'c.d', 'e_f', 'g-1');
    const devArb = fc.constantFrom('/dev/ublkb0', '/dev/ublkb1', '/dev/nbd0', '/dev/nbd15');
    const op = fc.oneof(
      fc.record({ kind: fc.constant('link' as const), name: nameArb, device: devArb }),
      fc.record({ kind: fc.constant('unlink' as const), name: nameArb }),
      fc.record({ kind: fc.constant('reconcile' as const) }),
    );
    let run = 0;
    fc.assert(fc.property(fc.array(op, { maxLength: 25 }), (ops) => {
      const base = join(dir, `p${run++}`);
      const n = new StableNames({ linkDir: join(base, 'links'), udevDir: join(base, 'udev'), sysBlockDir: join(base, 'sys'), logger: pino({ level: 'silent' }) });
      const model = new Map<string, string>();
      for (const o of ops) {
        if (o.kind === 'link') {
          n.link(o.name, o.device);
          model.set(o.name, o.device);
        } else if (o.kind === 'unlink') {
          const d = model.get(o.name);
          if (d !== undefined) n.unlink(o.name, d);
          model.delete(o.name);
        } else {
          // A restart: a new daemon knows only the devices, not the links made before.
          const fresh = new StableNames({ linkDir: join(base, 'links'), udevDir: join(base, 'udev'), sysBlockDir: join(base, 'sys'), logger: pino({ level: 'silent' }) });
          fresh.reconcile([...model].map(([name, device]) => ({ name, device })));
        }
      }
      let entries: string[] = [];
      try {
        entries = readdirSync(join(base, 'links'));
      } catch {
        entries = [];
      }
      const actual = new Map(entries.map((e) => [e, resolve(join(base, 'links'), readlinkSync(join(base, 'links', e)))]));
      // Two names may share a device in this model (the daemon never does): only the link targets are compared.
      expect(actual).toEqual(model);
    }), { numRuns: 150 });
  });
});

describe('kernelDeviceOf', () => {
  it('prefers /dev/ublkbN, then /dev/nbdN, and ignores NBD socket endpoints', () => {
    expect(kernelDeviceOf(['nbd+unix:///d?socket=/run/x.sock', '/dev/nbd1', '/dev/ublkb4'])).toBe('/dev/ublkb4');
    expect(kernelDeviceOf(['nbd://127.0.0.1:10809/d', '/dev/nbd1'])).toBe('/dev/nbd1');
    expect(kernelDeviceOf(['nbd://127.0.0.1:10809/d', '/dev/nbd1p1', '/dev/sda'])).toBeNull();
    expect(kernelDeviceOf([])).toBeNull();
  });

  it('returns one of its inputs or null, for any strings (property)', () => {
    fc.assert(fc.property(fc.array(fc.oneof(fc.string(), fc.constantFrom('/dev/ublkb0', '/dev/nbd3', '/dev/nbd', '/dev/ublkb'))), (eps) => {
      const r = kernelDeviceOf(eps);
      if (r !== null) {
        expect(eps).toContain(r);
        expect(r).toMatch(/^\/dev\/(ublkb|nbd)\d+$/);
      } else {
        expect(eps.some((e) => /^\/dev\/(ublkb|nbd)\d{1,7}$/.test(e))).toBe(false);
      }
    }));
  });
});

describe('config keys byRemapDir and udevNamesDir', () => {
  it('take absolute paths or null, and name the key otherwise', () => {
    expect(applyConfig(DEFAULTS, { byRemapDir: '/x/by-remap', udevNamesDir: null }, 'f.json')).toMatchObject({ byRemapDir: '/x/by-remap', udevNamesDir: null });
    expect(applyConfig(DEFAULTS, { byRemapDir: null }, 'f.json').byRemapDir).toBeNull();
    expect(() => applyConfig(DEFAULTS, { byRemapDir: 'rel/dir' }, 'f.json')).toThrow(ConfigError);
    expect(() => applyConfig(DEFAULTS, { byRemapDir: 'rel/dir' }, 'f.json')).toThrow(/"byRemapDir" must be an absolute path/);
    expect(() => applyConfig(DEFAULTS, { udevNamesDir: 3 }, 'f.json')).toThrow(/"udevNamesDir"/);
  });
});

describe('stable names follow the DeviceManager', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('names-mgr'));
  });
  afterEach(() => cleanup());

  it('a link while the device runs, none after its removal; a restart (reassembly) links it again and drops stale links', async () => {
    const main = join(dir, 'main.img');
    const spare = join(dir, 'spare.img');
    sparseFile(main, 16 << 20);
    sparseFile(spare, 4 << 20);
    const stateDir = join(dir, 'state');
    const links = join(dir, 'by-remap');
    let next = 0;
    const seen: string[] = [];
    // The kernel part is the guest's (tests/vm/guest-names-ns.sh): here the
    // export only reports the device path the kernel would have given.
    const startExport: ExportStarter = async () => {
      const device = `/dev/ublkb${next++}`;
      return { endpoints: [device], connectionCount: () => 0, close: async () => { seen.push(`closed ${device}`); return { connectionsClosed: 0 }; } };
    };
    const lines: Line[] = [];
    const sys = join(dir, 'sys');
    const mk = (): { mgr: DeviceManager; names: StableNames; r: StableNamesHandle } => {
      const mgr = new DeviceManager({ stateDir, logger: logger(lines), openEngine, startExport, defaultMetadataTimeoutMs: 2000 });
      const names = new StableNames({ linkDir: links, udevDir: join(dir, 'udev'), sysBlockDir: sys, logger: logger(lines) });
      return { mgr, names, r: attachStableNames(mgr, names, sys) };
    };
    const a = mk();
    await a.mgr.add({ name: 'd0', main, spare }, { format: true });
    expect(readlinkSync(join(links, 'd0'))).toMatch(/^\.\.\//); // relative, as udev makes them
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb0');
    await a.mgr.remove('d0');
    expect(() => lstatSync(join(links, 'd0'))).toThrow(/ENOENT/);
    await a.mgr.add({ name: 'd0', main, spare });
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb1');
    // The daemon dies without removing anything; a stale link of a device
    // that is gone is there too.
    symlinkSync('/dev/nbd7', join(links, 'gone'));
    await a.mgr.shutdown(); // (a real crash would leave d0's link: the reconcile below fixes either)
    const b = mk();
    expect(await b.mgr.reassemble()).toEqual({ started: 1, failed: 0 });
    b.r.reconcile();
    expect(readdirSync(links).sort()).toEqual(['d0']);
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb2');
    expect(lines.find((l) => l.event === 'stable-names')).toMatchObject({ linked: ['d0'], removed: ['gone'] });
    // Daemon stop: the kernel keeps ublkb2 (quiesced for the next daemon):
    // its link stays, through the stop and after it.
    mkdirSync(join(sys, 'ublkb2'), { recursive: true });
    b.r.stopping();
    await b.mgr.shutdown();
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb2');
    b.r.stopped();
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb2');
    expect(lines.find((l) => l.event === 'stable-name-kept')).toMatchObject({ device: 'd0', kernelDevice: '/dev/ublkb2' });
    // A stop that deletes the device (ublkb3 has no sysfs folder) takes the link away.
    const c = mk();
    expect(await c.mgr.reassemble()).toEqual({ started: 1, failed: 0 });
    c.r.reconcile();
    expect(resolve(links, readlinkSync(join(links, 'd0')))).toBe('/dev/ublkb3');
    c.r.stopping();
    await c.mgr.shutdown();
    c.r.stopped();
    expect(readdirSync(links)).toEqual([]);
    expect(seen).toEqual(['closed /dev/ublkb0', 'closed /dev/ublkb1', 'closed /dev/ublkb2', 'closed /dev/ublkb3']);
  });

  it('a device without a kernel device (NBD sockets only) gets no link', async () => {
    const main = sparseFile(join(dir, 'main.img'), 16 << 20);
    const lines: Line[] = [];
    const mgr = new DeviceManager({
      stateDir: join(dir, 'state'), logger: logger(lines), openEngine, defaultMetadataTimeoutMs: 2000,
      startExport: async () => ({ endpoints: ['nbd+unix:///s?socket=/run/s.sock'], connectionCount: () => 0, close: async () => ({ connectionsClosed: 0 }) }),
    });
    const names = new StableNames({ linkDir: join(dir, 'by-remap'), udevDir: null, logger: logger(lines) });
    attachStableNames(mgr, names).reconcile();
    await mgr.add({ name: 's', main, spareTailBytes: 2 << 20 }, { format: true });
    expect(() => readdirSync(join(dir, 'by-remap'))).toThrow(/ENOENT/);
    await mgr.shutdown();
    expect(lines.filter((l) => String(l.event).startsWith('stable-name-'))).toEqual([]);
  });
});
