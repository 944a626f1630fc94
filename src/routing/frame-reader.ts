// Cuts a byte stream of [u32 length][frame] frames (the batch format of batch.ts, which is the
// data stream's, data-stream.ts) into frames, as chunks arrive. Pure: no sockets. A frame wholly
// inside one chunk is handed on as a view of it (no copy; it keeps the chunk alive while it is
// used); one that spans chunks is assembled once into a buffer of its own size, allocated when
// its length is known and checked against the bound. InPlaceReads has the socket read the rest
// of such a frame straight into that buffer.

const lengthBytes = 4;

/** Cuts a byte stream into [u32 length][frame] frames; a length of 0 or over `frameBytesMax` is malformed. */
export class FrameReader {
  /** A length prefix split between chunks. */
  private readonly head = Buffer.alloc(lengthBytes);
  private headHave = 0;
  /** A frame split between chunks, being assembled. */
  private partial: Buffer | undefined;
  private partialHave = 0;

  constructor(
    private readonly frameBytesMax: number,
    /** Where a frame that spans chunks is assembled (read-buffers.ts reuses them). */
    private readonly alloc: (n: number) => Buffer = Buffer.allocUnsafe,
  ) {}

  /** The frames `chunk` completes, in order, or undefined when it holds a malformed length (the stream is then unusable). */
  read(chunk: Buffer): Buffer[] | undefined {
    const frames: Buffer[] = [];
    let at = 0;
    while (at < chunk.length) {
      if (this.partial) {
        at = this.fill(chunk, at);
        if (this.partialHave < this.partial.length) break;
        frames.push(this.partial);
        this.partial = undefined;
        continue;
      }
      let n: number;
      if (this.headHave === 0 && chunk.length - at >= lengthBytes) {
        n = chunk.readUInt32BE(at);
        at += lengthBytes;
      } else {
        const take = Math.min(lengthBytes - this.headHave, chunk.length - at);
        chunk.copy(this.head, this.headHave, at, at + take);
        this.headHave += take;
        at += take;
        if (this.headHave < lengthBytes) break;
        this.headHave = 0;
        n = this.head.readUInt32BE(0);
      }
      if (n === 0 || n > this.frameBytesMax) return undefined;
      if (chunk.length - at >= n) {
        frames.push(chunk.subarray(at, at + n));
        at += n;
      } else {
        this.partial = this.alloc(n);
        this.partialHave = 0;
      }
    }
    return frames;
  }

  /** True while a frame (or its length) has begun and not ended: a stream closing now cut it. */
  get midFrame(): boolean {
    return this.headHave > 0 || this.partial !== undefined;
  }

  /** The unfilled rest of the frame being assembled, when it is `minBytes` or more (InPlaceReads). */
  rest(minBytes: number): Buffer | undefined {
    const p = this.partial;
    return p && p.length - this.partialHave >= minBytes ? p.subarray(this.partialHave) : undefined;
  }

  /** `n` bytes were read into rest()'s buffer: the frame, if they completed it. */
  filled(n: number): Buffer[] {
    const p = this.partial!;
    this.partialHave += n;
    if (this.partialHave < p.length) return [];
    this.partial = undefined;
    return [p];
  }

  private fill(chunk: Buffer, at: number): number {
    const p = this.partial!;
    const take = Math.min(p.length - this.partialHave, chunk.length - at);
    chunk.copy(p, this.partialHave, at, at + take);
    this.partialHave += take;
    return at + take;
  }
}

/** Below this, the rest of a frame is read with what follows it (into the scratch buffer), not alone. */
const inPlaceMinBytes = 16 * 1024;
const scratchBytes = 64 * 1024;
/**
 * After a frame read in place, the next read takes at most this much into the scratch buffer:
 * the next frame's length and header, so that a run of large frames (128 KiB read replies)
 * lands almost wholly in place rather than its first 64 KiB in the scratch buffer.
 */
const afterLargeReadBytes = 4 * 1024;

/**
 * Reads that land where the frames are handed on from (Node's socket `onread` option, with
 * `next` as its buffer function and `read` as its callback): once a frame longer than the read
 * in hand has begun, the kernel copies the rest of it straight into the frame's own buffer,
 * so a 128 KiB reply crosses into user space with one copy and no reassembly. Between such
 * frames reads land in a scratch buffer, cut as `FrameReader.read` cuts a chunk; frames wholly
 * inside it are handed on as views, and a scratch buffer that has lent any is never read into
 * again (the next is new), so no frame changes under its user.
 */
export class InPlaceReads {
  private scratch = Buffer.allocUnsafe(scratchBytes);
  private lent = false;
  /** next() offered (part of) the scratch buffer, not the rest of a frame. */
  private offeredScratch = false;
  /** The last frame completed was read in place (large frames are coming: read little between them). */
  private largeLast = false;

  constructor(private readonly reader: FrameReader) {}

  /** Where the next read should land. */
  next(): Buffer {
    const rest = this.reader.rest(inPlaceMinBytes);
    this.offeredScratch = rest === undefined;
    if (rest) return rest;
    if (this.lent) {
      this.scratch = Buffer.allocUnsafe(scratchBytes);
      this.lent = false;
    }
    return this.largeLast ? this.scratch.subarray(0, afterLargeReadBytes) : this.scratch;
  }

  /** `n` bytes were read into next()'s buffer: the frames they completed, or undefined when the stream is malformed. */
  read(n: number): Buffer[] | undefined {
    if (!this.offeredScratch) {
      const frames = this.reader.filled(n);
      if (frames.length > 0) this.largeLast = true;
      return frames;
    }
    const scratch = this.scratch;
    const frames = this.reader.read(scratch.subarray(0, n));
    if (frames && frames.length > 0) {
      this.largeLast = false;
      if (frames.some((f) => f.buffer === scratch.buffer)) this.lent = true;
    }
    return frames;
  }

  get midFrame(): boolean {
    return this.reader.midFrame;
  }
}
