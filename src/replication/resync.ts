// Quick resync (DESIGN.md 10, design.md "Resync"; DRBD's quick-resync bitmap): a stale copy of
// a page catches up only the grains that changed since it left, then is CASed back into the
// page's in-sync set.
//
// Who knows what a stale copy C lacks: every in-sync copy K of the page keeps a dirty-grain set
// for C (ResyncTracker), valid only if K watched C leave the in-sync set while K itself was in
// it (a route change K learned, or a write the primary could not get to C) and K stayed in sync
// since. Then the set is K's recent grains at that moment (changes in flight, which C may have
// missed) plus every change K applied after. K drops its sets of a page when it falls out of
// sync itself, and a set for C when C is back in sync or no copy any more. A stale copy K has no
// set for counts as the whole page. Sets live in memory and in the page store's records
// (unsynced, written a moment after they change: the activity log covers what is not written
// yet, so at the next start the sets of pages still in the log, the suspect ones, count whole).
//
// The resync itself, on the primary (Resyncer.handle), in this order:
// 1. under the page's range lock (exclusive, whole page) C is registered as resyncing: from the
//    next change on, the write path sends C every change too, and a change C misses marks its
//    grains again. No change is in flight while C is registered, so none slips between.
// 2. every dirty grain (∪ the grains C asked for; all of them when C asks `full`) is copied
//    from this peer's store in runs of contiguous dirty grains (one request each, up to 1 MiB),
//    several at once, each under the range lock of its grains, their bits cleared once C has
//    them; an unmapped range is sent as an unmap. Paced like migration (RunPacer).
// 3. under the whole page's lock, when no bit is set any more: CAS C into the in-sync set
//    (epoch + 1), forget C's set, unregister. Else back to 2 (a bounded number of rounds).
//
// The stale copy's side (Resyncer.start): every page of an open volume where this peer is a
// stale copy (a scan at start, then every route the tables learn) is asked for, a few at a time,
// with backoff while it stays stale.
//
// Snapshot layers: a resync brings the copy's live data only. Once the copy is back in sync, it
// takes the layers of the page's snapshots it does not hold (it was stale at their cut) from
// their holders, and joins them: src/snapshot/layer-sync.ts.

import { Semaphore } from 'async-mutex';
import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { sleep, type Env, type TimerHandle } from '../env/env';
import { ConflictError, NotFoundError, PeersanError } from '../errors';
import { LogLimiter } from '../log';
import { dirtyPersistMs, dirtyPersistPagesMax, grainBytes, resyncAdmitRoundsMax, resyncAnswerMsMax, resyncPagesInFlightMax, resyncRetryMsMax, resyncRetryMsMin, resyncRunBytesMax, resyncRunsInFlightMax, resyncRunsPerPageMax } from '../limits';
import type { MigrationSettings } from '../migration/migrator';
import { ByteRate, ChunkPacer } from '../migration/rate';
import { copiesOf, inSyncOf, staleCopiesOf, type Route, type RouteTable } from '../routing/table';
import type { ActivityLog, RecordKv } from './activity';
import type { ChangeTracker, ReplicaPort } from './hooks';
import type { ResyncAsk } from './messages';

// ---- grains of a page ------------------------------------------------------------------------

export interface PageGeometry {
  blockBytes: number;
  pageBlocks: number;
  /** The volume's size in blocks: its last page may be short. */
  blockCount: number;
}

export function geometryOf(volume: VolumeRecord): PageGeometry {
  return { blockBytes: volume.blockBytes, pageBlocks: volume.pageBlocks, blockCount: volume.sizeBytes / volume.blockBytes };
}

/** Blocks per grain: the store's grain, or the whole page when pages are smaller. */
export function grainBlocksOf(g: PageGeometry): number {
  return Math.min(g.pageBlocks, Math.max(1, grainBytes / g.blockBytes));
}

export function grainsPerPage(g: PageGeometry): number {
  return Math.ceil(g.pageBlocks / grainBlocksOf(g));
}

/** Grain indexes (within `page`) that [lba, lba + blocks) touches. */
export function grainsTouched(g: PageGeometry, page: number, lba: number, blocks: number): number[] {
  const per = grainBlocksOf(g);
  const start = lba - page * g.pageBlocks;
  if (blocks <= 0 || start < 0 || start + blocks > g.pageBlocks) throw new Error(`assertion failed: [${lba}, +${blocks}) is not inside page ${page}`);
  const first = Math.floor(start / per);
  const last = Math.floor((start + blocks - 1) / per);
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}

/** Contiguous grains of a page: `count` from `first`. */
export interface GrainRun {
  first: number;
  count: number;
}

/** The blocks of a run of grains of the page, within the volume (empty past its end). */
export function runExtent(g: PageGeometry, page: number, run: GrainRun): { lba: number; blocks: number } {
  const lba = page * g.pageBlocks + run.first * grainBlocksOf(g);
  const end = Math.min(lba + run.count * grainBlocksOf(g), (page + 1) * g.pageBlocks, g.blockCount);
  return { lba, blocks: Math.max(0, end - lba) };
}

/** The first run of grains dirty and not taken yet, at most `grainsMax` long; undefined when none is left. */
export function nextRun(dirty: GrainSet | undefined, taken: GrainSet, grainsMax: number): GrainRun | undefined {
  if (!dirty) return undefined;
  const free = (i: number): boolean => i < dirty.grains && dirty.has(i) && !taken.has(i);
  let first = 0;
  while (first < dirty.grains && !free(first)) first++;
  if (first === dirty.grains) return undefined;
  let count = 1;
  while (count < grainsMax && free(first + count)) count++;
  return { first, count };
}

/** The whole page, within the volume. */
export function pageExtent(g: PageGeometry, page: number): { lba: number; blocks: number } {
  const lba = page * g.pageBlocks;
  return { lba, blocks: Math.max(0, Math.min(g.pageBlocks, g.blockCount - lba)) };
}

