// Snapshots (DESIGN.md 6) on one peer, both roles, as the driver of two state machines whose
// heads state the ordering rules: the coordinator's sequencing (coordinator.ts: which step goes
// to which peer when, deadlines, aborts), driven by `create` (RPCs, timers, catalog records),
// and the participant's (participant.ts: what each request may do in each snapshot's state,
// holds, expiry), driven by prepare/take/release (the effects: pre-flush, gates, freezes,
// recordings). What each peer does at each step, in order:
//
// Barrier mode, for one volume or a consistency group (the coordinator is the peer that got
// the command):
//   1. a catalog record per volume in state `taking`, with a fresh layer number (seq);
//   2. PREPARE to every peer of the group: each closes the volumes' gates (new host requests
//      wait) and answers READY once the requests already inside have finished, forwarded
//      parts included, and the replicated changes in flight where it is a page's primary
//      (each copy applied it or was dropped). A peer that does not answer within prepareMsMax
//      aborts the snapshot;
//   3. TAKE to every peer: each freezes its store's layer of each volume (O(1): an epoch) and
//      reports the pages it is moving away (where each piece's data is at the cut);
//   4. RELEASE to every peer: gates open. Release comes only after every peer has frozen, so a
//      request released early on one peer can never reach an owner that has not frozen yet
//      (which could put a write in the snapshot without one that happened before it);
//   5. the record becomes `ready`, with the routes at the cut (where each page's layer lives).
// Any failure before 5 releases everything and deletes the records; peers drop any layer
// they froze when the record goes (the catalog watch), or at their next start.
//
// While a snapshot holds a volume on a peer (from PREPARE to RELEASE), that peer's page moves
// of the volume do not copy or commit (the migrator waits on `hold`, which resolves when the
// snapshot lets go), so the routes and piece cursors cannot change in between. A participant's
// gates reopen by themselves after holdMsMax (a coordinator that died), and it lets go of the
// volumes then too: such a peer refuses a late TAKE, so the snapshot aborts.
//
// Timestamp mode (`--mode timestamp`; hlc.ts, stamp-log.ts): host writes carry the hybrid-
// clock stamp they got at the peer that received them. Nothing is held:
//   1. PREPARE: each peer starts recording the changes that reach its store for the volumes
//      (stamp and data), freezes the layers (as TAKE does in barrier mode) and answers with
//      its clock. Every write that reached a store before its freeze was stamped below that
//      peer's clock then;
//   2. the cut T = past every clock in the answers (and the coordinator's): so every write
//      stamped at or after T reaches its owner after the freeze, and is recorded;
//   3. TAKE(T): each peer moves its clock past T (new host writes are stamped after T) and
//      waits until none of its host writes stamped before T is still in flight, and, as a
//      page's primary, none of the replicated changes stamped before T (every copy applied
//      it, recorded if after its freeze, or was dropped from the in-sync set, which the
//      record's routes then narrow: a change whose host peer died is waited for by no gate);
//   4. FINISH: each peer writes its recorded changes stamped before T into the frozen layers,
//      in the order they reached the store (stamp-log.ts says why). A write stamped before T
//      that was still on its way at the freeze is now in the snapshot; one stamped after T
//      that arrived before FINISH is not.
// Moves of the volumes pause from PREPARE to FINISH, as in barrier mode. Any failure aborts:
// recordings are dropped and the records deleted (the layers go with them).

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import type { Env, TimerHandle, Timers } from '../env/env';
import { NotFoundError, PeersanError } from '../errors';
import { inSyncOf, RouteTable, type Route } from '../routing/table';
import type { StoreVolume } from '../store/page-store';
import type { VolumeGate } from './gate';
import type { HybridClock } from './hlc';
import type { StampedChange, StampLog } from './stamp-log';
import {
  prepareMsMax, sealMsMax, SnapshotCoordinator, type Answer, type CoordinatorAction, type CoordinatorEvent, type CoordinatorPlan, type Send,
} from './coordinator';
import { holdMsMax, SnapshotParticipant, type ParticipantAction, type ParticipantEvent } from './participant';
import {
  createSnapshotRecord, deleteSnapshotRecord, narrowInSync, nextSnapshotSeq, routesAtCut, updateSnapshotRecord, validateSnapshotName, withoutSuspects,
  type FrozenReport, type MovingAtCut, type SnapshotMode, type SnapshotRecord, type SuspectAtCut,
} from './records';

