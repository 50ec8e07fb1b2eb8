/**
 * remapctl openers NAME: who holds the device's kernel block device
 * (/dev/ublkbN, /dev/nbdN): mounts in any mount namespace, processes with it
 * open, stacked devices, swap. `remove` refuses a device with openers unless
 * --force.
 */
import type { Command } from 'commander';
import { EXIT, type CommandContext } from './common.js';
import { request } from './client.js';
import type { OpenersAnswer } from '../daemon/handlers-openers.js';

export function registerOpenersCommands(program: Command, ctx: CommandContext): void {
  program.command('openers')
    .description('list who holds the device\'s /dev/ublkbN or /dev/nbdN (mounts, processes, stacked devices, swap); exit 5 when any')
    .argument('<name>', 'device name')
    .action(async (name: string, _opts: unknown, cmd: Command) => {
      const { g, o } = ctx(cmd);
      const r = (await request(g.socket, 'openers', { name }, 30_000)) as OpenersAnswer;
      const lines = r.devices.length === 0
        ? [`${name}: no kernel block device`]
        : r.openers.length === 0
          ? [`${name}: ${r.devices.join(', ')} not in use`]
          : r.openers.map((x) => `${name}: ${x.device} ${x.detail}`);
      o.print(lines.join('\n'), r);
      if (r.openers.length > 0) o.code = EXIT.IN_USE;
    });
}
