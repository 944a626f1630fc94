// The activity log of a peer (DESIGN.md 10, design invariant 6; DRBD's activity log): the pages
// this peer may have changed without the change being durable. A crash may lose writes its
// store had not flushed, so a copy that comes back cannot tell which of its pages are whole;
// the log names the ones that may not be, and only those are suspect at the next start (the
// peer steps out of their in-sync sets and resyncs them whole, src/replication/resync.ts).
//
// Ordering rules:
// - A page is in the log, durably (a synced record), BEFORE this peer changes it in any role:
//   beforeChange() resolves only after the put is synced; concurrent callers share that put.
// - A page leaves the log only when it had no change for activityQuietMs, has no recent grains
//   (changes not known acknowledged everywhere), is not suspect, and a flush of its volume
//   (dirty-grain records, then the store) STARTED after its last change. A change begun after
//   the flush started keeps the page (a counter per page, read before and after the flush).
// - A removal is a synced delete; a change of the page meanwhile waits for the delete before
//   it puts the record again, so the record never ends up deleted while the page is changing.
// Assumption (stated in limits.ts activityQuietMs): a change is applied within activityQuietMs of
// its beforeChange, or it is recent (has a sequence number) by then.

import type { Logger } from 'pino';
import type { Env, TimerHandle } from '../env/env';
import { activityQuietMs } from '../limits';

/** The page store's small local records (src/store/page-store.ts). */
export interface RecordKv {
  putRecord(key: string, value: Buffer, sync: boolean): Promise<void>;
  /** Synced. */
  deleteRecord(key: string): Promise<void>;
  listRecords(prefix: string): Promise<{ key: string; value: Buffer }[]>;
}

export interface ActivityLogOptions {
  kv: RecordKv;
  env: Env;
  /** Recent grains of the page here (ReplicaPort.recentGrains().length), plus one while a takeover of it reconciles (failover.ts); 0 when the volume is not open. */
  recentGrains(volumeId: string, page: number): number;
  /** Make durable everything this peer wrote of the volume: dirty-grain records, then its store (flush). */
  settle(volumeId: string): Promise<void>;
  /** False once the volume is deleted (maybe while this peer was down): its pages leave the log, suspect or not. */
  exists(volumeId: string): boolean;
  log?: Logger;
}

const activityPrefix = 'activity/';

interface Entry {
  /** The synced put that logs the page, until it resolves. */
  durable: Promise<void> | undefined;
  lastChangeMs: number;
  /** Changes noted: a sweep removes the page only if none came while it flushed. */
  changes: number;
}

export class ActivityLog {
  private readonly entries = new Map<string, Entry>();
  /** Deletes of records in flight, by key: a new put of the key waits for its delete. */
  private readonly deleting = new Map<string, Promise<void>>();
  /** volume id → pages logged at open and not trusted again since. */
  private readonly suspects = new Map<string, Set<number>>();
  private timer: TimerHandle | undefined;
  private sweeping = false;

  private constructor(private readonly o: ActivityLogOptions) {}

  /**
   * The log as the last run left it: every page in it is suspect, even after a clean shutdown (a
   * primary stopped with a change in flight may hold it while its copies do not; the grains it
   * kept in memory are gone).
   */
  static async open(o: ActivityLogOptions): Promise<ActivityLog> {
    const log = new ActivityLog(o);
    for (const r of await o.kv.listRecords(activityPrefix)) {
      const at = parseKey(r.key);
      if (!at) continue;
      let set = log.suspects.get(at.volumeId);
      if (!set) log.suspects.set(at.volumeId, (set = new Set()));
      set.add(at.page);
      log.entries.set(r.key, { durable: undefined, lastChangeMs: o.env.clock.monotonicMs(), changes: 0 });
    }
    return log;
  }

  /** Start the sweep (every activityQuietMs / 2 on the Env's timers). */
  start(): void {
    this.timer ??= this.o.env.timers.setInterval(() => void this.sweep(), activityQuietMs / 2).unref();
  }