export interface PrepareSnapshot {
  snapshotId: string;
  volumeIds: string[];
  /** Absent: barrier. */
  mode?: SnapshotMode;
  /** Timestamp mode freezes at PREPARE: the layers to freeze. */
  layers?: { volumeId: string; seq: number }[];
}

/** Timestamp mode: what the peer's freeze reports (barrier mode: empty lists, reported by TAKE). */
export interface PrepareReply extends FrozenReport {
  /** Timestamp mode: this peer's clock once its layers froze. */
  clock: number;
}

export interface TakeSnapshot {
  snapshotId: string;
  layers: { volumeId: string; seq: number }[];
  /** Timestamp mode: the cut T. */
  cut?: number;
}

export interface SnapshotRpc {
  /** Resolves once the peer is connected (bounded): checked before anything is held or frozen. */
  reach(peer: string): Promise<void>;
  prepare(peer: string, req: PrepareSnapshot): Promise<PrepareReply>;
  take(peer: string, req: TakeSnapshot): Promise<FrozenReport>;
  /**
   * Barrier: open the gates; the time this peer held host I/O, in ms. Timestamp: write the
   * recorded changes before the cut into the layers (or, with `abort`, drop them); with
   * `finish`, a peer that does not know the snapshot refuses (it restarted since PREPARE).
   */
  release(peer: string, snapshotId: string, abort: boolean, finish?: boolean): Promise<number>;
}

export interface SnapshotServiceOptions {
  self: string;
  /** Clock (durations, record stamps), timers (holds, deadlines) and randomness (snapshot ids). */
  env: Env;
  /** Every peer of the group now, this one included: each takes part in a snapshot. */
  groupPeers(): readonly string[];
  catalog: Catalog;
  gate(volumeId: string): VolumeGate | undefined;
  store(volumeId: string): StoreVolume | undefined;
  /** The recorder above the volume's store (timestamp mode). */
  stampLog(volumeId: string): StampLog | undefined;
  clock: HybridClock;
  /** Pages of the volume this peer is moving away, with their piece cursors. */
  moving(volumeId: string): MovingAtCut[];
  /** Pages of the volume whose copy here may lack writes it acknowledged (the activity log's suspects: records.ts SuspectAtCut). */
  suspect(volumeId: string): Iterable<number>;
  /** Resolves once no replicated change stamped before `t` that this peer is primary of is in flight (replicated.ts changesBefore). */
  changesBefore(volumeId: string, t: number): Promise<void> | undefined;
  /**
   * Copies of the volume's pages this peer is primary of that may lack one of its changes, their
   * drop not made yet (replicated.ts undroppedCopies), or that may differ from each other until
   * this peer reconciles them (failover.ts unreconciledCopies).
   */
  undropped(volumeId: string): Iterable<{ page: number; peer: string }>;
  /** Resolves when no page-move step of the volume is running on this peer. */
  idle(volumeId: string): Promise<void>;
  rpc: SnapshotRpc;
  log: Logger;
  event?(message: string, volume: string): void;
}

/**
 * How long PREPARE may spend flushing dirty data before it closes the gates. It adds to the
 * drain's prepareMsMax: a peer that needs both in full misses the coordinator's PREPARE
 * deadline (prepareMsMax + 1 s), and the snapshot aborts, as it would on the drain alone.
 */
export const preflushMsMax = 1_000;
/** Timestamp mode: data recorded per volume and peer between PREPARE and FINISH, at most. */
export const stampLogBytesMax = 256 * 1024 * 1024;

export { holdMsMax, prepareMsMax, sealMsMax };

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

/** A snapshot this peer coordinates: what its records need, and the records written so far (with their catalog versions). */
interface Taking {
  volumes: VolumeRecord[];
  name: string;
  mode: SnapshotMode;
  group: string;
  /** Monotonic ms when the command started; tookMs is measured from here when the first record is published. */
  started: number;
  tookMs?: number;
  records: { r: SnapshotRecord; version: number }[];
  /** Per volume, the routes that had changed before anything froze (narrowInSync). */
  before: Map<number, Route>[];
}

/** A volume held by snapshots on this peer: the promise its page moves wait on. */
interface Hold {
  released: Promise<void>;
  letGo(): void;
}

