// Snapshots (DESIGN.md 6) on one peer, both roles. The participant's steps are here; the
// coordinator's sequencing (which step goes to which peer when, deadlines, aborts) is the state
// machine in coordinator.ts, whose head states the ordering rules; `create` drives it (performs
// its actions: RPCs, timers, catalog records).
//
// Barrier mode, for one volume or a consistency group (the coordinator is the peer that got
// the command):
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
//      waits until none of its host writes stamped before T is still in flight;
//   4. FINISH: each peer writes its recorded changes stamped before T into the frozen layers,
//      in stamp order. A write stamped before T that was still on its way at the freeze is
//      now in the snapshot; one stamped after T that arrived before FINISH is not.
// Moves of the volumes pause from PREPARE to FINISH, as in barrier mode. Any failure aborts:
// recordings are dropped and the records deleted (the layers go with them).

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import type { Env, TimerHandle, Timers } from '../env/env';
import { NotFoundError, PeersanError } from '../errors';
import type { StoreVolume } from '../store/page-store';
import type { VolumeGate } from './gate';
import type { HybridClock } from './hlc';
import type { StampedChange, StampLog } from './stamp-log';
import {
  prepareMsMax, sealMsMax, SnapshotCoordinator, type Answer, type CoordinatorAction, type CoordinatorEvent, type CoordinatorPlan, type Send,
} from './coordinator';
import {
  createSnapshotRecord, deleteSnapshotRecord, nextSnapshotSeq, updateSnapshotRecord, validateSnapshotName,
  type MovingAtCut, type SnapshotMode, type SnapshotRecord,
} from './records';

export interface PrepareSnapshot {
  snapshotId: string;
  volumeIds: string[];
  /** Absent: barrier. */
  mode?: SnapshotMode;
  /** Timestamp mode freezes at PREPARE: the layers to freeze. */
  layers?: { volumeId: string; seq: number }[];
}

export interface PrepareReply {
  /** Timestamp mode: this peer's clock once its layers froze. */
  clock: number;
  /** Timestamp mode: the pages this peer is moving away, with their piece cursors. */
  moving: MovingAtCut[];
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
  take(peer: string, req: TakeSnapshot): Promise<MovingAtCut[]>;
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
  groupPeers: readonly string[];
  catalog: Catalog;
  gate(volumeId: string): VolumeGate | undefined;
  store(volumeId: string): StoreVolume | undefined;
  /** The recorder above the volume's store (timestamp mode). */
  stampLog(volumeId: string): StampLog | undefined;
  clock: HybridClock;
  /** Pages of the volume this peer is moving away, with their piece cursors. */
  moving(volumeId: string): MovingAtCut[];
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
/** A peer reopens its gates by itself this long after PREPARE (the coordinator is gone). */
export const holdMsMax = 10_000;
/** Timestamp mode: data recorded per volume and peer between PREPARE and FINISH, at most. */
export const stampLogBytesMax = 256 * 1024 * 1024;

export { prepareMsMax, sealMsMax };

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
}

/** A barrier snapshot prepared on this peer: its volumes, and where its PREPARE spent its time. */
interface Prepared {
  volumeIds: string[];
  flushMs: number;
  drainMs: number;
  /** Set once the volumes are held (after the pre-flush): the hold's own end, holdMsMax later. */
  holdEnds?: TimerHandle;
}

/** A volume held by snapshots on this peer: how many, and the promise its page moves wait on. */
interface Hold {
  count: number;
  released: Promise<void>;
  letGo(): void;
}

export class SnapshotService {
  protected readonly o: SnapshotServiceOptions;
  /** Snapshots this peer has prepared and not released. */
  private readonly prepared = new Map<string, Prepared>();
  /** Timestamp snapshots this peer has prepared and not finished. */
  private readonly stamping = new Map<string, { layers: { volumeId: string; seq: number }[]; cut?: number; expire: TimerHandle }>();
  /** Volumes held by snapshots (barrier: gates closed; timestamp: recording): their page moves wait. */
  private readonly holds = new Map<string, Hold>();
  /** Timestamp mode: changes that reached this peer's store after its freeze, stamped before the cut, written into layers at FINISH. */
  lateChangesApplied = 0;

  constructor(opts: SnapshotServiceOptions) {
    this.o = opts;
  }

  // ---- participant ----------------------------------------------------------------------------

