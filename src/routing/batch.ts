// Frames produced in one turn of the event loop travel as one gRPC message: a batch is
// [u32 length][frame] repeated. At queue depth 32 a peer forwards bursts of requests, and
// gRPC's cost is per message, not per byte, so batching is what makes forwarding cheap.
// Pure split function (bounded, undefined on a malformed batch) plus a tiny batcher.

import { peerBatchBytesMax, peerFrameBytesMax } from '../limits';

const lengthBytes = 4;

/** The frames of a batch, as views into it; undefined if the batch is malformed. */
export function splitBatch(batch: Buffer): Buffer[] | undefined {
  const frames: Buffer[] = [];
  let at = 0;
  while (at < batch.length) {
    if (at + lengthBytes > batch.length) return undefined;
    const n = batch.readUInt32BE(at);
    at += lengthBytes;
    if (n === 0 || n > peerFrameBytesMax || at + n > batch.length) return undefined;
    frames.push(batch.subarray(at, at + n));
    at += n;
  }
  return frames;
}

/** Collects frames and hands them to `write` as one batch per event-loop turn (or when full). */
export class FrameBatcher {
  private frames: Buffer[] = [];
  private bytes = 0;
  private scheduled = false;

  constructor(private readonly write: (batch: Buffer) => void) {}

  push(frame: Buffer): void {
    if (this.bytes + lengthBytes + frame.length > peerBatchBytesMax) this.flush();
    const head = Buffer.allocUnsafe(lengthBytes);
    head.writeUInt32BE(frame.length, 0);
    this.frames.push(head, frame);
    this.bytes += lengthBytes + frame.length;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  flush(): void {
    this.scheduled = false;
    if (this.frames.length === 0) return;
    const batch = Buffer.concat(this.frames, this.bytes);
    this.frames = [];
    this.bytes = 0;
    this.write(batch);
  }

  /** Drop what is queued (the stream broke). */
  clear(): void {
    this.frames = [];
    this.bytes = 0;
  }
}