export class SnapshotService {
  protected readonly o: SnapshotServiceOptions;
  /** Which snapshots this peer has prepared, in which state (participant.ts); this class performs its actions. */
  private readonly participant: SnapshotParticipant;
  /** Requests (PREPARE, TAKE, RELEASE) the participant has not answered yet. */
  private readonly requests = new Map<number, { resolve(value: unknown): void; reject(err: Error): void }>();
  private lastRequest = 0;
  /** The participant's expiry timers. */
  private readonly expiries = new Map<number, TimerHandle>();
  /** Volumes held by snapshots (barrier: gates closed; timestamp: recording): their page moves wait. */
  private readonly holds = new Map<string, Hold>();
  /** Timestamp mode: changes that reached this peer's store after its freeze, stamped before the cut, written into layers at FINISH. */
  lateChangesApplied = 0;
  /**
   * Timestamp mode, per snapshot recorded here: the copies this peer saw leave a page's in-sync
   * set from its freeze on (watchDrops), and how to stop watching.
   */
  private readonly drops = new Map<string, { dropped: SuspectAtCut[]; stop: (() => void)[] }>();

  constructor(opts: SnapshotServiceOptions) {
    this.o = opts;
    this.participant = new SnapshotParticipant({ self: opts.self, clock: () => opts.clock.now() });
  }

  // ---- participant ----------------------------------------------------------------------------

  prepare(req: PrepareSnapshot): Promise<PrepareReply> {
    return this.request((r) => ({ kind: 'prepare', req: r, prepare: req }));
  }

  take(req: TakeSnapshot): Promise<FrozenReport> {
    return this.request((r) => ({ kind: 'take', req: r, take: req }));
  }

  release(snapshotId: string, abort = false, finish = false): Promise<number> {
    return this.request((r) => ({ kind: 'release', req: r, snapshotId, abort, finish }));
  }

  /**
   * While a snapshot holds the volume on this peer: a promise that resolves when the last one
   * lets go (page moves take no step until then). Undefined when nothing holds it.
   */
  hold(volumeId: string): Promise<void> | undefined {
    return this.holds.get(volumeId)?.released;
  }

  /** A request to the participant: resolves with its answer, rejects with its refusal. */
  private request<T>(event: (req: number) => ParticipantEvent): Promise<T> {
    const req = ++this.lastRequest;
    const answered = new Promise<T>((resolve, reject) => this.requests.set(req, { resolve: resolve as (v: unknown) => void, reject }));
    this.participate(event(req));
    return answered;
  }

  private participate(ev: ParticipantEvent): void {
    for (const a of this.participant.step(ev)) this.act(a);
  }

  /** Run an effect of request `req`; the participant hears how it ended. */
  private effect(req: number, run: () => Promise<ParticipantEvent>): void {
    run().then((ev) => this.participate(ev), (error: Error) => this.participate({ kind: 'failed', req, error }));
  }

  private act(a: ParticipantAction): void {
    const { timers, clock } = this.o.env;
    switch (a.kind) {
      case 'answer':
      case 'refuse': {
        const r = this.requests.get(a.req);
        this.requests.delete(a.req);
        return a.kind === 'answer' ? r?.resolve(a.value) : r?.reject(a.error);
      }
      case 'arm':
        this.expiries.set(a.expiry, timers.setTimeout(() => this.participate({ kind: 'expired', snapshotId: a.snapshotId, expiry: a.expiry }), a.ms).unref());
        return;
      case 'disarm':
        timers.clearTimeout(this.expiries.get(a.expiry));
        this.expiries.delete(a.expiry);
        return;
      case 'hold': {
        let letGo!: () => void;
        const released = new Promise<void>((r) => (letGo = r));
        this.holds.set(a.volumeId, { released, letGo });
        return;
      }
      case 'letGo':
        this.holds.get(a.volumeId)?.letGo();
        this.holds.delete(a.volumeId);
        return;
      case 'preflush':
        return this.effect(a.req, async () => {
          const started = clock.monotonicMs();
          await this.preflush(a.volumeIds);
          return { kind: 'flushed', req: a.req, ms: clock.monotonicMs() - started };
        });
      case 'close':
        return this.effect(a.req, async () => ({ kind: 'closed', req: a.req, ms: await this.closeGates(a.snapshotId, a.volumeIds) }));
      case 'freeze':
        return this.effect(a.req, async () => ({ kind: 'frozen', req: a.req, ...(await this.freeze(a)) }));
      case 'record':
        return this.effect(a.req, async () => ({ kind: 'frozen', req: a.req, ...(await this.recordAndFreeze(a.snapshotId, a.layers)) }));
      case 'seal':
        return this.effect(a.req, async () => {
          this.o.clock.observe(a.cut);
          await within(timers, Promise.all(a.volumeIds.flatMap((id) => [this.o.gate(id)?.writesBefore(a.cut), this.o.changesBefore(id, a.cut)])), sealMsMax, `host writes stamped before the cut did not finish on ${this.o.self}`);
          // A change before T settled with a copy's drop still to be made: that copy froze without it.
          const suspect: SuspectAtCut[] = [];
          for (const id of a.volumeIds) this.undroppedInto(id, suspect);
          this.droppedInto(a.snapshotId, suspect);
          return { kind: 'sealed', req: a.req, suspect };
        });
      case 'finish':
        return this.effect(a.req, async () => {
          await this.finish(a.snapshotId, a.layers, a.cut);
          return { kind: 'finished', req: a.req };
        });
      case 'open': {
        let held = 0;
        for (const id of a.volumeIds) held = Math.max(held, this.o.gate(id)?.release(a.snapshotId) ?? 0);
        if (a.req !== undefined) this.act({ kind: 'answer', req: a.req, value: held });
        return;
      }
      case 'dropRecording':
        this.o.stampLog(a.volumeId)?.drop(a.snapshotId);
        this.unwatchDrops(a.snapshotId);
        return;
    }
  }

