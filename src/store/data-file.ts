// Positional reads and writes on one file through the callback fs API: lighter per call
// than FileHandle's promises on the hot path. Short reads past the end of the file are zero
// filled (the file is sparse: a slot past EOF has never been written). I/O errors leave as
// the store's typed errors (StoreReadError, StoreWriteError, NoSpaceError), so the SCSI
// layer and other peers learn what failed, not just a message (src/errors.ts ErrorKind).
//
// Writes are gathered: those asked for in one turn of the event loop go out at its end, and
// a run of them where each starts where the one before it ends (a host writing sequentially at
// depth 32 sends a dozen adjacent 4 KiB writes in a turn) goes as one pwritev. Each write costs
// a trip through libuv's thread pool (a futex wake-up, two context switches, its lock): one
// trip per run instead of one per write is most of what a small write costs here. Runs are cut
// from the writes in the order they were asked for, and no write resolves before its bytes are
// in the kernel, so what media.ts promises holds as before. Runs complete in any order, as the
// single writes before them did: two writes of the same bytes in flight at once (a host's
// overlapping commands, sent without waiting; SCSI leaves their order to the target) land in
// either order. A page's copies get such changes one after the other (replication's range lock).
//
// No system call writes more than 256 KiB (callBytesMax): a larger write is cut at 256 KiB-
// aligned offsets, and a run of adjacent writes ends before it would pass 256 KiB. The kernel
// gives a buffered write of 2 MiB at an aligned offset a 2 MiB folio in the page cache, and
// from then on every 4 KiB write into that range costs the whole folio's buffer heads
// (ext4_block_write_begin): measured here (kernel 6.18, ext4), a scattered 4 KiB overwrite cost
// 7.5 µs of CPU in a range last written by 2 MiB writes, 4.2 µs by 1 MiB, 2.5 µs by 256 KiB,
// and two threads writing at once more than doubled it (spinning on the inode's lock). A volume
// filled sequentially (an image copied in, a page moved or resynced) and then overwritten at
// random is common, so writes are cut here; the pieces of one write settle it together, with
// the first failure.
//
// Runs under 64 KiB (a write at a scattered offset is a run of one; a sequential writer's dozen
// adjacent 4 KiB writes are one) are written inline: at the end of the turn, on the event
// loop's own thread, with pwrite/pwritev. A buffered write of a few KiB costs the kernel about
// 5 µs; sending it to another thread cost more than the write itself (the message, the other
// thread's wake-up, the answer's wake-up of this one). Measured with bench/vs-tgt.js on the
// 2-core VM, the same day (README, Performance): a local scattered 4 KiB write went from
// 45 µs of CPU (the write threads below) to 29, 26,882 IOPS to 35,026; a forwarded one from
// 67 µs (both peers) to 48, 18,990 IOPS to 23,518.
// The price of inline writes is that a slow one stalls the whole loop (every host and peer
// this process serves): the kernel throttling a writer while it flushes dirty pages (measured:
// 4 KiB writes at p99.9 0.5 ms, 159 of 2.9 million over 10 ms, at most 27 ms, while dd dirtied
// 10 GB), a disk that hangs. So
// InlineWrites times each inline run; one that took inlineRunMsSlow or more sends the small
// runs of the next inlineOffMs the other way, where a slow write holds only its own thread:
// - to the store's write threads in batches of up to eight (write-threads.ts) when a turn
//   has four or more small runs;
// - through libuv's pool, one trip per run, when it has fewer (a batch's two messages cost more
//   than a trip or two) or when the threads have no staging buffer free.
// Larger runs always go through the pool, where a trip is small beside the bytes. `close`
// waits for every write asked for: a file descriptor closed under a write in flight could be
// reused by the next file opened, and the write would land there.
import * as fs from 'node:fs';
import { storeError } from '../errors';
import type { MediaFile } from './media';
import { sharedWriteThreads, stagingBytes, type ThreadWrite, type WriteThreads } from './write-threads';

/**
 * An inline run that took this long turns inline writes off (see above). Not much less: on a
 * busy machine the scheduler can hold the thread off the CPU for a few ms in the middle of a
 * write (measured on the 2-core VM under the benches: 2 ms was passed often enough to keep
 * inline writes off most of the time), and that is no reason to send writes elsewhere.
 */
const inlineRunMsSlow = 20;
/** For this long. */
const inlineOffMs = 5_000;

/**
 * Whether small runs are written inline now (see the top of this file), for the whole process:
 * its files share the disk and the loop. The clock is injected for tests.
 */
export class InlineWrites {
  /** What happened (for /metrics): runs written inline, the writes in them, slow runs (each turned inline writes off). */
  readonly counts = { runs: 0, writes: 0, slow: 0 };
  /** Inline writes are off until this time (the clock's ms). */
  private offUntilMs = -Infinity;

  constructor(readonly nowMs: () => number = () => performance.now()) {}

  /** The time an inline write starts now, or undefined while inline writes are off. */
  start(): number | undefined {
    const now = this.nowMs();
    return now >= this.offUntilMs ? now : undefined;
  }

