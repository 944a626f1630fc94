// Reused buffers for the large frames a peer receives on its data streams (issue 19). A
// forwarding peer receives every forwarded read's data in a frame of its own (frame-reader.ts)
// and sends it on to the host. Allocated fresh, those frames are a new 128 KiB ArrayBuffer per
// read: V8 counts them as external memory, and under sustained forwarding (about 10,000 a second)
// enough of them are in flight across a scavenge that they get promoted, and the old generation
// then needs 10-13 mark-compacts a second to free them (measured: a quarter to a half of the
// forwarding peer's CPU). Reused, they cost no allocation at all.
//
// Reuse is only safe when nobody can still read the old contents. The rule, in this order:
//   1. take(): a frame of pooledMinBytes or more gets a buffer from the free lists, or a new one.
//      Every such buffer is "issued": the frame is decoded and its data goes to one caller.
//   2. handOver(): the one code path that gives that data to exactly one host read and keeps no
//      other reference (VolumeRouter.read, forwarded to one owner) marks it "for a host". Data
//      that goes anywhere else (a migration, a resync, a read-repair, XCOPY, an OR WRITE whose
//      write may still be sending it) is never marked, so it is never reused: the GC frees it.
//   3. giveBack(): the iSCSI session, once the read's last Data-In PDU has left for the socket
//      (the socket's write callback: the kernel holds a copy, or the connection is gone and
//      nothing will send it). Only then does the buffer go back on a free list.
// A buffer given back twice, or one never handed over, is ignored: the sets are keyed by the
// buffer itself, so no view of it can make another reusable.

/** Frames smaller than this are allocated as before (a 4 KiB read's frame costs little). */
export const pooledMinBytes = 64 * 1024;
/** Buffers are sized in steps of this, so a read of N KiB reuses one of another N KiB read (the frame's header varies a little). */
const stepBytes = 4096;

export class ReadBuffers {
  private readonly free = new Map<number, ArrayBufferLike[]>();
  private freeBytes = 0;
  /** Buffers take() made: only these may be reused. */
  private readonly issued = new WeakSet<ArrayBufferLike>();
  /** Issued buffers whose data went to one host read and nowhere else (handOver). */
  private readonly forHost = new WeakSet<ArrayBufferLike>();
  /** Counters, for tests and the bench. */
  readonly counts = { taken: 0, reused: 0, givenBack: 0 };

  /** `freeBytesMax`: the free lists hold at most this much; buffers given back beyond it are left to the GC. */
  constructor(private readonly freeBytesMax: number) {}

  /** A buffer of `n` bytes to receive a frame into (its contents are old bytes, to be overwritten). */
  readonly take = (n: number): Buffer => {
    if (n < pooledMinBytes) return Buffer.allocUnsafe(n);
    this.counts.taken++;
    const capacity = Math.ceil(n / stepBytes) * stepBytes;
    const ab = this.free.get(capacity)?.pop();
    if (ab) {
      this.counts.reused++;
      this.freeBytes -= capacity;
      return Buffer.from(ab, 0, n);
    }
    const b = Buffer.allocUnsafeSlow(capacity);
    this.issued.add(b.buffer);
    return b.subarray(0, n);
  };

  /** `data` (a view of a taken buffer, or anything else) goes to one host read and is referenced nowhere else. */
  handOver(data: Buffer): void {
    if (this.issued.has(data.buffer)) this.forHost.add(data.buffer);
  }

  /** The host read that got `data` has sent it: its buffer may be reused, if it was handed over. */
  giveBack(data: Buffer): void {
    const ab = data.buffer;
    if (!this.forHost.delete(ab)) return;
    this.counts.givenBack++;
    if (this.freeBytes + ab.byteLength > this.freeBytesMax) return;
    let list = this.free.get(ab.byteLength);
    if (!list) this.free.set(ab.byteLength, (list = []));
    list.push(ab);
    this.freeBytes += ab.byteLength;
  }
}
