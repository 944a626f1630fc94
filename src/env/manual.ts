// A deterministic environment, the seed of the simulator (issue 16): time stands still until
// the owner advances it, timers fire in order of due time (ties in the order they were armed)
// and only when time reaches them, and randomness comes from a seeded PRNG, so a run replays
// exactly from its seed.
import type { Clock, Env, Random, TimerHandle, Timers } from './env';

/** 2023-11-14T22:13:20Z: a fixed wall-clock origin, so stamps and names replay too. */
const wallOriginMsDefault = 1_700_000_000_000;

export class ManualClock implements Clock {
  private t = 0;
  /** Added to the wall clock only (monotonic time is the group's true time): clock skew. */
  skewMs = 0;

  constructor(private readonly wallOriginMs = wallOriginMsDefault) {}

  nowMs(): number {
    return Math.floor(this.wallOriginMs + this.skewMs + this.t);
  }

  nowUs(): number {
    return Math.floor((this.wallOriginMs + this.skewMs + this.t) * 1000);
  }

  monotonicMs(): number {
    return this.t;
  }

  /** Set the time, never backwards. With timers armed, move time by ManualEnv.advance or run, which fire them on the way. */
  set(ms: number): void {
    if (ms < this.t) throw new Error(`time goes back: ${ms} < ${this.t}`);
    this.t = ms;
  }
}

class ManualTimer implements TimerHandle {
  armed = true;
  constructor(
    readonly fn: () => void,
    public dueMs: number,
    readonly intervalMs: number | undefined,
  ) {}

  unref(): TimerHandle {
    return this;
  }
}

export class ManualTimers implements Timers {
  /** Armed timers by due time; ties keep the order they were armed in. */
  private queue: ManualTimer[] = [];

  constructor(private readonly clock: ManualClock) {}

  setTimeout(fn: () => void, ms: number): TimerHandle {
    return this.arm(new ManualTimer(fn, 0, undefined), ms);
  }

  setInterval(fn: () => void, ms: number): TimerHandle {
    return this.arm(new ManualTimer(fn, 0, Math.max(1, ms)), ms);
  }

  clearTimeout(handle: TimerHandle | undefined): void {
    if (!(handle instanceof ManualTimer) || !handle.armed) return;
    handle.armed = false;
    this.queue.splice(this.queue.indexOf(handle), 1);
  }

  clearInterval(handle: TimerHandle | undefined): void {
    this.clearTimeout(handle);
  }

  /** Armed timers. */
  pending(): number {
    return this.queue.length;
  }

  /**
   * Fire the earliest timer due at or before `untilMs`, with the clock set to its due time.
   * Returns false (clock untouched) when none is due.
   */
  fireNext(untilMs: number): boolean {
    const timer = this.queue[0];
    if (!timer || timer.dueMs > untilMs) return false;
    this.queue.shift();
    timer.armed = false;
    this.clock.set(timer.dueMs);
    if (timer.intervalMs !== undefined) this.arm(timer, timer.intervalMs);
    timer.fn();
    return true;
  }

  /**
   * A timer at exactly `ms` from now, fractions included (Node's 1 ms floor does not apply): for
   * a simulated environment's own events (network and disk latencies of tens of microseconds),
   * never for the protocol code's timers, which keep Node's rule.
   */
  setTimeoutExact(fn: () => void, ms: number): TimerHandle {
    return this.arm(new ManualTimer(fn, 0, undefined), ms, 0);
  }

  // Node's rule: a delay below 1 ms (or not a number) is 1 ms, so nothing fires without time passing.
  private arm(timer: ManualTimer, ms: number, floorMs = 1): TimerHandle {
    timer.dueMs = this.clock.monotonicMs() + (ms >= floorMs ? ms : floorMs);
    timer.armed = true;
    let i = this.queue.length;
    while (i > 0 && this.queue[i - 1].dueMs > timer.dueMs) i--;
    this.queue.splice(i, 0, timer);
    return timer;
  }
}

/** sfc32 (Chris Doty-Humphrey's small fast counter): 32-bit state words, period at least 2^32, passes PractRand. */
export class SeededRandom implements Random {
  private a: number;
  private b: number;
  private c: number;
  private d = 1;

  constructor(readonly seed: number) {
    this.a = 0x9e3779b9;
    this.b = 0x243f6a88;
    this.c = seed >>> 0;
    for (let i = 0; i < 12; i++) this.next(); // mix the seed through the state
  }

  float(): number {
    return this.next() / 0x1_0000_0000;
  }

  int(n: number): number {
    if (!(n >= 1 && n <= 0x1_0000_0000 && Number.isInteger(n))) throw new RangeError(`int(${n}): n must be an integer in [1, 2^32]`);
    return Math.floor(this.float() * n);
  }

  bytes(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) out[i] = this.next() & 0xff;
    return out;
  }

  private next(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }
}

/** An Env whose time the owner advances. */
export class ManualEnv implements Env {
  readonly clock: ManualClock;
  readonly timers: ManualTimers;
  readonly random: SeededRandom;

  constructor(opts: { seed?: number; wallOriginMs?: number } = {}) {
    this.clock = new ManualClock(opts.wallOriginMs);
    this.timers = new ManualTimers(this.clock);
    this.random = new SeededRandom(opts.seed ?? 1);
  }

  /** Move time forward by `ms`, firing every timer that falls due on the way, in order. Synchronous. */
  advance(ms: number): void {
    const untilMs = this.clock.monotonicMs() + ms;
    while (this.timers.fireNext(untilMs));
    this.clock.set(untilMs);
  }

  /**
   * Like `advance`, but lets promise continuations run after each timer (one macrotask turn),
   * so async code woken by a timer can arm the next one before time moves on.
   */
  async run(ms: number): Promise<void> {
    const untilMs = this.clock.monotonicMs() + ms;
    await settle();
    while (this.timers.fireNext(untilMs)) await settle();
    this.clock.set(untilMs);
  }
}

/** One turn of the real event loop: pending promise continuations run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