/** A set of grains of one page, as a bitmap. */
export class GrainSet {
  private readonly bits: Uint8Array;
  private n = 0;

  constructor(readonly grains: number, full = false) {
    this.bits = new Uint8Array(Math.ceil(grains / 8));
    if (full) for (let i = 0; i < grains; i++) this.add(i);
  }

  static decode(grains: number, base64: string): GrainSet {
    const s = new GrainSet(grains);
    const bytes = Buffer.from(base64, 'base64');
    for (let i = 0; i < grains; i++) if (((bytes[i >> 3] ?? 0) >> (i & 7)) & 1) s.add(i);
    return s;
  }

  get size(): number {
    return this.n;
  }

  has(i: number): boolean {
    return ((this.bits[i >> 3] >> (i & 7)) & 1) === 1;
  }

  add(i: number): void {
    if (i < 0 || i >= this.grains || this.has(i)) return;
    this.bits[i >> 3] |= 1 << (i & 7);
    this.n++;
  }

  delete(i: number): void {
    if (!this.has(i)) return;
    this.bits[i >> 3] &= ~(1 << (i & 7));
    this.n--;
  }

  first(): number | undefined {
    for (let i = 0; i < this.grains; i++) if (this.has(i)) return i;
    return undefined;
  }

  encode(): string {
    return Buffer.from(this.bits).toString('base64');
  }
}

// ---- ResyncTracker: dirty grains per (page, stale copy), the ChangeTracker of the write path ---

export interface ResyncTrackerOptions {
  self: string;
  kv: RecordKv;
  activity: ActivityLog;
  env: Env;
  /** The volume's record, when the catalog has it. */
  volume(volumeId: string): VolumeRecord | undefined;
  /** The replicated layer of an open volume (its recent grains when a copy leaves the in-sync set). */
  port(volumeId: string): ReplicaPort | undefined;
  log?: Logger;
}

const dirtyPrefix = 'dirty/';

/** The stored form of one page's sets. */
interface DirtyRecord {
  grains: number;
  copies: Record<string, string>;
}

type Sets = Map<string, GrainSet>;

export class ResyncTracker implements ChangeTracker {
  /** `volumeId/page` → stale copy → its dirty grains. */
  private readonly dirty = new Map<string, Sets>();
  /** `volumeId/page` → copies a resync from this peer is running for (they get every change too). */
  private readonly registered = new Map<string, Set<string>>();
  /** The route table of each watched volume: what a change is tracked by (see changed). */
  private readonly tables = new Map<string, RouteTable>();
  /** Pages whose sets changed since they were last written; one timer writes them. */
  private readonly unwritten = new Set<string>();
  /** The last write of each page's record: the next one follows it. */
  private readonly writes = new Map<string, Promise<void>>();
  private timer: TimerHandle | undefined;

  private constructor(private readonly o: ResyncTrackerOptions) {}

  /** The sets the last run left; those of pages suspect here count whole (their last marks may be lost). */
  static async open(o: ResyncTrackerOptions): Promise<ResyncTracker> {
    const t = new ResyncTracker(o);
    for (const r of await o.kv.listRecords(dirtyPrefix)) {
      const pk = r.key.slice(dirtyPrefix.length);
      const at = parsePageKey(pk);
      const rec = decodeRecord(r.value);
      if (!at || !rec) continue;
      const suspect = o.activity.isSuspect(at.volumeId, at.page);
      const sets: Sets = new Map();
      for (const [copy, bits] of Object.entries(rec.copies)) sets.set(copy, suspect ? new GrainSet(rec.grains, true) : GrainSet.decode(rec.grains, bits));
      t.dirty.set(pk, sets);
      if (suspect) t.schedule(pk);
    }
    return t;
  }

  // -- ChangeTracker (the write path, on every peer and role) --

  beforeChange(volumeId: string, page: number): Promise<void> | undefined {
    return this.o.activity.beforeChange(volumeId, page);
  }

  changed(volumeId: string, page: number, route: Route, lba: number, blocks: number, missed: readonly string[]): void {
    this.o.activity.noteChanged(volumeId, page);
    // Only an in-sync copy sees every change; a stale one keeps nothing for others.
    if (!inSyncOf(route).includes(this.o.self)) return;
    const stale = staleCopiesOf(route);
    // A copy being resynced from here gets every change from this peer's write path, so its
    // grains stay clean: only while this peer is the primary that sent the change. A resync this
    // peer serves outlives a loss of the role (its admission may wait for a snapshot): the
    // changes another primary made meanwhile, applied here as a copy, did not go to the resyncing
    // copy, and are marked (simulator, seed 22024: admitted without a write made meanwhile).
    const resyncing = route.owner === this.o.self ? this.registered.get(pageKey(volumeId, page)) : undefined;
    const targets = new Set([...stale.filter((c) => !resyncing?.has(c)), ...missed]);
    targets.delete(this.o.self);
    // The change ran by `route`, which the page's copies may have left since (a change held up
    // by a partition ends late): the table's route says who is a copy now. A peer that is none
    // gets no set; one that is stale now, or came back as a copy since, gets a whole one (a
    // partial set begun for a removed copy outlived its removal and, when the peer came back
    // as a new copy with its page freed, its resync copied only these grains: simulator, seed
    // 22031).
    const now = this.tables.get(volumeId)?.route(page);
    const known = now?.copies ? now : undefined;
    const volume = targets.size > 0 ? this.o.volume(volumeId) : undefined;
    if (!volume) return;
    const geo = geometryOf(volume);
    const grains = grainsTouched(geo, page, lba, blocks);
    for (const copy of targets) {
      if (known && !copiesOf(known).includes(copy)) continue;
      // A set begun now for a copy already stale would miss what came before: it is whole.
      const whole = stale.includes(copy) || (known !== undefined && !inSyncOf(known).includes(copy));
      const set = this.setFor(volumeId, page, copy, grainsPerPage(geo), whole);
      for (const g of grains) set.add(g);
    }
    this.schedule(pageKey(volumeId, page));
  }

