// Child process for the kill -9 test: opens the engine (compiled JS in dist/)
// and writes random blocks forever. It prints "I <block> <tag>" before each
// write is submitted and "A <block> <tag>" once it was acknowledged, with
// synchronous writes to a log file so that nothing acknowledged is lost from the
// log when the parent kills it.
import { openSync, writeSync } from 'node:fs';
import { openEngine } from '../../dist/src/engine/open.js';
import { lcg, taggedWriter } from './crash-writes.mjs';

const [mainPath, sparePath, blocksArg, format, seedArg, logPath] = process.argv.slice(2);
// A regular file: writeSync never returns EAGAIN (a pipe can), and what was
// written survives the kill in the page cache.
const log = openSync(logPath, 'w');
const blocks = Number(blocksArg);
const rand = lcg(seedArg);

const engine = await openEngine({ name: 'crash', mainPath, sparePath, format: format === 'format', metadataTimeoutMs: 5000 });
writeSync(1, 'READY\n');
const QD = 8;
const worker = taggedWriter(engine, log, blocks, rand, seedArg);
await Promise.all(Array.from({ length: QD }, worker));