  /** Barrier PREPARE: close the volumes' gates and drain them, and wait for the page-move step in progress; ms it took. */
  private async closeGates(snapshotId: string, volumeIds: string[]): Promise<number> {
    const started = this.o.env.clock.monotonicMs();
    const closed: VolumeGate[] = [];
    try {
      await Promise.all(
        volumeIds.map(async (id) => {
          const gate = this.o.gate(id);
          if (!gate) throw new PeersanError(`volume ${id} is not open on ${this.o.self}`);
          await gate.close(snapshotId, prepareMsMax, holdMsMax);
          closed.push(gate);
          // Page moves stop at their next step while the gate is closed; wait for the current one.
          await this.o.idle(id);
          // And for the replicated changes in flight here as a page's primary: one whose host
          // peer died is drained by no gate, and a copy it has not reached would freeze without
          // it (seed 128's barrier twin). Each copy applies it or is dropped before READY.
          await this.o.changesBefore(id, this.o.clock.now());
        }),
      );
    } catch (err) {
      for (const g of closed) g.release(snapshotId);
      throw err;
    }
    return this.o.env.clock.monotonicMs() - started;
  }

  /** Barrier TAKE: freeze the layers while every gate is still closed; the pages this peer is moving away, and its suspect copies. */
  private async freeze(a: Extract<ParticipantAction, { kind: 'freeze' }>): Promise<FrozenReport> {
    for (const id of a.volumeIds) {
      if (!this.o.gate(id)?.isClosed) throw new PeersanError(`peer ${this.o.self} stopped holding I/O for snapshot ${a.snapshotId} (held longer than ${holdMsMax} ms)`);
    }
    const report: FrozenReport = { moving: [], suspect: [] };
    const started = this.o.env.clock.monotonicMs();
    for (const { volumeId, seq } of a.layers) {
      const store = this.o.store(volumeId);
      if (!store) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
      report.moving.push(...this.o.moving(volumeId));
      await this.frozenSuspects(volumeId, report.suspect, async () => void (await store.snapshot(String(seq), this.o.env.clock.nowMs())));
    }
    // Where the hold goes on this peer: draining requests (PREPARE) and freezing the layers
    // (TAKE: the store's fdatasync and synced batch); the rest is round trips. The pre-flush
    // comes before the hold.
    this.o.log.info({ snapshotId: a.snapshotId, flushMs: round(a.flushMs), drainMs: round(a.drainMs), freezeMs: round(this.o.env.clock.monotonicMs() - started) }, 'snapshot layers frozen');
    return report;
  }

