// Barrier-mode snapshots (DESIGN.md 6) on one peer, both roles.
//
// Coordinator (the peer that got the command), for one volume or a consistency group:
//   1. a catalog record per volume in state `taking`, with a fresh layer number (seq);
//   2. PREPARE to every peer of the group: each closes the volumes' gates (new host requests
//      wait) and answers READY once the requests already inside have finished, forwarded
//      parts included. A peer that does not answer within prepareMsMax aborts the snapshot;
//   3. TAKE to every peer: each freezes its store's layer of each volume (O(1): an epoch) and
//      reports the pages it is moving away (where each piece's data is at the cut);
//   4. RELEASE to every peer: gates open. Release comes only after every peer has frozen, so a
//      request released early on one peer can never reach an owner that has not frozen yet
//      (which could put a write in the snapshot without one that happened before it);
//   5. the record becomes `ready`, with the routes at the cut (where each page's layer lives).
// Any failure before 5 releases everything and deletes the records; peers drop any layer
// they froze when the record goes (the catalog watch), or at their next start.
//
// While a volume's gate is closed on a peer, that peer's page moves of the volume do not
// copy or commit (the migrator asks `holding`), so the routes and piece cursors cannot change
// between PREPARE and RELEASE. A participant's gates reopen by themselves after holdMsMax
// (a coordinator that died): such a peer refuses a late TAKE, so the snapshot aborts.

import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { NotFoundError, PeersanError } from '../errors';
import type { StoreVolume } from '../store/page-store';
import type { VolumeGate } from './gate';
import {
  createSnapshotRecord, deleteSnapshotRecord, nextSnapshotSeq, updateSnapshotRecord, validateSnapshotName,
  type MovingAtCut, type SnapshotMode, type SnapshotRecord,
} from './records';

export interface PrepareSnapshot {
  snapshotId: string;
  volumeIds: string[];
}

export interface TakeSnapshot {
  snapshotId: string;
  layers: { volumeId: string; seq: number }[];
}

export interface SnapshotRpc {
  prepare(peer: string, req: PrepareSnapshot): Promise<void>;
  take(peer: string, req: TakeSnapshot): Promise<MovingAtCut[]>;
  /** Open the gates; the time this peer held host I/O, in ms. */
  release(peer: string, snapshotId: string): Promise<number>;
}

export interface SnapshotServiceOptions {
  self: string;
  groupPeers: readonly string[];
  catalog: Catalog;
  gate(volumeId: string): VolumeGate | undefined;
  store(volumeId: string): StoreVolume | undefined;
  /** Pages of the volume this peer is moving away, with their piece cursors. */
  moving(volumeId: string): MovingAtCut[];
  /** Resolves when no page-move step of the volume is running on this peer. */
  idle(volumeId: string): Promise<void>;
  rpc: SnapshotRpc;
  log: Logger;
  event?(message: string, volume: string): void;
  /** Fault injection (tests): called at named points; may kill the process. */
  crashPoint?(point: string): void;
}

/** How long a peer may take to drain its requests and answer PREPARE. */
export const prepareMsMax = 3_000;
/**
 * How long PREPARE may spend flushing dirty data before it closes the gates. It adds to the
 * drain's prepareMsMax: a peer that needs both in full misses the coordinator's PREPARE
 * deadline (prepareMsMax + 1 s), and the snapshot aborts, as it would on the drain alone.
 */
export const preflushMsMax = 1_000;
/** A peer reopens its gates by itself this long after PREPARE (the coordinator is gone). */
export const holdMsMax = 10_000;

export interface SnapshotView {
  volume: string;
  name: string;
  seq: number;
  mode: SnapshotMode;
  group: string;
  state: string;
  createdAtMs: number;
  heldMs: number;
  tookMs: number;
  targetName: string;
}

export class SnapshotService {
  private readonly o: SnapshotServiceOptions;
  /** Snapshots this peer has prepared and not released: their volumes. */
  private readonly prepared = new Map<string, { volumeIds: string[]; heldMs: number; flushMs: number; drainMs: number }>();
  /** Test only: freeze without the barrier (to show the causal checker finds what it must). */
  uncoordinated = false;

  constructor(opts: SnapshotServiceOptions) {
    this.o = opts;
  }

  // ---- participant ----------------------------------------------------------------------------

  async prepare(req: PrepareSnapshot): Promise<void> {
    const closed: VolumeGate[] = [];
    const entry = { volumeIds: req.volumeIds, heldMs: 0, flushMs: 0, drainMs: 0 };
    this.prepared.set(req.snapshotId, entry);
    const flushStarted = performance.now();
    await this.preflush(req.volumeIds);
    entry.flushMs = performance.now() - flushStarted;
    // Aborted meanwhile (another peer failed PREPARE; RELEASE came): closing now would hold hosts for nothing.
    if (this.prepared.get(req.snapshotId) !== entry) throw new PeersanError(`snapshot ${req.snapshotId} was released while ${this.o.self} prepared it`);
    const started = performance.now();
    try {
      await Promise.all(
        req.volumeIds.map(async (id) => {
          const gate = this.o.gate(id);
          if (!gate) throw new PeersanError(`volume ${id} is not open on ${this.o.self}`);
          await gate.close(req.snapshotId, prepareMsMax, holdMsMax);
          closed.push(gate);
          // Page moves stop at their next step while the gate is closed; wait for the current one.
          await this.o.idle(id);
        }),
      );
    } catch (err) {
      for (const g of closed) g.release(req.snapshotId);
      this.prepared.delete(req.snapshotId);
      throw err;
    }
    entry.drainMs = performance.now() - started;
  }