  close(): void {
    this.o.env.timers.clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Before this peer changes `page`: undefined when it is logged durably already, else the put that logs it. */
  beforeChange(volumeId: string, page: number): Promise<void> | undefined {
    const key = recordKey(volumeId, page);
    const entry = this.entries.get(key);
    if (entry) {
      this.touch(entry);
      return entry.durable;
    }
    const fresh: Entry = { durable: undefined, lastChangeMs: this.o.env.clock.monotonicMs(), changes: 1 };
    this.entries.set(key, fresh);
    const deleting = this.deleting.get(key);
    const put = deleting ? deleting.then(() => this.o.kv.putRecord(key, Buffer.alloc(0), true)) : this.o.kv.putRecord(key, Buffer.alloc(0), true);
    fresh.durable = put.then(
      () => {
        fresh.durable = undefined;
      },
      (err: Error) => {
        // Not logged: the next change tries again (this one fails with the error).
        if (this.entries.get(key) === fresh) this.entries.delete(key);
        throw err;
      },
    );
    return fresh.durable;
  }

  /** A change of the page was applied (its last change is now). */
  noteChanged(volumeId: string, page: number): void {
    const entry = this.entries.get(recordKey(volumeId, page));
    if (entry) this.touch(entry);
  }

  /** Pages of the volume that were in the log at open (this peer may have lost their writes), less those trusted since. */
  suspect(volumeId: string): ReadonlySet<number> {
    return this.suspects.get(volumeId) ?? new Set();
  }

  isSuspect(volumeId: string, page: number): boolean {
    return this.suspects.get(volumeId)?.has(page) ?? false;
  }

  /** This peer's copy of the page is whole again (resynced in full): no longer suspect, and the sweep may drop it. */
  trusted(volumeId: string, page: number): void {
    this.suspects.get(volumeId)?.delete(page);
  }

  /**
   * This peer's copy of the page may miss acknowledged writes it once held (a page move from here
   * lost the primary role: what it forwarded to the destination is not here): suspect, so its
   * next resync is whole. Logged, so a crash before that resync leaves it suspect.
   */
  distrust(volumeId: string, page: number): void {
    let set = this.suspects.get(volumeId);
    if (!set) this.suspects.set(volumeId, (set = new Set()));
    set.add(page);
    void this.beforeChange(volumeId, page)?.catch(() => undefined);
  }

  /** Pages in the log (tests, status). */
  logged(volumeId: string): number[] {
    return [...this.entries.keys()].map(parseKey).filter((at) => at?.volumeId === volumeId).map((at) => at!.page).sort((a, b) => a - b);
  }

  /** Remove the pages that are quiet, recent-free and not suspect, after a flush of their volume. One sweep at a time. */
  async sweep(): Promise<void> {
    if (this.sweeping) return;
    this.sweeping = true;
    try {
      for (const [volumeId, keys] of this.quietByVolume()) await this.forget(volumeId, keys);
    } finally {
      this.sweeping = false;
    }
  }

  private touch(entry: Entry): void {
    entry.lastChangeMs = this.o.env.clock.monotonicMs();
    entry.changes++;
  }

  private quietByVolume(): Map<string, string[]> {
    const nowMs = this.o.env.clock.monotonicMs();
    const out = new Map<string, string[]>();
    for (const [key, entry] of this.entries) {
      const at = parseKey(key)!;
      if (entry.durable || nowMs - entry.lastChangeMs < activityQuietMs || !this.removable(at.volumeId, at.page)) continue;
      out.set(at.volumeId, [...(out.get(at.volumeId) ?? []), key]);
    }
    return out;
  }

  private removable(volumeId: string, page: number): boolean {
    if (!this.o.exists(volumeId)) return true;
    return !this.isSuspect(volumeId, page) && this.o.recentGrains(volumeId, page) === 0;
  }

  private async forget(volumeId: string, keys: string[]): Promise<void> {
    const before = new Map(keys.map((k) => [k, this.entries.get(k)?.changes]));
    try {
      await this.o.settle(volumeId);
    } catch (err) {
      this.o.log?.warn({ volumeId, reason: (err as Error).message }, 'activity log: flush failed; pages stay logged');
      return;
    }
    for (const key of keys) {
      const entry = this.entries.get(key);
      const at = parseKey(key)!;
      if (!entry || entry.changes !== before.get(key) || !this.removable(volumeId, at.page)) continue;
      this.entries.delete(key);
      await this.remove(key);
    }
  }

  private async remove(key: string): Promise<void> {
    const del = this.o.kv.deleteRecord(key);
    const settled = del.catch((err: Error) => {
      // Left in the log: the page is suspect after a crash, which costs a resync, never data.
      this.o.log?.warn({ key, reason: err.message }, 'activity log: delete failed');
    });
    this.deleting.set(key, settled);
    await settled;
    if (this.deleting.get(key) === settled) this.deleting.delete(key);
  }
}

function recordKey(volumeId: string, page: number): string {
  return `${activityPrefix}${volumeId}/${String(page).padStart(10, '0')}`;
}

function parseKey(key: string): { volumeId: string; page: number } | undefined {
  const m = /^activity\/([0-9a-f]{16})\/(\d{10})$/.exec(key);
  return m ? { volumeId: m[1], page: Number(m[2]) } : undefined;
}