  resyncing(volumeId: string, page: number): readonly string[] {
    return [...(this.registered.get(pageKey(volumeId, page)) ?? [])];
  }

  // -- route changes --

  /** Follow a volume's routes: a copy leaving the in-sync set starts its set here, a copy back in sync ends it. */
  watch(volumeId: string, table: RouteTable): () => void {
    // page → the last route seen with its copies: a copy leaving its in-sync set, or new to its copies, is seen here.
    const seen = new Map<number, Route>();
    for (const [page, route] of table.recorded()) if (route.copies) seen.set(page, route);
    this.tables.set(volumeId, table);
    const unlisten = table.onLearn((page, route) => this.learned(volumeId, page, route, seen.get(page) ?? table.placed(page), seen));
    return () => {
      unlisten();
      if (this.tables.get(volumeId) === table) this.tables.delete(volumeId);
    };
  }

  private learned(volumeId: string, page: number, route: Route, last: Route, seen: Map<number, Route>): void {
    // A route from a MOVED answer does not say who holds copies: nothing to learn from it.
    if (!route.copies) return;
    seen.set(page, route);
    const before = inSyncOf(last);
    const pk = pageKey(volumeId, page);
    const inSync = inSyncOf(route);
    const sets = this.dirty.get(pk);
    if (!inSync.includes(this.o.self)) {
      // Out of sync ourselves: we miss changes from now on, so our sets are worthless.
      if (sets) this.forgetPage(pk);
      return;
    }
    // A set ends when its copy is back in sync or no copy any more, and a new copy starts with
    // none (whole): it holds nothing of the page, whatever a set kept for its peer says.
    const added = copiesOf(route).filter((c) => !copiesOf(last).includes(c));
    for (const copy of [...(sets?.keys() ?? [])]) if (inSync.includes(copy) || !copiesOf(route).includes(copy) || added.includes(copy)) this.forget(volumeId, page, copy);
    if (!before.includes(this.o.self)) {
      // Back in sync ourselves: a set kept from before missed what we missed while out. One read
      // back at open, the catalog having dropped us while we were down, was never forgotten (no
      // route showed us leaving) and, once we were primary, resynced its copy without a write
      // made meanwhile (simulator, seed 34913). The copies still stale count whole here.
      if (this.dirty.has(pk)) this.forgetPage(pk);
      return;
    }
    const left = staleCopiesOf(route).filter((c) => before.includes(c));
    const volume = this.o.volume(volumeId);
    if (left.length === 0 || !volume) return;
    // Changes in flight when the copy left may not have reached it: they are its first dirty grains.
    const recent = this.o.port(volumeId)?.recentGrains(page) ?? [];
    for (const copy of left) {
      const set = this.setFor(volumeId, page, copy, grainsPerPage(geometryOf(volume)), false);
      for (const g of recent) set.add(g);
    }
    this.schedule(pk);
  }

  // -- the resync handler's use --

  /**
   * Register `copy` as resyncing from this peer (call under the page's exclusive range lock) and
   * mark the grains it asks for: all of them for `full`. A copy with no set here is whole.
   */
  register(volumeId: string, page: number, copy: string, grains: number, asked: readonly number[] | 'all'): void {
    const pk = pageKey(volumeId, page);
    let set = this.registered.get(pk);
    if (!set) this.registered.set(pk, (set = new Set()));
    set.add(copy);
    this.markAsked(volumeId, page, copy, grains, asked);
  }

  /** More grains a running resync is asked for (a repeated ask). */
  markAsked(volumeId: string, page: number, copy: string, grains: number, asked: readonly number[] | 'all'): void {
    const dirty = this.setFor(volumeId, page, copy, grains, true);
    for (const g of asked === 'all' ? Array.from({ length: grains }, (_, i) => i) : asked) dirty.add(g);
    this.schedule(pageKey(volumeId, page));
  }

  /**
   * This peer's copy of the page was rewritten outside the write path: a move rolled back from a
   * destination that restarted, and no other in-sync copy took the page over, so what came back
   * is the destination's, which may lack writes the stale copies hold. Their sets here name only
   * what they missed by the write path, so each resyncs all of it (simulator, seed 86323: a
   * stale copy kept a write the roll-back had taken from this peer, and the copies differed).
   */
  rewritten(volumeId: string, page: number): void {
    const route = this.tables.get(volumeId)?.route(page);
    const volume = this.o.volume(volumeId);
    if (!route?.copies || !volume) return;
    const grains = grainsPerPage(geometryOf(volume));
    for (const copy of staleCopiesOf(route)) if (copy !== this.o.self) this.markAsked(volumeId, page, copy, grains, 'all');
  }

  unregister(volumeId: string, page: number, copy: string): void {
    const pk = pageKey(volumeId, page);
    const set = this.registered.get(pk);
    set?.delete(copy);
    if (set?.size === 0) this.registered.delete(pk);
  }

  /** The copy's dirty grains here (undefined: no set, the whole page). */
  dirtyOf(volumeId: string, page: number, copy: string): GrainSet | undefined {
    return this.dirty.get(pageKey(volumeId, page))?.get(copy);
  }

  clear(volumeId: string, page: number, copy: string, grain: number): void {
    const set = this.dirtyOf(volumeId, page, copy);
    if (!set) return;
    set.delete(grain);
    this.schedule(pageKey(volumeId, page));
  }

  /** The copy is back in sync (or gone): its set ends. */
  forget(volumeId: string, page: number, copy: string): void {
    const pk = pageKey(volumeId, page);
    const sets = this.dirty.get(pk);
    if (!sets?.delete(copy)) return;
    if (sets.size === 0) this.dirty.delete(pk);
    this.schedule(pk);
  }

