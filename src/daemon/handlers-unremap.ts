/**
 * `unremap` (issue 6, retiring remaps after the main disk was replaced):
 *
 *   unremap {name, all: true} | {name, blocks: [n, ...]} -> UnremapAnswer
 *
 * Each block is copied back from the spare to main and its remap cleared
 * (BlockEngine.unremapBlocks: main durable before the UNMAP commit). With
 * `all`, only the failures are listed (the table may hold a million blocks).
 */
import type { CommandHandler } from './control.js';
import type { DeviceManager } from './devices.js';
import { ControlError, argBool, argString } from './protocol.js';
import type { UnremapResult } from '../engine/engine.js';

export interface UnremapAnswer {
  name: string;
  requested: number;
  unremapped: number;
  notRemapped: number;
  failed: number;
  /** Remapped blocks left on the device afterwards. */
  remainingRemapped: number;
  /** One entry per requested block (absent with `all`). */
  results?: UnremapResult[];
  failures: Array<Extract<UnremapResult, { result: 'failed' }>>;
}

export function unremapHandlers(mgr: DeviceManager): Record<string, CommandHandler> {
  return {
    unremap: async (args) => {
      const name = argString('unremap', args, 'name');
      const all = argBool('unremap', args, 'all') === true;
      const blocks = args.blocks;
      if (all === (blocks !== undefined)) throw new ControlError('BAD_REQUEST', 'unremap: give exactly one of "all": true or "blocks"');
      if (blocks !== undefined && (!Array.isArray(blocks) || blocks.length === 0 || blocks.length > 1_000_000
        || !blocks.every((b): b is number => typeof b === 'number' && Number.isSafeInteger(b) && b >= 0))) {
        throw new ControlError('BAD_REQUEST', 'unremap: argument "blocks" must be a non-empty array of at most 1000000 non-negative integers');
      }
      const engine = mgr.runningEngine(name, 'unremap');
      const results = await engine.unremapBlocks(all ? 'all' : (blocks as number[]));
      const failures = results.filter((r): r is Extract<UnremapResult, { result: 'failed' }> => r.result === 'failed');
      const answer: UnremapAnswer = {
        name,
        requested: results.length,
        unremapped: results.filter((r) => r.result === 'unremapped').length,
        notRemapped: results.filter((r) => r.result === 'not-remapped').length,
        failed: failures.length,
        remainingRemapped: engine.status().remappedBlocks,
        failures,
      };
      if (!all) answer.results = results;
      return answer;
    },
  };
}
