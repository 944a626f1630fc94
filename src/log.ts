// Structured logs (pino). Peers log JSON to stderr (or a file for `demo`, so its stdout stays
// readable); level from PEERSAN_LOG_LEVEL.

import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(opts: { name: string; file?: string; level?: string }): Logger {
  const level = opts.level ?? process.env.PEERSAN_LOG_LEVEL ?? 'info';
  const destination = opts.file ? pino.destination({ dest: opts.file, mkdir: true, sync: false }) : pino.destination(2);
  return pino({ name: opts.name, level }, destination);
}

/** A logger that drops everything (tests). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/**
 * Repeated warnings (a refused connection, a stream dropped) logged at most once per key per
 * window; the next one that passes carries how many were suppressed meanwhile. A hostile
 * client can make a peer refuse thousands of connections a second: the log must not grow with it.
 * The keys are few and fixed by the caller (never taken from the wire), so the map stays small.
 */
export class LogLimiter {
  private readonly windowMs: number;
  private readonly nowMs: () => number;
  private readonly seen = new Map<string, { untilMs: number; suppressed: number }>();

  constructor(opts: { windowMs?: number; nowMs?: () => number } = {}) {
    this.windowMs = opts.windowMs ?? 10_000;
    this.nowMs = opts.nowMs ?? Date.now;
  }

  /** Log `msg` at `level` unless `key` was logged within the window; returns whether it was logged. */
  log(log: Logger, level: 'warn' | 'info' | 'error', key: string, obj: Record<string, unknown>, msg: string): boolean {
    const now = this.nowMs();
    const entry = this.seen.get(key);
    if (entry && now < entry.untilMs) {
      entry.suppressed++;
      return false;
    }
    const suppressed = entry?.suppressed ?? 0;
    this.seen.set(key, { untilMs: now + this.windowMs, suppressed: 0 });
    log[level](suppressed > 0 ? { ...obj, suppressed } : obj, msg);
    return true;
  }

  warn(log: Logger, key: string, obj: Record<string, unknown>, msg: string): boolean {
    return this.log(log, 'warn', key, obj, msg);
  }
}