  /** The volume is deleted: its sets go, records included. */
  dropVolume(volumeId: string): void {
    for (const pk of [...this.dirty.keys()]) if (pk.startsWith(`${volumeId}/`)) this.forgetPage(pk);
  }

  // -- persistence --

  /** Write every page of the volume whose sets changed (unsynced; the volume's flush makes them durable). */
  async writeOut(volumeId?: string): Promise<void> {
    const pages = [...this.unwritten].filter((pk) => volumeId === undefined || pk.startsWith(`${volumeId}/`));
    await Promise.all(pages.map((pk) => this.write(pk)));
  }

  close(): void {
    this.o.env.timers.clearTimeout(this.timer);
    this.timer = undefined;
  }

  /**
   * The copy's set, begun whole when asked, or when the page is suspect here: this peer restarted
   * with it in its activity log, so its recent grains (changes it applied before the crash that
   * the copy may lack) are lost. Begun from the recent grains it knows now, a copy that left the
   * in-sync set of a suspect primary kept as the page's only in-sync copy was resynced without a
   * change made before the crash (simulator, seed 187549: a COMPARE AND WRITE on the primary only).
   */
  private setFor(volumeId: string, page: number, copy: string, grains: number, wholeIfNew: boolean): GrainSet {
    const pk = pageKey(volumeId, page);
    let sets = this.dirty.get(pk);
    if (!sets) this.dirty.set(pk, (sets = new Map()));
    let set = sets.get(copy);
    if (!set) sets.set(copy, (set = new GrainSet(grains, wholeIfNew || this.o.activity.isSuspect(volumeId, page))));
    return set;
  }

  private forgetPage(pk: string): void {
    this.dirty.delete(pk);
    this.schedule(pk);
  }

  private schedule(pk: string): void {
    this.unwritten.add(pk);
    if (this.unwritten.size >= dirtyPersistPagesMax) void this.writeOut();
    else this.armTimer();
  }

  private armTimer(): void {
    this.timer ??= this.o.env.timers.setTimeout(() => {
      this.timer = undefined;
      void this.writeOut();
    }, dirtyPersistMs).unref();
  }

  /** Write one page's record as it is now, after the page's previous write. */
  private write(pk: string): Promise<void> {
    this.unwritten.delete(pk);
    const next = (this.writes.get(pk) ?? Promise.resolve()).then(() => {
      const sets = this.dirty.get(pk);
      if (!sets || sets.size === 0) return this.o.kv.deleteRecord(dirtyPrefix + pk);
      return this.o.kv.putRecord(dirtyPrefix + pk, encodeRecord(sets), false);
    }).catch((err: Error) => {
      // A record not written is like one lost in a crash of an unsuspect page: rare, and the
      // copy's set reads whole at the next start only if the page is suspect. Try again later.
      this.o.log?.warn({ page: pk, reason: err.message }, 'dirty grains: record not written; retrying');
      this.unwritten.add(pk);
      this.armTimer();
    });
    this.writes.set(pk, next);
    void next.then(() => {
      if (this.writes.get(pk) === next) this.writes.delete(pk);
    });
    return next;
  }
}

function pageKey(volumeId: string, page: number): string {
  return `${volumeId}/${String(page).padStart(10, '0')}`;
}

function parsePageKey(pk: string): { volumeId: string; page: number } | undefined {
  const m = /^([0-9a-f]{16})\/(\d{10})$/.exec(pk);
  return m ? { volumeId: m[1], page: Number(m[2]) } : undefined;
}

function encodeRecord(sets: Sets): Buffer {
  const copies: Record<string, string> = {};
  let grains = 0;
  for (const [copy, set] of sets) {
    copies[copy] = set.encode();
    grains = set.grains;
  }
  return Buffer.from(JSON.stringify({ grains, copies } satisfies DirtyRecord));
}

function decodeRecord(b: Buffer): DirtyRecord | undefined {
  try {
    const r = JSON.parse(b.toString()) as DirtyRecord;
    return Number.isSafeInteger(r.grains) && r.grains > 0 && typeof r.copies === 'object' && r.copies !== null ? r : undefined;
  } catch {
    return undefined;
  }
}

// ---- pacing --------------------------------------------------------------------------------------

/**
 * Gives way to host I/O as a page move does (migration/rate.ts ChunkPacer: time a run takes
 * beyond twice the fastest recent one is waiting behind other work), with two differences that
 * runs bring. A run's time grows with its length, so each length class (1, 2–3, 4–7, … grains)
 * has its own pacer and a short run never makes a long one look slow. And several runs are in
 * flight at once, each queued behind the others on the same disks and link: a run's time is
 * divided by the runs in flight when it started, so this peer's own runs are not taken for
 * host load.
 */
export class RunPacer {
  private readonly pacers: ChunkPacer[] = [];

  constructor(private readonly duty: number) {}

  /** A run of `grains` took `ms` with `inFlight` runs in flight (itself included): the pause before its place is given to the next run. */
  pauseAfter(grains: number, ms: number, inFlight: number): number {
    const cls = Math.floor(Math.log2(Math.max(1, grains)));
    this.pacers[cls] ??= new ChunkPacer(this.duty);
    return this.pacers[cls].pauseAfter(ms / Math.max(1, inFlight));
  }
}

// ---- Resyncer: both sides of the resync protocol ----------------------------------------------

