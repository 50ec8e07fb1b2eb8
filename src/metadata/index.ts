export { crc32c } from './crc32c.js';
export { FileMetaIO, META_BLOCK, type MetaIO } from './io.js';
export { RecordType, RECORD_BYTES, recordTypeName, type MetaRecord, type RecordTypeCode } from './records.js';
export { computeLayout, spareBlockOffset, RECORDS_PER_BLOCK, DEFAULT_JOURNAL_BYTES, type Layout, type CopyLayout, type LayoutOptions } from './layout.js';
export { FORMAT_VERSION, type Identity, type MainIdentity } from './format.js';
export {
  formatSpare,
  FormatInterruptedError,
  loadSpare,
  inspectSpare,
  repairSpare,
  type LoadedMetadata,
  type CopyReport,
  type StructureReport,
  type FormatOptions,
  type LoadOptions,
  type InspectResult,
  type IdentityInput,
} from './store.js';
export { MetadataWriter, type WriterOptions, type CommitOptions, type WriterStats, type MetaLogger } from './writer.js';
export { reduce, applyRecord, emptyState, stateToRecords, doubleMappedSpares, statesEqual, type MetaState, type RemapEntry } from './reduce.js';
