// Test-only preload for tests/leaks/cycles.test.ts, loaded into the daemon
// with NODE_OPTIONS="--expose-gc --require <this file>" (nothing is added to
// src/daemon). On SIGUSR2 it runs full GCs and writes, atomically, to
// $DMR_LEAK_PROBE_OUT: process.getActiveResourcesInfo() and
// process.memoryUsage() of the daemon, with a sequence number. Signal handles
// are unref'd: this keeps nothing alive, and its one SIGUSR2 handle is the
// same at every sample.
'use strict';
const fs = require('node:fs');

const out = process.env.DMR_LEAK_PROBE_OUT;
let seq = 0;
if (out) {
  const snapshot = () => {
    if (typeof globalThis.gc === 'function') globalThis.gc();
    const m = process.memoryUsage();
    seq += 1;
    const snap = {
      seq,
      resources: process.getActiveResourcesInfo(),
      heapUsed: m.heapUsed,
      heapTotal: m.heapTotal,
      external: m.external,
      arrayBuffers: m.arrayBuffers,
      rss: m.rss,
    };
    // Investigation aid: DMR_LEAK_HEAPSNAP_DIR=DIR also writes DIR/<seq>.heapsnapshot.
    const snapDir = process.env.DMR_LEAK_HEAPSNAP_DIR;
    if (snapDir) require('node:v8').writeHeapSnapshot(`${snapDir}/${seq}.heapsnapshot`);
    fs.writeFileSync(`${out}.tmp`, JSON.stringify(snap));
    fs.renameSync(`${out}.tmp`, out);
  };
  // GC, give the concurrent ArrayBuffer sweeper 100 ms to free what the GC
  // found dead (external memory), GC again, then sample. The timer is unref'd
  // and has fired before the sample is taken, so it is not in the list.
  process.on('SIGUSR2', () => {
    if (typeof globalThis.gc === 'function') globalThis.gc();
    setTimeout(snapshot, 100).unref();
  });
}

// Self-check of the test (never set in the suite): DMR_LEAK_INJECT=fd|buffer
// leaks one fd (/dev/null) or one 8 KiB Buffer each time a net.Server starts
// listening, i.e. once per add (the device's NBD export), to show that the
// test's checks catch a per-cycle leak.
const inject = process.env.DMR_LEAK_INJECT;
if (inject === 'fd' || inject === 'buffer') {
  const net = require('node:net');
  const kept = [];
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function (...args) {
    kept.push(inject === 'fd' ? fs.openSync('/dev/null', 'r') : Buffer.alloc(8192, 1));
    return listen.apply(this, args);
  };
}
