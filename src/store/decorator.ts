// A BlockBackend wrapped by another (metering, a migrating page's routing): the geometry
// passes through; the subclass decides what each operation does with `inner`.

import { ReadOnlyError } from '../errors';
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

/** A read-only BlockBackend (a snapshot): changes are refused with ReadOnlyError; flush has nothing to do. */
export abstract class ReadOnlyBackend implements BlockBackend {
  abstract readonly blockBytes: number;
  abstract readonly blockCount: number;
  abstract readonly grainBlocks: number;
  /** What is read-only, for the error message ("snapshot s1 of volume v"). */
  protected abstract readonly what: string;

  abstract read(lba: number, blocks: number): Promise<Buffer>;
  abstract lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]>;

  async flush(): Promise<void> {}
  write(): Promise<void> {
    return Promise.reject(this.readOnly());
  }
  unmap(): Promise<void> {
    return Promise.reject(this.readOnly());
  }
  compareAndWrite(): Promise<CompareAndWriteResult> {
    return Promise.reject(this.readOnly());
  }
  private readOnly(): ReadOnlyError {
    return new ReadOnlyError(`${this.what} is read-only`);
  }
}

/**
 * Run `run` (a sync throw becomes a rejection) and call `after` when it settles, without an
 * extra async function: the wrappers on the data path stay one promise deep.
 */
export function whenSettled<T>(run: () => Promise<T>, after: (ok: boolean) => void): Promise<T> {
  let p: Promise<T>;
  try {
    p = run();
  } catch (err) {
    p = Promise.reject(err);
  }
  return p.then(
    (v) => {
      after(true);
      return v;
    },
    (err: unknown) => {
      after(false);
      throw err;
    },
  );
}
