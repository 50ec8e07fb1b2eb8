/**
 * A strict parser of the Prometheus text exposition format 0.0.4, for tests:
 * it throws (naming the line) on anything the format does not allow, and on
 * what a well-formed exposition must not do (a family split in two, a second
 * HELP/TYPE, samples before their TYPE, a counter not ending in _total,
 * duplicate series, a histogram whose buckets are not cumulative or whose
 * +Inf bucket differs from its _count). Written from the format's
 * description, not from any other implementation.
 */

export type PromType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

export interface PromSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface PromFamily {
  name: string;
  type: PromType;
  help: string;
  samples: PromSample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function parseValue(s: string, where: string): number {
  if (s === '+Inf') return Infinity;
  if (s === '-Inf') return -Infinity;
  if (s === 'NaN') return NaN;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(s)) throw new Error(`${where}: bad value ${JSON.stringify(s)}`);
  return Number(s);
}

function unescapeHelp(s: string, where: string): string {
  return s.replace(/\\(.)/g, (_m, c: string) => {
    if (c === '\\') return '\\';
    if (c === 'n') return '\n';
    throw new Error(`${where}: bad escape \\${c} in HELP`);
  });
}

/** Parses `{a="x",b="y"}` starting at s[i] === '{'; returns the labels and the index after '}'. */
function parseLabels(s: string, i: number, where: string): { labels: Record<string, string>; end: number } {
  const labels: Record<string, string> = {};
  i++;
  if (s[i] === '}') return { labels, end: i + 1 };
  for (;;) {
    const m = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(s.slice(i));
    if (m === null) throw new Error(`${where}: bad label name at column ${i}`);
    const name = m[0];
    i += name.length;
    if (s[i] !== '=' || s[i + 1] !== '"') throw new Error(`${where}: expected =" after label ${name}`);
    i += 2;
    let v = '';
    for (;;) {
      const c = s[i];
      if (c === undefined) throw new Error(`${where}: unterminated value of label ${name}`);
      if (c === '"') break;
      if (c === '\n') throw new Error(`${where}: raw newline in label ${name}`);
      if (c === '\\') {
        const e = s[i + 1];
        if (e === '\\') v += '\\';
        else if (e === '"') v += '"';
        else if (e === 'n') v += '\n';
        else throw new Error(`${where}: bad escape \\${e ?? ''} in label ${name}`);
        i += 2;
        continue;
      }
      v += c;
      i++;
    }
    i++;
    if (!LABEL_NAME.test(name) || name.startsWith('__')) throw new Error(`${where}: reserved or bad label name ${name}`);
    if (name in labels) throw new Error(`${where}: label ${name} given twice`);
    labels[name] = v;
    if (s[i] === ',') {
      i++;
      if (s[i] === '}') return { labels, end: i + 1 };
      continue;
    }
    if (s[i] === '}') return { labels, end: i + 1 };
    throw new Error(`${where}: expected , or } after label ${name}`);
  }
}

function familyOf(sampleName: string, families: Map<string, PromFamily>): PromFamily | undefined {
  const direct = families.get(sampleName);
  if (direct !== undefined) return direct;
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (sampleName.endsWith(suffix)) {
      const f = families.get(sampleName.slice(0, -suffix.length));
      if (f !== undefined && (f.type === 'histogram' || f.type === 'summary')) return f;
    }
  }
  return undefined;
}

