export { NbdExport, type NbdExportOptions } from './export.js';
export {
  type NbdBackend,
  type BackendCapabilities,
  type ExportView,
  exportView,
  transmissionFlags,
  blockSizeConstraints,
  isReadOnly,
  canFlush,
  canFua,
  canTrim,
  canZero,
  canFastZero,
  canDf,
  canMultiConn,
  canCache,
} from './backend.js';
export {
  serveTransmission,
  TransmissionSession,
  newStats,
  type NbdStats,
  type TransmissionOptions,
  type SessionState,
} from './transmission.js';
export { NbdHandshake, SERVER_HANDSHAKE_FLAGS, type HandshakeConfig, type HandshakeExport, type HandshakeOutcome, type HandshakeStep } from './handshake.js';
export { RequestParser, type ParsedEvent } from './request-parser.js';
export * as nbdProtocol from './protocol.js';
