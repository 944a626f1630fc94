// An in-memory BlockBackend for SCSI tests: the reference model the store is compared with.

import type { BlockBackend, CompareAndWriteResult, LbaExtent } from '../../src/store/types';

export class MemoryBackend implements BlockBackend {
  readonly blockBytes: number;
  blockCount: number;
  readonly grainBlocks: number;
  readonly data: Buffer;
  readonly mapped: Uint8Array;
  flushes = 0;
  fuaWrites = 0;

  constructor(blockBytes = 512, blockCount = 4096, grainBlocks = 128) {
    this.blockBytes = blockBytes;
    this.blockCount = blockCount;
    this.grainBlocks = grainBlocks;
    this.data = Buffer.alloc(blockBytes * blockCount);
    this.mapped = new Uint8Array(blockCount);
  }

  private check(lba: number, blocks: number): void {
    if (lba < 0 || blocks < 0 || lba + blocks > this.blockCount) throw new Error(`range ${lba}+${blocks}`);
  }

  async read(lba: number, blocks: number): Promise<Buffer> {
    this.check(lba, blocks);
    return Buffer.from(this.data.subarray(lba * this.blockBytes, (lba + blocks) * this.blockBytes));
  }

  async write(lba: number, data: Buffer, opts?: { fua?: boolean }): Promise<void> {
    this.check(lba, data.length / this.blockBytes);
    data.copy(this.data, lba * this.blockBytes);
    this.mapped.fill(1, lba, lba + data.length / this.blockBytes);
    if (opts?.fua) this.fuaWrites++;
  }

  async unmap(lba: number, blocks: number): Promise<void> {
    this.check(lba, blocks);
    this.data.fill(0, lba * this.blockBytes, (lba + blocks) * this.blockBytes);
    this.mapped.fill(0, lba, lba + blocks);
  }

  async compareAndWrite(lba: number, compare: Buffer, data: Buffer): Promise<CompareAndWriteResult> {
    const current = await this.read(lba, compare.length / this.blockBytes);
    for (let i = 0; i < current.length; i++) if (current[i] !== compare[i]) return { ok: false, miscompareOffsetBytes: i };
    await this.write(lba, data);
    return { ok: true };
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  async lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    const out: LbaExtent[] = [];
    for (let b = lba; b < Math.min(this.blockCount, lba + blocksMax); b++) {
      const mapped = this.mapped[b] === 1;
      const last = out[out.length - 1];
      if (last && last.mapped === mapped) last.blocks++;
      else out.push({ lba: b, blocks: 1, mapped });
    }
    return out;
  }
}
