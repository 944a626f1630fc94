// The owner's side of a timestamp-mode snapshot (DESIGN.md 6): between PREPARE and the end
// of the snapshot, every change that reaches this peer's store for the volume is recorded
// with its hybrid-clock stamp and its data. PREPARE froze the store's layer right after
// recording began, so the frozen layer holds every write that arrived before; the cut T is
// chosen after that; at the end, the recorded changes stamped before T go into the frozen
// layer in the order this store applied them (StoreVolume.writeIntoSnapshot). Host I/O is never
// held: a recorded write costs one copy of its data.
//
// The stamp decides WHETHER a change is in the snapshot; the store's order decides how
// overlapping ones combine. Stamps cannot order them: a change that is not a host write (a
// resync's grain, a move's copy) is stamped when it lands, on this peer's clock, while a host
// change stamped long before may land after it (held in a range lock, retried). Sorted by
// stamp, such an old unmap went under the newer copy of the grain in the layer while the live
// store (and the other copies, which apply in the primary's order) had it on top (simulator,
// seed 207). Overlapping changes of a page land in the same order on every copy (the primary's
// range lock, the move's piece locks), so replaying in the order of arrival keeps the copies'
// layers the same.
//
// Sits right above the store, below page moves, so host writes served here, forwarded writes
// and a move's dual writes are all seen. A change without a stamp (not a host write) is
// stamped on arrival.

import { PeersanError } from '../errors';
import { BackendDecorator } from '../store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';
import type { HybridClock } from './hlc';

export interface StampedChange {
  stamp: number;
  lba: number;
  blocks: number;
  /** null: the blocks were unmapped (read as zeros). */
  data: Buffer | null;
  /** Recorded after the layer froze (the store had not seen it at the freeze). */
  afterFreeze: boolean;
}

/** A recording for one snapshot; `bytes` bounds the copies it keeps. */
interface Recording {
  snapshotId: string;
  changes: StampedChange[];
  bytes: number;
  overflowed: boolean;
  frozen: boolean;
}

export class StampLog extends BackendDecorator {
  private recording: Recording | undefined;

  constructor(inner: BlockBackend, private readonly clock: HybridClock, private readonly bytesMax: number) {
    super(inner);
  }

  /** Start recording for a snapshot (one at a time per volume). */
  begin(snapshotId: string): void {
    if (this.recording && this.recording.snapshotId !== snapshotId) {
      throw new PeersanError(`the volume is already recording for timestamp snapshot ${this.recording.snapshotId}`, 'PEERSAN_ERR_CONFLICT');
    }
    this.recording ??= { snapshotId, changes: [], bytes: 0, overflowed: false, frozen: false };
  }

  /** The layer froze: changes recorded from now on were not in it. */
  frozen(snapshotId: string): void {
    if (this.recording?.snapshotId === snapshotId) this.recording.frozen = true;
  }

  /** Stop recording; the changes stamped before `cut`, in the order they reached the store. */
  end(snapshotId: string, cut: number): StampedChange[] {
    const r = this.recording;
    if (!r || r.snapshotId !== snapshotId) throw new PeersanError(`no recording for snapshot ${snapshotId} on this peer`);
    this.recording = undefined;
    if (r.overflowed) throw new PeersanError(`more than ${this.bytesMax} bytes written during the snapshot`, 'PEERSAN_ERR_SNAPSHOT_ABORTED');
    return r.changes.filter((c) => c.stamp < cut);
  }

  /** Stop recording without using it (the snapshot aborted). */
  drop(snapshotId: string): void {
    if (this.recording?.snapshotId === snapshotId) this.recording = undefined;
  }

  get isRecording(): boolean {
    return this.recording !== undefined;
  }

  private record(opts: WriteOptions | undefined, lba: number, blocks: number, data: Buffer | null): void {
    const r = this.recording;
    if (!r || r.overflowed) return;
    r.bytes += data?.length ?? 0;
    if (r.bytes > this.bytesMax) {
      r.overflowed = true;
      r.changes = [];
      return;
    }
    r.changes.push({ stamp: opts?.stamp ?? this.clock.now(), lba, blocks, data: data && Buffer.from(data), afterFreeze: r.frozen });
  }

  read(lba: number, blocks: number): Promise<Buffer> {
    return this.inner.read(lba, blocks);
  }
  // Not recording (nearly always): the store's own promise, nothing added. A change already on
  // its way when recording begins is not recorded: it lands before the freeze, which waits for it.
  write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    if (!this.recording) return this.inner.write(lba, data, opts);
    return this.inner.write(lba, data, opts).then(() => this.record(opts, lba, data.length / this.blockBytes, data));
  }
  unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void> {
    if (!this.recording) return this.inner.unmap(lba, blocks, opts);
    return this.inner.unmap(lba, blocks, opts).then(() => this.record(opts, lba, blocks, null));
  }
  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult> {
    if (!this.recording) return this.inner.compareAndWrite(lba, compare, data, opts);
    return this.inner.compareAndWrite(lba, compare, data, opts).then((r) => {
      if (r.ok) this.record(opts, lba, data.length / this.blockBytes, data);
      return r;
    });
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.inner.lbaStatus(lba, blocksMax);
  }
}
