/**
 * remapctl import-dmr4 (issue 6, docs/DMR4.md): migrate from the kernel
 * dm-remap target. `--dry-run` decodes the old spare offline (no daemon);
 * with a device name, the daemon creates the equivalent device.
 */
import { resolve } from 'node:path';
import { Command, CommanderError } from 'commander';
import { EXIT, deviceArgs, deviceOptions, table, type CommandContext, type DeviceFlags } from './common.js';
import { request } from './client.js';
import { RemapError } from '../errors.js';
import type { ImportDmr4Result } from '../daemon/handlers-dmr4.js';
import type { DeviceStatus } from '../daemon/devices.js';
import { DMR4_FLAG, Dmr4Error, jsonSafe, type Dmr4Image, type Dmr4TableEntry } from '../migrate/dmr4.js';
import { readDmr4Spare, type Dmr4ImportReport } from '../migrate/dmr4-import.js';
import { formatSize } from './size.js';

function flagsText(f: number): string {
  const names = [f & DMR4_FLAG.PENDING ? 'pending' : '', f & DMR4_FLAG.ACTIVE ? 'active' : ''].filter((x) => x !== '');
  return names.length > 0 ? names.join(',') : String(f);
}

function entryLine(e: Dmr4TableEntry): string[] {
  return [String(e.index), `${e.originalSector} -> ${e.spareSector}`, flagsText(e.flags), e.problems.length > 0 ? e.problems.join(',') : '-'];
}

function dryRunText(path: string, img: Dmr4Image): string {
  const out = [`old spare ${path}: ${img.spareBytes} bytes (${formatSize(img.spareBytes)})`];
  for (const c of img.copies) {
    out.push(`copy ${c.index} at ${c.offset}: ${c.valid ? `valid, seq ${c.seq}, timestamp ${c.timestamp}, ${c.activeRemaps} entries` : `invalid: ${c.problem}`}`
      + `${c.index === img.chosen ? '  <- chosen' : ''}`);
  }
  out.push(`chosen: copy ${img.chosen} (seq ${img.seq}, timestamp ${img.timestamp}), ${img.table.length} entries (original sector -> spare sector, 512-byte sectors)`);
  if (img.table.length > 0) out.push(table([['ENTRY', 'ORIGINAL -> SPARE', 'FLAGS', 'OVERLAP'], ...img.table.map(entryLine)]));
  if (img.overlapping.length === 0) {
    out.push('no overlapping entries: every entry would be imported with its data');
  } else {
    out.push(`${img.overlapping.length} overlapping entr${img.overlapping.length === 1 ? 'y' : 'ies'}: imported as pending (unreadable until rewritten), never as data:`);
    for (const e of img.overlapping) out.push(`  entry ${e.index}: sector ${e.originalSector} -> ${e.spareSector} (${e.problems.join(', ')})`);
  }
  return out.join('\n');
}

function importText(r: ImportDmr4Result): string {
  const d: DeviceStatus = r.device;
  const i = r.import as unknown as Dmr4ImportReport & { seq: number | string };
  const out = [
    `imported ${i.from} (copy ${i.chosenCopy}, seq ${i.seq}, ${i.entries} entries) into ${d.name}: `
      + `${i.sectorsImported} sector(s) in ${i.dataBlocks.length} block(s) of ${i.blockSize} bytes remapped with data`,
  ];
  if (i.pendingBlocks.length > 0) {
    out.push(`${i.pendingBlocks.length} block(s) pending (unreadable until rewritten):`);
    for (const p of i.pendingBlocks) out.push(`  block ${p.block}: entries ${p.entries.join(',')} (${p.problems.join(', ')}${p.detail !== undefined ? `: ${p.detail}` : ''})`);
  }
  if (i.outsideEntries.length > 0) out.push(`not imported (main sector outside the device): entries ${i.outsideEntries.join(',')}`);
  out.push(`${d.name}: ${formatSize(d.sizeBytes)}, ${d.remappedBlocks} remapped, ${d.pendingBlocks} pending, spare ${d.spareBlocksUsed}/${d.spareBlocksTotal} blocks used`
    + `${d.exports.length > 0 ? `; exports: ${d.exports.join(', ')}` : ''}`);
  return out.join('\n');
}

async function decodeOrThrow(path: string): Promise<Dmr4Image> {
  try {
    return await readDmr4Spare(path);
  } catch (err) {
    if (err instanceof Dmr4Error) throw new RemapError(err.errno, `old spare ${path}: ${err.message}`, { op: 'import-dmr4' });
    throw err;
  }
}

interface ImportOpts extends DeviceFlags {
  from: string;
  dryRun?: boolean;
  main?: string;
}

export function registerDmr4Commands(program: Command, ctx: CommandContext): void {
  deviceOptions(program.command('import-dmr4')
    .description('migrate from the kernel dm-remap target: decode its old spare (--dry-run, no daemon) or create the equivalent device')
    .argument('[name]', 'new device name (not with --dry-run)')
    .requiredOption('--from <path>', 'the old dm-remap spare (DMR4 metadata)')
    .option('--dry-run', 'only decode the old spare and show what would be imported (no daemon needed)')
    .option('--main <path>', 'main (failing) disk or image: the one the old target remapped'), 'new spare')
    .action(async (name: string | undefined, opts: ImportOpts, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const from = resolve(opts.from);
      if (opts.dryRun === true) {
        const devFlags = ['main', 'spare', 'spareTail', 'format', 'blockSize', 'nbdUnix', 'nbdTcp', 'nbdDevice', 'ublk', 'ublkQueues', 'ublkDepth', 'metadataTimeout'] as const;
        if (name !== undefined || devFlags.some((k) => opts[k] !== undefined)) {
          throw new CommanderError(EXIT.USAGE, 'remapctl.usage', 'import-dmr4 --dry-run takes only --from (and --json): it creates nothing');
        }
        const img = await decodeOrThrow(from);
        o.print(dryRunText(from, img), { path: from, ...(jsonSafe(img) as object) });
        return;
      }
      if (name === undefined) throw new CommanderError(EXIT.USAGE, 'remapctl.usage', 'import-dmr4: give the new device NAME (or --dry-run)');
      if (opts.main === undefined) throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `import-dmr4 ${name}: --main PATH is required`);
      if ((opts.spare === undefined) === (opts.spareTail === undefined)) {
        throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `import-dmr4 ${name}: give exactly one of --spare PATH or --spare-tail SIZE`);
      }
      const args: Record<string, unknown> = { name, from, main: resolve(opts.main), ...deviceArgs(opts, `import-dmr4 ${name}`) };
      const r = (await request(g.socket, 'importDmr4', args, 3_600_000)) as ImportDmr4Result;
      o.print(importText(r), r);
    });
}
