// The real environment: Node's clocks, timers and crypto-grade randomness. Built once per
// process by the composition root (src/server/peer.ts) and handed down.
import { randomBytes, randomInt } from 'node:crypto';
import type { Clock, Env, Random, Timers } from './env';

const clock: Clock = {
  nowMs: () => Date.now(),
  nowUs: () => Math.floor((performance.timeOrigin + performance.now()) * 1000),
  monotonicMs: () => performance.now(),
};

// Node's Timeout already has unref(); the casts only hide it behind the opaque handle.
const timers: Timers = {
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout | undefined),
  setInterval: (fn, ms) => setInterval(fn, ms),
  clearInterval: (h) => clearInterval(h as NodeJS.Timeout | undefined),
};

const random: Random = {
  float: () => Math.random(),
  int: (n) => randomInt(n),
  bytes: (n) => randomBytes(n),
};

const real: Env = Object.freeze({ clock, timers, random });

/** The process's real environment (one shared, stateless object). */
export function realEnv(): Env {
  return real;
}
