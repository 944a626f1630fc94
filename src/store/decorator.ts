// A BlockBackend wrapped by another (metering, a migrating page's routing): the geometry
// passes through; the subclass decides what each operation does with `inner`.

import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from './types';

export abstract class BackendDecorator implements BlockBackend {
  constructor(protected readonly inner: BlockBackend) {}

  get blockBytes(): number {
    return this.inner.blockBytes;
  }
  get blockCount(): number {
    return this.inner.blockCount;
  }
  get grainBlocks(): number {
    return this.inner.grainBlocks;
  }

  abstract read(lba: number, blocks: number): Promise<Buffer>;
  abstract write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  abstract unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void>;
  abstract compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult>;
  abstract flush(): Promise<void>;
  abstract lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]>;
}
