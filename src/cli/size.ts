/** Sizes with K/M/G/T suffixes (powers of 1024): "64M", "4096", "1G", "512KiB". */
export function parseSize(text: string): number {
  const m = /^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$/i.exec(text);
  if (m === null) throw new Error(`"${text}" is not a size (a number of bytes, optionally with a K, M, G or T suffix)`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const n = Number(m[1]) * mult;
  if (!Number.isSafeInteger(n) || n <= 0) throw new Error(`size "${text}" must be a positive number of bytes below 2^53`);
  return n;
}

/** 1073741824 -> "1.0 GiB". */
export function formatSize(n: number | null): string {
  if (n === null) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}