export function parsePromText(text: string): Map<string, PromFamily> {
  if (!text.endsWith('\n')) throw new Error('exposition does not end with a newline');
  const lines = text.slice(0, -1).split('\n');
  const families = new Map<string, PromFamily>();
  const seenHelp = new Set<string>();
  const closed = new Set<string>();
  let current: string | null = null;
  const series = new Set<string>();
  lines.forEach((line, n) => {
    const where = `line ${n + 1} (${JSON.stringify(line.slice(0, 80))})`;
    if (line === '') throw new Error(`${where}: empty line`);
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) ([^ ]+) ?(.*)$/.exec(line);
      if (m === null) return; // a plain comment
      const [, kw, name, rest] = m;
      if (!METRIC_NAME.test(name)) throw new Error(`${where}: bad metric name`);
      if (closed.has(name) || (current !== null && current !== name && families.has(name))) throw new Error(`${where}: family ${name} is split`);
      if (current !== null && current !== name) closed.add(current);
      current = name;
      let f = families.get(name);
      if (f === undefined) {
        f = { name, type: 'untyped', help: '', samples: [] };
        families.set(name, f);
      }
      if (kw === 'HELP') {
        if (seenHelp.has(name)) throw new Error(`${where}: second HELP for ${name}`);
        seenHelp.add(name);
        f.help = unescapeHelp(rest, where);
      } else {
        if (f.samples.length > 0) throw new Error(`${where}: TYPE after samples of ${name}`);
        if (f.type !== 'untyped') throw new Error(`${where}: second TYPE for ${name}`);
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(rest)) throw new Error(`${where}: bad type ${rest}`);
        f.type = rest as PromType;
      }
      return;
    }
    const nm = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (nm === null) throw new Error(`${where}: bad sample name`);
    const name = nm[0];
    let i = name.length;
    let labels: Record<string, string> = {};
    if (line[i] === '{') ({ labels, end: i } = parseLabels(line, i, where));
    if (line[i] !== ' ') throw new Error(`${where}: expected a space before the value`);
    const parts = line.slice(i + 1).split(' ');
    if (parts.length < 1 || parts.length > 2 || parts[0] === '') throw new Error(`${where}: expected VALUE [TIMESTAMP]`);
    const value = parseValue(parts[0], where);
    if (parts.length === 2 && !/^-?\d+$/.test(parts[1])) throw new Error(`${where}: bad timestamp`);
    const f = familyOf(name, families);
    if (f === undefined) throw new Error(`${where}: sample ${name} has no TYPE/HELP before it`);
    if (current !== f.name) throw new Error(`${where}: sample of ${f.name} outside its family's block`);
    const key = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    if (series.has(key)) throw new Error(`${where}: duplicate series`);
    series.add(key);
    f.samples.push({ name, labels, value });
  });
  for (const f of families.values()) checkFamily(f);
  return families;
}

function checkFamily(f: PromFamily): void {
  if (f.type === 'counter') {
    if (!f.name.endsWith('_total')) throw new Error(`counter ${f.name} does not end in _total`);
    for (const s of f.samples) if (!(s.value >= 0)) throw new Error(`counter ${f.name} has a negative or NaN value`);
  }
  if (f.type !== 'histogram') return;
  const groups = new Map<string, { buckets: Array<[number, number]>; sum?: number; count?: number }>();
  for (const s of f.samples) {
    const { le, ...rest } = s.labels;
    const key = JSON.stringify(Object.entries(rest).sort());
    let g = groups.get(key);
    if (g === undefined) groups.set(key, (g = { buckets: [] }));
    if (s.name === `${f.name}_bucket`) {
      if (le === undefined) throw new Error(`${f.name}_bucket without le`);
      g.buckets.push([parseValue(le, `${f.name} le`), s.value]);
    } else if (s.name === `${f.name}_sum`) {
      g.sum = s.value;
    } else if (s.name === `${f.name}_count`) {
      g.count = s.value;
    } else {
      throw new Error(`histogram ${f.name} has a sample ${s.name}`);
    }
  }
  for (const [key, g] of groups) {
    if (g.sum === undefined || g.count === undefined) throw new Error(`histogram ${f.name}${key} lacks _sum or _count`);
    const last = g.buckets[g.buckets.length - 1];
    if (last === undefined || last[0] !== Infinity) throw new Error(`histogram ${f.name}${key} lacks the +Inf bucket (last)`);
    for (let i = 1; i < g.buckets.length; i++) {
      if (!(g.buckets[i][0] > g.buckets[i - 1][0])) throw new Error(`histogram ${f.name}${key}: le not ascending`);
      if (g.buckets[i][1] < g.buckets[i - 1][1]) throw new Error(`histogram ${f.name}${key}: buckets not cumulative`);
    }
    if (last[1] !== g.count) throw new Error(`histogram ${f.name}${key}: +Inf bucket ${last[1]} != _count ${g.count}`);
  }
}

/** The value of the one sample of `name` whose labels include `labels`; throws when none or several match. */
export function sampleValue(fams: Map<string, PromFamily>, name: string, labels: Record<string, string> = {}): number {
  const found: PromSample[] = [];
  for (const f of fams.values()) {
    for (const s of f.samples) {
      if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)) found.push(s);
    }
  }
  if (found.length !== 1) throw new Error(`${found.length} samples of ${name}${JSON.stringify(labels)}`);
  return found[0].value;
}
