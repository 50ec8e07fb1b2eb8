/**
 * Starts the NBD export of a device through src/frontends/nbd (NbdExport).
 * The frontend is loaded lazily: without it, devices without exports still
 * work and an export request fails with UNSUPPORTED.
 */
import type { Logger } from 'pino';
import type { BlockEngine } from '../engine/engine.js';
import type { DeviceSpec, ExportHandle, ExportStarter } from './devices.js';
import { ControlError } from './protocol.js';

interface NbdExportOptionsLike {
  backend: BlockEngine;
  description?: string;
  unixPath?: string;
  tcp?: { host: string; port: number };
  readOnly?: boolean;
  logger: Logger;
}

interface NbdModuleLike {
  NbdExport: { start(opts: NbdExportOptionsLike): Promise<ExportHandle> };
}

let loaded: Promise<NbdModuleLike | Error> | undefined;

function loadNbd(): Promise<NbdModuleLike | Error> {
  if (loaded === undefined) {
    // A computed specifier: the frontend is developed in parallel and may be absent.
    const spec = ['..', 'frontends', 'nbd', 'index.js'].join('/');
    loaded = import(spec).then(
      (m: unknown) => {
        const mod = m as Partial<NbdModuleLike>;
        if (typeof mod.NbdExport?.start !== 'function') return new Error('src/frontends/nbd has no NbdExport.start');
        return mod as NbdModuleLike;
      },
      (err: unknown) => (err instanceof Error ? err : new Error(String(err))),
    );
  }
  return loaded;
}

export const startNbdExport: ExportStarter = async (engine: BlockEngine, spec: DeviceSpec, logger: Logger) => {
  if (spec.nbdUnix === undefined && spec.nbdTcp === undefined) return null;
  const mod = await loadNbd();
  if (mod instanceof Error) {
    throw new ControlError('UNSUPPORTED', `device "${spec.name}": the NBD frontend is not available (${mod.message})`);
  }
  return mod.NbdExport.start({
    backend: engine,
    description: spec.description ?? `dm-remapd device ${spec.name}`,
    unixPath: spec.nbdUnix,
    tcp: spec.nbdTcp,
    readOnly: spec.readOnly,
    logger: logger.child({ component: 'nbd' }),
  });
};
