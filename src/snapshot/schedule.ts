// Snapshot schedules: `peersan snapshot schedule VOL --every 1h --keep 24`. One catalog record
// per volume (schedules/<volumeId>). Every peer checks the schedules every few seconds, but
// only the first peer of the group that is up acts (no leader election: each peer knows from
// the gossiped view which peers are up), and a due run is claimed by compare-and-swap on the
// record's lastRunMs, so two peers never take the same scheduled snapshot. Scheduled snapshots
// are named auto-<UTC time>; after each, the oldest auto-* beyond `keep` are deleted.

import type { Logger } from 'pino';
import type { Catalog } from '../cluster/catalog';
import type { MetaStore } from '../cluster/metastore';
import type { Env, TimerHandle } from '../env/env';
import { ConflictError, InvalidArgumentError } from '../errors';

const schedulePrefix = 'schedules/';

export interface ScheduleRecord {
  volumeId: string;
  volume: string;
  everyMs: number;
  keep: number;
  lastRunMs: number;
}

const units: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "30s", "15m", "1h", "1d" → ms (at least 1 s). */
export function parseEvery(text: string): number {
  const m = /^(\d+)([smhd])$/.exec(text.trim());
  if (!m || Number(m[1]) < 1) throw new InvalidArgumentError(`--every: "${text}" is not a period like 30s, 15m, 1h or 1d`);
  return Number(m[1]) * units[m[2]];
}

/** A new schedule's first run is one period after `nowMs` (wall clock); a changed one keeps its last run. */
export async function setSchedule(meta: MetaStore, r: Omit<ScheduleRecord, 'lastRunMs'>, nowMs: number): Promise<ScheduleRecord> {
  if (!Number.isInteger(r.keep) || r.keep < 1 || r.keep > 256) throw new InvalidArgumentError('--keep must be a whole number from 1 to 256');
  return againOnConflict(async () => {
    const current = await meta.get(schedulePrefix + r.volumeId);
    const record: ScheduleRecord = { ...r, lastRunMs: current ? (JSON.parse(current.value.toString()) as ScheduleRecord).lastRunMs : nowMs };
    await meta.put(schedulePrefix + r.volumeId, Buffer.from(JSON.stringify(record)), current?.version ?? 0);
    return record;
  });
}

export async function removeSchedule(meta: MetaStore, volumeId: string): Promise<boolean> {
  return againOnConflict(async () => {
    const current = await meta.get(schedulePrefix + volumeId);
    if (!current) return false;
    await meta.delete(current.key, current.version);
    return true;
  });
}

/**
 * The runner claims a due run by compare-and-swap on the same record: an administrator's
 * change that lost that race reads the record again and retries (a few times at most).
 */
async function againOnConflict<T>(change: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await change();
    } catch (err) {
      if (!(err instanceof ConflictError) || attempt >= 5) throw err;
    }
  }
}

export async function getSchedule(meta: MetaStore, volumeId: string): Promise<ScheduleRecord | undefined> {
  const r = await meta.get(schedulePrefix + volumeId);
  return r ? (JSON.parse(r.value.toString()) as ScheduleRecord) : undefined;
}

export interface SchedulerOptions {
  self: string;
  /** Wall clock (runs are due by it: they are named after it and shared in the catalog) and the check timer. */
  env: Env;
  catalog: Catalog;
  /** Whether this peer is the one that runs schedules now (the first up peer of the group). */
  isRunner(): boolean;
  take(volume: string, name: string): Promise<void>;
  /** Names of the volume's snapshots, oldest first. */
  list(volume: string): Promise<string[]>;
  remove(volume: string, name: string): Promise<void>;
  log: Logger;
  checkMs?: number;
}

export class SnapshotScheduler {
  private timer: TimerHandle | undefined;
  private running = false;

  constructor(private readonly o: SchedulerOptions) {}

  start(): void {
    this.timer = this.o.env.timers.setInterval(() => void this.tick(), this.o.checkMs ?? 1_000).unref();
  }

  stop(): void {
    this.o.env.timers.clearInterval(this.timer);
  }

  /** One check: take every due scheduled snapshot this peer claims. */
  async tick(): Promise<void> {
    if (this.running || !this.o.isRunner()) return;
    const now = this.o.env.clock.nowMs();
    this.running = true;
    try {
      for (const rec of await this.o.catalog.store.list(schedulePrefix)) {
        const s = JSON.parse(rec.value.toString()) as ScheduleRecord;
        if (now - s.lastRunMs < s.everyMs || !this.o.catalog.volumeById(s.volumeId)) continue;
        try {
          await this.o.catalog.store.put(rec.key, Buffer.from(JSON.stringify({ ...s, lastRunMs: now })), rec.version);
        } catch (err) {
          if (err instanceof ConflictError) continue; // another peer claimed this run
          throw err;
        }
        await this.run(s, now).catch((err: Error) => this.o.log.warn({ volume: s.volume, reason: err.message }, 'scheduled snapshot failed'));
      }
    } finally {
      this.running = false;
    }
  }

  private async run(s: ScheduleRecord, now: number): Promise<void> {
    const name = `auto-${new Date(now).toISOString().replace(/[-:]/g, '').replace(/\.(\d+)Z$/, '$1').replace('T', '-').toLowerCase()}`;
    await this.o.take(s.volume, name);
    const autos = (await this.o.list(s.volume)).filter((n) => n.startsWith('auto-'));
    for (const old of autos.slice(0, Math.max(0, autos.length - s.keep))) await this.o.remove(s.volume, old);
    this.o.log.info({ volume: s.volume, name, kept: Math.min(autos.length, s.keep) }, 'scheduled snapshot taken');
  }
}
