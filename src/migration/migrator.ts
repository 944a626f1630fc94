// Page migration on one peer (DESIGN.md 4), both roles. The protocol, its ordering rules and
// what a restart resumes from are stated once, at the top of move-machine.ts.
//
// Source S — start(): check the request, record the intent in the catalog (CAS-create, one move
// per page), write the checkpoint, ask D to prepare, register the page's pieces with its I/O
// path (movable.ts), then hand the move to its MoveMachine. This class is the machine's driver:
// it performs each action with the real I/O (piece locks, the store, the catalog, D's page
// service, the copy rate, the environment's timers) and feeds the outcome back as the next
// event; a cancel goes in as an event too. Snapshots: `enterStep` waits on `hold`, `idle` tells
// a snapshot when the steps already running have ended.
//
// Destination D — prepare(), finish(), receiving(): a few steps each, kept procedural here.
//
// Restart — recover(): completes moves committed before the crash, resumes the others from
// their checkpoints (a machine with `resumed`), checks D's receiving records.

import type { Logger } from 'pino';
import type { MembersView } from '../cluster/members';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { sleep, type Env } from '../env/env';
import { ConflictError, InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import { roleOf, switchedPrimary } from '../replication/placement';
import { BlockOp, decodeExtents } from '../routing/frame';
import { copiesOf, type Route } from '../routing/table';
import type { PageStore } from '../store/page-store';
import { SharedLock } from '../store/shared-lock';
import type { MovableVolume, OutgoingMove } from './movable';
import { chunkBytes, committedByMove, MoveMachine, retryMs, type MoveAction, type MoveEvent } from './move-machine';
import { checkpointKey, decodeCheckpoint, encodeCheckpoint, incomingKey, pieceGeometry, type MoveCheckpoint, type MoveCursor } from './pieces';
import { ByteRate } from './rate';

export interface MigrationSettings {
  /** Copy rate per peer, bytes per second (0: unlimited). */
  rateBytesPerSec: number;
  pieceBytes: number;
  /** How much of the time a move may make other work wait, (0, 1] (MigrationConfig.dutyPercent / 100); absent: 1, never pause. */
  duty?: number;
}

/** The calls a source makes to a destination's PeerService. */
export interface MoveRpc {
  prepare(to: string, req: PrepareRequest): Promise<void>;
  finish(to: string, req: FinishRequest): Promise<void>;
}

export interface PrepareRequest {
  volumeId: string;
  page: number;
  from: string;
  /** A new move: D clears whatever it holds of the page. False when resuming: keep the copied pieces. */
  fresh: boolean;
}

export interface FinishRequest {
  volumeId: string;
  page: number;
  committed: boolean;
  /** The committed route version (commit only). */
  version: number;
  /** The move's source (absent from a peer of an older version). */
  from?: string;
}

export interface MoveInfo {
  volume: string;
  volumeId: string;
  page: number;
  from: string;
  to: string;
  pieces: number;
  done: number;
  state: string;
  startedAtMs: number;
  bytesCopied: number;
  lastError: string;
}

export interface MigratorOptions {
  self: string;
  /** Clock, timers (pacing, retries, waits) and randomness. */
  env: Env;
  /** The group's members: a page moves only to one that is up (not joining, draining or leaving). */
  members: MembersView;
  store: PageStore;
  catalog: Catalog;
  /** The volume's pages on this peer, if it is open here. */
  movable(volumeId: string): MovableVolume | undefined;
  rpc: MoveRpc;
  settings: MigrationSettings;
  log: Logger;
  /** Something a person watching the group wants to know (the console's events). */
  event?(kind: 'migration' | 'page-moved', message: string, volume: string): void;
  /**
   * A move of this peer committed: a fresh one, one resumed after a restart, or one whose
   * commit a restart interrupted. The balancer starts the page's cool-down from here, so it
   * does not move the page straight back, whoever started the move.
   */
  committed?(move: { volumeId: string; page: number; from: string; to: string }): void;
  /**
   * While a snapshot holds the volume here: a promise that resolves when it lets go (moves
   * neither copy nor commit meanwhile); undefined when nothing holds it.
   */
  hold?(volumeId: string): Promise<void> | undefined;
  /**
   * Run `fn` while no change of the page is in flight on this peer (the replicated layer's range
   * lock over the whole page, src/replication). A role switch made under it keeps this peer in
   * the in-sync set: every copy then has every change. Absent: a role switch moves this peer out
   * of the in-sync set (a change in flight may have reached it and not the new primary), and the
   * resync brings it back. A move's commit CAS runs under it too.
   */
  quiet?<T>(volumeId: string, page: number, fn: () => Promise<T>): Promise<T>;
  /**
   * Make `peer`'s store of the volume durable (its own store: a replica flush). A role switch
   * asks it of the new primary before its CAS; absent, nothing is asked.
   */
  flushCopy?(peer: string, volumeId: string): Promise<void>;
  /**
   * This peer's copy of the page may miss acknowledged writes (a move from here lost the primary
   * role: what it forwarded to D is not here): resync it whole (the activity log's suspect pages).
   */
  distrust?(volumeId: string, page: number): void;
  /**
   * This peer became the page's primary by a move's commit: its copies must agree with it on what
   * the old primary changed without an acknowledgement (the replicated layer's reconcile).
   */
  adopted?(volumeId: string, page: number): void;
  /**
   * Before the commit CAS, on the source: the page's other copies agree with this peer (whose
   * reads of a moving page come from D) on what it changed without an acknowledgement.
   */
  beforeHandoff?(volumeId: string, page: number): Promise<void>;
  /**
   * The page's copy here may not be whole yet (a suspect page this peer steps out of after a
   * restart, a takeover still reconciling): no move or role switch of it starts meanwhile.
   * Resolves true once it is whole, false if it is not within a bound.
   */
  settled?(volumeId: string, page: number): Promise<boolean>;
  /** The copy keeper is changing the page's copies now (CopyKeeper.changing): no move starts meanwhile. */
  copiesChanging?(volumeId: string, page: number): boolean;
  /** The same after a move of the page was cancelled here (in the background). */
  cancelled?(volumeId: string, page: number): void;
  /**
   * This peer's copy of the page is not whole (it forwarded writes to D) and D's may not be (D
   * restarted mid-move): hand the primary role to another in-sync copy, which holds every
   * acknowledged write. Resolves true once the page has another primary, false if no other
   * in-sync copy exists; rejects (PeersanError, tried again) if none took it over yet. Absent: false.
   */
  handOff?(volumeId: string, page: number): Promise<boolean>;
}

interface Running {
  /** The move's sequencing (move-machine.ts); this driver performs its actions. */
  machine: MoveMachine;
  move: OutgoingMove;
  movable: MovableVolume;
  /** Settles when the move commits (resolve) or is cancelled / stops (reject). */
  finished: Promise<void>;
  settle(err?: Error): void;
  /** Stops following the page's routes (see launch). */
  unfollow(): void;
  /** FINISH went to D: its receiving record may be gone, and what came back from it is confirmed (see confirmMove). */
  finishing: boolean;
  /** D's start token in the answer to the first chunk of the pass over the piece in transit (see copyChunk). */
  passToken: number;
}

/** The actions the driver performs at once, with no outcome to feed back. */
type Effect = Extract<MoveAction, { kind: 'leaveStep' | 'turnBack' | 'lostPage' | 'ended' }>;

export class Migrator {
  private readonly o: MigratorOptions;
  private readonly rate: ByteRate;
  /** Outgoing moves by `volumeId/page`. */
  private readonly running = new Map<string, Running>();
  /** Moves (and role switches) being started: start() until it returns. */
  private readonly starting = new Set<string>();
  /** Pages this peer is receiving: `volumeId/page` → source. */
  private readonly incoming = new Map<string, string>();
  /**
   * Replicated pages this peer was receiving when it restarted: staging writes it acknowledged
   * without FUA may be lost, so their moves do not commit (prepare refuses them; see move-machine.ts).
   */
  private readonly restarted = new Set<string>();
  private closed = false;
  /** Resolves at close(): steps waiting for a snapshot's hold stop waiting. */
  private readonly closing: Promise<void>;
  private closeNow!: () => void;
  /** Running totals for /metrics. */
  readonly counters = { committed: 0, cancelled: 0, bytesCopied: 0 };
  /** Move steps running per volume, and who waits for them to end (see enterStep() and idle()). */
  private readonly stepping = new Map<string, { steps: number; idle: (() => void)[] }>();

  constructor(opts: MigratorOptions) {
    this.o = opts;
    // The burst is one piece: after a pause the copier may take one piece at once, no more, so
    // copying is paced evenly instead of in bursts that stall host I/O for a moment.
    this.rate = new ByteRate(opts.settings.rateBytesPerSec, Math.max(chunkBytes, opts.settings.pieceBytes), opts.env);
    this.closing = new Promise((r) => (this.closeNow = r));
  }

  // ---- destination side -----------------------------------------------------------------------

  /** This peer is the destination of a move of the page (from prepare until finish). */
  receiving(volumeId: string, page: number): boolean {
    return this.incoming.has(key(volumeId, page));
  }

  /**
   * Asked by the page service for every staging request (a move's copy or dual write) it gets:
   * receiving the page, and its primary as this peer knows it is still the move's source (or
   * this peer, once the move committed: the source forwards what it had in flight). Another
   * primary took the page over from a source cut off from the group, which goes on copying until
   * it hears of it; the new primary may have made this peer a copy meanwhile, whose newer blocks
   * the old source's pieces would overwrite. (Found while reading seed 1042's trace; that seed
   * itself failed for the roll-back that never ended, move-machine.ts `lost`.)
   */
  acceptsStaging(volumeId: string, page: number): boolean {
    const from = this.incoming.get(key(volumeId, page));
    if (from === undefined) return false;
    const volume = this.o.catalog.volumeById(volumeId);
    const owner = volume && this.o.catalog.routes(volume).route(page).owner;
    return owner === undefined || owner === from || owner === this.o.self;
  }

  async prepare(req: PrepareRequest): Promise<void> {
    const volume = this.requireVolume(req.volumeId);
    const movable = this.o.movable(req.volumeId);
    if (!movable) throw new PeersanError(`volume ${volume.name} is not open on ${this.o.self} yet`);
    const intent = await this.o.catalog.moveIntent(req.volumeId, req.page);
    if (!intent || intent.to !== this.o.self || intent.from !== req.from) throw new ConflictError(`no recorded move of page ${req.page} of ${volume.name} from ${req.from} to ${this.o.self}`);
    const k = key(req.volumeId, req.page);
    // This peer gave the page away and is still cleaning up after that move (its last step
    // frees the local copy): taking the page back now would let that free erase what the new
    // move copies here. The simulator found it (seed 273). Transient: the source tries again.
    if (this.running.has(k)) throw new PeersanError(`page ${req.page} of ${volume.name} is still being released by its previous move from ${this.o.self}`);
    if (req.fresh || this.incoming.get(k) !== req.from) {
      // Starting over clears the page here, so the catalog must say first that the source is
      // still the page's primary and this peer holds no copy of it. A move resumed after its
      // source restarted asks (not fresh) until this peer answers, and its source may have lost
      // the page meanwhile: by then the new primary may have made this peer one of its copies,
      // which clearing would erase, acknowledged writes and all (simulator, seeds 3601, 3608).
      // A fresh PREPARE is no proof either: the source read the route before its start waited
      // (for the catalog, the intent, a disk), and meanwhile the page may have gone to another
      // primary and moved here: this peer cleared the page it served as primary, and the old
      // source, reading a route that named this peer primary, took it for its own commit and
      // freed its copy, an in-sync one (simulator, seed 23891).
      const route = await this.o.catalog.fetchRoute(volume, req.page);
      if (route.owner !== req.from || copiesOf(route).includes(this.o.self)) {
        throw new ConflictError(`page ${req.page} of ${volume.name} has primary ${route.owner} and copies ${copiesOf(route).join(', ')} now: the move from ${req.from} is stale`);
      }
      this.incoming.delete(k);
      this.restarted.delete(k);
      await this.clearPage(movable, volume, req.page);
    } else {
      // The source confirms before it commits or ends a roll-back: what this peer acknowledged is
      // whole (it did not restart since) and durable (the flush) before it becomes the page's.
      if (this.restarted.has(k)) throw new ConflictError(`${this.o.self} restarted while receiving page ${req.page} of ${volume.name}: writes it had not made durable may be lost; the move does not commit`);
      await movable.raw.flush();
    }
    await this.o.store.putRecord(incomingKey(req.volumeId, req.page), Buffer.from(JSON.stringify({ from: req.from })), true);
    this.incoming.set(k, req.from);
  }

  async finish(req: FinishRequest): Promise<void> {
    const k = key(req.volumeId, req.page);
    // A FINISH of an older move from another source (one abandoned, repeated by its source's
    // restart) while this peer receives the page from a newer one: not this move's. Clearing here
    // freed the new move's pieces and dropped its receiving record, so its roll-back never ended
    // (simulator, seed 7558).
    const receivingFrom = this.incoming.get(k);
    if (req.from !== undefined && receivingFrom !== undefined && receivingFrom !== req.from) return;
    const volume = this.o.catalog.volumeById(req.volumeId);
    if (req.committed) {
      if (volume) this.o.catalog.routes(volume).learn(req.page, { owner: this.o.self, version: req.version });
      // Once per commit: a FINISH sent again finds the receiving record gone.
      if (volume && this.incoming.has(k)) this.o.adopted?.(req.volumeId, req.page);
    } else {
      const movable = this.o.movable(req.volumeId);
      if (volume && movable && !(await this.holdsCopy(volume, req.page))) await this.clearPage(movable, volume, req.page);
    }
    this.incoming.delete(k);
    this.restarted.delete(k);
    await this.o.store.deleteRecord(incomingKey(req.volumeId, req.page));
  }

  /**
   * The page's route names this peer as a copy: a move abandoned by its source (the page got
   * another primary) may reach D after that primary made D a copy of its own (a rebuild), whose
   * blocks an abandoned move's clean-up must not free.
   */
  private async holdsCopy(volume: VolumeRecord, page: number): Promise<boolean> {
    return copiesOf(await this.o.catalog.fetchRoute(volume, page)).includes(this.o.self);
  }

  /** Free this peer's copy of the page (a destination's stale or abandoned copy, a source's after its commit). */
  private async clearPage(movable: MovableVolume, volume: VolumeRecord, page: number): Promise<void> {
    const first = page * volume.pageBlocks;
    const blocks = Math.min(volume.pageBlocks, movable.blockCount - first);
    if (blocks > 0) await movable.raw.unmap(first, blocks);
  }

  // ---- source side ----------------------------------------------------------------------------

  /**
   * Start moving a page this peer owns; resolves once the move is under way (see `wait`). While
   * it starts (starting()), the copy keeper changes none of the page's copies; a start while the
   * keeper is changing them is refused (MigratorOptions.copiesChanging): a copy added on the
   * destination after the move read the route would be swapped in twice at its commit (the
   * simulator, seed 275). Both checks are synchronous with their marks: they exclude each other.
   */
  async start(volumeName: string, page: number, to: string): Promise<MoveInfo> {
    const volume = this.o.catalog.require(volumeName);
    const k = key(volume.id, page);
    if (this.o.copiesChanging?.(volume.id, page)) throw new ConflictError(`the copies of page ${page} of ${volume.name} are being changed; try the move again shortly`);
    if (this.starting.has(k)) throw new ConflictError(`page ${page} of ${volume.name} is already moving`);
    this.starting.add(k);
    try {
      return await this.startMarked(volume, page, to);
    } finally {
      this.starting.delete(k);
    }
  }

  /** A move or role switch of the page is starting here (see start). */
  /** The end of this peer's move of the page (its clean-up included), if one runs; never rejects. */
  moveEnded(volumeId: string, page: number): Promise<void> | undefined {
    return this.running.get(key(volumeId, page))?.finished.catch(() => undefined);
  }

  /**
   * While this peer's move of the page runs: PREPARE again on D (see confirm), so that what this
   * peer read of the page through the move (pieces on D) is known whole and durable there; rejects
   * (ConflictError) if D restarted since the move began. Not once FINISH went to D: by then a
   * roll-back confirmed what came back, or the page has another primary, and D may have dropped
   * its receiving record (a PREPARE would make a new one).
   */
  async confirmMove(volumeId: string, page: number): Promise<void> {
    const r = this.running.get(key(volumeId, page));
    if (r && !r.finishing) await this.confirm(r.machine.cp);
  }

  startingMove(volumeId: string, page: number): boolean {
    return this.starting.has(key(volumeId, page));
  }

  private async startMarked(volume: VolumeRecord, page: number, to: string): Promise<MoveInfo> {
    const pages = Math.ceil(volume.sizeBytes / volume.blockBytes / volume.pageBlocks);
    if (!Number.isSafeInteger(page) || page < 0 || page >= pages) throw new InvalidArgumentError(`volume ${volume.name} has pages 0 to ${pages - 1}, not ${page}`);
    const member = this.o.members.get(to);
    if (!member || member.state === 'removed') throw new InvalidArgumentError(`no peer "${to}" in the group (peers: ${this.o.members.ids().join(', ')})`);
    if (member.state !== 'up') throw new ConflictError(`peer ${to} is ${member.state}: nothing new is placed on it`);
    const route = this.o.catalog.routes(volume).route(page);
    if (route.owner !== this.o.self) throw new ConflictError(`page ${page} of ${volume.name} is on ${route.owner}, not ${this.o.self}`);
    if (to === this.o.self) throw new InvalidArgumentError(`page ${page} of ${volume.name} is already on ${to}`);
    if (this.o.settled && !(await this.o.settled(volume.id, page))) throw new ConflictError(`page ${page} of ${volume.name} is still failing over or being resynced on ${this.o.self}; try the move again shortly`);
    if (this.running.has(key(volume.id, page))) throw new ConflictError(`page ${page} of ${volume.name} is already moving`);
    // A peer holding a copy takes the primary role without data copied, once its copy is in sync.
    const known = route.copies ? route : await this.o.catalog.fetchRoute(volume, page);
    if (known.owner !== this.o.self) throw new ConflictError(`page ${page} of ${volume.name} is on ${known.owner}, not ${this.o.self}`);
    const role = roleOf(known, to);
    if (role === 'stale') throw new ConflictError(`${to}'s copy of page ${page} of ${volume.name} is resyncing; it can take the primary role once it is in sync`);
    if (role === 'in-sync') return this.switchRole(volume, page, known, to);
    const movable = this.o.movable(volume.id);
    if (!movable) throw new PeersanError(`volume ${volume.name} is not open on ${this.o.self} yet`);
    if (this.closed) throw new PeersanError(`peer ${this.o.self} is stopping`);
    const { pieceBlocks, pieces } = pieceGeometry(volume.pageBlocks, volume.blockBytes, this.o.settings.pieceBytes);
    const cp: MoveCheckpoint = { volumeId: volume.id, page, from: this.o.self, to, routeVersion: route.version, pieces, pieceBlocks, done: 0, state: 'copying', startedAtMs: this.o.env.clock.nowMs(), id: this.o.env.random.bytes(8).toString('hex') };
    try {
      await this.o.catalog.createMoveIntent(volume, page, { from: cp.from, to, routeVersion: cp.routeVersion, startedAtMs: cp.startedAtMs, id: cp.id });
    } catch (err) {
      // No answer is no proof it was not recorded: make sure it is not left behind.
      if (!(err instanceof ConflictError)) void this.forgetIntent(cp);
      throw err;
    }
    try {
      await this.o.store.putRecord(checkpointKey(volume.id, page), encodeCheckpoint(cp), true);
      await this.o.rpc.prepare(to, { volumeId: volume.id, page, from: this.o.self, fresh: true });
    } catch (err) {
      await this.o.store.deleteRecord(checkpointKey(volume.id, page)).catch(() => undefined);
      void this.forgetIntent(cp);
      throw err instanceof PeersanError ? err : new PeersanError(`cannot start the move: ${(err as Error).message}`);
    }
    const r = await this.launch(cp, movable, false);
    this.o.log.info({ volume: volume.name, page, to, pieces }, 'page move started');
    this.o.event?.('migration', `moving page ${page} of ${volume.name} from ${this.o.self} to ${to}`, volume.name);
    return this.info(r);
  }

  /**
   * Hand the primary role of the page to `to`, an in-sync copy: one CAS (owner := to, first in
   * copies and in-sync set), checked against the catalog's record. See MigratorOptions.quiet.
   */
  private async switchRole(volume: VolumeRecord, page: number, route: Route, to: string): Promise<MoveInfo> {
    const quiet = this.o.quiet;
    const cas = async (): Promise<Route> => {
      // The new primary syncs its store first, under the quiet: every change of the page it
      // acknowledged is in it. A host's flush does not wait for a secondary it cannot reach
      // (router.ts flush), so that copy may hold flushed writes only in memory; as primary it
      // may become their only copy (a later drop of the others), and a power loss then lost
      // them (the takeover's kin: failover.ts takeOver, simulator seed 128201).
      await this.o.flushCopy?.(to, volume.id);
      // `to` may have begun to leave while the page quieted: a leaving peer walks its roles once
      // more before it stops, but one handed to it after that would fail over instead.
      const member = this.o.members.get(to);
      if (member?.state !== 'up') throw new ConflictError(`peer ${to} is ${member?.state ?? 'gone'}: it takes no primary role`);
      return this.o.catalog.casRoute(volume, page, route, (now) => {
        if (roleOf(now, to) !== 'in-sync') throw new ConflictError(`${to} holds no in-sync copy of page ${page} of ${volume.name} any more`);
        return switchedPrimary(now, to, quiet !== undefined);
      });
    };
    const startedAtMs = this.o.env.clock.nowMs();
    // A move of the page left by an earlier start (or resumed by nobody yet) must end first: its
    // intent names this peer as the source, and a new primary would never remove it.
    if (await this.o.catalog.moveIntent(volume.id, page)) throw new ConflictError(`page ${page} of ${volume.name} is already moving`);
    const next = quiet ? await quiet(volume.id, page, cas) : await cas();
    this.o.log.info({ volume: volume.name, page, to, version: next.version }, 'primary role of a page switched to an in-sync copy');
    this.o.event?.('page-moved', `page ${page} of ${volume.name}: primary role switched from ${this.o.self} to ${to} (no data copied)`, volume.name);
    this.o.committed?.({ volumeId: volume.id, page, from: this.o.self, to });
    return { volume: volume.name, volumeId: volume.id, page, from: this.o.self, to, pieces: 0, done: 0, state: 'switched', startedAtMs, bytesCopied: 0, lastError: '' };
  }

  /** A move of the page away from this peer runs here (maybe lost, and not abandoned yet): its I/O goes through the move. */
  movingOut(volumeId: string, page: number): boolean {
    return this.running.has(key(volumeId, page));
  }

  /** Resolves when the move of the page commits; rejects if it is cancelled. */
  wait(volumeId: string, page: number): Promise<void> {
    const r = this.running.get(key(volumeId, page));
    return r ? r.finished : Promise.resolve();
  }

  cancel(volumeId: string, page: number): void {
    const r = this.running.get(key(volumeId, page));
    if (!r) throw new NotFoundError(`page ${page} is not moving away from ${this.o.self}`);
    if (!r.machine.cancellable) throw new ConflictError(`the move of page ${page} is committing; it cannot be cancelled any more`);
    this.drive(r, { kind: 'cancel' });
  }

  list(): MoveInfo[] {
    return [...this.running.values()].map((r) => this.info(r));
  }

  /** Pages of the volume this peer was receiving when it restarted, replicated ones: its copy of their moved pieces may lack acknowledged writes. */
  restartedPages(volumeId: string): number[] {
    return [...this.restarted].filter((k) => k.startsWith(`${volumeId}/`)).map((k) => Number(k.slice(volumeId.length + 1)));
  }

  /** This peer's moves of a volume with their cursors: pieces [0, done) are on the destination. */
  cursors(volumeId: string): { volumeId: string; page: number; from: string; to: string; done: number; pieceBlocks: number }[] {
    return [...this.running.values()]
      .filter((r) => r.machine.cp.volumeId === volumeId)
      .map((r) => ({ volumeId, page: r.machine.cp.page, from: r.machine.cp.from, to: r.machine.cp.to, done: r.move.cursor.done, pieceBlocks: r.machine.cp.pieceBlocks }));
  }

  /** Resolves when no step of a move of the volume is running (new ones wait while a snapshot holds it). */
  idle(volumeId: string): Promise<void> {
    const s = this.stepping.get(volumeId);
    return s ? new Promise((r) => s.idle.push(r)) : Promise.resolve();
  }

  /** Moves running on this peer (the balancer's rate limit). */
  get inFlight(): number {
    return this.running.size;
  }

  private info(r: Running): MoveInfo {
    const m = r.machine;
    const c = m.cp;
    return {
      volume: this.o.catalog.volumeById(c.volumeId)?.name ?? c.volumeId, volumeId: c.volumeId, page: c.page, from: c.from, to: c.to,
      pieces: c.pieces, done: c.done, state: c.state, startedAtMs: c.startedAtMs, bytesCopied: m.bytesCopied, lastError: m.lastError,
    };
  }

  /** Register the move with the page's I/O path and run its machine in the background. */
  private async launch(cp: MoveCheckpoint, movable: MovableVolume, resumed: boolean): Promise<Running> {
    const pageLba = cp.page * (this.o.catalog.volumeById(cp.volumeId)?.pageBlocks ?? 0);
    const cursor: MoveCursor = { pieces: cp.pieces, done: cp.done, transit: -1, state: cp.state === 'cancelling' ? 'cancelling' : 'copying' };
    const move: OutgoingMove = { page: cp.page, to: cp.to, pageLba, pieceBlocks: cp.pieceBlocks, cursor, locks: Array.from({ length: cp.pieces }, () => new SharedLock()), transitDirty: false };
    const machine = new MoveMachine(cp, { pageLba, blockCount: movable.blockCount, blockBytes: movable.blockBytes }, { resumed, duty: this.o.settings.duty ?? 1 });
    let settle!: (err?: Error) => void;
    const finished = new Promise<void>((resolve, reject) => (settle = (err) => (err ? reject(err) : resolve())));
    finished.catch(() => undefined);
    // A takeover or handover gives the page to another copy while it moves: the machine hears of
    // it at once (the commit could not see a loss followed by a return of the role).
    const table = this.o.catalog.routes(this.requireVolume(cp.volumeId));
    const heard = (page: number, route: Route): void => {
      if (page !== cp.page || route.version <= cp.routeVersion || route.owner === cp.from || committedByMove(r.machine.cp, route)) return;
      // Before this peer asks the new primary for a resync (the same route starts it): a whole one.
      this.o.distrust?.(cp.volumeId, cp.page);
      this.drive(r, { kind: 'lost' });
    };
    const unfollow = table.onLearn(heard);
    const r: Running = { machine, move, movable, finished, settle, unfollow, finishing: false, passToken: 0 };
    this.running.set(key(cp.volumeId, cp.page), r);
    await movable.begin(move);
    this.drive(r, { kind: 'begin' });
    // A takeover learned after start() read the route and before the listener above (the intent's
    // write, a resumed move's start) is heard now: else the move would copy on to a destination
    // that refuses it, and never hear of it again (simulator, seed 1067).
    heard(cp.page, table.route(cp.page));
    return r;
  }

  // ---- the driver: the machine's actions with real I/O ------------------------------------------

  /** Step the move's machine with `ev` and perform what it returns; each outcome steps it again. */
  private drive(r: Running, ev: MoveEvent): void {
    const m = r.machine;
    const before = m.lastError;
    const actions = m.step(ev);
    if (m.lastError !== '' && m.lastError !== before && !m.over) this.o.log.warn({ page: m.cp.page, to: m.cp.to, piece: m.transit, reason: m.lastError }, 'page move step failed; retrying');
    for (const a of actions) {
      if (a.kind === 'leaveStep' || a.kind === 'turnBack' || a.kind === 'lostPage' || a.kind === 'ended') {
        this.effect(r, a);
        continue;
      }
      // Only a stop of this peer ends a move early; the checkpoint resumes it at the next start.
      const outcome = this.closed ? Promise.resolve<MoveEvent>({ kind: 'stop', error: new PeersanError('peer stopping; the move resumes at its next start') }) : this.perform(r, a);
      void outcome.then(
        (next) => this.drive(r, next),
        (error: Error) => this.drive(r, { kind: 'stop', error }),
      );
    }
  }

  private effect(r: Running, a: Effect): void {
    if (a.kind === 'leaveStep') return this.leaveStep(r.machine.cp.volumeId);
    if (a.kind === 'turnBack') {
      r.move.cursor.state = 'cancelling';
      return;
    }
    if (a.kind === 'lostPage') {
      const cp = r.machine.cp;
      this.o.log.warn({ page: cp.page, volumeId: cp.volumeId, to: cp.to }, 'the page has another primary: move abandoned, this copy resyncs whole');
      this.o.distrust?.(cp.volumeId, cp.page);
      return;
    }
    this.ended(r, a);
  }

  /** One action with an outcome; a rejection (an action with no failure event failed) stops the move. */
  private async perform(r: Running, a: Exclude<MoveAction, Effect>): Promise<MoveEvent> {
    const { machine, move, movable } = r;
    const cp = machine.cp;
    switch (a.kind) {
      case 'prepare':
        return outcome(this.confirm(cp), { kind: 'prepared' }, (error) => ({ kind: 'prepareFailed', error }));
      case 'handOff':
        return outcome(this.o.handOff?.(cp.volumeId, cp.page) ?? Promise.resolve(false), (handed) => ({ kind: 'handedOff', handed }), (error) => ({ kind: 'handOffFailed', error }));
      case 'enterStep':
        return this.enterStep(cp.volumeId);
      case 'throttle':
        await this.rate.take(a.bytes);
        return { kind: 'throttled' };
      case 'setTransit':
        await move.locks[a.piece].runExclusive(async () => {
          move.cursor.transit = a.piece;
          move.transitDirty = false;
        });
        return { kind: 'transitSet' };
      case 'copyChunk':
        return this.copyChunk(r, a);
      case 'markPiece':
        return move.locks[a.piece].runExclusive(async (): Promise<MoveEvent> => {
          if (a.ifClean && move.transitDirty) {
            move.cursor.transit = -1;
            return { kind: 'pieceDirty' };
          }
          move.cursor.done = a.done;
          move.cursor.transit = -1;
          await this.checkpoint(a.checkpoint);
          return { kind: 'pieceMarked' };
        });
      case 'clearTransit':
        await move.locks[a.piece].runExclusive(async () => {
          move.cursor.transit = -1;
        });
        return { kind: 'transitCleared' };
      case 'persist':
        await this.checkpoint(a.checkpoint);
        return { kind: 'persisted' };
      case 'setRoute': {
        let unconfirmed: Error | undefined;
        const confirmed = async (): Promise<void> => {
          if (!a.confirm) return;
          try {
            await this.confirm(cp);
          } catch (err) {
            unconfirmed = err as Error;
            throw err;
          }
        };
        return outcome(
          (async () => {
            // The reconcile before the handoff spreads this peer's content of recent grains, read
            // through the move (done pieces from D): D confirms first that it lost none of them
            // (a restart), or the other copies would take D's gaps.
            await confirmed();
            await this.o.beforeHandoff?.(cp.volumeId, cp.page);
            // The CAS runs while no replicated change of the page is under way here (quiet): one
            // in flight at the commit would have reached the other copies but maybe not D, and a
            // COMPARE AND WRITE caught so cannot be answered MOVED (it may have applied). After
            // it, changes find the page gone before applying anything. D confirms again, under
            // the same quiet: nothing it acknowledges after its flush and before the CAS.
            const commit = async (): Promise<Route> => {
              await confirmed();
              return this.o.catalog.setRoute(this.requireVolume(cp.volumeId), cp.page, { owner: cp.from, version: a.version }, cp.to);
            };
            return this.o.quiet ? this.o.quiet(cp.volumeId, cp.page, commit) : commit();
          })(),
          (route) => ({ kind: 'routeSet', version: route.version }),
          (error) => (unconfirmed ? { kind: 'prepareFailed', error: unconfirmed } : { kind: 'routeSetFailed', error }),
        );
      }
      case 'readRoute':
        return outcome(
          (async () => this.o.catalog.fetchRoute(this.requireVolume(cp.volumeId), cp.page))(),
          (route) => ({ kind: 'routeRead', owner: route.owner, version: route.version }),
          (error) => ({ kind: 'routeReadFailed', error }),
        );
      case 'finish':
        r.finishing = true;
        return outcome(this.o.rpc.finish(cp.to, { volumeId: cp.volumeId, page: cp.page, committed: a.committed, version: a.version, from: cp.from }), { kind: 'finished' }, (error) => ({ kind: 'finishFailed', error }));
      case 'deleteIntent':
        return outcome(this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp), { kind: 'intentDeleted' }, (error) => ({ kind: 'intentDeleteFailed', error }));
      case 'release':
        // Every piece is done (or back): whatever still holds a piece lock is being forwarded.
        // New requests find the page gone and are re-routed (PageMovedError).
        movable.end(cp.page);
        await drain(move);
        if (a.free) await this.clearPage(movable, this.requireVolume(cp.volumeId), cp.page);
        else this.o.cancelled?.(cp.volumeId, cp.page);
        await this.o.store.deleteRecord(checkpointKey(cp.volumeId, cp.page));
        return { kind: 'released' };
      case 'armTimer':
        await sleep(this.o.env.timers, a.ms);
        return { kind: 'timer' };
    }
  }

  /**
   * Wait until no snapshot holds the volume, then count a step running. A snapshot's cut needs
   * pieces and routes to stand still; `idle` tells it when the steps already counted have ended.
   */
  private async enterStep(volumeId: string): Promise<MoveEvent> {
    // Another snapshot may hold the volume by the time the last one lets go: look again.
    for (let held = this.o.hold?.(volumeId); held && !this.closed; held = this.o.hold?.(volumeId)) await Promise.race([held, this.closing]);
    if (this.closed) return { kind: 'stop', error: new PeersanError('peer stopping; the move resumes at its next start') };
    // No await between the look above and the count below: a snapshot that takes hold now
    // finds this step counted, and its idle() waits for it.
    const s = this.stepping.get(volumeId) ?? { steps: 0, idle: [] };
    s.steps++;
    this.stepping.set(volumeId, s);
    return { kind: 'stepEntered' };
  }

  private leaveStep(volumeId: string): void {
    const s = this.stepping.get(volumeId);
    if (!s || --s.steps > 0) return;
    this.stepping.delete(volumeId);
    for (const wake of s.idle) wake();
  }

  /**
   * One chunk under the piece's exclusive lock, so no write lands between reading it on one side
   * and writing it on the other. D answers its start token (PageStore.nextStartToken): one that
   * differs from the answer to the pass's first chunk means D restarted since and may have lost
   * the chunks before this one (not synced: only the last chunk is FUA), so the chunk fails and
   * the machine copies the piece again from its first chunk (move-machine.ts; simulator, seed
   * 196915).
   */
  private async copyChunk(r: Running, a: Extract<MoveAction, { kind: 'copyChunk' }>): Promise<MoveEvent> {
    const t0 = this.o.env.clock.monotonicMs();
    const first = a.lba === r.move.pageLba + a.piece * r.move.pieceBlocks;
    try {
      const token = await r.move.locks[a.piece].runExclusive(() => (a.back ? this.copyBack(r, a.lba, a.blocks, a.last) : this.copyForward(r, a.lba, a.blocks, a.last)));
      if (first) r.passToken = token;
      else if (token !== r.passToken) throw new PeersanError(`peer ${r.move.to} restarted while receiving piece ${a.piece} (start token ${r.passToken}, now ${token}): the piece is copied again from its first chunk`);
    } catch (error) {
      return { kind: 'chunkFailed', error: error as Error };
    }
    this.counters.bytesCopied += a.blocks * r.movable.blockBytes;
    return { kind: 'chunkCopied', ms: this.o.env.clock.monotonicMs() - t0 };
  }

  /** Copy the chunk to D; resolves to D's start token (0 from a peer of an older version). */
  private async copyForward(r: Running, lba: number, blocks: number, last: boolean): Promise<number> {
    const { movable, move } = r;
    const extents = await movable.raw.lbaStatus(lba, blocks);
    // The last chunk of a piece is written FUA: the piece is durable on D before it is marked done.
    if (extents.every((e) => !e.mapped)) return (await movable.toDest(move.to, BlockOp.unmap, lba, blocks, last)).version;
    return (await movable.toDest(move.to, BlockOp.write, lba, blocks, last, await movable.raw.read(lba, blocks))).version;
  }

  /** Copy the chunk back from D; resolves to D's start token (its answer to the chunk's first request). */
  private async copyBack(r: Running, lba: number, blocks: number, last: boolean): Promise<number> {
    const { movable, move } = r;
    const status = await movable.toDest(move.to, BlockOp.lbaStatus, lba, blocks, false);
    const extents = decodeExtents(status.payload) ?? [];
    if (extents.length > 0 && extents.every((e) => !e.mapped)) await movable.raw.unmap(lba, blocks, { fua: last });
    else {
      const read = await movable.toDest(move.to, BlockOp.read, lba, blocks, false);
      if (read.payload?.length !== blocks * movable.blockBytes) throw new PeersanError(`peer ${move.to} returned a short read`);
      if (read.version !== status.version) throw new PeersanError(`peer ${move.to} restarted while its chunk ${lba}+${blocks} was copied back`);
      await movable.raw.write(lba, read.payload, { fua: last });
    }
    return status.version;
  }

  /** The move is over: report it and let its waiters go. */
  private ended(r: Running, a: Extract<MoveAction, { kind: 'ended' }>): void {
    const cp = r.machine.cp;
    const name = this.o.catalog.volumeById(cp.volumeId)?.name ?? cp.volumeId;
    this.running.delete(key(cp.volumeId, cp.page));
    r.unfollow();
    if (a.outcome === 'stopped') {
      r.settle(a.error);
      if (!this.closed) this.o.log.error({ err: a.error, page: cp.page, volumeId: cp.volumeId }, 'page move stopped');
      return;
    }
    if (a.outcome === 'cancelled') {
      this.counters.cancelled++;
      this.o.log.info({ volume: name, page: cp.page, to: cp.to }, 'page move cancelled and rolled back');
      this.o.event?.('migration', `the move of page ${cp.page} of ${name} to ${cp.to} was cancelled; the page stays on ${cp.from}`, name);
      r.settle(new PeersanError(`the move of page ${cp.page} to ${cp.to} was cancelled`));
      return;
    }
    this.counters.committed++;
    this.o.log.info({ volume: name, page: cp.page, to: cp.to, version: a.version, bytesCopied: r.machine.bytesCopied }, 'page move committed');
    this.o.event?.('page-moved', `page ${cp.page} of ${name} moved from ${cp.from} to ${cp.to} (${Math.round((this.o.env.clock.nowMs() - cp.startedAtMs) / 100) / 10} s)`, name);
    this.o.committed?.({ volumeId: cp.volumeId, page: cp.page, from: cp.from, to: cp.to });
    r.settle();
  }

  /** PREPARE again on D (not fresh): it keeps its pieces, makes them durable, or refuses a move it may have lost writes of. */
  private confirm(cp: MoveCheckpoint): Promise<void> {
    return this.o.rpc.prepare(cp.to, { volumeId: cp.volumeId, page: cp.page, from: cp.from, fresh: false });
  }

  private checkpoint(cp: MoveCheckpoint): Promise<void> {
    return this.o.store.putRecord(checkpointKey(cp.volumeId, cp.page), encodeCheckpoint(cp), true);
  }

  /**
   * Remove the intent of a move that did not start, in the background until it is gone (or this
   * peer stops; its restart removes intents it left, see recover): a stale intent would block
   * every later move of the page. The simulator found intents left after a catalog hiccup.
   */
  private async forgetIntent(cp: MoveCheckpoint): Promise<void> {
    while (!this.closed) {
      try {
        return await this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp);
      } catch {
        await sleep(this.o.env.timers, retryMs);
      }
    }
  }

  // ---- restart --------------------------------------------------------------------------------

  /** Before this peer serves anything: resume its outgoing moves and check its incoming ones. */
  async recover(): Promise<void> {
    const checkpointed = new Set<string>();
    for (const rec of await this.o.store.listRecords('move-out/')) {
      const cp = decodeCheckpoint(rec.value);
      if (cp) checkpointed.add(key(cp.volumeId, cp.page));
      const volume = cp && this.o.catalog.volumeById(cp.volumeId);
      const movable = cp && this.o.movable(cp.volumeId);
      if (!cp || !volume) {
        await this.o.store.deleteRecord(rec.key);
        continue;
      }
      // The volume is in the catalog but not open here: keep the checkpoint for the next start
      // (dropping it would leave the move's intent in the catalog for good).
      if (!movable) continue;
      const route = await this.o.catalog.fetchRoute(volume, cp.page);
      // The route's version may have moved on since the commit (changes of the copies, a takeover).
      if (committedByMove(cp, route)) {
        // Committed before the crash: finish the clean-up.
        this.o.log.info({ volume: volume.name, page: cp.page, to: cp.to }, 'completing a page move committed before a restart');
        await this.o.rpc.finish(cp.to, { volumeId: cp.volumeId, page: cp.page, committed: true, version: route.version, from: cp.from }).catch(() => undefined);
        await this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp);
        await this.clearPage(movable, volume, cp.page);
        await this.o.store.deleteRecord(rec.key);
        this.o.committed?.({ volumeId: cp.volumeId, page: cp.page, from: cp.from, to: cp.to });
      } else if (route.owner === this.o.self && route.version >= cp.routeVersion) {
        this.o.log.info({ volume: volume.name, page: cp.page, to: cp.to, done: cp.done, pieces: cp.pieces, state: cp.state }, 'resuming a page move after a restart');
        await this.launch(cp, movable, true);
      } else {
        // Another primary took the page over while this peer was down: the move is abandoned (as
        // MoveMachine.abandon does), and this copy, missing what was forwarded to D, resyncs whole.
        this.o.log.warn({ volume: volume.name, page: cp.page, route }, 'abandoning a page move whose page has another primary');
        this.o.distrust?.(cp.volumeId, cp.page);
        await this.o.rpc.finish(cp.to, { volumeId: cp.volumeId, page: cp.page, committed: false, version: 0, from: cp.from }).catch(() => undefined);
        await this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp);
        await this.o.store.deleteRecord(rec.key);
      }
    }
    // Intents this peer recorded for moves it has no checkpoint of (a start that failed, and
    // whose clean-up a crash or the catalog cut short): nobody else would ever remove them.
    for (const { volumeId, page, intent } of await this.o.catalog.moveIntents()) {
      if (intent.from === this.o.self && !checkpointed.has(key(volumeId, page))) {
        this.o.log.info({ volumeId, page, to: intent.to }, 'removing the intent of a page move that never started');
        await this.o.catalog.deleteMoveIntent(volumeId, page, intent);
      }
    }
    for (const rec of await this.o.store.listRecords('move-in/')) {
      const [, volumeId, pageText] = rec.key.split('/');
      const page = Number(pageText);
      const from = (JSON.parse(rec.value.toString()) as { from: string }).from;
      const volume = this.o.catalog.volumeById(volumeId);
      const movable = this.o.movable(volumeId);
      if (!volume) {
        await this.o.store.deleteRecord(rec.key);
        continue;
      }
      if (!movable) continue;
      const route = await this.o.catalog.fetchRoute(volume, page);
      const intent = await this.o.catalog.moveIntent(volumeId, page);
      if (route.owner === this.o.self || copiesOf(route).includes(this.o.self)) {
        await this.o.store.deleteRecord(rec.key);
      } else if (intent && intent.to === this.o.self && intent.from === from) {
        this.incoming.set(key(volumeId, page), from);
        // With one copy a crash may lose writes not flushed yet (the host did not flush them); with
        // more, the other copies hold them, and this copy must not become their primary.
        if (copiesOf(route).length > 1) this.restarted.add(key(volumeId, page));
      } else {
        this.o.log.info({ volume: volume.name, page }, 'freeing the copy of a page whose move was abandoned');
        await this.clearPage(movable, volume, page);
        await this.o.store.deleteRecord(rec.key);
      }
    }
  }

  /** Stop copying; moves resume from their checkpoints at the next start. */
  close(): void {
    this.closed = true;
    this.closeNow();
  }

  private requireVolume(volumeId: string): VolumeRecord {
    const v = this.o.catalog.volumeById(volumeId);
    if (!v) throw new NotFoundError(`no volume with id ${volumeId}`);
    return v;
  }
}

function key(volumeId: string, page: number): string {
  return `${volumeId}/${page}`;
}

/** Wait until no request holds any piece of the move. */
async function drain(move: OutgoingMove): Promise<void> {
  for (const lock of move.locks) await lock.runExclusive(async () => undefined);
}

/** The event for a promise's outcome: `ok` (or made from its value) when it resolves, `failed(error)` when it rejects. */
function outcome<T>(p: Promise<T>, ok: MoveEvent | ((v: T) => MoveEvent), failed: (error: Error) => MoveEvent): Promise<MoveEvent> {
  return p.then((v) => (typeof ok === 'function' ? ok(v) : ok), (err: unknown) => failed(err as Error));
}