export interface ResyncerOptions {
  self: string;
  env: Env;
  catalog: Catalog;
  tracker: ResyncTracker;
  activity: ActivityLog;
  /** The replicated layer of a volume open on this peer. */
  port(volumeId: string): ReplicaPort | undefined;
  /** Send a resync ask to a page's primary; resolves when it answered (the copy is back in sync). */
  ask(primary: string, ask: ResyncAsk): Promise<unknown>;
  /**
   * This peer, primary of the page, is stepping out of it as suspect after a restart (failover.ts):
   * its copy may miss writes it acknowledged, so it is no source for a resync until it has handed
   * the page over.
   */
  untrusted?(volumeId: string, page: number): boolean;
  /**
   * The page's in-sync copies may differ now, on grains only this peer knows: a takeover still
   * reconciling (failover.ts), a change that failed here and is not settled (replicated.ts). A
   * copy resynced from this peer meanwhile is not admitted: were this peer to die before it
   * settles, the copy would be in sync with content none of the others has, and no recent grain
   * anywhere would tell the next primary to reconcile it.
   */
  unsettled?(volumeId: string, page: number): boolean;
  /**
   * A move of the page away from this peer that has not ended yet (the promise ends with it),
   * else undefined. Its last step frees this peer's copy of the page: a copy the new primary
   * adds here meanwhile is asked for only after that, or the free would erase what the resync
   * wrote (simulator, seed 1045: the page moved from this peer, the new primary chose it for the
   * page's second copy at once).
   */
  moveEnded?(volumeId: string, page: number): Promise<void> | undefined;
  /**
   * A move of the page away from this peer runs: its destination D confirms its copy (the move's
   * PREPARE again, migrator.ts), which makes it durable and fails if D restarted since the move
   * began. Resolves at once when no move runs. See serve.
   */
  confirmMove?(volumeId: string, page: number): Promise<void>;
  /**
   * While a snapshot holds the volume on this peer (src/snapshot/service.ts hold): a promise that
   * resolves when it lets go; undefined when nothing holds it. No copy is admitted in sync
   * meanwhile: see serve.
   */
  snapshotHold?(volumeId: string): Promise<void> | undefined;
  /** Copy rate and give-way of page moves: resync is paced the same way. */
  settings: MigrationSettings;
  log: Logger;
  /** Where the bytes sent are counted (the peer's /metrics reads them); default: a new pair. */
  counters?: { resyncBytes: number; rebuildBytes: number };
}

export interface ResyncAnswer {
  /** The page's epoch with the asker in sync. */
  version: number;
}

/** The resync is still running after resyncAnswerMsMax: ask again (`again`) to wait on. */
export interface ResyncRunning {
  running: true;
}

function isAnswer(answer: unknown): answer is ResyncAnswer {
  return typeof answer === 'object' && answer !== null && Number.isSafeInteger((answer as Partial<ResyncAnswer>).version);
}

function isRunning(answer: unknown): answer is ResyncRunning {
  return typeof answer === 'object' && answer !== null && (answer as Partial<ResyncRunning>).running === true;
}

export class Resyncer {
  /**
   * Bytes of data sent from this peer: to copies catching up what they missed (resyncBytes,
   * peersan_resync_bytes_total), and to copies this peer never saw in sync, filled whole (a new
   * copy: more replicas, or a lost peer's copy rebuilt; rebuildBytes).
   */
  readonly counters: { resyncBytes: number; rebuildBytes: number };
  private readonly rate: ByteRate;
  private readonly pacer: RunPacer;
  /** Runs this peer sends at once, over every page it serves, and how many are sending now. */
  private readonly window = new Semaphore(resyncRunsInFlightMax);
  private runsInFlight = 0;
  /** Failed asks are many while a primary is down: one warning per volume and window. */
  private readonly limiter: LogLimiter;
  /** Resyncs this peer serves, by `volumeId/page/copy`: a repeated ask joins its run. */
  private readonly runs = new Map<string, Promise<ResyncAnswer>>();
  /** The asking side: pages waiting for a turn, and every page queued, running or backing off. */
  private readonly waiting: string[] = [];
  private readonly pending = new Set<string>();
  private readonly attempts = new Map<string, number>();
  private readonly retryTimers = new Set<TimerHandle>();
  private running = 0;
  /** Volumes followed, by id: their name and how to stop. */
  private readonly followed = new Map<string, { name: string; stop: () => void }>();
  private unfollow: (() => void) | undefined;
  private closed = false;

  /** A graceful leave: no more asks (stopAsking). */
  private notAsking = false;

  constructor(private readonly o: ResyncerOptions) {
    this.counters = o.counters ?? { resyncBytes: 0, rebuildBytes: 0 };
    this.rate = new ByteRate(o.settings.rateBytesPerSec, Math.max(resyncRunBytesMax, o.settings.pieceBytes), o.env);
    this.pacer = new RunPacer(o.settings.duty ?? 1);
    this.limiter = new LogLimiter({ nowMs: () => o.env.clock.monotonicMs() });
  }

  // ---- the stale copy's side --------------------------------------------------------------------

  /** Follow every volume's routes (this peer's open volumes are asked for), and ask for the pages stale here now. */
  start(): void {
    this.unfollow = this.o.catalog.onVolumeChange((name, record) => {
      if (record) this.follow(record);
      else this.deleted(name);
    });
    for (const v of this.o.catalog.listVolumes()) this.follow(v);
  }

  /**
   * Ask for no resync any more (a graceful leave, before this peer steps out of its copies'
   * in-sync sets: asking to come back in would undo it). The dirty grains it tracks as a
   * primary are kept.
   */
  stopAsking(): void {
    this.notAsking = true;
  }

  close(): void {
    this.closed = true;
    this.unfollow?.();
    for (const f of this.followed.values()) f.stop();
    this.followed.clear();
    for (const t of this.retryTimers) this.o.env.timers.clearTimeout(t);
    this.retryTimers.clear();
  }

  private follow(volume: VolumeRecord): void {
    if (this.followed.has(volume.id) || this.closed) return;
    const table = this.o.catalog.routes(volume);
    const untrack = this.o.tracker.watch(volume.id, table);
    const unlisten = table.onLearn((page, route) => this.learned(volume, page, route));
    const stop = (): void => {
      untrack();
      unlisten();
    };
    this.followed.set(volume.id, { name: volume.name, stop });
    for (const [page, route] of table.recorded()) this.consider(volume.id, page, route);
  }