  /** A run of `writes` writes was written inline from `startMs` (start()) until now. */
  took(writes: number, startMs: number): void {
    this.counts.runs++;
    this.counts.writes += writes;
    const now = this.nowMs();
    if (now - startMs < inlineRunMsSlow) return;
    this.counts.slow++;
    this.offUntilMs = now + inlineOffMs;
  }
}

/** The ways a file's small runs go: inline (while on; absent: never), else the write threads or the pool. */
export interface SmallWrites {
  threads: WriteThreads;
  inline?: InlineWrites;
}

let sharedInline: InlineWrites | undefined;
/** The process's inline writes (made when first asked for). */
export function sharedInlineWrites(): InlineWrites {
  sharedInline ??= new InlineWrites();
  return sharedInline;
}

/** The process's ways for small writes: its inline writes and write threads. */
const sharedSmallWrites = (): SmallWrites => ({ threads: sharedWriteThreads(), inline: sharedInlineWrites() });

/** A write asked for and not yet sent. */
export interface QueuedWrite {
  buf: Buffer;
  position: number;
  resolve(): void;
  reject(err: Error): void;
}

/** At most this many writes go in one pwritev (IOV_MAX is 1024). */
const runWritesMax = 64;
/** At most this many bytes go in one system call (see above). */
export const callBytesMax = 256 * 1024;

/**
 * `w` cut at callBytesMax-aligned file offsets into pieces (views of its buffer) when it is
 * larger than callBytesMax; `w` settles once every piece has, failed with the first failure.
 */
export function piecesOf(w: QueuedWrite): QueuedWrite[] {
  if (w.buf.length <= callBytesMax) return [w];
  const pieces: QueuedWrite[] = [];
  let left = 0;
  let failure: Error | undefined;
  const settle = (err?: Error): void => {
    failure ??= err;
    if (--left > 0) return;
    if (failure) w.reject(failure);
    else w.resolve();
  };
  for (let at = 0; at < w.buf.length; ) {
    const position = w.position + at;
    const end = Math.min(w.buf.length, at + callBytesMax - (position % callBytesMax));
    pieces.push({ buf: w.buf.subarray(at, end), position, resolve: () => settle(), reject: settle });
    at = end;
  }
  left = pieces.length;
  return pieces;
}

/** `queue` cut, in order, into runs of adjacent writes (each starts where the one before it ends), bounded as above. */
export function adjacentRuns(queue: readonly QueuedWrite[]): QueuedWrite[][] {
  const runs: QueuedWrite[][] = [];
  let run: QueuedWrite[] = [];
  let end = -1;
  let bytes = 0;
  for (const w of queue) {
    if (run.length === 0 || w.position !== end || run.length >= runWritesMax || bytes + w.buf.length > callBytesMax) {
      if (run.length > 0) runs.push(run);
      run = [];
      bytes = 0;
    }
    run.push(w);
    end = w.position + w.buf.length;
    bytes += w.buf.length;
  }
  if (run.length > 0) runs.push(run);
  return runs;
}

/** Runs of at least this many bytes go through the pool, not the write thread. */
const threadRunBytesMax = 64 * 1024;
/** The threads are used for a turn's small runs when there are at least this many of them. */
const threadRunsMin = 4;
/** A batch holds at most this many runs: a turn's dozen or more go to both threads at once. */
const batchRunsMax = 8;

const runBytes = (run: readonly QueuedWrite[]): number => run.reduce((a, w) => a + w.buf.length, 0);

/** `bufs` (adjacent pieces) without their first `skip` bytes. */
export function skipBytes(bufs: readonly Buffer[], skip: number): Buffer[] {
  let i = 0;
  for (; i < bufs.length && skip >= bufs[i].length; i++) skip -= bufs[i].length;
  const rest = bufs.slice(i);
  if (rest.length > 0 && skip > 0) rest[0] = rest[0].subarray(skip);
  return rest;
}

export class DataFile implements MediaFile {
  private queue: QueuedWrite[] = [];
  /** Writes asked for and not yet settled; `close` waits until there are none. */
  private unsettled = 0;
  private drainWaiters: (() => void)[] = [];
  private readonly sendQueued = (): void => {
    let queue = this.queue;
    this.queue = [];
    if (queue.some((w) => w.buf.length > callBytesMax)) {
      const asked = queue.length;
      queue = queue.flatMap(piecesOf);
      // Each piece is settled (and counted) as a write of its own.
      this.unsettled += queue.length - asked;
    }
    let batch: QueuedWrite[][] = [];
    let batchBytes = 0;
    const { threads, inline } = this.ways;
    const sendBatch = (): void => {
      if (batch.length > 0 && !threads.send(batch.map((run) => this.asOneWrite(run)))) for (const run of batch) this.writeRun(run, 0);
      batch = [];
      batchBytes = 0;
    };
    // Small runs inline while that stays on; the rest as below.
    const all = adjacentRuns(queue);
    const runs = inline ? this.writeInline(all, inline) : all;
    const sizes = runs.map(runBytes);
    // A few runs go through the pool as they are: a batch's messages cost more than a trip or two.
    const toThread = sizes.filter((bytes) => bytes < threadRunBytesMax).length >= threadRunsMin;
    for (const [i, run] of runs.entries()) {
      const bytes = sizes[i];
      if (!toThread || bytes >= threadRunBytesMax) {
        this.writeRun(run, 0);
        continue;
      }
      if (batchBytes + bytes > stagingBytes || batch.length >= batchRunsMax) sendBatch();
      batch.push(run);
      batchBytes += bytes;
    }
    sendBatch();
  };

