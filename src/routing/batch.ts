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
// The batcher queues the requests/replies themselves and encodes them when it flushes, into
// one buffer of headers (and small data, copied: a copy of a few KiB costs less than a chunk
// of its own). Data of zeroCopyMinBytes or more is not copied: the batch is a list of chunks
// (headers, data, headers, …) that the socket writes with one writev (writeChunks), so a
// 128 KiB read reply leaves the owner with no user-space copy. Such data must not change
// after it is pushed until the socket has sent it: store reads and iSCSI data are fresh
// buffers; the only reused ones, received read replies (read-buffers.ts), are reused only
// after the host read they answered has sent them, so a reply's data that is sent on to
// another peer (XCOPY, a migration) is never reused; and a request failed early (its
// deadline) is still only read by the socket.

import type * as net from 'node:net';
import { peerBatchBytesMax, peerFrameBytesMax } from '../limits';
import { FrameReader } from './frame-reader';

const lengthBytes = 4;

/** The frames of a batch, as views into it; undefined if the batch is malformed or has more than `framesMax`. */
export function splitBatch(batch: Buffer, framesMax = Number.MAX_SAFE_INTEGER): Buffer[] | undefined {
  const reader = new FrameReader(peerFrameBytesMax);
  const frames = reader.read(batch);
  return frames && !reader.midFrame && frames.length <= framesMax ? frames : undefined;
}

/** Data at least this large is sent as it is (its own chunk of the batch), not copied. */
export const zeroCopyMinBytes = 32 * 1024;

/** How a batcher sizes and writes one frame (frame.ts: requestFrameBytes/encodeRequestInto, …). */
export interface FrameCodec<T> {
  frameBytes(item: T): number;
  /** The data that ends the frame, if any (a request's data, a reply's payload). */
  data(item: T): Buffer | undefined;
  /** Write the frame at `b[at..]`; without its data (the last data(item).length bytes) when `withData` is false. */
  encodeInto(item: T, b: Buffer, at: number, withData: boolean): void;
}

/** Write a batch's chunks as one writev (a single chunk as one write); the socket's write result. */
export function writeChunks(socket: net.Socket, chunks: Buffer[]): boolean {
  if (chunks.length === 1) return socket.write(chunks[0]);
  socket.cork();
  let ok = true;
  for (const c of chunks) ok = socket.write(c) && ok;
  socket.uncork();
  return ok;
}

export type FlushPolicy = 'task' | 'turn';

/**
 * Collects frames and hands them to `write` as one batch per task or per event-loop turn (see
 * above), or at once when the batch is full. An item's buffers are borrowed until the batch is
 * flushed, and its large data until the socket has sent it (see above).
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
    private readonly write: (chunks: Buffer[]) => void,
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
    const { items, sizes, codec } = this;
    this.items = [];
    this.sizes = [];
    // Data sent as it is (undefined: copied into the headers' buffer), per item.
    const apart: (Buffer | undefined)[] = new Array(items.length);
    let headBytes = this.bytes;
    for (let i = 0; i < items.length; i++) {
      const data = codec.data(items[i]);
      if (data && data.length >= zeroCopyMinBytes) {
        apart[i] = data;
        headBytes -= data.length;
      }
    }
    this.bytes = 0;
    const head = Buffer.allocUnsafe(headBytes);
    const chunks: Buffer[] = [];
    let at = 0;
    let from = 0;
    for (let i = 0; i < items.length; i++) {
      const data = apart[i];
      head.writeUInt32BE(sizes[i], at);
      codec.encodeInto(items[i], head, at + lengthBytes, data === undefined);
      at += lengthBytes + sizes[i] - (data?.length ?? 0);
      if (data) {
        chunks.push(head.subarray(from, at), data);
        from = at;
      }
    }
    if (from < at) chunks.push(head.subarray(from, at));
    this.write(chunks);
  }

  /** Drop what is queued (the stream broke). */
  clear(): void {
    this.items = [];
    this.sizes = [];
    this.bytes = 0;
  }
}
