import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { crc32c } from '../../src/metadata/crc32c.js';

function reference(data: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of data) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

describe('crc32c', () => {
  it('matches known answers (RFC 3720 B.4 and the check value)', () => {
    expect(crc32c(new TextEncoder().encode('123456789'))).toBe(0xe3069283);
    expect(crc32c(new Uint8Array(0))).toBe(0);
    expect(crc32c(new Uint8Array(32))).toBe(0x8a9136aa);
    expect(crc32c(new Uint8Array(32).fill(0xff))).toBe(0x62a8ab43);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i))).toBe(0x46dd794e);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => 31 - i))).toBe(0x113fdb5c);
  });

  it('equals a bitwise reference and chains like zlib crc32', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.uint8Array({ maxLength: 300 }), (a, b) => {
        expect(crc32c(a)).toBe(reference(a));
        const ab = new Uint8Array(a.length + b.length);
        ab.set(a);
        ab.set(b, a.length);
        expect(crc32c(b, crc32c(a))).toBe(crc32c(ab));
      }),
      { numRuns: 300 },
    );
  });

  it('works on unaligned subarrays', () => {
    const big = Uint8Array.from({ length: 100 }, (_, i) => (i * 7) & 0xff);
    for (let s = 0; s < 9; s++) expect(crc32c(big.subarray(s, s + 50))).toBe(reference(big.subarray(s, s + 50)));
  });
});
