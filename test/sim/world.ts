// The simulator's world (DESIGN.md 12): one true time, one queue of timers, one seeded source
// of randomness, and per peer an Env that sees that time through its own clock.
//
// Everything that happens in a simulated run is a timer firing: a message arriving, a disk
// completing, a host issuing its next command, a fault. The loop fires the earliest timer,
// lets the promise continuations it caused run to the end (one turn of the real event loop:
// nothing else is pending, because nothing in a run touches real I/O), and repeats. So the
// order of everything is a function of the seed, and a run replays exactly.
//
// Clocks (the bounds the design's protocols assume; faults stay within them):
// - Wall clock skew: each peer's wall clock is off true time by at most `skewUsMax` (±400 µs).
//   Timestamp snapshots (src/snapshot/hlc.ts) assume peers' clocks differ by less than one
//   round trip to the host; simulated hosts wait at least 1 ms between a reply and their next
//   command, so ±400 µs keeps that assumption. Skew changes in jumps (a time daemon's step).
// - Drift: each peer's monotonic clock (durations, timeouts, leases) runs at (1 + d) of true
//   time, |d| ≤ `driftMax` (200 ppm: a cheap crystal is within 100 ppm; twice that as margin).
//   A peer's timers fire after its own idea of the delay, so a lease measured by a fast clock
//   ends early in true time; lease margins must cover 2 × driftMax of the lease (DESIGN.md 10).
//
// A crash kills an incarnation: its timers never fire again, and what it was waiting for
// (messages, disk completions) never arrives. Its objects are simply dropped; a restart builds
// a new incarnation from what the disk and the catalog kept.

import type { Clock, Env, Random, TimerHandle, Timers } from '../../src/env/env';
import { ManualClock, ManualTimers, SeededRandom } from '../../src/env/manual';

export const skewUsMax = 400;
export const driftMax = 200e-6;

export class SimWorld {
  readonly clock = new ManualClock();
  readonly timers = new ManualTimers(this.clock);
  readonly random: SeededRandom;
  /** Events fired so far (the --steps bound counts these). */
  steps = 0;

  constructor(readonly seed: number) {
    this.random = new SeededRandom(seed);
  }

  now(): number {
    return this.clock.monotonicMs();
  }

  /** An independent stream of randomness (a peer's, the network's…), drawn from the seed. */
  fork(): SeededRandom {
    return new SeededRandom(this.random.int(0x1_0000_0000));
  }

  /** Run until `untilMs` of true time, `stepsMax` events, or nothing is left to happen. */
  async run(untilMs: number, stepsMax: number, stop?: () => boolean): Promise<void> {
    await turn();
    while (this.steps < stepsMax && !stop?.() && this.timers.fireNext(untilMs)) {
      this.steps++;
      await turn();
    }
    if (this.now() < untilMs && this.steps < stepsMax && !stop?.()) this.clock.set(untilMs);
  }

  /** Arm a timer on true time, fractions of a millisecond included (the world's own events: messages, disks, hosts, faults). */
  after(ms: number, fn: () => void): TimerHandle {
    return this.timers.setTimeoutExact(fn, ms);
  }
}

/** One turn of the real event loop: every promise continuation pending runs. */
function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** A peer's view of time: skewed wall clock, drifting monotonic clock. */
export class PeerClock implements Clock {
  skewUs = 0;
  drift = 0;
  /** Monotonic time at the last drift change, and the peer's reading then. */
  private baseTrue = 0;
  private baseMono = 0;

  constructor(private readonly world: SimWorld) {
    this.baseTrue = world.now();
    this.baseMono = world.now();
  }

  nowMs(): number {
    return Math.floor(this.world.clock.nowMs() + this.skewUs / 1000);
  }

  nowUs(): number {
    return Math.floor(this.world.clock.nowUs() + this.skewUs);
  }

  monotonicMs(): number {
    return this.baseMono + (this.world.now() - this.baseTrue) * (1 + this.drift);
  }

  setDrift(d: number): void {
    this.baseMono = this.monotonicMs();
    this.baseTrue = this.world.now();
    this.drift = d;
  }

  /** True time it takes this clock to see `ms` pass. */
  trueMs(ms: number): number {
    return ms / (1 + this.drift);
  }
}

class PeerTimer implements TimerHandle {
  inner: TimerHandle | undefined;
  unref(): TimerHandle {
    return this;
  }
}

/** A peer incarnation's timers: on the world's queue, scaled by its drift, dead after a crash. */
export class PeerTimers implements Timers {
  private readonly live = new Set<PeerTimer>();
  private dead = false;

  constructor(private readonly world: SimWorld, private readonly clock: PeerClock) {}

  setTimeout(fn: () => void, ms: number): TimerHandle {
    const t = new PeerTimer();
    if (this.dead) return t;
    this.live.add(t);
    t.inner = this.world.timers.setTimeout(() => {
      this.live.delete(t);
      if (!this.dead) fn();
    }, this.clock.trueMs(ms));
    return t;
  }

  setInterval(fn: () => void, ms: number): TimerHandle {
    const t = new PeerTimer();
    if (this.dead) return t;
    this.live.add(t);
    const arm = (): void => {
      t.inner = this.world.timers.setTimeout(() => {
        if (this.dead || !this.live.has(t)) return;
        arm();
        fn();
      }, this.clock.trueMs(Math.max(1, ms)));
    };
    arm();
    return t;
  }

  clearTimeout(handle: TimerHandle | undefined): void {
    if (!(handle instanceof PeerTimer)) return;
    this.live.delete(handle);
    this.world.timers.clearTimeout(handle.inner);
  }

  clearInterval(handle: TimerHandle | undefined): void {
    this.clearTimeout(handle);
  }

  /** The incarnation died: nothing it armed fires any more. */
  kill(): void {
    this.dead = true;
    for (const t of this.live) this.world.timers.clearTimeout(t.inner);
    this.live.clear();
  }

  get alive(): boolean {
    return !this.dead;
  }
}

/** The Env one incarnation of a peer runs in. */
export class PeerEnv implements Env {
  readonly timers: PeerTimers;

  constructor(world: SimWorld, readonly clock: PeerClock, readonly random: Random) {
    this.timers = new PeerTimers(world, clock);
  }
}
