// allocAligned(size, align, true) puts I/O buffers of 1 MiB and more on transparent huge pages
// (madvise), so that a 1 MiB O_DIRECT request is one physically contiguous
// segment list (docs/NATIVE.md). Checked in a child process each, through
// the process's own AnonHugePages, with DM_REMAPD_THP=0 as the control.
// Skipped where THP is "never", and under ASan.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

// The child runs the built tree, as the other child-process tests do.
const BACKING = fileURLToPath(new URL('../../dist/src/native/backing.js', import.meta.url));
const THP = '/sys/kernel/mm/transparent_hugepage/enabled';
const thpMode = existsSync(THP) ? (/\[(\w+)\]/.exec(readFileSync(THP, 'utf8'))?.[1] ?? 'never') : 'never';

/** AnonHugePages (kB) a child gains by allocating `count` buffers of `size` bytes. */
function hugeKbAfter(size: number, count: number, env: NodeJS.ProcessEnv = {}, huge = true): number {
  const script = `
    import { readFileSync } from 'node:fs';
    const { allocAligned } = await import(${JSON.stringify(BACKING)});
    const huge = () => Number(/AnonHugePages:\\s+(\\d+)/.exec(readFileSync('/proc/self/smaps_rollup', 'utf8'))[1]);
    const before = huge();
    const keep = [];
    for (let i = 0; i < ${count}; i++) keep.push(allocAligned(${size}, 4096, ${huge}));
    if (keep.some((b) => b.byteLength !== ${size} || b.some((x) => x !== 0))) throw new Error('bad buffer');
    console.log(huge() - before);
  `;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
    encoding: 'utf8', env: { ...process.env, ...env }, timeout: 30_000,
  });
  return Number(out.trim().split('\n').pop());
}

// Under the ASan stage (scripts/asan.sh preloads libasan) posix_memalign is
// ASan's own allocator, so where the memory lands says nothing about ours.
const underAsan = /asan/.test(process.env.LD_PRELOAD ?? '');

describe.skipIf(thpMode === 'never' || underAsan)(`allocAligned on huge pages (THP ${thpMode}${underAsan ? ', skipped under ASan' : ''})`, () => {
  it('backs 1 MiB I/O buffers with huge pages when asked, and not with DM_REMAPD_THP=0, below 1 MiB or when not asked', () => {
    const on = hugeKbAfter(1 << 20, 8);
    const off = hugeKbAfter(1 << 20, 8, { DM_REMAPD_THP: '0' });
    const small = hugeKbAfter(512 * 1024, 8);
    const notAsked = hugeKbAfter(1 << 20, 8, {}, false);
    console.log(`[thp] AnonHugePages gained: 8 x 1 MiB ${on} kB, with DM_REMAPD_THP=0 ${off} kB, 8 x 512 KiB ${small} kB, 8 x 1 MiB not asked for ${notAsked} kB`);
    // At least one 2 MiB huge page (memory can be too fragmented for all 8).
    expect(on).toBeGreaterThanOrEqual(2048);
    expect(off).toBe(0);
    expect(small).toBe(0);
    expect(notAsked).toBe(0);
  });
});
