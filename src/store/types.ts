// The block interface a logical unit reads and writes through. Today the local page store
// implements it; later the router does (serving local pages from the store and forwarding
// the rest to their owners), so everything the SCSI layer needs to be atomic or durable is
// a method here, executed where the data lives.
//
// Buffers: `read` returns a buffer the caller owns. `write`/`compareAndWrite` borrow the
// caller's buffer only until the returned promise settles.

export interface WriteOptions {
  /** Force Unit Access: durable (fdatasync) before the promise resolves. */
  fua?: boolean;
  /**
   * The hybrid-clock stamp the host's command got at the peer that received it (timestamp-mode
   * snapshots, src/snapshot/hlc.ts); carried when forwarded. Absent: not a host write.
   */
  stamp?: number;
  /**
   * A change forwarded by another peer: the version of the page's route its sender routed it by
   * (page-service.ts). The primary of a replicated page refuses it (MOVED) if the route is newer
   * when the change would be applied (src/replication/replicated.ts says why). Absent: this
   * peer's own request, or not a host change.
   */
  routeVersion?: number;
}

export interface LbaExtent {
  lba: number;
  blocks: number;
  /** false: deallocated (reads as zeros). */
  mapped: boolean;
}

export type CompareAndWriteResult = { ok: true } | { ok: false; miscompareOffsetBytes: number };

export interface BlockBackend {
  readonly blockBytes: number;
  /** Capacity in logical blocks. */
  readonly blockCount: number;
  /** Provisioning (unmap) granularity in blocks. */
  readonly grainBlocks: number;

  read(lba: number, blocks: number): Promise<Buffer>;
  write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  /** Deallocate: the blocks read as zeros afterwards; whole grains release their space. */
  unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void>;
  /** Atomic with respect to every other write to the same blocks. */
  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult>;
  /** Everything acknowledged before the call is durable when it resolves. */
  flush(): Promise<void>;
  /** Mapped/deallocated extents from `lba`, covering at most `blocksMax` blocks, in order. */
  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]>;
}
