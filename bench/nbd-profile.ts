/**
 * Reads V8 .cpuprofile files (node --cpu-prof) and sums self time per
 * function (name + script + line), for the hotspot table of bench:nbd.
 */
import { readFileSync } from 'node:fs';
import { relative } from 'node:path';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  hitCount?: number;
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples?: number[];
  timeDeltas?: number[];
  startTime: number;
  endTime: number;
}

export interface Hotspot {
  name: string;
  where: string;
  selfMs: number;
  /** Share of the non-idle samples. */
  share: number;
}

export interface ProfileSummary {
  totalMs: number;
  idleMs: number;
  hotspots: Hotspot[];
  /** Self time grouped by kind: our JS, node internals, dependencies, native/GC/program. */
  byKind: Record<string, number>;
}

function isProfile(x: unknown): x is CpuProfile {
  return typeof x === 'object' && x !== null && Array.isArray((x as CpuProfile).nodes);
}

function kindOf(url: string, name: string): string {
  if (url === '') return name === '(garbage collector)' ? 'GC' : name.startsWith('(') ? name : 'native/builtin';
  if (url.startsWith('node:')) return 'node internals';
  if (url.includes('/node_modules/')) return 'dependencies';
  return 'dm-remapd JS';
}

export function summarizeProfiles(files: string[], root: string, top = 15): ProfileSummary {
  const self = new Map<string, { name: string; where: string; ms: number; kind: string }>();
  let totalMs = 0;
  let idleMs = 0;
  for (const f of files) {
    const parsed: unknown = JSON.parse(readFileSync(f, 'utf8'));
    if (!isProfile(parsed)) continue;
    const byId = new Map<number, ProfileNode>(parsed.nodes.map((n) => [n.id, n]));
    const samples = parsed.samples ?? [];
    const deltas = parsed.timeDeltas ?? [];
    // Each sample's time is the delta to the next sample (the last one gets the mean).
    const meanUs = samples.length > 0 ? (parsed.endTime - parsed.startTime) / samples.length : 0;
    for (let i = 0; i < samples.length; i++) {
      const node = byId.get(samples[i]);
      if (node === undefined) continue;
      const us = i + 1 < deltas.length ? Math.max(0, deltas[i + 1]) : meanUs;
      const ms = us / 1000;
      const cf = node.callFrame;
      totalMs += ms;
      if (cf.functionName === '(idle)') {
        idleMs += ms;
        continue;
      }
      let url = cf.url;
      if (url.startsWith('file://')) url = relative(root, new URL(url).pathname);
      const name = cf.functionName === '' ? '(anonymous)' : cf.functionName;
      const where = url === '' ? '' : `${url}:${cf.lineNumber + 1}`;
      const key = `${name}\u0000${where}`;
      const e = self.get(key) ?? { name, where, ms: 0, kind: kindOf(cf.url, name) };
      e.ms += ms;
      self.set(key, e);
    }
  }
  const busy = totalMs - idleMs;
  const byKind: Record<string, number> = {};
  for (const e of self.values()) byKind[e.kind] = (byKind[e.kind] ?? 0) + e.ms;
  const hotspots = [...self.values()]
    .sort((a, b) => b.ms - a.ms)
    .slice(0, top)
    .map((e) => ({ name: e.name, where: e.where, selfMs: e.ms, share: busy > 0 ? e.ms / busy : NaN }));
  return { totalMs, idleMs, hotspots, byKind };
}
