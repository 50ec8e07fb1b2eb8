/**
 * remapctl spare add NAME PATH [--format] / spare list NAME (issue 6,
 * spare pool): more than one spare per device, added online.
 */
import { resolve } from 'node:path';
import { Command } from 'commander';
import { table, type CommandContext } from './common.js';
import { request } from './client.js';
import type { SpareAddAnswer, SpareListAnswer } from '../daemon/handlers-spare.js';
import type { SpareInfo } from '../engine/spare-pool.js';

function spareRow(s: SpareInfo): string[] {
  return [String(s.ordinal), s.ordinal === 0 ? 'primary' : 'extra', s.path, String(s.blocks), String(s.used), String(s.blocks - s.used), String(s.firstIndex)];
}

function spareTable(spares: SpareInfo[]): string {
  return table([['SPARE', 'ROLE', 'PATH', 'BLOCKS', 'USED', 'FREE', 'FIRST INDEX'], ...spares.map(spareRow)]);
}

/** `remapctl status NAME` lines for the spares (one per spare; none for a single-spare device). */
export function spareLines(spares: SpareInfo[] | null): Array<[string, string]> {
  if (spares === null || spares.length < 2) return [];
  return spares.map((s): [string, string] => [`spare ${s.ordinal}`, `${s.path}: ${s.used} used of ${s.blocks} blocks`]);
}

export function registerSpareCommands(program: Command, ctx: CommandContext): void {
  const spare = program.command('spare').description('the spare pool of a device: more than one spare, added online');

  spare.command('add')
    .description('add an extra spare to a running device (labels a blank one only with --format; never overwrites another device\'s label)')
    .argument('<name>', 'device name')
    .argument('<path>', 'spare file or device')
    .option('--format', 'label a spare that has no label (its first 4 KiB are overwritten)')
    .action(async (name: string, path: string, opts: { format?: boolean }, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const args: Record<string, unknown> = { name, path: resolve(path) };
      if (opts.format === true) args.format = true;
      const r = (await request(g.socket, 'spareAdd', args, 600_000)) as SpareAddAnswer;
      o.print(`${name}: spare ${r.added.ordinal} added (${r.added.path}, ${r.added.blocks} blocks); `
        + `${r.spareBlocksUsed} of ${r.spareBlocksTotal} spare blocks used over ${r.spares.length} spares\n${spareTable(r.spares)}`, r);
    });

  spare.command('list')
    .description('the spares of a device with their use')
    .argument('<name>', 'device name')
    .action(async (name: string, _opts: unknown, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const r = (await request(g.socket, 'spareList', { name }, 30_000)) as SpareListAnswer;
      o.print(`${name}: ${r.spareBlocksUsed} of ${r.spareBlocksTotal} spare blocks used; the metadata has room for `
        + `${r.roomBlocks === null ? 'any number of' : r.roomBlocks} more spare blocks\n${spareTable(r.spares)}`, r);
    });
}
