// Snapshot layers follow a page's copies (DESIGN.md 10, "Snapshots freeze on every copy"; issue
// 17, quick resync: "snapshot layers resync and rebuild with their pages").
//
// Every peer froze its own copy of each page at a snapshot's cut, but only the copies in sync
// then (records.ts snapshotHolders) froze the snapshot's data: a copy stale at the cut froze
// stale blocks, and a copy built later (a rebuild, more replicas, a move's destination) holds
// nothing of the snapshot. Resync and rebuild (src/replication) bring such a copy's live data
// back; this brings it the snapshot layers it lacks, so the snapshot survives the loss of the
// copies that held it at the cut.
//
// Which pages: on each peer, every page of which it is an in-sync copy (of two or more) and every
// ready snapshot of the volume of which it is not a holder of that page yet, when its store has
// the snapshot's layer (it was up at the cut: the layer exists and is valid for the pages it
// holds; a layer made now would freeze live data for every page, which a reader of a page it
// holds at the cut would take for the snapshot). Looked at when the peer starts, when a route
// makes it an in-sync copy (a resync or rebuild ends: the catalog's watch), and when a snapshot
// becomes ready. One page at a time, paced like migration.
//
// Per page and snapshot, in this order:
//   1. the page's layer is read from its holders (a SnapshotReader: the holder at the cut first,
//      the next one when it is unreachable); only the grains the layer maps are read;
//   2. it replaces this peer's layer of the page (store.replaceSnapshotGrains: durable when it
//      resolves; live data and older snapshots keep their views);
//   3. only then this peer joins the page's holders in the snapshot's record (records.ts
//      joinHolders, compare-and-swap), a batch of pages at a time. A snapshot deleted meanwhile
//      is not joined (its record is gone) and its layer here goes with the record's watch
//      (targets.ts), so it never comes back. A crash between 2 and 3 costs a second copy.
// A layer's view of a page does not change once the snapshot is ready, so no lock is needed
// against host writes; the read may run at any time after the cut.

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import type { WatchEvent } from '../cluster/metastore';
import { sleep, type Env, type TimerHandle } from '../env/env';
import { grainBytes, resyncRetryMsMax, resyncRetryMsMin } from '../limits';
import { LogLimiter } from '../log';
import type { MigrationSettings } from '../migration/migrator';
import { ByteRate, ChunkPacer } from '../migration/rate';
import { followRoutes } from '../replication/route-watch';
import type { BlockSender } from '../routing/router';
import { copiesOf, inSyncOf, type Route, type RouteTable } from '../routing/table';
import type { StoreVolume } from '../store/page-store';
import type { BlockBackend } from '../store/types';
import { SnapshotReader } from './reader';
import { decodeSnapshot, holdsPage, joinHolders, listSnapshotRecords, routesAtCut, snapshotPrefix, type MovingAtCut, type SnapshotRecord } from './records';

/** Pages whose layers were taken before their holders are recorded (one compare-and-swap per snapshot). */
const joinPagesMax = 64;

/** Where a snapshot's layers lived at its cut (derived from its record once). */
interface Cut {
  routes: RouteTable;
  moving: Map<number, MovingAtCut>;
}

/**
 * The ready snapshots whose layer of `page` this peer should take from the holders: it is an
 * in-sync copy of a replicated page, not a holder of the page in the snapshot, and its store has
 * the snapshot's layer (`stored`). Oldest first.
 */
export function layersLacking(self: string, page: number, route: Route, records: readonly SnapshotRecord[], cut: (r: SnapshotRecord) => Cut, stored: (seq: number) => boolean): SnapshotRecord[] {
  if (copiesOf(route).length < 2 || !inSyncOf(route).includes(self)) return [];
  return records
    .filter((r) => r.state === 'ready' && stored(r.seq) && !holdsPage(r, page, self, cut(r).routes, cut(r).moving))
    .sort((a, b) => a.seq - b.seq);
}

export interface LayerSyncOptions {
  self: string;
  env: Env;
  log: Logger;
  catalog: Catalog;
  /** The volume's store on this peer, if open. */
  stored(volumeId: string): StoreVolume | undefined;
  link(peerId: string): BlockSender;
  /** The migration's rate and pacing (layers are copied like pages). */
  settings: MigrationSettings;
}

export class SnapshotLayerSync {
  /** Bytes of snapshot layers this peer took from holders, and page layers taken. */
  readonly counters = { bytes: 0, pageLayers: 0 };
  private readonly o: LayerSyncOptions;
  private readonly rate: ByteRate;
  private readonly pacer: ChunkPacer;
  private readonly limiter: LogLimiter;
  /** Snapshot records by volume id and name, as the catalog's watch has them. */
  private readonly records = new Map<string, Map<string, SnapshotRecord>>();
  private readonly cuts = new WeakMap<SnapshotRecord, Cut>();
  /** Pages to look at (`volumeId/page`), in order, and whether each is queued. */
  private readonly queue: string[] = [];
  private readonly queued = new Set<string>();
  private readonly attempts = new Map<string, number>();
  private readonly retryTimers = new Set<TimerHandle>();
  /** Layers taken and not recorded yet, by joinKey: the snapshot and its pages. */
  private readonly joins = new Map<string, { volumeId: string; name: string; seq: number; pages: number[] }>();
  private running = false;
  /** Set once the records are read at start: from then on a snapshot becoming ready is looked at. */
  private started = false;
  private closed = false;
  private unwatch: (() => void) | undefined;
  private unfollow: (() => void) | undefined;

