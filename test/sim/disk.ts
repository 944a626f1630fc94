// A simulated disk for the page store (src/store/media.ts StoreMedia), all in memory, for the
// deterministic simulator: every operation completes from a `timers.setTimeout` callback
// (never synchronously, never with real I/O), so under ManualTimers a run replays from its seed.
//
// Durability model (a power loss; `crash()` is one, and the process dies with it):
// - An operation takes effect when it completes (its timer fires). One still in flight at a
//   crash never takes effect and its promise never settles (a generation number: callbacks
//   armed before the crash find a newer generation and do nothing).
// - Files: a completed write is volatile until a datasync of that file, called after the write
//   completed, completes (the MediaFile contract, no more: a write still in flight when the
//   datasync is called, or completing while it runs, stays volatile). At a crash each volatile
//   write survives or not (a coin flip per write, whole writes, applied in the order they
//   completed). Creating and removing a file are durable at once. Reads see the latest state;
//   past the end they read zeros.
// - KV: the ops form a log in the order they complete. An op with {sync: true} makes itself and
//   every op before it durable. At a crash a random PREFIX of the volatile ops survives (a
//   batch is one op: all or nothing). Reads see the latest state.
// After `crash()` the media can be opened again (a restart) and shows the post-crash state.
// Latent sector errors (failSector): a read touching a failed 512-byte sector of a file fails
// (StoreReadError, as data-file.ts types an EIO) until a write covers the sector; they are on
// the medium, so they outlive crashes. The data under them is intact: healSectors() (the disk
// remapped them) makes it readable again.
//
// Memory: file data is kept sparse, in 64 KiB chunks, and the durable and the latest image
// share every chunk neither changed since (copied on first change). Buffers are copied on
// write and on read: callers reuse theirs.

import type { Random, Timers } from '../../src/env/env';
import { StoreReadError } from '../../src/errors';
import type { KvOp, KvRange, KvWriteOptions, MediaFile, MediaKv, StoreMedia } from '../../src/store/media';

const chunkBytes = 64 * 1024;
const sectorBytes = 512;
const latencyMsDefault = 1;

export interface SimMediaOptions {
  timers: Timers;
  random: Random;
  /** Milliseconds one operation takes (drawn per operation); 1 by default. */
  latencyMs?: () => number;
  /** The timers' clock (ManualClock.monotonicMs): needed by stallUntil. */
  now?: () => number;
}

/** Sparse file contents: chunk index → 64 KiB, absent chunks are zeros. */
class Image {
  constructor(
    readonly chunks = new Map<number, Buffer>(),
    public sizeBytes = 0,
  ) {}

  /** A copy sharing every chunk (copy on write: see `writable`). */
  share(): Image {
    return new Image(new Map(this.chunks), this.sizeBytes);
  }

  read(buf: Buffer, offset: number, length: number, position: number): void {
    for (let done = 0; done < length; ) {
      const at = position + done;
      const index = Math.floor(at / chunkBytes);
      const inChunk = at - index * chunkBytes;
      const n = Math.min(chunkBytes - inChunk, length - done);
      const chunk = at < this.sizeBytes ? this.chunks.get(index) : undefined;
      const valid = Math.max(0, Math.min(n, this.sizeBytes - at));
      if (chunk) chunk.copy(buf, offset + done, inChunk, inChunk + valid);
      else buf.fill(0, offset + done, offset + done + valid);
      buf.fill(0, offset + done + valid, offset + done + n);
      done += n;
    }
  }

  /** `other`: an image that may share chunks with this one (they are copied before a change). */
  write(data: Buffer, position: number, other: Image | undefined): void {
    for (let done = 0; done < data.length; ) {
      const at = position + done;
      const index = Math.floor(at / chunkBytes);
      const inChunk = at - index * chunkBytes;
      const n = Math.min(chunkBytes - inChunk, data.length - done);
      data.copy(this.writable(index, other), inChunk, done, done + n);
      done += n;
    }
    this.sizeBytes = Math.max(this.sizeBytes, position + data.length);
  }

  private writable(index: number, other: Image | undefined): Buffer {
    const chunk = this.chunks.get(index);
    if (chunk && other?.chunks.get(index) !== chunk) return chunk;
    const own = chunk ? Buffer.from(chunk) : Buffer.alloc(chunkBytes);
    this.chunks.set(index, own);
    return own;
  }
}

interface VolatileWrite {
  /** Completion order. */
  seq: number;
  position: number;
  data: Buffer;
}

/** One file's state across restarts. */
class SimFileState {
  /** What survives a power loss. */
  durable = new Image();
  /** What reads see. */
  latest = this.durable.share();
  /** Completed writes not yet durable, in completion order. */
  volatile: VolatileWrite[] = [];
  /** Writes completed so far (a datasync covers those completed before it was called). */
  completed = 0;
  /** Sectors that fail to read until rewritten (latent errors: on the medium, kept across crashes). */
  readonly failed = new Set<number>();

