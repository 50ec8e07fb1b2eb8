// Quick measurement, skipped unless DMR_BENCH=1:
//   DMR_BENCH=1 [DMR_BENCH_FILE=/var/tmp/dmr-bench.img] [DMR_BENCH_QD=32] npx vitest run tests/native/randread.perf.test.ts
// Random 4 KiB O_DIRECT reads at a fixed queue depth for 3 s from JS (callback API),
// to compare with: fio --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 on the same file.
import { existsSync, statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { BackingDevice, BackingOp, allocAligned } from '../../src/native/backing.js';

const enabled = process.env.DMR_BENCH === '1';
const file = process.env.DMR_BENCH_FILE ?? '/var/tmp/dmr-bench.img';
const qd = Number(process.env.DMR_BENCH_QD ?? 32);
const seconds = Number(process.env.DMR_BENCH_SECONDS ?? 3);
const GiB = 1024 * 1024 * 1024;

function ensureFile(): void {
  if (existsSync(file) && statSync(file).size >= GiB) return;
  // Real data, not a sparse file: holes are served without touching the disk.
  writeFileSync(file, Buffer.alloc(0));
  const fd = openSync(file, 'w');
  const chunk = Buffer.alloc(8 * 1024 * 1024, 0x5a);
  for (let off = 0; off < GiB; off += chunk.length) writeSync(fd, chunk, 0, chunk.length, off);
  closeSync(fd);
  truncateSync(file, GiB);
}

describe.skipIf(!enabled)('random 4 KiB O_DIRECT reads', () => {
  it(`QD${qd} for ${seconds} s`, async () => {
    ensureFile();
    const dev = BackingDevice.open(file, { queueDepth: Math.max(qd, 32) });
    const blocks = Math.floor(dev.info.sizeBytes / 4096);
    let done = 0;
    let errors = 0;
    let stop = false;
    let outstanding = 0;
    let finish: () => void = () => {};
    const finished = new Promise<void>((r) => (finish = r));
    const issue = (buf: Buffer): void => {
      outstanding++;
      dev.submit(BackingOp.READ, buf, Math.floor(Math.random() * blocks) * 4096, 4096, 0, (res) => {
        outstanding--;
        if (res === 4096) done++;
        else errors++;
        if (!stop) issue(buf);
        else if (outstanding === 0) finish();
      });
    };
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < qd; i++) issue(allocAligned(4096));
    await new Promise((r) => setTimeout(r, seconds * 1000));
    stop = true;
    await finished;
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    const s = dev.stats();
    await dev.close();
    const line = {
      file,
      qd,
      ringSetup: dev.info.ringSetup,
      iops: Math.round(done / secs),
      errors,
      cpuPercent: Math.round(((cpu.user + cpu.system) / 1e6 / secs) * 100),
      opsPerSubmit: +(s.ops / s.submitCalls).toFixed(1),
      opsPerCallback: +(s.ops / s.completionCallbacks).toFixed(1),
    };
    console.log(JSON.stringify(line));
    expect(errors).toBe(0);
  }, 60_000);
});
