// Load meters (DESIGN.md 5): operations, bytes, latency and outstanding commands as
// exponentially weighted moving averages over ~1 s, 10 s and 60 s. Pure: the caller passes
// the time (milliseconds from any monotonic clock) into every call, so tests drive time by
// hand.
//
// Recording an operation only adds to counters of the current interval; fold(now) turns the
// interval into rates and blends them into the averages with a weight that depends on the
// interval's length (alpha = 1 - e^(-dt/window)), so irregular folding gives the same result
// as regular folding. Folding happens once a second (LoadMonitor.tick), not per operation.

/** The three averaging windows, in ms. Index 0, 1, 2 everywhere a triple appears. */
export const loadWindowsMs: readonly [number, number, number] = [1_000, 10_000, 60_000];
/** Index of the 10 s window: what the balancer weighs. */
export const balanceWindow = 1;
/** Bytes that count as much as one operation in the balancer's load figure (load = iops + bytes/s ÷ this). */
export const loadBytesPerOp = 64 * 1024;

/** A meter's averages as they travel in summaries (arrays of three: 1 s, 10 s, 60 s). */
export interface LoadStats {
  iops: number[];
  bytesPerSec: number[];
  /** Mean latency of the operations completed in the window; 0 when none ever completed. */
  latencyMs: number[];
  /** Time-averaged number of operations in progress. */
  outstandingAvg: number[];
  /** Operations in progress right now. */
  outstanding: number;
}

export function zeroStats(): LoadStats {
  return { iops: [0, 0, 0], bytesPerSec: [0, 0, 0], latencyMs: [0, 0, 0], outstandingAvg: [0, 0, 0], outstanding: 0 };
}

/** The balancer's single load figure for a meter, window `w` (default 10 s). */
export function loadOf(s: LoadStats, w = balanceWindow): number {
  return (s.iops[w] ?? 0) + (s.bytesPerSec[w] ?? 0) / loadBytesPerOp;
}

/** Sum of several meters' stats: rates and outstanding add up, latency is the operation-weighted mean. */
export function sumStats(all: readonly LoadStats[]): LoadStats {
  const out = zeroStats();
  for (let w = 0; w < 3; w++) {
    let weighted = 0;
    for (const s of all) {
      out.iops[w] += s.iops[w] ?? 0;
      out.bytesPerSec[w] += s.bytesPerSec[w] ?? 0;
      out.outstandingAvg[w] += s.outstandingAvg[w] ?? 0;
      weighted += (s.latencyMs[w] ?? 0) * (s.iops[w] ?? 0);
    }
    out.latencyMs[w] = out.iops[w] > 0 ? weighted / out.iops[w] : 0;
  }
  for (const s of all) out.outstanding += s.outstanding;
  return out;
}

/** Below this, an outstanding count made of fractions (page-spanning requests) is zero. */
const outstandingEpsilon = 1e-6;

export class LoadMeter {
  readonly iops: [number, number, number] = [0, 0, 0];
  readonly bytesPerSec: [number, number, number] = [0, 0, 0];
  readonly latencyMs: [number, number, number] = [0, 0, 0];
  readonly outstandingAvg: [number, number, number] = [0, 0, 0];
  /** Operations in progress (fractional for requests attributed to several pages). */
  outstanding = 0;
  /** Last time an operation began or ended. */
  lastActiveMs: number;
  // The interval since the last fold.
  private ops = 0;
  private bytes = 0;
  private latencySumMs = 0;
  private outstandingAreaMs = 0;
  private lastChangeMs: number;
  private lastFoldMs: number;
  private latencySeen = false;

  constructor(nowMs: number) {
    this.lastFoldMs = nowMs;
    this.lastChangeMs = nowMs;
    this.lastActiveMs = nowMs;
  }

  private integrate(nowMs: number): void {
    if (nowMs > this.lastChangeMs) {
      this.outstandingAreaMs += this.outstanding * (nowMs - this.lastChangeMs);
      this.lastChangeMs = nowMs;
    }
  }

  /** An operation (or `weight` of one) starts. */
  begin(nowMs: number, weight = 1): void {
    this.integrate(nowMs);
    this.outstanding += weight;
    this.lastActiveMs = nowMs;
  }

  /** The operation begun at `startMs` completed, moving `bytes` of data. */
  end(startMs: number, nowMs: number, bytes: number, weight = 1): void {
    this.integrate(nowMs);
    this.outstanding -= weight;
    if (this.outstanding < outstandingEpsilon) this.outstanding = 0;
    this.ops += weight;
    this.bytes += bytes;
    this.latencySumMs += (nowMs - startMs) * weight;
    this.lastActiveMs = nowMs;
  }

  /** An operation (or `weight` of one) moving `bytes`, counted with no latency or queue (the traffic matrix's arrivals). */
  record(nowMs: number, bytes: number, weight = 1): void {
    this.ops += weight;
    this.bytes += bytes;
    this.lastActiveMs = nowMs;
  }

  /** Blend the interval since the last fold into the averages. */
  fold(nowMs: number): void {
    const dtMs = nowMs - this.lastFoldMs;
    if (dtMs <= 0) return;
    this.integrate(nowMs);
    const opsRate = (this.ops * 1000) / dtMs;
    const bytesRate = (this.bytes * 1000) / dtMs;
    const queue = this.outstandingAreaMs / dtMs;
    const latency = this.ops > 0 ? this.latencySumMs / this.ops : undefined;
    for (let w = 0; w < 3; w++) {
      const alpha = 1 - Math.exp(-dtMs / loadWindowsMs[w]);
      this.iops[w] += alpha * (opsRate - this.iops[w]);
      this.bytesPerSec[w] += alpha * (bytesRate - this.bytesPerSec[w]);
      this.outstandingAvg[w] += alpha * (queue - this.outstandingAvg[w]);
      // Latency is only known when something completed; the first sample seeds the average
      // (an average that starts at 0 would report an idle-looking latency for a minute).
      if (latency !== undefined) this.latencyMs[w] = this.latencySeen ? this.latencyMs[w] + alpha * (latency - this.latencyMs[w]) : latency;
    }
    if (latency !== undefined) this.latencySeen = true;
    this.ops = 0;
    this.bytes = 0;
    this.latencySumMs = 0;
    this.outstandingAreaMs = 0;
    this.lastFoldMs = nowMs;
  }

  /** Nothing in progress and nothing recorded for `idleMs`: the entry may be dropped. */
  idleFor(nowMs: number, idleMs: number): boolean {
    return this.outstanding === 0 && nowMs - this.lastActiveMs >= idleMs;
  }

  stats(): LoadStats {
    return { iops: [...this.iops], bytesPerSec: [...this.bytesPerSec], latencyMs: [...this.latencyMs], outstandingAvg: [...this.outstandingAvg], outstanding: this.outstanding };
  }

  /** The balancer's load figure (10 s window). */
  load(): number {
    return this.iops[balanceWindow] + this.bytesPerSec[balanceWindow] / loadBytesPerOp;
  }
}
