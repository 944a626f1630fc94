// The environment seam (DESIGN.md 12): protocol code reads time, arms timers and draws random
// numbers only through an injected `Env`, never through `Date.now`, `setTimeout` or
// `Math.random`. A peer wires `realEnv()` once in its composition root; tests and the
// simulator wire a `ManualEnv`, whose time moves only when they advance it.

/** Two clocks, because they answer two questions. */
export interface Clock {
  /**
   * Wall-clock milliseconds since the epoch (an integer, like `Date.now`): for stamps and
   * records that another process reads (createdAtMs, startedAtMs, schedules, RPC deadlines).
   * May jump when the host's clock is set; never use it to measure a duration.
   */
  nowMs(): number;
  /**
   * Wall-clock microseconds since the epoch with sub-millisecond resolution: the physical part
   * of the hybrid clock of timestamp snapshots (src/snapshot/hlc.ts), where a millisecond
   * would be too coarse to order a host's writes through two peers.
   */
  nowUs(): number;
  /**
   * Milliseconds from an arbitrary origin that never goes back (fractional): for durations,
   * timeouts, leases, rates and EWMA decay.
   */
  monotonicMs(): number;
}

/** What a timer call returns: opaque but for `unref` (a timer that must not keep a process alive). */
export interface TimerHandle {
  unref(): TimerHandle;
}

/** Timers on the environment's monotonic clock. Clearing an undefined or spent handle is a no-op. */
export interface Timers {
  setTimeout(fn: () => void, ms: number): TimerHandle;
  clearTimeout(handle: TimerHandle | undefined): void;
  setInterval(fn: () => void, ms: number): TimerHandle;
  clearInterval(handle: TimerHandle | undefined): void;
}

/** Randomness for protocol choices (jitter, ids). Secrets (keys, CHAP challenges, nonces) take node:crypto directly. */
export interface Random {
  /** Uniform in [0, 1). */
  float(): number;
  /** Uniform integer in [0, n). */
  int(n: number): number;
  bytes(n: number): Buffer;
}

export interface Env {
  readonly clock: Clock;
  readonly timers: Timers;
  readonly random: Random;
}

/** Resolves after `ms` on the environment's timers (a `setTimeout` wrapped in a promise). */
export function sleep(timers: Timers, ms: number): Promise<void> {
  return new Promise((resolve) => timers.setTimeout(resolve, ms));
}

/** `p`'s value, or undefined when `ms` passes first (its later outcome is ignored). */
export function within<T>(timers: Timers, p: Promise<T>, ms: number): Promise<T | undefined> {
  return new Promise((resolve, reject) => {
    const timer = timers.setTimeout(() => resolve(undefined), ms);
    p.then(
      (v) => (timers.clearTimeout(timer), resolve(v)),
      (err: unknown) => (timers.clearTimeout(timer), reject(err)),
    );
  });
}
