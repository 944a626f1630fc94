// Copy a snapshot's data into a volume through the routers (restore: into its own volume;
// clone: into a new one), extent by extent: mapped ranges are read from the peers holding the
// snapshot's layers and written to the target's page owners, deallocated ranges are unmapped,
// so a thin snapshot stays thin. Blocks of the target beyond the snapshot's size are unmapped.

import type { BlockBackend } from '../store/types';

const chunkBytes = 1024 * 1024;

export interface CopyProgress {
  copiedBytes: number;
  unmappedBytes: number;
}

export async function copyInto(from: BlockBackend, to: BlockBackend, onProgress?: (p: CopyProgress) => void): Promise<CopyProgress> {
  const bs = from.blockBytes;
  const chunkBlocks = Math.max(1, Math.floor(chunkBytes / bs));
  const progress: CopyProgress = { copiedBytes: 0, unmappedBytes: 0 };
  const end = Math.min(from.blockCount, to.blockCount);
  for (let lba = 0; lba < end; ) {
    const extents = await from.lbaStatus(lba, end - lba);
    if (extents.length === 0) break;
    for (const e of extents) {
      const stop = Math.min(e.lba + e.blocks, end);
      for (let at = Math.max(e.lba, lba); at < stop; at += chunkBlocks) {
        const n = Math.min(chunkBlocks, stop - at);
        if (e.mapped) {
          await to.write(at, await from.read(at, n));
          progress.copiedBytes += n * bs;
        } else {
          await to.unmap(at, n);
          progress.unmappedBytes += n * bs;
        }
      }
      lba = stop;
      onProgress?.(progress);
    }
  }
  if (to.blockCount > end) {
    for (let at = end; at < to.blockCount; at += chunkBlocks * 64) await to.unmap(at, Math.min(chunkBlocks * 64, to.blockCount - at));
  }
  return progress;
}
