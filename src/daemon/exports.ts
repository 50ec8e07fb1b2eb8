/**
 * Starts the NBD export of a device (src/frontends/nbd), or none when the
 * spec names no NBD endpoint.
 */
import type { Logger } from 'pino';
import type { BlockEngine } from '../engine/engine.js';
import { NbdExport } from '../frontends/nbd/index.js';
import type { DeviceSpec, ExportStarter } from './devices.js';

export const startNbdExport: ExportStarter = async (engine: BlockEngine, spec: DeviceSpec, logger: Logger) => {
  if (spec.nbdUnix === undefined && spec.nbdTcp === undefined) return null;
  return NbdExport.start({
    backend: engine,
    description: spec.description ?? `dm-remapd device ${spec.name}`,
    unixPath: spec.nbdUnix,
    tcp: spec.nbdTcp,
    readOnly: spec.readOnly,
    logger: logger.child({ component: 'nbd' }), // NbdExport adds the device itself
  });
};