  async prepare(req: PrepareSnapshot): Promise<PrepareReply> {
    if (req.mode === 'timestamp') return this.prepareStamped(req);
    const closed: VolumeGate[] = [];
    const entry: Prepared = { volumeIds: req.volumeIds, flushMs: 0, drainMs: 0 };
    this.prepared.set(req.snapshotId, entry);
    const flushStarted = this.o.env.clock.monotonicMs();
    await this.preflush(req.volumeIds);
    entry.flushMs = this.o.env.clock.monotonicMs() - flushStarted;
    // Aborted meanwhile (another peer failed PREPARE; RELEASE came): closing now would hold hosts for nothing.
    if (this.prepared.get(req.snapshotId) !== entry) throw new PeersanError(`snapshot ${req.snapshotId} was released while ${this.o.self} prepared it`);
    const started = this.o.env.clock.monotonicMs();
    // Held from here: page moves of the volumes take no new step. The gates reopen by
    // themselves after holdMsMax (the coordinator is gone); the hold ends then too.
    for (const id of req.volumeIds) this.holdVolume(id);
    entry.holdEnds = this.o.env.timers.setTimeout(() => void this.release(req.snapshotId), holdMsMax).unref();
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
      if (this.prepared.get(req.snapshotId) === entry) this.dropPrepared(req.snapshotId);
      throw err;
    }
    entry.drainMs = this.o.env.clock.monotonicMs() - started;
    return { clock: 0, moving: [] };
  }

  /** Timestamp mode, step 1: record, freeze, answer with the clock. */
  private async prepareStamped(req: PrepareSnapshot): Promise<PrepareReply> {
    const layers = req.layers ?? [];
    if (this.stamping.has(req.snapshotId)) throw new PeersanError(`snapshot ${req.snapshotId} is already prepared on ${this.o.self}`);
    // The coordinator gone: recordings do not outlive holdMsMax.
    const expire = this.o.env.timers.setTimeout(() => this.dropStamped(req.snapshotId), holdMsMax).unref();
    this.stamping.set(req.snapshotId, { layers, expire });
    for (const { volumeId } of layers) this.holdVolume(volumeId);
    try {
      await this.preflush(layers.map((l) => l.volumeId));
      const moving: MovingAtCut[] = [];
      for (const { volumeId, seq } of layers) {
        const store = this.o.store(volumeId);
        const log = this.o.stampLog(volumeId);
        if (!store || !log) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
        // Page moves stop at their next step; wait for the current one.
        await this.o.idle(volumeId);
        log.begin(req.snapshotId);
        moving.push(...this.o.moving(volumeId));
        await store.snapshot(String(seq), this.o.env.clock.nowMs());
        log.frozen(req.snapshotId);
      }
      if (!this.stamping.has(req.snapshotId)) throw new PeersanError(`snapshot ${req.snapshotId} was dropped while ${this.o.self} prepared it`);
      return { clock: this.o.clock.now(), moving };
    } catch (err) {
      this.dropStamped(req.snapshotId);
      throw err;
    }
  }

  /** Timestamp mode, step 3: clock past the cut; wait for host writes stamped before it. */
  private async seal(req: TakeSnapshot): Promise<MovingAtCut[]> {
    const s = this.stamping.get(req.snapshotId);
    if (!s || req.cut === undefined) throw new PeersanError(`snapshot ${req.snapshotId} was not prepared on ${this.o.self}`);
    this.o.clock.observe(req.cut);
    s.cut = req.cut;
    const volumeIds = new Set([...s.layers.map((l) => l.volumeId), ...req.layers.map((l) => l.volumeId)]);
    await within(this.o.env.timers, Promise.all([...volumeIds].map((id) => this.o.gate(id)?.writesBefore(req.cut!))), sealMsMax, `host writes stamped before the cut did not finish on ${this.o.self}`);
    return [];
  }

  /** Timestamp mode, step 4: the recorded changes before the cut go into the frozen layers. */
  private async finishStamped(snapshotId: string): Promise<number> {
    const s = this.stamping.get(snapshotId);
    if (!s || s.cut === undefined) throw new PeersanError(`snapshot ${snapshotId} was not taken on ${this.o.self}`);
    const started = this.o.env.clock.monotonicMs();
    let changes = 0;
    try {
      for (const { volumeId, seq } of s.layers) {
        const log = this.o.stampLog(volumeId);
        const store = this.o.store(volumeId);
        if (!log || !store) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
        const before = log.end(snapshotId, s.cut);
        changes += before.length;
        this.lateChangesApplied += before.filter((c) => c.afterFreeze).length;
        await this.completeLayer(store, seq, before);
      }
    } finally {
      this.dropStamped(snapshotId);
    }
    this.o.log.info({ snapshotId, changes, finishMs: round(this.o.env.clock.monotonicMs() - started) }, 'timestamp snapshot layers completed');
    return 0;
  }

  private dropStamped(snapshotId: string): void {
    const s = this.stamping.get(snapshotId);
    if (!s) return;
    this.stamping.delete(snapshotId);
    this.o.env.timers.clearTimeout(s.expire);
    for (const { volumeId } of s.layers) {
      this.o.stampLog(volumeId)?.drop(snapshotId);
      this.letGo(volumeId);
    }
  }

  /**
   * Timestamp mode, FINISH on one volume: the changes recorded since the freeze and stamped
   * before the cut (in stamp order) go into the frozen layer `seq`. Without them the layer is
   * this peer's own freeze, and peers froze at different times.
   */
  protected async completeLayer(store: StoreVolume, seq: number, changes: StampedChange[]): Promise<void> {
    if (changes.length > 0) await store.writeIntoSnapshot(String(seq), changes);
  }

  /** A snapshot holds the volume (counted: several may, one per consistency group and mode). */
  private holdVolume(volumeId: string): void {
    const h = this.holds.get(volumeId);
    if (h) return void h.count++;
    let letGo!: () => void;
    const released = new Promise<void>((r) => (letGo = r));
    this.holds.set(volumeId, { count: 1, released, letGo });
  }

  /** One snapshot lets go of the volume; the last one wakes the page moves waiting on it. */
  private letGo(volumeId: string): void {
    const h = this.holds.get(volumeId);
    if (!h || --h.count > 0) return;
    this.holds.delete(volumeId);
    h.letGo();
  }

  /** Barrier: forget a prepared snapshot; the volumes it held are let go (their gates are the caller's). */
  private dropPrepared(snapshotId: string): { volumeIds: string[] } | undefined {
    const p = this.prepared.get(snapshotId);
    if (!p) return undefined;
    this.prepared.delete(snapshotId);
    this.o.env.timers.clearTimeout(p.holdEnds);
    if (p.holdEnds !== undefined) for (const id of p.volumeIds) this.letGo(id);
    return p;
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

  async take(req: TakeSnapshot): Promise<MovingAtCut[]> {
    if (req.cut !== undefined) return this.seal(req);
    const p = this.prepared.get(req.snapshotId);
    if (!p) throw new PeersanError(`snapshot ${req.snapshotId} was not prepared on ${this.o.self}`);
    for (const id of p.volumeIds) {
      if (!this.o.gate(id)?.isClosed) throw new PeersanError(`peer ${this.o.self} stopped holding I/O for snapshot ${req.snapshotId} (held longer than ${holdMsMax} ms)`);
    }
    const moving: MovingAtCut[] = [];
    const started = this.o.env.clock.monotonicMs();
    for (const { volumeId, seq } of req.layers) {
      const store = this.o.store(volumeId);
      if (!store) throw new PeersanError(`volume ${volumeId} is not open on ${this.o.self}`);
      moving.push(...this.o.moving(volumeId));
      await store.snapshot(String(seq), this.o.env.clock.nowMs());
    }
    // Where the hold goes on this peer: draining requests (PREPARE) and freezing the layers
    // (TAKE: the store's fdatasync and synced batch); the rest is round trips. The pre-flush
    // comes before the hold.
    this.o.log.info({ snapshotId: req.snapshotId, flushMs: round(p.flushMs), drainMs: round(p.drainMs), freezeMs: round(this.o.env.clock.monotonicMs() - started) }, 'snapshot layers frozen');
    return moving;
  }

  async release(snapshotId: string, abort = false, finish = false): Promise<number> {
    if (this.stamping.has(snapshotId)) {
      if (abort) return void this.dropStamped(snapshotId), 0;
      return this.finishStamped(snapshotId);
    }
    // FINISH of a timestamp snapshot this peer does not know: it restarted after PREPARE and
    // the writes it recorded since its freeze are gone with it, so its layer is not the cut.
    // The simulator found a snapshot reported taken without them (seed 1539).
    if (finish && !abort) throw new PeersanError(`snapshot ${snapshotId} is not recorded on ${this.o.self} (it restarted since PREPARE): the layer would miss writes before the cut`);
    const p = this.dropPrepared(snapshotId);
    if (!p) return 0;
    let held = 0;
    for (const id of p.volumeIds) held = Math.max(held, this.o.gate(id)?.release(snapshotId) ?? 0);
    return held;
  }

  /**
   * While a snapshot holds the volume on this peer: a promise that resolves when the last one
   * lets go (page moves take no step until then). Undefined when nothing holds it.
   */
  hold(volumeId: string): Promise<void> | undefined {
    return this.holds.get(volumeId)?.released;
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
    const taking: Taking = { volumes, name, mode, group: opts.group ?? '', started: this.o.env.clock.monotonicMs(), records: [] };
    const snapshotId = this.o.env.random.bytes(8).toString('hex');
    const coordinator = this.coordinator({ snapshotId, mode, volumeIds: volumes.map((v) => v.id), peers: this.o.groupPeers, clock: () => this.o.clock.now() });
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
            this.captureRoutes(taking.volumes, taking.records.map((x) => x.r), a.moving);
            if (a.cut !== undefined) for (const x of taking.records) x.r.cut = a.cut;
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
        return { step: s.step, moving: await rpc.take(s.peer, s.req) };
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
    taking.tookMs ??= round(this.o.env.clock.monotonicMs() - taking.started);
    x.r.state = 'ready';
    x.r.heldMs = round(heldMs);
    x.r.tookMs = taking.tookMs;
    await updateSnapshotRecord(this.o.catalog.store, x.r, x.version);
    this.o.event?.(`snapshot ${x.r.name} of ${x.r.volume} taken (${taking.mode}; ${taking.mode === 'timestamp' ? 'host I/O not held' : `hosts held ${round(heldMs)} ms`}, ${taking.tookMs} ms in all)`, x.r.volume);
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
      volumeId: v.id, volume: v.name, name, seq, mode, group, state: 'taking', createdAtMs: this.o.env.clock.nowMs(), heldMs: 0, tookMs: 0,
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

function defaultName(nowMs: number): string {
  return `snap-${new Date(nowMs).toISOString().replace(/[-:]/g, '').replace(/\..*/, '').replace('T', '-').toLowerCase()}`;
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
