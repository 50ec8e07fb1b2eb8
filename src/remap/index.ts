// The pure core of remapping: no I/O here (see src/remap/README.md).
export { BlockSet } from './block-set.js';
export { planRange, type Extent } from './planner.js';
export { RemapTable } from './remap-table.js';
export { DEFAULT_CHUNK_CAPACITY, type SortedChunksOptions } from './sorted-chunks.js';
export { MAX_SPARE_BLOCKS, SpareAllocator } from './spare-allocator.js';