  private constructor(private readonly fd: number, private readonly ways: SmallWrites) {}

  /** Opens (creating) `path`; its small writes go the `ways` given (by default the process's). */
  static open(path: string, ways: SmallWrites = sharedSmallWrites()): Promise<DataFile> {
    return new Promise((resolve, reject) => {
      fs.open(path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600, (err, fd) => (err ? reject(err) : resolve(new DataFile(fd, ways))));
    });
  }

  read(buf: Buffer, offset: number, length: number, position: number): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.read(this.fd, buf, offset, length, position, (err, n) => {
        if (err) return reject(storeError(err, false, `reading ${length} bytes at ${position}`));
        if (n < length) buf.fill(0, offset + n, offset + length);
        resolve();
      });
    });
  }

  /** Writes all of it, at the end of this turn of the event loop, with the adjacent writes asked for in it (see above). */
  write(buf: Buffer, offset: number, length: number, position: number): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.queue.length === 0) setImmediate(this.sendQueued);
      this.unsettled++;
      this.queue.push({ buf: buf.subarray(offset, offset + length), position, resolve, reject });
    });
  }

  /** `n` writes were answered (each is counted once, where it is resolved or rejected). */
  private settled(n: number): void {
    if ((this.unsettled -= n) > 0) return;
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w();
  }

  /** Write the small ones of `runs` inline while inline writes stay on; returns the others, in order. */
  private writeInline(runs: QueuedWrite[][], inline: InlineWrites): QueuedWrite[][] {
    const rest: QueuedWrite[][] = [];
    for (const run of runs) {
      const bytes = runBytes(run);
      const startMs = bytes < threadRunBytesMax ? inline.start() : undefined;
      if (startMs === undefined) rest.push(run);
      else this.writeRunNow(run, bytes, startMs, inline);
    }
    return rest;
  }

  /**
   * Write `run` (`bytes` in all) now, on this thread, all of it (again after a short write);
   * settled before this returns. Timed for `inline` from `startMs`.
   */
  private writeRunNow(run: QueuedWrite[], bytes: number, startMs: number, inline: InlineWrites): void {
    const write = this.asOneWrite(run);
    let err: NodeJS.ErrnoException | null = null;
    try {
      for (let done = 0; done < bytes; ) {
        const n = run.length === 1 ? fs.writeSync(this.fd, run[0].buf, done, bytes - done, write.position + done) : fs.writevSync(this.fd, skipBytes(write.pieces, done), write.position + done);
        if (n === 0) throw Object.assign(new Error('the file took none of the bytes'), { code: 'EIO' });
        done += n;
      }
    } catch (e) {
      err = e as NodeJS.ErrnoException;
    }
    inline.took(run.length, startMs);
    write.done(err);
  }

  /** `run` as one write (for a write thread, or inline): its bytes in one piece each, settled together. */
  private asOneWrite(run: QueuedWrite[]): ThreadWrite {
    return {
      fd: this.fd, position: run[0].position, pieces: run.map((w) => w.buf),
      done: (err) => {
        if (!err) {
          for (const w of run) w.resolve();
        } else {
          const failure = storeError(err, true, `writing ${runBytes(run)} bytes at ${run[0].position}`);
          for (const w of run) w.reject(failure);
        }
        this.settled(run.length);
      },
    };
  }

  /** Write `run` (adjacent writes) from its `skip`th byte on: one write or pwritev, again on a short one. */
  private writeRun(run: QueuedWrite[], skip: number): void {
    const position = run[0].position + skip;
    const done = (err: NodeJS.ErrnoException | null, n: number): void => {
      if (!err && n === 0) err = Object.assign(new Error('the file took none of the bytes'), { code: 'EIO' });
      if (err) {
        const failure = storeError(err, true, `writing ${runBytes(run) - skip} bytes at ${position}`);
        for (const w of run) w.reject(failure);
        return this.settled(run.length);
      }
      // Writes wholly written are done; a short write goes on from where it stopped.
      let through = skip + n;
      let i = 0;
      for (; i < run.length && through >= run[i].buf.length; i++) {
        through -= run[i].buf.length;
        run[i].resolve();
      }
      this.settled(i);
      if (i < run.length) this.writeRun(run.slice(i), through);
    };
    if (run.length === 1) return fs.write(this.fd, run[0].buf, skip, run[0].buf.length - skip, position, done);
    fs.writev(this.fd, skipBytes(run.map((w) => w.buf), skip), position, done);
  }

  datasync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(storeError(err, true, 'fdatasync')) : resolve())));
  }

  size(): Promise<number> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(err) : resolve(st.size))));
  }

  /** Closes the file once every write asked for has settled. */
  async close(): Promise<void> {
    if (this.unsettled > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