  constructor(o: LayerSyncOptions) {
    this.o = o;
    this.rate = new ByteRate(o.settings.rateBytesPerSec, Math.max(grainBytes, o.settings.pieceBytes), o.env);
    this.pacer = new ChunkPacer(o.settings.duty ?? 1);
    this.limiter = new LogLimiter({ nowMs: () => o.env.clock.monotonicMs() });
  }

  /** Follow the snapshot records and the routes; look at every page once. */
  async start(): Promise<void> {
    this.unwatch = await this.o.catalog.store.watch(snapshotPrefix, (ev) => this.onRecord(ev));
    for (const r of await listSnapshotRecords(this.o.catalog.store)) this.remember(r);
    this.started = true;
    this.unfollow = followRoutes(this.o.catalog, (volume, page, route) => this.consider(volume, page, route), (volume) => this.considerVolume(volume));
    for (const v of this.o.catalog.listVolumes()) this.considerVolume(v);
  }

  close(): void {
    this.closed = true;
    this.unwatch?.();
    this.unfollow?.();
    for (const t of this.retryTimers) this.o.env.timers.clearTimeout(t);
    this.retryTimers.clear();
  }

  private onRecord(ev: WatchEvent): void {
    if (ev.type === 'put') return this.remember(decodeSnapshot(ev.record.value));
    const [volumeId, name] = ev.key.slice(snapshotPrefix.length).split('/');
    this.records.get(volumeId)?.delete(name);
  }

  private remember(r: SnapshotRecord): void {
    let byName = this.records.get(r.volumeId);
    if (!byName) this.records.set(r.volumeId, (byName = new Map()));
    const before = byName.get(r.name);
    byName.set(r.name, r);
    // A snapshot that became ready (or a new one): this peer may lack its layer of some pages.
    const volume = this.o.catalog.volumeById(r.volumeId);
    if (this.started && r.state === 'ready' && before?.state !== 'ready' && volume) this.considerVolume(volume);
  }

  private considerVolume(volume: VolumeRecord): void {
    if (!this.records.get(volume.id)?.size) return;
    const table = this.o.catalog.routes(volume);
    // Only pages with a copy here and another elsewhere can lack a layer (layersLacking): not a walk through every page.
    for (const [page, route] of table.sharedPagesWith(this.o.self, table.pageCount(volume.sizeBytes / volume.blockBytes))) this.consider(volume, page, route);
  }

  private consider(volume: VolumeRecord, page: number, route: Route): void {
    if (this.closed || this.lacking(volume.id, page, route).length === 0) return;
    this.enqueue(`${volume.id}/${page}`);
  }

  private lacking(volumeId: string, page: number, route: Route): SnapshotRecord[] {
    const store = this.o.stored(volumeId);
    const records = this.records.get(volumeId);
    if (!store || !records) return [];
    // A layer taken already and not recorded yet is not taken again.
    const pending = [...records.values()].filter((r) => !this.joins.get(joinKey(r))?.pages.includes(page));
    return layersLacking(this.o.self, page, route, pending, (r) => this.cutOf(r), (seq) => store.hasSnapshot(String(seq)));
  }

  private cutOf(r: SnapshotRecord): Cut {
    let cut = this.cuts.get(r);
    if (!cut) this.cuts.set(r, (cut = { routes: routesAtCut(r), moving: new Map(r.moving.map((m) => [m.page, m])) }));
    return cut;
  }

  private enqueue(key: string): void {
    if (this.queued.has(key)) return;
    this.queued.add(key);
    this.queue.push(key);
    void this.work();
  }