  /** Timestamp PREPARE, volume by volume: record the changes that reach the store from now, then freeze; the pages moving away, and the suspect copies. */
  private async recordAndFreeze(snapshotId: string, layers: { volumeId: string; seq: number }[]): Promise<FrozenReport> {
    const report: FrozenReport = { moving: [], suspect: [] };
    for (const { volumeId, seq } of layers) {
      const store = this.o.store(volumeId);
      const log = this.o.stampLog(volumeId);
      if (!store || !log) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
      // Page moves stop at their next step; wait for the current one.
      await this.o.idle(volumeId);
      log.begin(snapshotId);
      this.watchDrops(snapshotId, volumeId);
      report.moving.push(...this.o.moving(volumeId));
      await this.frozenSuspects(volumeId, report.suspect, async () => void (await store.snapshot(String(seq), this.o.env.clock.nowMs())));
      log.frozen(snapshotId);
    }
    return report;
  }

  /**
   * Run `freeze` (the volume's layer), and add to `out` the pages suspect here before OR after
   * it: one trusted meanwhile (its whole resync ended) may have frozen before the resync wrote
   * it, one distrusted meanwhile lacked its writes before too. Likewise the other copies whose
   * drop this peer, their primary, has not made yet (undroppedInto).
   */
  private async frozenSuspects(volumeId: string, out: SuspectAtCut[], freeze: () => Promise<void>): Promise<void> {
    const before = new Set(this.o.suspect(volumeId));
    const undropped: SuspectAtCut[] = [];
    this.undroppedInto(volumeId, undropped);
    await freeze();
    for (const page of new Set([...before, ...this.o.suspect(volumeId)])) out.push({ volumeId, page, peer: this.o.self });
    this.undroppedInto(volumeId, undropped);
    out.push(...undropped);
  }

  /**
   * Add to `out` the copies of the volume's pages, primary here, that may lack a change this
   * peer applied (their drop waits for the catalog): such a copy may still be in the page's
   * in-sync set where the coordinator reads it, yet it holds no layer of the page (seed 138).
   */
  private undroppedInto(volumeId: string, out: SuspectAtCut[]): void {
    for (const { page, peer } of this.o.undropped(volumeId)) {
      if (!out.some((x) => x.volumeId === volumeId && x.page === page && x.peer === peer)) out.push({ volumeId, page, peer });
    }
  }

  /**
   * Timestamp mode, from this peer's freeze of the volume until TAKE(T) is sealed: note each copy
   * that leaves a page's in-sync set. A copy dropped for a change stamped before T froze without
   * it, and its resync brings back live data only; by the time the coordinator reads the routes
   * again (publishRecord) the copy may be back in sync, and it would be counted as a holder of a
   * layer that lacks the change (simulator, seed 468: dropped during TAKE's wait, resynced, in
   * sync again at publish). A page's primary learns its own drops at once, so every drop of a
   * change it waits for in TAKE is seen here before TAKE answers. A drop for a later change only
   * leaves a good layer out: the copy takes it from the holders afterwards (layer-sync.ts).
   */
  private watchDrops(snapshotId: string, volumeId: string): void {
    const volume = this.o.catalog.volumeById(volumeId);
    if (!volume) return;
    const table = this.o.catalog.routes(volume);
    // The routes now; a listener hears only the route that replaces one.
    const start = new RouteTable(table.peers, table.pageBlocks, new Map(table.changed()), table.copyCount);
    const last = new Map<number, readonly string[]>();
    const w = this.drops.get(snapshotId) ?? { dropped: [], stop: [] };
    this.drops.set(snapshotId, w);
    w.stop.push(table.onLearn((page, route) => {
      const now = inSyncOf(route);
      for (const peer of last.get(page) ?? inSyncOf(start.route(page))) if (!now.includes(peer)) w.dropped.push({ volumeId, page, peer });
      last.set(page, now);
    }));
  }

  /** The copies watchDrops saw leave an in-sync set, added to `out`; the watch ends. */
  private droppedInto(snapshotId: string, out: SuspectAtCut[]): void {
    for (const x of this.drops.get(snapshotId)?.dropped ?? []) {
      if (!out.some((y) => y.volumeId === x.volumeId && y.page === x.page && y.peer === x.peer)) out.push(x);
    }
    this.unwatchDrops(snapshotId);
  }

  private unwatchDrops(snapshotId: string): void {
    for (const stop of this.drops.get(snapshotId)?.stop ?? []) stop();
    this.drops.delete(snapshotId);
  }