  private deleted(name: string): void {
    for (const [id, f] of this.followed) {
      if (f.name !== name) continue;
      f.stop();
      this.followed.delete(id);
      this.o.tracker.dropVolume(id);
    }
  }

  private learned(volume: VolumeRecord, page: number, route: Route): void {
    if (route.copies) this.consider(volume.id, page, route);
    else void this.completed(volume, page);
  }

  /** A route heard in a MOVED answer does not say who holds copies: read the catalog's record of it. */
  private async completed(volume: VolumeRecord, page: number): Promise<void> {
    const route = await this.o.catalog.fetchRoute(volume, page).catch(() => undefined);
    if (route) this.consider(volume.id, page, route);
  }

  private consider(volumeId: string, page: number, route: Route): void {
    if (route.copies && staleCopiesOf(route).includes(this.o.self)) this.enqueue(pageKey(volumeId, page));
  }

  private enqueue(key: string): void {
    if (this.pending.has(key) || this.closed || this.notAsking) return;
    this.pending.add(key);
    this.waiting.push(key);
    this.pump();
  }

  private pump(): void {
    while (this.running < resyncPagesInFlightMax && this.waiting.length > 0) {
      const key = this.waiting.shift()!;
      this.running++;
      void this.askFor(key).finally(() => {
        this.running--;
        this.pump();
      });
    }
  }

  /** One ask for a page; on failure the page is asked for again after a backoff, while it stays stale. */
  private async askFor(key: string): Promise<void> {
    const at = parsePageKey(key)!;
    const volume = this.o.catalog.volumeById(at.volumeId);
    const route = volume && this.o.catalog.routes(volume).route(at.page);
    if (!volume || !route?.copies || !staleCopiesOf(route).includes(this.o.self) || this.closed || this.notAsking) {
      this.done(key);
      return;
    }
    try {
      const version = await this.askOnce(volume, at.page, route);
      this.done(key);
      // Routes learned while the ask ran were not queued (the page was pending): one newer than
      // the answer's may have made this copy stale again (dropped by a change it missed while
      // the answer was on its way), and no later route may come to ask for it.
      const now = this.o.catalog.routes(volume).route(at.page);
      if (now.version > version) this.learned(volume, at.page, now);
    } catch (err) {
      // Maybe asked the wrong peer (this peer's routes lag): read the route before the next ask.
      void this.o.catalog.fetchRoute(volume, at.page).catch(() => undefined);
      this.retryLater(key, err as Error);
    }
  }

  /** Ask until answered; the page's epoch with this copy in sync. */
  private async askOnce(volume: VolumeRecord, page: number, route: Route): Promise<number> {
    const port = this.o.port(volume.id);
    if (!port) throw new PeersanError(`volume ${volume.name} is not open on ${this.o.self} yet`);
    await this.o.moveEnded?.(volume.id, page);
    // The route that made this page stale may also make it suspect here (a move away from this
    // peer lost the page: the migrator distrusts it in its own listener of the same route, which
    // may run after ours): let every listener of it run before deciding whether the ask is whole.
    await Promise.resolve();
    const full = this.o.activity.isSuspect(volume.id, page);
    const ask: ResyncAsk = { volumeId: volume.id, page, version: route.version, full, grains: full ? [] : port.recentGrains(page) };
    // Each answer comes within resyncAnswerMsMax: "running" while the copy goes on, so that an
    // ask lost on the way (a partition answers nothing) fails at a short deadline.
    let answer: unknown;
    for (let again = false; isRunning((answer = await this.o.ask(route.owner, { ...ask, again }))); again = true);
    if (full) this.o.activity.trusted(volume.id, page);
    // The watch brings the new route too; reading it now saves asking again meanwhile.
    await this.o.catalog.fetchRoute(volume, page).catch(() => undefined);
    return isAnswer(answer) ? answer.version : route.version;
  }

  private done(key: string): void {
    this.pending.delete(key);
    this.attempts.delete(key);
  }

  private retryLater(key: string, err: Error): void {
    const n = (this.attempts.get(key) ?? 0) + 1;
    this.attempts.set(key, n);
    const delayMs = Math.min(resyncRetryMsMax, resyncRetryMsMin * 2 ** (n - 1));
    this.limiter.warn(this.o.log, parsePageKey(key)!.volumeId, { page: key, attempt: n, retryInMs: delayMs, reason: err.message }, 'resync ask failed; asking again');
    const timer = this.o.env.timers.setTimeout(() => {
      this.retryTimers.delete(timer);
      if (this.closed) return;
      this.waiting.push(key);
      this.pump();
    }, delayMs).unref();
    this.retryTimers.add(timer);
  }

  // ---- the primary's side -----------------------------------------------------------------------

  /**
   * A stale copy `from` asks to be brought back in sync. A repeated ask joins the running resync
   * (marking what it asks for, unless it is the same ask `again`). Answered when the run ends, or
   * "running" after resyncAnswerMsMax.
   */
  handle(from: string, ask: ResyncAsk): Promise<ResyncAnswer | ResyncRunning> {
    const key = `${pageKey(ask.volumeId, ask.page)}/${from}`;
    let run = this.runs.get(key);
    const volume = this.o.catalog.volumeById(ask.volumeId);
    if (run && volume) {
      if (!ask.again) this.o.tracker.markAsked(ask.volumeId, ask.page, from, grainsPerPage(geometryOf(volume)), ask.full ? 'all' : ask.grains);
    } else {
      run = this.serve(from, ask).finally(() => this.runs.delete(key));
      // The run goes on when nobody waits on it any more (its asker asks again, or gave up).
      run.catch(() => undefined);
      this.runs.set(key, run);
    }
    return this.within(run);
  }