  /** One page at a time; the holders are recorded by batches, and whenever the queue runs dry. */
  private async work(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        const key = this.queue.shift()!;
        this.queued.delete(key);
        await this.catchUp(key).then(() => this.attempts.delete(key), (err: Error) => this.retryLater(key, err));
        const pending = [...this.joins.values()].reduce((n, j) => n + j.pages.length, 0);
        if (pending >= joinPagesMax || this.queue.length === 0) await this.recordJoins();
      }
    } finally {
      this.running = false;
    }
  }

  /** Take every snapshot layer of the page this peer lacks (see the top). */
  private async catchUp(key: string): Promise<void> {
    const [volumeId, pageText] = key.split('/');
    const page = Number(pageText);
    const volume = this.o.catalog.volumeById(volumeId);
    const store = this.o.stored(volumeId);
    if (!volume || !store) return;
    for (const r of this.lacking(volumeId, page, this.o.catalog.routes(volume).route(page))) {
      await this.takeLayer(r, page, store);
      this.counters.pageLayers++;
      const join = this.joins.get(joinKey(r)) ?? { volumeId: r.volumeId, name: r.name, seq: r.seq, pages: [] };
      join.pages.push(page);
      this.joins.set(joinKey(r), join);
    }
  }

  /**
   * The snapshot's layer of the page from its holders into this peer's layer: a piece at a time
   * (the migration's piece size), only the grains the layer maps read, the rest zeros.
   */
  private async takeLayer(r: SnapshotRecord, page: number, store: StoreVolume): Promise<void> {
    const reader = new SnapshotReader({ self: this.o.self, record: r, grainBlocks: store.grainBlocks, local: () => layerOf(store, r.seq), link: this.o.link });
    const first = page * r.pageBlocks;
    const end = Math.min(first + r.pageBlocks, reader.blockCount);
    const mapped = await mappedRuns(reader, first, end);
    const grainsPerPiece = Math.max(1, Math.floor(this.o.settings.pieceBytes / grainBytes));
    for (let at = first; at < end; at += grainsPerPiece * store.grainBlocks) {
      const startMs = this.o.env.clock.monotonicMs();
      const grains: (Buffer | null)[] = [];
      for (let g = at; g < Math.min(end, at + grainsPerPiece * store.grainBlocks); g += store.grainBlocks) {
        grains.push(await this.grain(reader, g, Math.min(store.grainBlocks, end - g), mapped));
      }
      await this.replaceGrains(store, r.seq, at, grains);
      const pauseMs = this.pacer.pauseAfter(this.o.env.clock.monotonicMs() - startMs);
      if (pauseMs > 0) await sleep(this.o.env.timers, pauseMs);
    }
  }

  /** This peer's layer of snapshot `seq` takes `grains` from `lba` on (durable when it resolves); a negative control may vary it. */
  protected replaceGrains(store: StoreVolume, seq: number, lba: number, grains: readonly (Buffer | null)[]): Promise<void> {
    return store.replaceSnapshotGrains(String(seq), lba, grains);
  }

  /** One grain of the layer, padded to the grain's size; null when the layer maps none of it (zeros). */
  private async grain(reader: BlockBackend, lba: number, blocks: number, mapped: readonly [number, number][]): Promise<Buffer | null> {
    if (!mapped.some(([from, to]) => from < lba + blocks && to > lba)) return null;
    const bytes = blocks * reader.blockBytes;
    await this.rate.take(bytes);
    const data = await reader.read(lba, blocks);
    this.counters.bytes += bytes;
    if (data.length === grainBytes) return data;
    const padded = Buffer.alloc(grainBytes);
    data.copy(padded);
    return padded;
  }

  /** Record this peer as a holder of the pages whose layers it took (a snapshot gone meanwhile: nothing). */
  private async recordJoins(): Promise<void> {
    const joins = [...this.joins.values()];
    this.joins.clear();
    for (const j of joins) {
      try {
        const joined = await joinHolders(this.o.catalog.store, j, j.pages, this.o.self);
        this.o.log.info({ volumeId: j.volumeId, snapshot: j.name, pages: j.pages.length, joined }, joined ? 'took snapshot layers from their holders; now a holder too' : 'snapshot gone while its layers were taken');
      } catch (err) {
        // The layers are here; taking them again is the simple way to record them later.
        for (const page of j.pages) this.retryLater(`${j.volumeId}/${page}`, err as Error);
      }
    }
  }

  private retryLater(key: string, err: Error): void {
    if (this.closed) return;
    const n = (this.attempts.get(key) ?? 0) + 1;
    this.attempts.set(key, n);
    const delayMs = Math.min(resyncRetryMsMax, resyncRetryMsMin * 2 ** (n - 1));
    this.limiter.warn(this.o.log, key.split('/')[0], { page: key, attempt: n, retryInMs: delayMs, reason: err.message }, 'could not take a snapshot layer from its holders; trying again');
    const timer = this.o.env.timers.setTimeout(() => {
      this.retryTimers.delete(timer);
      if (!this.closed) this.enqueue(key);
    }, delayMs).unref();
    this.retryTimers.add(timer);
  }
}

/** A snapshot's key among the joins to record (its name may be taken again by a newer one). */
function joinKey(r: SnapshotRecord): string {
  return `${r.volumeId}/${r.name}/${r.seq}`;
}

/** This peer's layer of snapshot `seq` (undefined: none). */
function layerOf(store: StoreVolume, seq: number): BlockBackend | undefined {
  return store.hasSnapshot(String(seq)) ? store.snapshotView(String(seq)) : undefined;
}

/** The [from, to) block runs of [first, end) that the snapshot's layer maps (GET LBA STATUS answers a prefix each time). */
async function mappedRuns(reader: BlockBackend, first: number, end: number): Promise<[number, number][]> {
  const runs: [number, number][] = [];
  for (let at = first; at < end; ) {
    const extents = await reader.lbaStatus(at, end - at);
    const last = extents[extents.length - 1];
    if (!last || last.lba + last.blocks <= at) throw new Error(`assertion failed: no extent of the snapshot at block ${at}`);
    for (const e of extents) if (e.mapped) runs.push([e.lba, e.lba + e.blocks]);
    at = last.lba + last.blocks;
  }
  return runs;
}