  /** Timestamp FINISH: the recorded changes before the cut go into the frozen layers. */
  private async finish(snapshotId: string, layers: { volumeId: string; seq: number }[], cut: number): Promise<void> {
    this.unwatchDrops(snapshotId);
    const started = this.o.env.clock.monotonicMs();
    let changes = 0;
    for (const { volumeId, seq } of layers) {
      const log = this.o.stampLog(volumeId);
      const store = this.o.store(volumeId);
      if (!log || !store) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
      const before = log.end(snapshotId, cut);
      changes += before.length;
      this.lateChangesApplied += before.filter((c) => c.afterFreeze).length;
      await this.completeLayer(store, seq, before);
    }
    this.o.log.info({ snapshotId, changes, finishMs: round(this.o.env.clock.monotonicMs() - started) }, 'timestamp snapshot layers completed');
  }

  /**
   * Timestamp mode, FINISH on one volume: the changes recorded since the freeze and stamped
   * before the cut (in the store's order) go into the frozen layer `seq`. Without them the layer is
   * this peer's own freeze, and peers froze at different times.
   */
  protected async completeLayer(store: StoreVolume, seq: number, changes: StampedChange[]): Promise<void> {
    if (changes.length > 0) await store.writeIntoSnapshot(String(seq), changes);
  }

  /**
   * Write the volumes' dirty data back while hosts still run, so that the fdatasync of TAKE,
   * inside the hold, has only the last moments' writes left (measured by bench/snapshot.js:
   * that fdatasync was most of the hold). Only a head start: bounded, failures ignored.
   */
  private async preflush(volumeIds: string[]): Promise<void> {
    const { timers } = this.o.env;
    let timer: TimerHandle | undefined;
    const late = new Promise<void>((r) => (timer = timers.setTimeout(r, preflushMsMax)));
    const flushed = Promise.all(volumeIds.map((id) => this.o.store(id)?.flush().catch(() => undefined)));
    await Promise.race([flushed, late]);
    timers.clearTimeout(timer);
  }

  // ---- coordinator ----------------------------------------------------------------------------

  async create(volumeNames: string[], opts: { name?: string; mode?: SnapshotMode; group?: string }): Promise<SnapshotView[]> {
    const mode = opts.mode ?? 'barrier';
    if (mode !== 'barrier' && mode !== 'timestamp') throw new PeersanError(`unknown snapshot mode "${mode}": barrier or timestamp`, 'PEERSAN_ERR_INVALID_ARGUMENT');
    if (volumeNames.length === 0) throw new PeersanError('name at least one volume', 'PEERSAN_ERR_INVALID_ARGUMENT');
    const volumes = [...new Set(volumeNames)].map((n) => this.o.catalog.require(n));
    const name = opts.name ?? defaultName(this.o.env.clock.nowMs());
    validateSnapshotName(name);
    if (volumes.length > 1 && !opts.group) throw new PeersanError('a snapshot of several volumes is a consistency group: give it --group NAME', 'PEERSAN_ERR_INVALID_ARGUMENT');
    const before = volumes.map((v) => new Map(this.o.catalog.routes(v).changed()));
    const taking: Taking = { volumes, name, mode, group: opts.group ?? '', started: this.o.env.clock.monotonicMs(), records: [], before };
    const snapshotId = this.o.env.random.bytes(8).toString('hex');
    const coordinator = this.coordinator({ snapshotId, mode, volumeIds: volumes.map((v) => v.id), peers: this.o.groupPeers(), clock: () => this.o.clock.now() });
    try {
      const held = await this.drive(coordinator, taking);
      this.o.log.info({ volumes: volumeNames, name, heldMs: round(held), tookMs: taking.tookMs }, 'snapshot taken');
      return taking.records.map((x) => viewOf(x.r));
    } catch (err) {
      this.o.log.warn({ volumes: volumeNames, name, reason: (err as Error).message }, 'snapshot aborted');
      throw err instanceof PeersanError && err.code === 'PEERSAN_ERR_ALREADY_EXISTS' ? err : new PeersanError(`snapshot aborted, hosts released: ${(err as Error).message}`, 'PEERSAN_ERR_SNAPSHOT_ABORTED');
    }
  }

  /** The coordinator of one snapshot (coordinator.ts); a negative control may vary one of its steps. */
  protected coordinator(plan: CoordinatorPlan): SnapshotCoordinator {
    return new SnapshotCoordinator(plan);
  }

