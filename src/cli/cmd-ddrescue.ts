/**
 * remapctl export/import NAME --ddrescue FILE (issue 6): GNU ddrescue
 * mapfiles. Export writes the remapped and pending blocks as bad areas ('-')
 * and everything else as finished ('+'); import pre-remaps the blocks that a
 * ddrescue run found bad, copying what is still readable.
 */
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { EXIT, type CommandContext } from './common.js';
import { request } from './client.js';
import {
  MAX_MAPFILE_BYTES, MapfileError, blocksOfArea, deviceAreas, formatMapfile, mergeBlockRanges, parseMapfile,
  type AreaStatus, type BlockRange, type MapArea,
} from './ddrescue-map.js';
import { ERRNO, RemapError } from '../errors.js';
import type { ExportAnswer, ImportAnswer } from '../daemon/handlers-ddrescue.js';

function usage(message: string): CommanderError {
  return new CommanderError(EXIT.USAGE, 'remapctl.usage', message);
}

function statusesArg(v: string): AreaStatus[] {
  const allowed = ['-', '*', '/', '?'];
  if (v.length === 0 || [...v].some((c) => !allowed.includes(c))) {
    throw new InvalidArgumentError(`statuses must be characters among - * / ? (e.g. "-*/"), got "${v}"`);
  }
  return [...new Set([...v])] as AreaStatus[];
}

function stamp(d: Date): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** Write a file atomically: a temporary file beside it, fsync, rename, fsync of the folder. */
function writeAtomic(path: string, text: string): void {
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  let fd = openSync(tmp, 'wx', 0o644);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    try { unlinkSync(tmp); } catch { /* already gone */ }
    throw err;
  }
  closeSync(fd);
  try {
    renameSync(tmp, path);
  } catch (err) {
    try { unlinkSync(tmp); } catch { /* already gone */ }
    throw err;
  }
  fd = openSync(dirname(path), 'r');
  try { fsyncSync(fd); } finally { closeSync(fd); }
}

/** A failed file operation as a RemapError, so that remapctl exits with the code of its errno (ENOENT: 8, EACCES: 6). */
function fsError(err: unknown, what: string): RemapError {
  const code = (err as NodeJS.ErrnoException).code;
  const errno = code !== undefined && code in ERRNO ? ERRNO[code as keyof typeof ERRNO] : ERRNO.EIO;
  return new RemapError(errno, `${what}: ${(err as Error).message}`);
}

function readMapfile(name: string, path: string): string {
  let size: number;
  try {
    const st = statSync(path);
    if (!st.isFile()) throw usage(`import ${name}: mapfile ${path} is not a regular file`);
    size = st.size;
  } catch (err) {
    if (err instanceof CommanderError) throw err;
    throw fsError(err, `import ${name}: cannot read mapfile ${path}`);
  }
  if (size > MAX_MAPFILE_BYTES) throw usage(`import ${name}: mapfile ${path} is ${size} bytes, more than the ${MAX_MAPFILE_BYTES} accepted`);
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw fsError(err, `import ${name}: cannot read mapfile ${path}`);
  }
}

function rangeText(first: number, count: number): string {
  return count === 1 ? `block ${first}` : `blocks ${first}-${first + count - 1}`;
}

