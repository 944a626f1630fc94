// How fast a move copies: a token bucket of bytes shared by every move on a peer (the rate
// limit), and a pacer per move that gives way to host I/O (ChunkPacer). Pure but for the
// environment's clock and timers the bucket is given.
import { sleep, type Env } from '../env/env';

export class ByteRate {
  private tokens: number;
  private last: number;

  constructor(
    private readonly bytesPerSec: number,
    /** Burst allowance: what may be taken at once after an idle spell. */
    private readonly burstBytes: number,
    private readonly env: Env,
  ) {
    this.tokens = burstBytes;
    this.last = env.clock.monotonicMs();
  }

  /** Resolves once `bytes` may be moved; requests larger than the burst wait for their whole time. */
  async take(bytes: number): Promise<void> {
    if (this.bytesPerSec <= 0) return;
    const t = this.env.clock.monotonicMs();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((t - this.last) * this.bytesPerSec) / 1000);
    this.last = t;
    this.tokens -= bytes;
    if (this.tokens < 0) await sleep(this.env.timers, (-this.tokens * 1000) / this.bytesPerSec);
  }
}

/**
 * Gives way to host I/O after each copied chunk (LEDBAT's idea, RFC 6817: a background transfer
 * that watches its own delay). The fastest of the move's recent chunks is what a chunk costs on
 * quiet peers and links; time beyond twice that (LEDBAT's target: less is jitter) is waiting
 * behind other work, most of it host I/O, wherever it is: the source, the destination or the
 * link. The pacer asks for a pause that makes such waiting at most `duty` of the time, so on
 * idle peers the copy runs at the rate limit and under host load it slows down by itself.
 */
export class ChunkPacer {
  private readonly recentMs: number[];
  private chunks = 0;

  constructor(
    /** Share of the time the copy may make others wait, (0, 1]; 1: never pause. */
    private readonly duty: number,
    history = 64,
    private readonly pauseMsMax = 200,
  ) {
    this.recentMs = new Array<number>(history).fill(Infinity);
  }

  /** Record a chunk that took `ms`; returns how long to pause before the next one (ms, 0: none). */
  pauseAfter(ms: number): number {
    if (this.duty >= 1) return 0;
    this.recentMs[this.chunks++ % this.recentMs.length] = ms;
    let fastestMs = Infinity;
    for (const x of this.recentMs) if (x < fastestMs) fastestMs = x;
    const waitedMs = ms - 2 * fastestMs;
    if (waitedMs <= 0) return 0;
    return Math.min(this.pauseMsMax, (waitedMs * (1 - this.duty)) / this.duty);
  }
}