  /**
   * Run a coordinator to its end: perform its actions in the order given, and feed it what
   * each one led to (an RPC's answer or failure, a timer, a record written). Resolves with the
   * longest hold once it reports `taken`; rejects with its reason once it reports `aborted`.
   */
  private drive(m: SnapshotCoordinator, taking: Taking): Promise<number> {
    const { timers } = this.o.env;
    const armed = new Map<string, TimerHandle>();
    return new Promise((resolve, reject) => {
      const feed = (ev: CoordinatorEvent): void => {
        for (const a of m.step(ev)) perform(a);
      };
      const report = <T>(p: Promise<T>, ok: (v: T) => CoordinatorEvent, failed: (error: Error) => CoordinatorEvent): void => {
        p.then((v) => feed(ok(v)), (err: Error) => feed(failed(err)));
      };
      const perform = (a: CoordinatorAction): void => {
        switch (a.kind) {
          case 'send':
            return report(this.send(m.o.snapshotId, a), (answer) => ({ kind: 'answer', peer: a.peer, ...answer }), (error) => ({ kind: 'failed', peer: a.peer, step: a.step, error }));
          case 'arm':
            armed.set(`${a.step} ${a.peer}`, timers.setTimeout(() => feed({ kind: 'timer', peer: a.peer, step: a.step }), a.ms));
            return;
          case 'disarm':
            timers.clearTimeout(armed.get(`${a.step} ${a.peer}`));
            armed.delete(`${a.step} ${a.peer}`);
            return;
          case 'createRecord':
            return report(this.createRecord(taking, a.volume), (seq) => ({ kind: 'recordCreated', volume: a.volume, seq }), (error) => ({ kind: 'recordFailed', volume: a.volume, error }));
          case 'cut':
            this.captureRoutes(taking, a);
            if (a.cut !== undefined) for (const x of taking.records) x.r.cut = a.cut;
            return;
          case 'distrust':
            taking.volumes.forEach((v, i) => narrowToTrusted(taking.records[i].r, a.suspect.filter((x) => x.volumeId === v.id)));
            return;
          case 'updateRecord':
            return report(this.publishRecord(taking, a.volume, a.heldMs), () => ({ kind: 'recordUpdated', volume: a.volume }), (error) => ({ kind: 'recordFailed', volume: a.volume, error }));
          case 'deleteRecord': {
            const { r } = taking.records[a.volume];
            return report(deleteSnapshotRecord(this.o.catalog.store, r.volumeId, r.name).catch(() => false), () => ({ kind: 'recordDeleted', volume: a.volume }), () => ({ kind: 'recordDeleted', volume: a.volume }));
          }
          case 'taken':
            return resolve(a.heldMs);
          case 'aborted':
            return reject(a.reason);
        }
      };
      feed({ kind: 'start' });
    });
  }

  /** One step to one peer, through the RPCs; its answer as the coordinator takes it. */
  private async send(snapshotId: string, s: Send): Promise<Answer> {
    const { rpc } = this.o;
    switch (s.step) {
      case 'REACH':
        await rpc.reach(s.peer);
        return { step: s.step };
      case 'PREPARE':
        return { step: s.step, reply: await rpc.prepare(s.peer, s.req) };
      case 'TAKE':
        return { step: s.step, ...(await rpc.take(s.peer, s.req)) };
      case 'RELEASE':
        return { step: s.step, heldMs: await rpc.release(s.peer, snapshotId, false) };
      case 'FINISH':
        return { step: s.step, heldMs: await rpc.release(s.peer, snapshotId, false, true) };
      case 'ABORT':
        return { step: s.step, heldMs: await rpc.release(s.peer, snapshotId, true) };
    }
  }

  /** Volume `i`'s record, in state `taking`, with a fresh layer number: that number. */
  private async createRecord(taking: Taking, i: number): Promise<number> {
    const v = taking.volumes[i];
    const r = this.recordFor(v, taking.name, await nextSnapshotSeq(this.o.catalog.store, v.id), taking.mode, taking.group);
    taking.records.push({ r, version: await createSnapshotRecord(this.o.catalog.store, r) });
    return r.seq;
  }