  complete(position: number, data: Buffer): void {
    this.latest.write(data, position, this.durable);
    this.volatile.push({ seq: ++this.completed, position, data });
    for (let s = Math.floor(position / sectorBytes); s * sectorBytes < position + data.length; s++) this.failed.delete(s);
  }

  /** The first failed sector of [position, position + length), or undefined. */
  failedIn(position: number, length: number): number | undefined {
    if (this.failed.size === 0) return undefined;
    for (let s = Math.floor(position / sectorBytes); s * sectorBytes < position + length; s++) if (this.failed.has(s)) return s;
    return undefined;
  }

  /** Writes completed up to `seq` are durable. */
  sync(seq: number): void {
    const keep: VolatileWrite[] = [];
    for (const w of this.volatile) {
      if (w.seq <= seq) this.durable.write(w.data, w.position, this.latest);
      else keep.push(w);
    }
    this.volatile = keep;
    if (keep.length === 0) this.latest = this.durable.share();
  }

  crash(random: Random): void {
    for (const w of this.volatile) if (random.int(2) === 1) this.durable.write(w.data, w.position, this.latest);
    this.volatile = [];
    this.latest = this.durable.share();
  }
}

type KvLogOp = { type: 'batch'; ops: KvOp[] } | { type: 'clear'; range: KvRange };

const inRange = (key: string, range: KvRange): boolean => key >= range.gte && key < range.lt;

function applyKv(map: Map<string, Buffer>, op: KvLogOp): void {
  if (op.type === 'clear') {
    for (const key of [...map.keys()]) if (inRange(key, op.range)) map.delete(key);
    return;
  }
  for (const o of op.ops) {
    if (o.type === 'put') map.set(o.key, o.value);
    else map.delete(o.key);
  }
}

/** The KV's state across restarts. Values are never changed in place (shared by both maps). */
class SimKvState {
  durable = new Map<string, Buffer>();
  latest = new Map<string, Buffer>();
  volatile: KvLogOp[] = [];

  complete(op: KvLogOp, sync: boolean): void {
    applyKv(this.latest, op);
    this.volatile.push(op);
    if (!sync) return;
    for (const o of this.volatile) applyKv(this.durable, o);
    this.volatile = [];
  }

  crash(random: Random): void {
    const kept = random.int(this.volatile.length + 1);
    for (let i = 0; i < kept; i++) applyKv(this.durable, this.volatile[i]);
    this.volatile = [];
    this.latest = new Map(this.durable);
  }
}

export class SimMedia implements StoreMedia {
  private readonly timers: Timers;
  private readonly random: Random;
  private readonly latencyMs: () => number;
  private readonly now: (() => number) | undefined;
  private readonly files = new Map<string, SimFileState>();
  private readonly kv = new SimKvState();
  /** Bumped by every crash: completions armed in an older generation are dropped. */
  private generation = 0;
  private stalledUntilMs = 0;
  /** Operations completed (a progress count for tests and the simulator's stats). */
  completed = 0;

  constructor(opts: SimMediaOptions) {
    this.timers = opts.timers;
    this.random = opts.random;
    this.latencyMs = opts.latencyMs ?? (() => latencyMsDefault);
    this.now = opts.now;
  }

  /** The process dies now, in a power loss: see the head comment. */
  crash(): void {
    this.generation++;
    for (const file of this.files.values()) file.crash(this.random);
    this.kv.crash(this.random);
  }

  /** A slow disk: no operation completes before `monotonicMs` (the `now` clock), those in flight included. */
  stallUntil(monotonicMs: number): void {
    if (!this.now) throw new Error('SimMedia.stallUntil needs the `now` option');
    this.stalledUntilMs = Math.max(this.stalledUntilMs, monotonicMs);
  }

  /** A latent error: reads of `sector` (512 bytes) of file `name` fail until a write covers it. */
  failSector(name: string, sector: number): void {
    const file = this.files.get(name);
    if (!file) throw new Error(`SimMedia.failSector: no file ${name}`);
    file.failed.add(sector);
  }

  /** A latent error on a written sector drawn from `random` (a sector of a chunk some write touched); undefined when nothing is written. */
  failWrittenSector(random: Random): { name: string; sector: number } | undefined {
    const written = [...this.files].flatMap(([name, f]) => [...f.latest.chunks.keys()].map((chunk): [string, number] => [name, chunk]));
    if (written.length === 0) return undefined;
    const [name, chunk] = written[random.int(written.length)];
    const sector = (chunk * chunkBytes) / sectorBytes + random.int(chunkBytes / sectorBytes);
    this.failSector(name, sector);
    return { name, sector };
  }

  /** Every latent error gone (remapped by the disk): the data under them reads again. */
  healSectors(): void {
    for (const f of this.files.values()) f.failed.clear();
  }

  /** Bytes held in memory by file data (durable and latest images, shared chunks once). */
  memoryBytes(): number {
    const chunks = new Set<Buffer>();
    for (const f of this.files.values()) for (const image of [f.durable, f.latest]) for (const c of image.chunks.values()) chunks.add(c);
    return chunks.size * chunkBytes;
  }