  /** The run's outcome, or "running" once resyncAnswerMsMax passed. */
  private within(run: Promise<ResyncAnswer>): Promise<ResyncAnswer | ResyncRunning> {
    const { timers } = this.o.env;
    return new Promise((resolve, reject) => {
      const timer = timers.setTimeout(() => resolve({ running: true }), resyncAnswerMsMax).unref();
      run.then(
        (answer) => (timers.clearTimeout(timer), resolve(answer)),
        (err: unknown) => (timers.clearTimeout(timer), reject(err)),
      );
    });
  }

  private async serve(from: string, ask: ResyncAsk): Promise<ResyncAnswer> {
    const volume = this.o.catalog.volumeById(ask.volumeId);
    if (!volume) throw new NotFoundError(`no volume ${ask.volumeId}`);
    const port = this.o.port(volume.id);
    if (!port) throw new PeersanError(`volume ${volume.name} is not open on ${this.o.self} yet`);
    const route = await this.routeFor(volume, ask, from);
    if (inSyncOf(route).includes(from)) return { version: route.version };
    if (this.o.untrusted?.(volume.id, ask.page)) throw new ConflictError(`page ${ask.page} of ${volume.name} is suspect on ${this.o.self}, which hands it over first; ask again`);
    const geo = geometryOf(volume);
    const whole = pageExtent(geo, ask.page);
    const grains = grainsPerPage(geo);
    // A copy this peer keeps no set for (a new copy, or one it never saw in sync) is filled whole:
    // its bytes are a rebuild's.
    const fill = !this.o.tracker.dirtyOf(volume.id, ask.page, from);
    await port.exclusive(ask.page, whole.lba, whole.blocks, async () => this.o.tracker.register(volume.id, ask.page, from, grains, ask.full ? 'all' : ask.grains));
    try {
      for (let round = 0; round < resyncAdmitRoundsMax; round++) {
        await this.copyDirty(volume, port, ask.page, from, fill);
        // A page moving away from here is read partly from the move's destination D, whose copy
        // may miss staging writes it acknowledged without FUA if it restarted since (the in-sync
        // copies hold them; D's copy is confirmed only at the commit). A copy resynced from it
        // would be admitted in sync without them, and could become primary later (simulator,
        // seed 3020). So D confirms after the copy, before the admission.
        await this.o.confirmMove?.(volume.id, ask.page);
        // A snapshot's record trusts a copy in sync both before anything froze and at its cut
        // (records.ts narrowInSync), so no copy may come back into the in-sync set in between:
        // dropped and admitted again meanwhile, its layer froze while it was stale (simulator,
        // seed 26461). The admission waits while a snapshot holds the volume here (outside the
        // page's lock: host I/O goes on) and looks again under it. In barrier mode that hold
        // spans every freeze and the cut. In timestamp mode a copy may freeze before this peer's
        // PREPARE; what a resync writes to it after its freeze is recorded there, and goes into
        // its layer at FINISH if stamped before the cut (stamp-log.ts).
        for (let held = this.o.snapshotHold?.(volume.id); held; held = this.o.snapshotHold?.(volume.id)) await held;
        const admitted = await port.exclusive(ask.page, whole.lba, whole.blocks, () => this.admit(volume, ask.page, from));
        if (admitted) {
          this.o.log.info({ volume: volume.name, page: ask.page, copy: from, version: admitted.version }, 'copy resynced and back in sync');
          return { version: admitted.version };
        }
      }
      throw new PeersanError(`page ${ask.page} of ${volume.name} kept changing for ${from}; ask again`);
    } finally {
      this.o.tracker.unregister(volume.id, ask.page, from);
    }
  }

  /** The page's route as this primary knows it, newer when the asker knows a newer epoch; refused unless ours and `from` a copy. */
  private async routeFor(volume: VolumeRecord, ask: ResyncAsk, from: string): Promise<Route> {
    let route = this.o.catalog.routes(volume).route(ask.page);
    if (ask.version > route.version || !route.copies) route = await this.o.catalog.fetchRoute(volume, ask.page);
    if (route.owner !== this.o.self) throw new ConflictError(`page ${ask.page} of ${volume.name} is served by ${route.owner} at epoch ${route.version}, not by ${this.o.self}`);
    if (!copiesOf(route).includes(from)) throw new ConflictError(`${from} holds no copy of page ${ask.page} of ${volume.name} at epoch ${route.version}`);
    return route;
  }

  /**
   * Copy every dirty grain of the copy: runs of contiguous dirty grains, one request each (at most
   * resyncRunBytesMax), up to resyncRunsPerPageMax runs of the page at once (and
   * resyncRunsInFlightMax over every page this peer serves), each under the range lock of its
   * grains, paced. A round takes each grain once: one marked again by a change the copy missed
   * while or after it was copied is left to the next round, after the admit step looked.
   */
  private async copyDirty(volume: VolumeRecord, port: ReplicaPort, page: number, copy: string, newCopy: boolean): Promise<void> {
    const geo = geometryOf(volume);
    const grains = grainsPerPage(geo);
    // A set dropped meanwhile (this peer fell out of sync and back) leaves nothing known: whole,
    // and its bytes are a rebuild's, as a new copy's are.
    const whole = !this.o.tracker.dirtyOf(volume.id, page, copy);
    if (whole) this.o.tracker.markAsked(volume.id, page, copy, grains, 'all');
    const fill = newCopy || whole;
    const taken = new GrainSet(grains);
    const runGrainsMax = Math.max(1, Math.floor(resyncRunBytesMax / (grainBlocksOf(geo) * geo.blockBytes)));
    let failed: unknown;
    // The next run to copy (its grains taken), none once a run failed: the round ends, and throws.
    const next = (): GrainRun | undefined => {
      const run = failed === undefined ? nextRun(this.o.tracker.dirtyOf(volume.id, page, copy), taken, runGrainsMax) : undefined;
      if (run) for (let g = run.first; g < run.first + run.count; g++) taken.add(g);
      return run;
    };
    const worker = async (): Promise<void> => {
      for (let run = next(); run; run = next()) {
        try {
          const bytes = await this.window.runExclusive(() => this.copyRun(volume, port, page, copy, run));
          if (fill) this.counters.rebuildBytes += bytes;
          else this.counters.resyncBytes += bytes;
        } catch (err) {
          failed ??= err;
        }
      }
    };
    await Promise.all(Array.from({ length: resyncRunsPerPageMax }, worker));
    if (failed !== undefined) throw failed;
  }

