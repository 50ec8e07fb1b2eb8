export { attachUblkDevice, type UblkAttachment, type UblkOptions } from './attach.js';