  /** Volume `i`'s record becomes `ready`. */
  private async publishRecord(taking: Taking, i: number, heldMs: number): Promise<void> {
    const x = taking.records[i];
    // Timestamp mode: the layers were completed only now (FINISH); a copy dropped from a page's
    // in-sync set since the cut may have missed a write stamped before it.
    if (taking.mode === 'timestamp') narrowToInSync(x.r, this.o.catalog.routes(taking.volumes[i]));
    taking.tookMs ??= round(this.o.env.clock.monotonicMs() - taking.started);
    x.r.state = 'ready';
    x.r.heldMs = round(heldMs);
    x.r.tookMs = taking.tookMs;
    await updateSnapshotRecord(this.o.catalog.store, x.r, x.version);
    this.o.event?.(`snapshot ${x.r.name} of ${x.r.volume} taken (${taking.mode}; ${taking.mode === 'timestamp' ? 'host I/O not held' : `hosts held ${round(heldMs)} ms`}, ${taking.tookMs} ms in all)`, x.r.volume);
  }

  /**
   * Where each page's layer lives: the routes at the cut (frozen: moves wait while gates are
   * closed), each page's in-sync copies narrowed to those in sync before anything froze too,
   * less the copies suspect where they froze.
   */
  private captureRoutes(taking: Taking, frozen: FrozenReport): void {
    const records = taking.records.map((x) => x.r);
    taking.volumes.forEach((v, i) => {
      const table = this.o.catalog.routes(v);
      const pages = Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks);
      // The changed routes only (every other page is at the placement rule, version 1): no time per page while hosts are held.
      records[i].moved = [...table.changed()].filter(([page, route]) => page < pages && route.version > 1).sort((a, b) => a[0] - b[0]);
      records[i].moving = frozen.moving.filter((m) => m.volumeId === v.id);
      narrowToInSync(records[i], new RouteTable(v.peers, v.pageBlocks, taking.before[i], v.placedCopies ?? 1));
      narrowToTrusted(records[i], frozen.suspect.filter((x) => x.volumeId === v.id));
    });
  }

  private recordFor(v: VolumeRecord, name: string, seq: number, mode: SnapshotMode, group: string): SnapshotRecord {
    return {
      volumeId: v.id, volume: v.name, name, seq, mode, group, state: 'taking', createdAtMs: this.o.env.clock.nowMs(), heldMs: 0, tookMs: 0,
      sizeBytes: v.sizeBytes, blockBytes: v.blockBytes, peers: v.peers, pageBlocks: v.pageBlocks, moved: [], moving: [], placedCopies: v.placedCopies,
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

function defaultName(nowMs: number): string {
  return `snap-${new Date(nowMs).toISOString().replace(/[-:]/g, '').replace(/\..*/, '').replace('T', '-').toLowerCase()}`;
}

/** The record's routes at the cut, each page's in-sync copies narrowed to those in sync in `other` too (records.ts narrowInSync). */
function narrowToInSync(r: SnapshotRecord, other: RouteTable): void {
  narrowRoutes(r, [...other.changed()].map(([page]) => page), (page, route) => narrowInSync(route, other.route(page)));
}

/**
 * The record's routes at the cut without the copies suspect where they froze (records.ts
 * SuspectAtCut), and its moving pages marked whose destination was one of them (MovingAtCut toSuspect).
 */
function narrowToTrusted(r: SnapshotRecord, suspect: readonly SuspectAtCut[]): void {
  narrowRoutes(r, suspect.map((x) => x.page), (page, route) => withoutSuspects(route, suspect.filter((x) => x.page === page).map((x) => x.peer)));
  for (const m of r.moving) if (suspect.some((x) => x.page === m.page && x.peer === m.to)) m.toSuspect = true;
}

/**
 * Each of the record's routes at the cut (those it keeps, and those of `pages`) as `narrow`
 * makes it. A route it keeps stays kept, even one of the placement rule's version: a narrowing
 * made before (seed 8: a suspect copy left out at the cut, then the routes after FINISH).
 */
function narrowRoutes(r: SnapshotRecord, pages: readonly number[], narrow: (page: number, route: Route) => Route): void {
  const cut = routesAtCut(r);
  const kept = new Set(r.moved.map(([page]) => page));
  const all = [...new Set([...kept, ...pages])].sort((a, b) => a - b);
  r.moved = all.flatMap((page): [number, Route][] => {
    const route = cut.route(page);
    const narrowed = narrow(page, route);
    return kept.has(page) || narrowed !== route ? [[page, narrowed]] : [];
  });
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

async function within<T>(timers: Timers, p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: TimerHandle | undefined;
  const late = new Promise<never>((_, reject) => (timer = timers.setTimeout(() => reject(new PeersanError(`${what} within ${ms} ms`)), ms)));
  try {
    return await Promise.race([p, late]);
  } finally {
    timers.clearTimeout(timer);
  }
}