export function registerDdrescueCommands(program: Command, ctx: CommandContext): void {
  program.command('export')
    .description('write the remapped and pending blocks of a device as bad areas of a GNU ddrescue mapfile')
    .argument('<name>', 'device name')
    .requiredOption('--ddrescue <file>', 'mapfile to write (replaced atomically)')
    .action(async (name: string, opts: { ddrescue: string }, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const file = resolve(opts.ddrescue);
      const r = (await request(g.socket, 'ddrescue-export', { name }, 120_000)) as ExportAnswer;
      const areas = deviceAreas(r.sizeBytes, r.blockSize, [...r.remapped, ...r.pending]);
      const now = stamp(new Date());
      const text = formatMapfile({ currentPos: 0, currentStatus: '+', currentPass: 1, areas }, [
        `Mapfile. Written by remapctl (dm-remapd): device ${name}, block size ${r.blockSize}; bad areas are its remapped and pending blocks`,
        `Command line: remapctl export ${name} --ddrescue ${file}`,
        `Start time:   ${now}`,
        `Current time: ${now}`,
        'Finished',
      ]);
      try {
        writeAtomic(file, text);
      } catch (err) {
        throw fsError(err, `export ${name}: cannot write ${file}`);
      }
      const count = (rs: BlockRange[]): number => rs.reduce((n, x) => n + x[1], 0);
      const bad = areas.filter((a) => a.status === '-');
      const data = { name, file, sizeBytes: r.sizeBytes, blockSize: r.blockSize, remappedBlocks: count(r.remapped), pendingBlocks: count(r.pending),
        badAreas: bad.length, badBytes: bad.reduce((n, a) => n + a.size, 0), areas: areas.length };
      o.print(`${name}: wrote ${file}: ${data.remappedBlocks} remapped and ${data.pendingBlocks} pending block(s) as ${data.badAreas} bad area(s) `
        + `(${data.badBytes} bytes), ${data.areas} area(s) in all`, data);
    });

  program.command('import')
    .description('pre-remap the bad areas of a GNU ddrescue mapfile, copying what is still readable')
    .argument('<name>', 'device name')
    .requiredOption('--ddrescue <file>', 'mapfile to read (e.g. of a ddrescue run over this main)')
    .option('--statuses <chars>', 'area statuses to import: "-" (bad sectors, the default), plus "*" non-trimmed, "/" non-scraped, "?" non-tried', statusesArg)
    .action(async (name: string, opts: { ddrescue: string; statuses?: AreaStatus[] }, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const file = resolve(opts.ddrescue);
      const statuses = opts.statuses ?? ['-'];
      let areas: MapArea[];
      try {
        areas = parseMapfile(readMapfile(name, file)).areas;
      } catch (err) {
        if (err instanceof MapfileError) throw usage(`import ${name}: mapfile ${file}: ${err.message}`);
        throw err;
      }
      const selected = areas.filter((a) => statuses.includes(a.status));
      if (selected.length === 0) {
        const data = { name, file, statuses: statuses.join(''), areas: 0, blocks: 0, remapped: 0, alreadyRemapped: 0, pending: 0, failed: 0, ranges: [] };
        o.print(`${name}: ${file} has no area of status ${statuses.join(' ')}: nothing to import`, data);
        return;
      }
      const st = (await request(g.socket, 'status', { name }, 30_000)) as { blockSize: number | null; sizeBytes: number | null };
      if (st.blockSize === null || st.sizeBytes === null) throw usage(`import ${name}: the device is not running`);
      const blocks = Math.floor(st.sizeBytes / st.blockSize);
      for (const a of selected) {
        if (a.pos + a.size > blocks * st.blockSize) {
          throw usage(`import ${name}: mapfile ${file}: line ${a.line ?? 0}: area ${a.pos}+${a.size} ('${a.status}') ends past the device's `
            + `${blocks * st.blockSize} bytes of whole blocks: a mapfile of another disk?`);
        }
      }
      const ranges = mergeBlockRanges(selected.map((a) => blocksOfArea(a, st.blockSize as number)));
      const r = (await request(g.socket, 'ddrescue-import', { name, ranges }, 3_600_000)) as ImportAnswer;
      const lines = r.ranges.map((x) => {
        const parts = [`${x.remapped} remapped`];
        if (x.alreadyRemapped > 0) parts.push(`${x.alreadyRemapped} already remapped`);
        if (x.pending > 0) parts.push(`${x.pending} pending (unreadable)`);
        if (x.failed > 0) parts.push(`${x.failed} failed`);
        return [`${name}: ${rangeText(x.first, x.count)}: ${parts.join(', ')}`,
          ...x.problems.map((p) => `  block ${p.block}: ${p.result}: ${p.reason}`)].join('\n');
      });
      lines.push(`${name}: ${selected.length} area(s) of status ${statuses.join(' ')} from ${file}: ${r.blocks} block(s): ${r.remapped} remapped, `
        + `${r.alreadyRemapped} already remapped, ${r.pending} pending, ${r.failed} failed`);
      o.print(lines.join('\n'), { ...r, file, statuses: statuses.join(''), areas: selected.length });
      if (r.pending > 0 || r.failed > 0) o.code = EXIT.FAILED;
    });
}
