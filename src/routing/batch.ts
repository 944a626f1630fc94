// Frames produced together travel as one write on the data stream (data-stream.ts): a batch is
// [u32 length][frame] repeated, the stream's own format, so batches need no framing of their
// own and the receiver cuts frames as they come (FrameReader). At queue depth 32 a peer
// forwards bursts of requests, and a write (a system call, a TCP segment) costs per call, not
// per byte, so batching is what makes forwarding cheap.
// Pure split function (bounded, undefined on a malformed batch) plus a tiny batcher.
//
// When a batch goes out matters as much as its size. Two policies:
//   'task'  flush when the task that pushed ends (a microtask). The sender's side: the
//           commands of one iSCSI read event still go as one batch, and leave at once.
//   'turn'  flush at the end of the turn (setImmediate). The owner's side: replies come one
//           per store completion, each its own task, and a batch per task would be a write
//           per reply. The owner calls flushAfterTask() once it has nothing left in flight,
//           since no more replies are coming to wait for.
//
// The batcher queues the requests/replies themselves and encodes them straight into the one
// batch buffer when it flushes: a block's data is copied once on its way out (into the batch,
// which the socket writes as it is), and no per-frame buffers become garbage.

import { peerBatchBytesMax, peerFrameBytesMax } from '../limits';
import { FrameReader } from './frame-reader';

const lengthBytes = 4;

/** The frames of a batch, as views into it; undefined if the batch is malformed or has more than `framesMax`. */
export function splitBatch(batch: Buffer, framesMax = Number.MAX_SAFE_INTEGER): Buffer[] | undefined {
  const reader = new FrameReader(peerFrameBytesMax);
  const frames = reader.read(batch);
  return frames && !reader.midFrame && frames.length <= framesMax ? frames : undefined;
}

/** How a batcher sizes and writes one frame (frame.ts: requestFrameBytes/encodeRequestInto, …). */
export interface FrameCodec<T> {
  frameBytes(item: T): number;
  encodeInto(item: T, b: Buffer, at: number): void;
}

export type FlushPolicy = 'task' | 'turn';

/**
 * Collects frames and hands them to `write` as one batch per task or per event-loop turn (see
 * above), or at once when the batch is full. An item's buffers are borrowed until the batch is
 * flushed (callers keep them until the answer anyway).
 */
export class FrameBatcher<T> {
  private items: T[] = [];
  private sizes: number[] = [];
  private bytes = 0;
  /** A flush is scheduled at the end of the turn / of the task. */
  private turnScheduled = false;
  private taskScheduled = false;
  private readonly flushAtTurnEnd = (): void => {
    this.turnScheduled = false;
    this.flush();
  };
  private readonly flushAtTaskEnd = (): void => {
    this.taskScheduled = false;
    this.flush();
  };

  constructor(
    private readonly codec: FrameCodec<T>,
    private readonly write: (batch: Buffer) => void,
    private readonly policy: FlushPolicy = 'turn',
  ) {}

  push(item: T): void {
    const n = this.codec.frameBytes(item);
    if (n === 0 || n > peerFrameBytesMax) throw new Error(`assertion failed: a frame of ${n} bytes`);
    if (this.bytes + lengthBytes + n > peerBatchBytesMax) this.flush();
    this.items.push(item);
    this.sizes.push(n);
    this.bytes += lengthBytes + n;
    if (this.policy === 'task') this.flushAfterTask();
    else if (!this.turnScheduled) {
      this.turnScheduled = true;
      setImmediate(this.flushAtTurnEnd);
    }
  }

  /** Flush what is queued when the current task ends (its microtasks included), not later. */
  flushAfterTask(): void {
    if (this.taskScheduled || this.items.length === 0) return;
    this.taskScheduled = true;
    queueMicrotask(this.flushAtTaskEnd);
  }

  flush(): void {
    if (this.items.length === 0) return;
    const { items, sizes } = this;
    const batch = Buffer.allocUnsafe(this.bytes);
    this.items = [];
    this.sizes = [];
    this.bytes = 0;
    let at = 0;
    for (let i = 0; i < items.length; i++) {
      batch.writeUInt32BE(sizes[i], at);
      this.codec.encodeInto(items[i], batch, at + lengthBytes);
      at += lengthBytes + sizes[i];
    }
    this.write(batch);
  }

  /** Drop what is queued (the stream broke). */
  clear(): void {
    this.items = [];
    this.sizes = [];
    this.bytes = 0;
  }
}