  /**
   * One run, holding a place in the peer's window: at the copy rate, under the run's range lock,
   * then the pause that gives way to host I/O (still holding the place, so the window shrinks).
   */
  private async copyRun(volume: VolumeRecord, port: ReplicaPort, page: number, copy: string, run: GrainRun): Promise<number> {
    const geo = geometryOf(volume);
    const ext = runExtent(geo, page, run);
    if (ext.blocks === 0) {
      this.clearRun(volume, page, copy, run);
      return 0;
    }
    await this.rate.take(ext.blocks * geo.blockBytes);
    const inFlight = ++this.runsInFlight;
    const startMs = this.o.env.clock.monotonicMs();
    let bytes: number;
    try {
      bytes = await port.exclusive(page, ext.lba, ext.blocks, () => this.sendRun(volume, port, page, copy, run, ext));
    } finally {
      this.runsInFlight--;
    }
    const pauseMs = this.pacer.pauseAfter(run.count, this.o.env.clock.monotonicMs() - startMs, inFlight);
    if (pauseMs > 0) await sleep(this.o.env.timers, pauseMs);
    return bytes;
  }

  /**
   * Send a run as this peer holds it: written ranges as writes, unmapped ones as unmaps; then
   * clear its bits. Under the run's range lock no change of it runs meanwhile, so a bit is
   * cleared only once the copy has what this peer has (a crash never keeps a bit cleared early).
   * The run's last send is FUA, which makes the whole run durable on the copy (the store's FUA
   * syncs everything written before it): what this peer holds includes writes acknowledged as
   * durable (FUA, or flushed), and an in-sync copy must hold those durably, or a crash of it
   * loses them while the others, trusting it, step out of the in-sync set as suspect after their
   * own restart (simulator, seed 5169: a copy admitted with the resynced grains still in its
   * cache, it crashed, the other copy restarted and left the in-sync set: an acknowledged FUA
   * write was lost on every copy). The FUA covers the run's earlier sends only if the copy did not
   * restart in between (they were not synced): its answers carry its start token, and a run
   * answered with two fails (its bits stay set; the copy's restart makes it ask again, whole).
   */
  private async sendRun(volume: VolumeRecord, port: ReplicaPort, page: number, copy: string, run: GrainRun, ext: { lba: number; blocks: number }): Promise<number> {
    const route = this.o.catalog.routes(volume).route(page);
    if (route.owner !== this.o.self) throw new ConflictError(`page ${page} of ${volume.name} moved to ${route.owner} during its resync`);
    let bytes = 0;
    let token: number | undefined;
    const end = ext.lba + ext.blocks;
    for (let at = ext.lba; at < end; ) {
      const extents = await port.local.lbaStatus(at, end - at);
      if (extents.length === 0) throw new Error(`assertion failed: no extent at ${at}`);
      for (const e of extents) {
        const data = e.mapped ? await port.local.read(e.lba, e.blocks) : undefined;
        const answered = await port.send(copy, route, e.mapped ? 'write' : 'unmap', e.lba, e.blocks, data, e.lba + e.blocks >= end);
        if (token !== undefined && answered !== token) throw new PeersanError(`${copy} restarted during the resync of grains ${run.first}+${run.count} of page ${page} of ${volume.name}; they are sent again`);
        token = answered;
        bytes += data?.length ?? 0;
        at = e.lba + e.blocks;
      }
    }
    this.clearRun(volume, page, copy, run);
    return bytes;
  }

  private clearRun(volume: VolumeRecord, page: number, copy: string, run: GrainRun): void {
    for (let g = run.first; g < run.first + run.count; g++) this.o.tracker.clear(volume.id, page, copy, g);
  }

  /**
   * Under the whole page's lock: when nothing is dirty for the copy any more, CAS it into the
   * in-sync set. Undefined: something is dirty again, or the route changed (read again); copy more.
   */
  private async admit(volume: VolumeRecord, page: number, copy: string): Promise<Route | undefined> {
    const now = this.o.catalog.routes(volume).route(page);
    if (now.owner !== this.o.self) throw new ConflictError(`page ${page} of ${volume.name} moved to ${now.owner} during its resync`);
    if (!copiesOf(now).includes(copy)) throw new ConflictError(`${copy} is no copy of page ${page} of ${volume.name} any more`);
    if (!inSyncOf(now).includes(copy)) {
      if ((this.o.tracker.dirtyOf(volume.id, page, copy)?.size ?? 1) > 0) return undefined;
      if (this.o.snapshotHold?.(volume.id)) return undefined;
      if (this.o.unsettled?.(volume.id, page)) throw new ConflictError(`the in-sync copies of page ${page} of ${volume.name} are not settled on ${this.o.self} yet (reconciling); ask again`);
      try {
        await this.o.catalog.casRoute(volume, page, now, (cur) => ({ owner: cur.owner, copies: [...copiesOf(cur)], inSync: [...inSyncOf(cur), copy] }));
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
        await this.o.catalog.fetchRoute(volume, page);
        return undefined;
      }
    }
    this.o.tracker.unregister(volume.id, page, copy);
    this.o.tracker.forget(volume.id, page, copy);
    return this.o.catalog.routes(volume).route(page);
  }
}
