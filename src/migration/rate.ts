// The migration rate limit: a token bucket of bytes shared by every move on a peer, so
// copying never takes more than its share of the disks and links from host I/O.

export class ByteRate {
  private tokens: number;
  private last: number;

  constructor(
    private readonly bytesPerSec: number,
    /** Burst allowance: what may be taken at once after an idle spell. */
    private readonly burstBytes: number,
    private readonly now: () => number = () => performance.now(),
    private readonly sleep: (ms: number) => Promise<void> = (ms) => new Promise((r) => setTimeout(r, ms)),
  ) {
    this.tokens = burstBytes;
    this.last = now();
  }

  /** Resolves once `bytes` may be moved; requests larger than the burst wait for their whole time. */
  async take(bytes: number): Promise<void> {
    if (this.bytesPerSec <= 0) return;
    const t = this.now();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((t - this.last) * this.bytesPerSec) / 1000);
    this.last = t;
    this.tokens -= bytes;
    if (this.tokens < 0) await this.sleep((-this.tokens * 1000) / this.bytesPerSec);
  }
}
