/**
 * Fuzz of `remapctl scan --range` (outside input from argv): seeded random
 * strings built from the grammar's own pieces and from garbage. The parser
 * either returns a range or throws a RangeError naming the text; resolving a
 * parsed range either gives blocks inside the device, start before end, or
 * a RangeError naming the text. Nothing else is ever thrown.
 * DMR_FUZZ_SEED=N reproduces a run.
 */
import { describe, expect, it } from 'vitest';
import { parseScanRange, resolveScanRange } from '../../src/cli/scan-range.js';
import { Rng } from './rng.js';

const PIECES = ['0', '1', '7', '100', '4096', '8191', '8192', '99999999999999999999', '9007199254740993', 'K', 'M', 'G', 'T', 'P', 'k', 'KiB', 'iB', 'B', 'b',
  '-', '--', ' ', '.', '5', 'x', '0x1', '1e3', '\u0000', 'ü', '🙂', '+', ',', '\n', '٣'];

const NUMS = ['0', '1', '2', '100', '1000', '4096', '8191', '8192', '65536', String(2 ** 40), '99999999999999999999'];
const SUFFIXES = ['K', 'M', 'G', 'T', 'KiB', 'mb', 'g', 'P', 'KB'];

describe('fuzz: scan --range', () => {
  it('only ranges or RangeErrors naming the text, and resolved ranges always inside the device', () => {
    const seed = Number(process.env.DMR_FUZZ_SEED ?? Date.now() % 0x7fffffff);
    console.log(`[fuzz scan-range] seed ${seed} (DMR_FUZZ_SEED=${seed} replays it)`);
    const r = new Rng(seed);
    let parsed = 0;
    let resolved = 0;
    for (let i = 0; i < 20_000; i++) {
      let text = '';
      if (r.chance(0.5)) {
        for (let n = 1 + r.int(6); n > 0; n--) text += r.pick(PIECES);
      } else {
        // Close to the grammar: NUM[SUFFIX]-[NUM[SUFFIX]], sometimes with one piece spliced in.
        const bound = (): string => `${r.pick(NUMS)}${r.chance(0.5) ? r.pick(SUFFIXES) : ''}`;
        text = `${bound()}-${r.chance(0.8) ? bound() : ''}`;
        if (r.chance(0.3)) {
          const at = r.int(text.length + 1);
          text = text.slice(0, at) + r.pick(PIECES) + text.slice(at);
        }
      }
      let p;
      try {
        p = parseScanRange(text);
      } catch (e) {
        expect(e, text).toBeInstanceOf(RangeError);
        expect((e as Error).message, text).toContain(`"${text}"`);
        continue;
      }
      parsed++;
      const bs = r.pick([512, 4096]);
      const blocks = r.pick([1, 8, 8192, 2 ** 40, 1 + r.int(100_000)]);
      try {
        const x = resolveScanRange(p, text, bs, blocks);
        resolved++;
        expect(Number.isSafeInteger(x.startBlock) && Number.isSafeInteger(x.endBlock), text).toBe(true);
        expect(x.startBlock, text).toBeGreaterThanOrEqual(0);
        expect(x.startBlock, text).toBeLessThan(x.endBlock);
        expect(x.endBlock, text).toBeLessThanOrEqual(blocks);
      } catch (e) {
        expect(e, text).toBeInstanceOf(RangeError);
        expect((e as Error).message, text).toContain(`"${text}"`);
      }
    }
    console.log(`[fuzz scan-range] 20000 inputs: ${parsed} parsed, ${resolved} resolved`);
    expect(parsed).toBeGreaterThan(100); // the generator does reach the grammar
    expect(resolved).toBeGreaterThan(10);
  });
});
