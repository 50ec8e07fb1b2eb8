export { attachUblkDevice, deleteRecordedUblk, type UblkAttachment, type UblkOptions } from './attach.js';
export { dropUblkRecord, startUblkExport, type UblkExport } from './export.js';
export { UblkRecordStore, parseUblkRecord, formatUblkRecord, type UblkRecord } from './record.js';
