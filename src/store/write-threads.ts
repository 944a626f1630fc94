// The store's own threads for small writes, while DataFile's inline writes are off (a slow
// one turned them off for a while: data-file.ts; inline, a write costs no trip at all).
// A small write sent through libuv's thread pool
// costs a trip of its own (a futex wake-up, two context switches, the pool's lock, the answer
// through the loop's async handle): about half of what a 4 KiB write at a scattered offset
// costs a peer. Here the small writes of one turn (DataFile's runs under 64 KiB, see
// data-file.ts) are copied into shared buffers and sent in batches, one message each, to two
// threads; each thread writes a batch one write after the other with pwrite and answers once
// for all. A turn's batch is one trip however many writes it holds, and a turn's dozen writes
// are split over both threads, so no write waits for more than a few others.
//
// What it keeps:
// - a write resolves after its bytes are in the kernel, as through the pool;
// - the caller's buffer is copied before `send` returns, so the caller may reuse it at once;
// - a failed write fails with its errno code (ENOSPC stays NoSpaceError); a short write goes
//   on from where it stopped, and one that takes no bytes is EIO;
// - if a thread dies, every batch it had fails (EIO) and the next batch starts a new one;
// - a thread keeps the process alive only while it has writes.
// The staging buffers come from a free list (at most stagingBuffersMax, each stagingBytes);
// when none is free, `send` says no and the caller uses the pool as before.
import { Worker } from 'node:worker_threads';

/** One write for the thread: `bytes` at `position` of the file `fd`. */
export interface ThreadWrite {
  fd: number;
  position: number;
  /** The bytes, as one buffer or as adjacent pieces written as one. */
  pieces: readonly Buffer[];
  /** Null when every byte is in the kernel; else the error (with its errno `code`). */
  done(err: NodeJS.ErrnoException | null): void;
}

/** Each staging buffer; a batch holds at most this many bytes. */
export const stagingBytes = 256 * 1024;
/** At most this many staging buffers (in flight and free together). */
const stagingBuffersMax = 16;
/** Threads: a turn's batches are spread over them, so one batch's writes do not wait for another's. */
const writeThreadsDefault = 2;

/** What the thread runs: plain JavaScript, so it loads the same from src/ (tests) and dist/. */
const threadSource = `
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
parentPort.on('message', ({ id, staging, fds, positions, lengths }) => {
  const bytes = new Uint8Array(staging);
  const errors = [];
  let at = 0;
  for (let i = 0; i < fds.length; i++) {
    let done = 0;
    let error = null;
    try {
      while (done < lengths[i]) {
        const n = fs.writeSync(fds[i], bytes, at + done, lengths[i] - done, positions[i] + done);
        if (n === 0) { error = { code: 'EIO', message: 'the file took none of the bytes' }; break; }
        done += n;
      }
    } catch (err) {
      error = { code: err.code || 'EIO', message: err.message };
    }
    errors.push(error);
    at += lengths[i];
  }
  parentPort.postMessage({ id, errors });
});
`;

interface Batch {
  staging: SharedArrayBuffer;
  writes: ThreadWrite[];
}

interface Reply {
  id: number;
  errors: ({ code: string; message: string } | null)[];
}

/** One thread and the batches it has. */
interface Lane {
  worker?: Worker;
  readonly inFlight: Map<number, Batch>;
}

export class WriteThreads {
  /** What went through (for /metrics): batches sent, the writes in them, batches refused for want of a staging buffer. */
  readonly counts = { batches: 0, writes: 0, refused: 0 };
  private readonly lanes: Lane[];
  private readonly free: SharedArrayBuffer[] = [];
  private allocated = 0;
  private nextId = 1;

  constructor(threads = writeThreadsDefault) {
    this.lanes = Array.from({ length: threads }, () => ({ inFlight: new Map<number, Batch>() }));
  }

  /**
   * Sends `writes` (at most stagingBytes together) as one batch to the thread with the fewest
   * batches, or returns false when no staging buffer is free (the caller writes them some other
   * way). Each write's `done` is called once.
   */
  send(writes: ThreadWrite[]): boolean {
    const staging = this.free.pop() ?? (this.allocated < stagingBuffersMax ? (this.allocated++, new SharedArrayBuffer(stagingBytes)) : undefined);
    if (!staging) {
      this.counts.refused++;
      return false;
    }
    this.counts.batches++;
    this.counts.writes += writes.length;
    const bytes = Buffer.from(staging);
    const fds: number[] = [];
    const positions: number[] = [];
    const lengths: number[] = [];
    let at = 0;
    for (const w of writes) {
      const start = at;
      for (const piece of w.pieces) at += piece.copy(bytes, at);
      fds.push(w.fd);
      positions.push(w.position);
      lengths.push(at - start);
    }
    const id = this.nextId++;
    const lane = this.lanes.reduce((a, b) => (b.inFlight.size < a.inFlight.size ? b : a));
    const worker = this.thread(lane);
    // Held while it has writes (so a process does not end under them), not while idle.
    if (lane.inFlight.size === 0) worker.ref();
    lane.inFlight.set(id, { staging, writes });
    worker.postMessage({ id, staging, fds, positions, lengths });
    return true;
  }

  /** Ends the threads (new ones start at the next batch); what they had in flight fails. */
  async stop(): Promise<void> {
    await Promise.all(this.lanes.map(async (lane) => {
      const worker = lane.worker;
      if (!worker) return;
      await worker.terminate();
      if (lane.worker !== worker) return;
      lane.worker = undefined;
      this.failAll(lane, new Error("the store's write thread was stopped"));
    }));
  }

  private thread(lane: Lane): Worker {
    if (lane.worker) return lane.worker;
    // No loaders or flags of the parent's (a test runner's TypeScript hooks): the thread needs none.
    const worker = new Worker(threadSource, { eval: true, execArgv: [] });
    worker.on('message', (reply: Reply) => this.answered(lane, reply));
    const died = (err: Error): void => {
      if (lane.worker !== worker) return;
      lane.worker = undefined;
      this.failAll(lane, err);
    };
    worker.on('error', died);
    worker.on('exit', (code) => died(new Error(`the store's write thread exited (code ${code})`)));
    worker.unref(); // after the listeners: adding a 'message' one refs it again
    lane.worker = worker;
    return worker;
  }

  private answered(lane: Lane, reply: Reply): void {
    const batch = lane.inFlight.get(reply.id);
    if (!batch) return;
    lane.inFlight.delete(reply.id);
    if (lane.inFlight.size === 0) lane.worker?.unref();
    this.free.push(batch.staging);
    batch.writes.forEach((w, i) => {
      const e = reply.errors[i];
      w.done(e ? Object.assign(new Error(e.message), { code: e.code }) : null);
    });
  }

  /** A thread is gone: nothing it had is known to be written. */
  private failAll(lane: Lane, cause: Error): void {
    const batches = [...lane.inFlight.values()];
    lane.inFlight.clear();
    for (const b of batches) {
      this.free.push(b.staging);
      for (const w of b.writes) w.done(Object.assign(new Error(cause.message), { code: 'EIO' }));
    }
  }
}

/** The write threads of this process (made when first asked for; threads start at the first batches). */
let shared: WriteThreads | undefined;
export function sharedWriteThreads(): WriteThreads {
  shared ??= new WriteThreads();
  return shared;
}
