import { afterAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { join } from 'node:path';
import { FileMetaIO } from '../../src/metadata/io.js';
import { loadSpare } from '../../src/metadata/store.js';
import { MetadataWriter } from '../../src/metadata/writer.js';
import { emptyState, reduce, stateToRecords, statesEqual } from '../../src/metadata/reduce.js';
import { RecordType, type MetaRecord, type RecordTypeCode } from '../../src/metadata/records.js';
import { freshSpare, tempDir } from './helpers.js';

const td = tempDir('model');
afterAll(() => td.cleanup());
let n = 0;

const recordArb: fc.Arbitrary<MetaRecord> = fc
  .record({ type: fc.constantFrom(...(Object.values(RecordType) as RecordTypeCode[])), logical: fc.nat({ max: 150 }), spare: fc.nat({ max: 40 }), dataCrc: fc.nat({ max: 0xffffffff }) })
  .map((r) => {
    const usesLogical = r.type === RecordType.REMAP || r.type === RecordType.PENDING_ADD || r.type === RecordType.PENDING_CLEAR || r.type === RecordType.UNMAP;
    const usesSpare = r.type === RecordType.REMAP || r.type === RecordType.SPARE_BAD || r.type === RecordType.QUARANTINE;
    return { type: r.type, logical: usesLogical ? r.logical : 0, spare: usesSpare ? r.spare : 0, dataCrc: r.type === RecordType.REMAP ? r.dataCrc : 0 };
  });

type Op = { kind: 'commit'; batches: MetaRecord[][] } | { kind: 'checkpoint' } | { kind: 'reload' };
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 8, arbitrary: fc.array(fc.array(recordArb, { minLength: 0, maxLength: 12 }), { minLength: 1, maxLength: 6 }).map((batches) => ({ kind: 'commit' as const, batches })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'checkpoint' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reload' as const }) },
);

describe('journal wrap-around with checkpoints matches the in-memory reducer', () => {
  it('random record streams through many checkpoints and reloads', async () => {
    let maxCheckpoints = 0;
    let maxWrapped = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 30, maxLength: 120, size: "max" }), fc.constantFrom(0.3, 0.7), async (ops, threshold) => {
        const p = join(td.dir, `m-${n++}.img`);
        let { io, loaded } = await freshSpare(p);
        const state = emptyState();
        const open = (): MetadataWriter => new MetadataWriter(io, loaded, { snapshot: () => stateToRecords(state), checkpointThreshold: threshold });
        let w = open();
        let checkpoints = 0;
        let blocksWritten = 0;
        try {
          for (const op of ops) {
            if (op.kind === 'commit') {
              // concurrent callers: group commit; apply each batch when its commit resolves
              await Promise.all(op.batches.map((b) => w.commit(b).then(() => reduce(b, state))));
            } else if (op.kind === 'checkpoint') {
              await w.checkpoint();
            } else {
              checkpoints += w.stats().checkpoints;
              blocksWritten += w.stats().journalBlocksWritten;
              await w.close();
              await io.close();
              io = await FileMetaIO.open(p);
              loaded = await loadSpare(io);
              expect(statesEqual(reduce(loaded.records), state)).toBe(true);
              expect(loaded.copies.every((c) => c.valid)).toBe(true);
              w = open();
            }
          }
          checkpoints += w.stats().checkpoints;
          blocksWritten += w.stats().journalBlocksWritten;
          await w.close();
          const final = await loadSpare(io);
          expect(statesEqual(reduce(final.records), state)).toBe(true);
          expect(final.seq).toBeGreaterThanOrEqual(w.seq);
          maxCheckpoints = Math.max(maxCheckpoints, checkpoints);
          maxWrapped = Math.max(maxWrapped, blocksWritten / loaded.layout.journalBlocks);
        } finally {
          await io.close();
        }
      }),
      { numRuns: 40 },
    );
    // the runs did exercise wrap-around and background checkpoints
    expect(maxCheckpoints).toBeGreaterThan(3);
    expect(maxWrapped).toBeGreaterThan(2);
  });
});