  /**
   * Write the volumes' dirty data back while hosts still run, so that the fdatasync of TAKE,
   * inside the hold, has only the last moments' writes left (measured by bench/snapshot.js:
   * that fdatasync was most of the hold). Only a head start: bounded, failures ignored.
   */
  private async preflush(volumeIds: string[]): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<void>((r) => (timer = setTimeout(r, preflushMsMax)));
    const flushed = Promise.all(volumeIds.map((id) => this.o.store(id)?.flush().catch(() => undefined)));
    await Promise.race([flushed, late]);
    clearTimeout(timer);
  }

  async take(req: TakeSnapshot): Promise<MovingAtCut[]> {
    // Test only: die after READY reached the coordinator (it sent TAKE) and before freezing.
    // (Dying in prepare() once it resolved comes too early: the reply may not have left yet.)
    this.o.crashPoint?.('snapshot-after-ready');
    const p = this.prepared.get(req.snapshotId);
    if (!p) throw new PeersanError(`snapshot ${req.snapshotId} was not prepared on ${this.o.self}`);
    for (const id of p.volumeIds) {
      if (!this.o.gate(id)?.isClosed) throw new PeersanError(`peer ${this.o.self} stopped holding I/O for snapshot ${req.snapshotId} (held longer than ${holdMsMax} ms)`);
    }
    const moving: MovingAtCut[] = [];
    const started = performance.now();
    for (const { volumeId, seq } of req.layers) {
      const store = this.o.store(volumeId);
      if (!store) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
      moving.push(...this.o.moving(volumeId));
      await store.snapshot(String(seq));
    }
    // Where the hold goes on this peer: draining requests (PREPARE) and freezing the layers
    // (TAKE: the store's fdatasync and synced batch); the rest is round trips. The pre-flush
    // comes before the hold.
    this.o.log.info({ snapshotId: req.snapshotId, flushMs: round(p.flushMs), drainMs: round(p.drainMs), freezeMs: round(performance.now() - started) }, 'snapshot layers frozen');
    return moving;
  }

  release(snapshotId: string): number {
    const p = this.prepared.get(snapshotId);
    if (!p) return 0;
    this.prepared.delete(snapshotId);
    let held = 0;
    for (const id of p.volumeIds) held = Math.max(held, this.o.gate(id)?.release(snapshotId) ?? 0);
    return held;
  }

  /** True while a snapshot holds the volume on this peer (page moves wait). */
  holding(volumeId: string): boolean {
    return this.o.gate(volumeId)?.isClosed === true;
  }

  // ---- coordinator ----------------------------------------------------------------------------

  async create(volumeNames: string[], opts: { name?: string; mode?: SnapshotMode; group?: string }): Promise<SnapshotView[]> {
    const mode = opts.mode ?? 'barrier';
    if (mode !== 'barrier') throw new PeersanError('timestamp-mode snapshots are not built yet; use --mode barrier', 'PEERSAN_ERR_INVALID_ARGUMENT');
    if (volumeNames.length === 0) throw new PeersanError('name at least one volume', 'PEERSAN_ERR_INVALID_ARGUMENT');
    const volumes = [...new Set(volumeNames)].map((n) => this.o.catalog.require(n));
    const name = opts.name ?? defaultName();
    validateSnapshotName(name);
    if (volumes.length > 1 && !opts.group) throw new PeersanError('a snapshot of several volumes is a consistency group: give it --group NAME', 'PEERSAN_ERR_INVALID_ARGUMENT');
    const started = performance.now();
    const snapshotId = randomBytes(8).toString('hex');
    const records: { r: SnapshotRecord; version: number }[] = [];
    try {
      for (const v of volumes) {
        const r = this.recordFor(v, name, await nextSnapshotSeq(this.o.catalog.store, v.id), mode, opts.group ?? '');
        records.push({ r, version: await createSnapshotRecord(this.o.catalog.store, r) });
      }
      const held = await this.barrier(snapshotId, volumes, records.map((x) => x.r));
      const tookMs = performance.now() - started;
      for (const x of records) {
        x.r.state = 'ready';
        x.r.heldMs = round(held);
        x.r.tookMs = round(tookMs);
        await updateSnapshotRecord(this.o.catalog.store, x.r, x.version);
        this.o.event?.(`snapshot ${x.r.name} of ${x.r.volume} taken (${mode}; hosts held ${round(held)} ms, ${round(tookMs)} ms in all)`, x.r.volume);
      }
      this.o.log.info({ volumes: volumeNames, name, heldMs: round(held), tookMs: round(tookMs) }, 'snapshot taken');
      return records.map((x) => viewOf(x.r));
    } catch (err) {
      for (const x of records) await deleteSnapshotRecord(this.o.catalog.store, x.r.volumeId, x.r.name).catch(() => undefined);
      this.o.log.warn({ volumes: volumeNames, name, reason: (err as Error).message }, 'snapshot aborted');
      throw err instanceof PeersanError && err.code === 'PEERSAN_ERR_ALREADY_EXISTS' ? err : new PeersanError(`snapshot aborted, hosts released: ${(err as Error).message}`, 'PEERSAN_ERR_SNAPSHOT_ABORTED');
    }
  }

  /** PREPARE, TAKE and RELEASE on every peer; the longest hold, in ms. */
  private async barrier(snapshotId: string, volumes: VolumeRecord[], records: SnapshotRecord[]): Promise<number> {
    const peers = this.o.groupPeers;
    const volumeIds = volumes.map((v) => v.id);
    const layers = records.map((r) => ({ volumeId: r.volumeId, seq: r.seq }));
    const releaseAll = async (): Promise<number> => {
      const held = await Promise.all(peers.map((p) => this.o.rpc.release(p, snapshotId).catch(() => 0)));
      return Math.max(0, ...held);
    };
    if (this.uncoordinated) {
      // Test only: each peer freezes on its own, one after another, with nothing held.
      for (const p of peers) {
        await this.o.rpc.prepare(p, { snapshotId, volumeIds: [] });
        await this.o.rpc.take(p, { snapshotId, layers });
        await this.o.rpc.release(p, snapshotId);
        await new Promise((r) => setTimeout(r, Math.random() * 10));
      }
      this.captureRoutes(volumes, records, []);
      return 0;
    }
    try {
      await Promise.all(peers.map((p) => within(named('PREPARE', this.o.rpc.prepare(p, { snapshotId, volumeIds })), prepareMsMax + 1_000, `peer ${p} did not answer PREPARE`)));
      this.captureRoutes(volumes, records, []);
      const moving = await Promise.all(peers.map((p) => within(named('TAKE', this.o.rpc.take(p, { snapshotId, layers })), prepareMsMax, `peer ${p} did not answer TAKE`)));
      this.captureRoutes(volumes, records, moving.flat());
    } catch (err) {
      await releaseAll();
      throw err;
    }
    return releaseAll();
  }

  /** Where each page's layer lives: the routes at the cut (frozen: moves wait while gates are closed). */
  private captureRoutes(volumes: VolumeRecord[], records: SnapshotRecord[], moving: MovingAtCut[]): void {
    volumes.forEach((v, i) => {
      const table = this.o.catalog.routes(v);
      const pages = Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks);
      records[i].moved = [];
      for (let page = 0; page < pages; page++) {
        const route = table.route(page);
        if (route.version > 1) records[i].moved.push([page, route]);
      }
      records[i].moving = moving.filter((m) => m.volumeId === v.id);
    });
  }

  private recordFor(v: VolumeRecord, name: string, seq: number, mode: SnapshotMode, group: string): SnapshotRecord {
    return {
      volumeId: v.id, volume: v.name, name, seq, mode, group, state: 'taking', createdAtMs: Date.now(), heldMs: 0, tookMs: 0,
      sizeBytes: v.sizeBytes, blockBytes: v.blockBytes, peers: v.peers, pageBlocks: v.pageBlocks, moved: [], moving: [],
    };
  }

  async delete(volumeName: string, name: string): Promise<void> {
    const v = this.o.catalog.require(volumeName);
    if (!(await deleteSnapshotRecord(this.o.catalog.store, v.id, name))) throw new NotFoundError(`volume ${volumeName} has no snapshot named ${name}`);
    this.o.event?.(`snapshot ${name} of ${volumeName} deleted`, volumeName);
  }
}

export function viewOf(r: SnapshotRecord): SnapshotView {
  return {
    volume: r.volume, name: r.name, seq: r.seq, mode: r.mode, group: r.group, state: r.state, createdAtMs: r.createdAtMs,
    heldMs: r.heldMs, tookMs: r.tookMs, targetName: `iqn.2026-11.io.peersan:${r.volume}.${r.name}`,
  };
}

function defaultName(): string {
  return `snap-${new Date().toISOString().replace(/[-:]/g, '').replace(/\..*/, '').replace('T', '-').toLowerCase()}`;
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

/** A barrier RPC whose failure says which step it was (an abort then tells where it stopped). */
async function named<T>(step: 'PREPARE' | 'TAKE', p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw new PeersanError(`${step} failed: ${(err as Error).message}`);
  }
}

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new PeersanError(`${what} within ${ms} ms`)), ms)));
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}
