/**
 * remapctl unremap NAME --all|BLOCK... (issue 6): retire remaps after the
 * main disk was replaced or repaired. Crash-safe and resumable: run it
 * again after a crash and it finishes the rest.
 */
import { Command, CommanderError } from 'commander';
import { EXIT, type CommandContext } from './common.js';
import { request } from './client.js';
import type { UnremapAnswer } from '../daemon/handlers-unremap.js';
import type { UnremapResult } from '../engine/engine.js';

function line(device: string, r: UnremapResult): string {
  switch (r.result) {
    case 'unremapped':
      return `${device}: block ${r.block} copied back to main (spare block ${r.spare} freed)`;
    case 'not-remapped':
      return `${device}: block ${r.block} is not remapped`;
    default:
      return `${device}: block ${r.block} failed: ${r.reason}`;
  }
}

export function registerUnremapCommands(program: Command, ctx: CommandContext): void {
  program.command('unremap')
    .description('copy remapped blocks back to main and clear their remaps (after the main was replaced); crash-safe, resumable')
    .argument('<name>', 'device name')
    .argument('[block...]', 'logical block numbers (in units of the block size)')
    .option('--all', 'every remapped block')
    .action(async (name: string, blocksText: string[], opts: { all?: boolean }, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const all = opts.all === true;
      if (all === (blocksText.length > 0)) throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `unremap ${name}: give either --all or block numbers`);
      const blocks = blocksText.map((b) => {
        if (!/^\d+$/.test(b) || !Number.isSafeInteger(Number(b))) {
          throw new CommanderError(EXIT.USAGE, 'remapctl.usage', `unremap ${name}: "${b}" is not a block number (a non-negative integer)`);
        }
        return Number(b);
      });
      const r = (await request(g.socket, 'unremap', all ? { name, all: true } : { name, blocks }, 24 * 3_600_000)) as UnremapAnswer;
      const lines = r.results !== undefined ? r.results.map((x) => line(name, x)) : r.failures.map((x) => line(name, x));
      lines.push(`${name}: ${r.unremapped} unremapped, ${r.failed} failed${r.notRemapped > 0 ? `, ${r.notRemapped} not remapped` : ''}; `
        + `${r.remainingRemapped} block(s) still remapped`);
      o.print(lines.join('\n'), r);
      if (r.failed > 0) o.code = EXIT.FAILED;
    });
}
