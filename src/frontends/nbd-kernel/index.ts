export { attachNbdDevice, parseNbdDevice, type AttachOptions, type NbdKernelAttachment } from './attach.js';
