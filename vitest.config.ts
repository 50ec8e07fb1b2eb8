import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Fault-injection tests mount FUSE filesystems and spawn nbdkit; running
    // many files at once on a 2-core machine makes timing-based checks flaky.
    maxWorkers: 2,
  },
});
