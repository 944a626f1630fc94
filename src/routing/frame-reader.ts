// Cuts a byte stream of [u32 length][frame] frames (the batch format of batch.ts, which is the
// data stream's, data-stream.ts) into frames, as chunks arrive. Pure: no sockets. A frame wholly
// inside one chunk is handed on as a view of it (no copy; it keeps the chunk alive while it is
// used); one that spans chunks is assembled once into a buffer of its own size, allocated when
// its length is known and checked against the bound.

const lengthBytes = 4;

/** Cuts a byte stream into [u32 length][frame] frames; a length of 0 or over `frameBytesMax` is malformed. */
export class FrameReader {
  /** A length prefix split between chunks. */
  private readonly head = Buffer.alloc(lengthBytes);
  private headHave = 0;
  /** A frame split between chunks, being assembled. */
  private partial: Buffer | undefined;
  private partialHave = 0;

  constructor(private readonly frameBytesMax: number) {}

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
        this.partial = Buffer.allocUnsafe(n);
        this.partialHave = 0;
      }
    }
    return frames;
  }

  /** True while a frame (or its length) has begun and not ended: a stream closing now cut it. */
  get midFrame(): boolean {
    return this.headHave > 0 || this.partial !== undefined;
  }

  private fill(chunk: Buffer, at: number): number {
    const p = this.partial!;
    const take = Math.min(p.length - this.partialHave, chunk.length - at);
    chunk.copy(p, this.partialHave, at, at + take);
    this.partialHave += take;
    return at + take;
  }
}

