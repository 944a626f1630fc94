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