  /**
   * Completes after the latency (and any stall) if the process of `generation` still lives:
   * `effect` runs then, and its value or error settles the promise. After a crash it never runs.
   */
  op<T>(generation: number, effect: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const complete = (): void => {
        if (generation !== this.generation) return;
        // A stall that began while this operation was in flight holds it too.
        const stalledMs = this.now ? this.stalledUntilMs - this.now() : 0;
        if (stalledMs > 0) return void this.timers.setTimeout(complete, stalledMs);
        this.completed++;
        try {
          resolve(effect());
        } catch (err) {
          reject(err);
        }
      };
      this.timers.setTimeout(complete, this.latencyMs());
    });
  }

  openFile(name: string): Promise<MediaFile> {
    return this.op(this.generation, () => {
      let state = this.files.get(name);
      if (!state) this.files.set(name, (state = new SimFileState()));
      return new SimFile(this, state, this.generation);
    });
  }

  removeFile(name: string): Promise<void> {
    return this.op(this.generation, () => void this.files.delete(name));
  }

  listFiles(): Promise<string[]> {
    return this.op(this.generation, () => [...this.files.keys()]);
  }

  openKv(): Promise<MediaKv> {
    return this.op(this.generation, () => new SimKv(this, this.kv, this.generation));
  }
}

class SimFile implements MediaFile {
  private closed = false;

  constructor(
    private readonly media: SimMedia,
    private readonly state: SimFileState,
    private readonly generation: number,
  ) {}

  read(buf: Buffer, offset: number, length: number, position: number): Promise<void> {
    return this.media.op(this.generation, () => {
      this.assertUsable();
      const failed = this.state.failedIn(position, length);
      if (failed !== undefined) throw new StoreReadError(`read of sector ${failed}: EIO (simulated latent sector error)`);
      this.state.latest.read(buf, offset, length, position);
    });
  }

  write(buf: Buffer, offset: number, length: number, position: number): Promise<void> {
    const data = Buffer.from(buf.subarray(offset, offset + length));
    return this.media.op(this.generation, () => {
      this.assertUsable();
      this.state.complete(position, data);
    });
  }

  datasync(): Promise<void> {
    const seq = this.state.completed;
    return this.media.op(this.generation, () => {
      this.assertUsable();
      this.state.sync(seq);
    });
  }

  size(): Promise<number> {
    return this.media.op(this.generation, () => {
      this.assertUsable();
      return this.state.latest.sizeBytes;
    });
  }

  close(): Promise<void> {
    return this.media.op(this.generation, () => {
      this.assertUsable();
      this.closed = true;
    });
  }

  // A handle of a dead process never completes at all (op drops it); a closed one fails like EBADF.
  private assertUsable(): void {
    if (this.closed) throw new Error('simulated file is closed');
  }
}

class SimKv implements MediaKv {
  private closed = false;

  constructor(
    private readonly media: SimMedia,
    private readonly state: SimKvState,
    private readonly generation: number,
  ) {}

  get(key: string): Promise<Buffer | undefined> {
    return this.media.op(this.generation, () => {
      this.assertOpen();
      const value = this.state.latest.get(key);
      return value && Buffer.from(value);
    });
  }

  put(key: string, value: Buffer, opts: KvWriteOptions): Promise<void> {
    return this.batch([{ type: 'put', key, value }], opts);
  }

  del(key: string, opts: KvWriteOptions): Promise<void> {
    return this.batch([{ type: 'del', key }], opts);
  }

  batch(ops: readonly KvOp[], opts: KvWriteOptions): Promise<void> {
    const copied: KvOp[] = ops.map((o) => (o.type === 'put' ? { type: 'put', key: o.key, value: Buffer.from(o.value) } : { type: 'del', key: o.key }));
    return this.media.op(this.generation, () => {
      this.assertOpen();
      this.state.complete({ type: 'batch', ops: copied }, opts.sync);
    });
  }

  clear(range: KvRange): Promise<void> {
    return this.media.op(this.generation, () => {
      this.assertOpen();
      this.state.complete({ type: 'clear', range: { ...range } }, false);
    });
  }

  /** A snapshot of the range taken when the first entry is asked for (one operation for the whole range). */
  async *iterator(range: KvRange): AsyncIterable<[string, Buffer]> {
    const entries = await this.media.op(this.generation, () => {
      this.assertOpen();
      const out: [string, Buffer][] = [];
      for (const [key, value] of this.state.latest) if (inRange(key, range)) out.push([key, Buffer.from(value)]);
      // LevelDB orders by bytes; the store's keys are ASCII, where string order is byte order.
      return out.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    });
    yield* entries;
  }

  isEmpty(): Promise<boolean> {
    return this.media.op(this.generation, () => {
      this.assertOpen();
      return this.state.latest.size === 0;
    });
  }

  close(): Promise<void> {
    return this.media.op(this.generation, () => {
      this.assertOpen();
      this.closed = true;
    });
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('simulated KV is closed');
  }
}
