export { attachUblkDevice, type UblkAttachment, type UblkOptions } from './attach.js';
export { startUblkExport, type UblkExport } from './export.js';
export { UblkRecordStore, parseUblkRecord, formatUblkRecord, type UblkRecord } from './record.js';
