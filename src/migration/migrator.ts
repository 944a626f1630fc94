// Page migration on one peer (DESIGN.md 4), both roles:
//
// Source S (the owner) — start(): record the intent in the catalog (CAS-create, one move per
// page), write a checkpoint, ask D to prepare, then route the page's I/O through its pieces
// (movable.ts) and copy them one by one, rate-limited: mark the piece in transit (writes go to
// both copies), copy it in chunks (each chunk under the piece's exclusive lock, so no write
// lands between reading it from S and writing it to D), make it durable on D, then mark it
// done in the checkpoint (S forwards its I/O to D from then on). Commit: CAS the route to
// {D, version + 1}, tell D, stop serving the page and free it. Cancel before commit copies
// the done pieces back from D, last first, the same way, and tells D to free its copy.
//
// Destination D — prepare(): checks the intent, clears any stale copy of the page and keeps
// a durable "receiving" record; its page service then accepts S's staging traffic for the
// page. finish(): learn the new route (commit) or free the copy (cancel).
//
// Restart: S resumes every checkpointed move from its piece in transit (or completes a
// commit it had already made in the catalog); D keeps a receiving record while the intent
// stands, drops it once it owns the page, and frees a copy whose move was abandoned. The
// catalog's route CAS is the single commit point: never two owners for one page version.

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { sleep, type Env } from '../env/env';
import { ConflictError, InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import { BlockOp, decodeExtents } from '../routing/frame';
import type { Route } from '../routing/table';
import type { PageStore } from '../store/page-store';
import { SharedLock } from '../store/shared-lock';
import type { MovableVolume, OutgoingMove } from './movable';
import { checkpointKey, decodeCheckpoint, encodeCheckpoint, incomingKey, pieceGeometry, type MoveCheckpoint, type MoveCursor } from './pieces';
import { ByteRate, ChunkPacer } from './rate';

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
  groupPeers: readonly string[];
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
}

/** Bytes copied per exclusive hold of a piece: small, so host writes to the piece wait little. */
const chunkBytes = 64 * 1024;
/** After a failed copy step (D unreachable), try again after this long. */
const retryMs = 500;

interface Running {
  cp: MoveCheckpoint;
  move: OutgoingMove;
  movable: MovableVolume;
  bytesCopied: number;
  lastError: string;
  cancelRequested: boolean;
  /** Gives way to host I/O between chunks. */
  pacer: ChunkPacer;
  /** Settles when the move commits (resolve) or is cancelled / fails for good (reject). */
  finished: Promise<void>;
  settle(err?: Error): void;
}

export class Migrator {
  private readonly o: MigratorOptions;
  private readonly rate: ByteRate;
  /** Outgoing moves by `volumeId/page`. */
  private readonly running = new Map<string, Running>();
  /** Pages this peer is receiving: `volumeId/page` → source. */
  private readonly incoming = new Map<string, string>();
  private closed = false;
  /** Resolves at close(): steps waiting for a snapshot's hold stop waiting. */
  private readonly closing: Promise<void>;
  private closeNow!: () => void;
  /** Running totals for /metrics. */
  readonly counters = { committed: 0, cancelled: 0, bytesCopied: 0 };
  /** Move steps running per volume, and who waits for them to end (see step() and idle()). */
  private readonly stepping = new Map<string, { steps: number; idle: (() => void)[] }>();

  constructor(opts: MigratorOptions) {
    this.o = opts;
    // The burst is one piece: after a pause the copier may take one piece at once, no more, so
    // copying is paced evenly instead of in bursts that stall host I/O for a moment.
    this.rate = new ByteRate(opts.settings.rateBytesPerSec, Math.max(chunkBytes, opts.settings.pieceBytes), opts.env);
    this.closing = new Promise((r) => (this.closeNow = r));
  }

  // ---- destination side -----------------------------------------------------------------------

  /** Asked by the page service for every staging request (a move's copy or dual write) it gets. */
  receiving(volumeId: string, page: number): boolean {
    return this.incoming.has(key(volumeId, page));
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
      this.incoming.delete(k);
      await this.clearPage(movable, volume, req.page);
    }
    await this.o.store.putRecord(incomingKey(req.volumeId, req.page), Buffer.from(JSON.stringify({ from: req.from })), true);
    this.incoming.set(k, req.from);
  }

  async finish(req: FinishRequest): Promise<void> {
    const k = key(req.volumeId, req.page);
    const volume = this.o.catalog.volumeById(req.volumeId);
    if (req.committed) {
      if (volume) this.o.catalog.routes(volume).learn(req.page, { owner: this.o.self, version: req.version });
    } else {
      const movable = this.o.movable(req.volumeId);
      if (volume && movable) await this.clearPage(movable, volume, req.page);
    }
    this.incoming.delete(k);
    await this.o.store.deleteRecord(incomingKey(req.volumeId, req.page));
  }

  private async clearPage(movable: MovableVolume, volume: VolumeRecord, page: number): Promise<void> {
    const first = page * volume.pageBlocks;
    const blocks = Math.min(volume.pageBlocks, movable.blockCount - first);
    if (blocks > 0) await movable.raw.unmap(first, blocks);
  }

  // ---- source side ----------------------------------------------------------------------------

  /** Start moving a page this peer owns; resolves once the move is under way (see `wait`). */
  async start(volumeName: string, page: number, to: string): Promise<MoveInfo> {
    const volume = this.o.catalog.require(volumeName);
    const pages = Math.ceil(volume.sizeBytes / volume.blockBytes / volume.pageBlocks);
    if (!Number.isSafeInteger(page) || page < 0 || page >= pages) throw new InvalidArgumentError(`volume ${volume.name} has pages 0 to ${pages - 1}, not ${page}`);
    if (!this.o.groupPeers.includes(to)) throw new InvalidArgumentError(`no peer "${to}" in the group (peers: ${this.o.groupPeers.join(', ')})`);
    const route = this.o.catalog.routes(volume).route(page);
    if (route.owner !== this.o.self) throw new ConflictError(`page ${page} of ${volume.name} is on ${route.owner}, not ${this.o.self}`);
    if (to === this.o.self) throw new InvalidArgumentError(`page ${page} of ${volume.name} is already on ${to}`);
    if (this.running.has(key(volume.id, page))) throw new ConflictError(`page ${page} of ${volume.name} is already moving`);
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
    const r = await this.launch(cp, movable, true);
    this.o.log.info({ volume: volume.name, page, to, pieces }, 'page move started');
    this.o.event?.('migration', `moving page ${page} of ${volume.name} from ${this.o.self} to ${to}`, volume.name);
    return this.info(r);
  }

  /** Resolves when the move of the page commits; rejects if it is cancelled. */
  wait(volumeId: string, page: number): Promise<void> {
    const r = this.running.get(key(volumeId, page));
    return r ? r.finished : Promise.resolve();
  }

  cancel(volumeId: string, page: number): void {
    const r = this.running.get(key(volumeId, page));
    if (!r) throw new NotFoundError(`page ${page} is not moving away from ${this.o.self}`);
    if (r.cp.state === 'committing') throw new ConflictError(`the move of page ${page} is committing; it cannot be cancelled any more`);
    r.cancelRequested = true;
  }

  list(): MoveInfo[] {
    return [...this.running.values()].map((r) => this.info(r));
  }

  /** This peer's moves of a volume with their cursors: pieces [0, done) are on the destination. */
  cursors(volumeId: string): { volumeId: string; page: number; from: string; to: string; done: number; pieceBlocks: number }[] {
    return [...this.running.values()]
      .filter((r) => r.cp.volumeId === volumeId)
      .map((r) => ({ volumeId, page: r.cp.page, from: r.cp.from, to: r.cp.to, done: r.move.cursor.done, pieceBlocks: r.cp.pieceBlocks }));
  }

  /**
   * Run one step of a move (a chunk copy, a piece state change, the commit) unless a snapshot
   * holds the volume: then wait until it lets go. A snapshot's cut needs pieces and routes to
   * stand still; `idle` tells it when the steps already started have finished.
   */
  private async step<T>(volumeId: string, fn: () => Promise<T>): Promise<T> {
    // Another snapshot may hold the volume by the time the last one lets go: look again.
    for (let held = this.o.hold?.(volumeId); held && !this.closed; held = this.o.hold?.(volumeId)) await Promise.race([held, this.closing]);
    // No await between the look above and the count below: a snapshot that takes hold now
    // finds this step counted, and its idle() waits for it.
    const s = this.stepping.get(volumeId) ?? { steps: 0, idle: [] };
    s.steps++;
    this.stepping.set(volumeId, s);
    try {
      return await fn();
    } finally {
      if (--s.steps === 0) {
        this.stepping.delete(volumeId);
        for (const wake of s.idle) wake();
      }
    }
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
    const c = r.cp;
    return {
      volume: this.o.catalog.volumeById(c.volumeId)?.name ?? c.volumeId, volumeId: c.volumeId, page: c.page, from: c.from, to: c.to,
      pieces: c.pieces, done: c.done, state: c.state, startedAtMs: c.startedAtMs, bytesCopied: r.bytesCopied, lastError: r.lastError,
    };
  }

  /** Register the move with the page's I/O path and run it in the background. */
  private async launch(cp: MoveCheckpoint, movable: MovableVolume, fresh: boolean): Promise<Running> {
    const cursor: MoveCursor = { pieces: cp.pieces, done: cp.done, transit: -1, state: cp.state === 'cancelling' ? 'cancelling' : 'copying' };
    const move: OutgoingMove = {
      page: cp.page, to: cp.to, pageLba: cp.page * (this.o.catalog.volumeById(cp.volumeId)?.pageBlocks ?? 0), pieceBlocks: cp.pieceBlocks,
      cursor, locks: Array.from({ length: cp.pieces }, () => new SharedLock()), transitDirty: false,
    };
    let settle!: (err?: Error) => void;
    const finished = new Promise<void>((resolve, reject) => (settle = (err) => (err ? reject(err) : resolve())));
    finished.catch(() => undefined);
    const r: Running = { cp, move, movable, bytesCopied: 0, lastError: '', cancelRequested: cp.state === 'cancelling', pacer: new ChunkPacer(this.o.settings.duty ?? 1), finished, settle };
    this.running.set(key(cp.volumeId, cp.page), r);
    await movable.begin(move);
    void this.run(r, fresh).catch((err: Error) => {
      // Only a stop of this peer ends a move early; the checkpoint resumes it at the next start.
      r.lastError = err.message;
      this.running.delete(key(cp.volumeId, cp.page));
      r.settle(err);
      if (!this.closed) this.o.log.error({ err, page: cp.page, volumeId: cp.volumeId }, 'page move stopped');
    });
    return r;
  }

  private async run(r: Running, fresh: boolean): Promise<void> {
    const { cp, move } = r;
    if (!fresh) await this.retrying(r, () => this.o.rpc.prepare(cp.to, { volumeId: cp.volumeId, page: cp.page, from: cp.from, fresh: false }));
    while (!r.cancelRequested && move.cursor.done < cp.pieces) {
      const piece = move.cursor.done;
      await this.step(cp.volumeId, () => move.locks[piece].runExclusive(async () => {
        move.cursor.transit = piece;
        move.transitDirty = false;
      }));
      await this.copyPiece(r, piece, false);
      await this.step(cp.volumeId, () => move.locks[piece].runExclusive(async () => {
        if (r.cancelRequested || move.transitDirty) {
          move.cursor.transit = -1;
          return;
        }
        move.cursor.done = piece + 1;
        move.cursor.transit = -1;
        cp.done = piece + 1;
        await this.checkpoint(cp);
      }));
    }
    if (r.cancelRequested) return this.rollBack(r);
    await this.step(cp.volumeId, () => this.commit(r));
  }

  /**
   * Copy one piece in chunks, forward (S → D) or back (D → S), until all of it went through
   * without a failure. A chunk that fails starts the piece again from its first chunk: the
   * other side may have restarted meanwhile and lost the chunks before it, which were not yet
   * durable there (only the piece's last chunk is sent FUA). The simulator found a move that
   * retried just the failed chunk and committed a page missing an earlier one (seed 104).
   */
  private async copyPiece(r: Running, piece: number, back: boolean): Promise<void> {
    while (!(await this.copyPieceOnce(r, piece, back))) {
      if (this.closed) throw new PeersanError('peer stopping; the move resumes at its next start');
      await sleep(this.o.env.timers, retryMs);
    }
  }

  /** One pass over the piece's chunks; false when a chunk failed (the piece must be copied again). */
  private async copyPieceOnce(r: Running, piece: number, back: boolean): Promise<boolean> {
    const { move, movable } = r;
    const bs = movable.blockBytes;
    const first = move.pageLba + piece * move.pieceBlocks;
    const end = Math.min(first + move.pieceBlocks, movable.blockCount);
    const chunkBlocks = Math.max(1, Math.floor(chunkBytes / bs));
    for (let lba = first; lba < end; lba += chunkBlocks) {
      if (r.cancelRequested && !back) return true;
      const blocks = Math.min(chunkBlocks, end - lba);
      const last = lba + blocks >= end;
      await this.rate.take(blocks * bs);
      const t0 = this.o.env.clock.monotonicMs();
      try {
        await this.step(r.cp.volumeId, () => move.locks[piece].runExclusive(() => (back ? this.copyBack(r, lba, blocks, last) : this.copyForward(r, lba, blocks, last))));
        r.lastError = '';
      } catch (err) {
        if (err instanceof ConflictError || err instanceof NotFoundError) throw err;
        if (r.lastError !== (err as Error).message) this.o.log.warn({ page: r.cp.page, to: r.cp.to, piece, reason: (err as Error).message }, 'page move step failed; copying the piece again');
        r.lastError = (err as Error).message;
        return false;
      }
      // The last chunk of a piece waits for a sync on D: slow by design, not a sign of load.
      if (!last) await this.yieldToHosts(r, this.o.env.clock.monotonicMs() - t0);
      r.bytesCopied += blocks * bs;
      this.counters.bytesCopied += blocks * bs;
    }
    return true;
  }

  /** Pause after a chunk that took `ms` if it waited behind host I/O (rate.ts: ChunkPacer). */
  private async yieldToHosts(r: Running, ms: number): Promise<void> {
    const pauseMs = r.pacer.pauseAfter(ms);
    if (pauseMs >= 1 && !this.closed) await sleep(this.o.env.timers, pauseMs);
  }

  private async copyForward(r: Running, lba: number, blocks: number, last: boolean): Promise<void> {
    const { movable, move } = r;
    const extents = await movable.raw.lbaStatus(lba, blocks);
    // The last chunk of a piece is written FUA: the piece is durable on D before it is marked done.
    if (extents.every((e) => !e.mapped)) await movable.toDest(move.to, BlockOp.unmap, lba, blocks, last);
    else await movable.toDest(move.to, BlockOp.write, lba, blocks, last, await movable.raw.read(lba, blocks));
  }

  private async copyBack(r: Running, lba: number, blocks: number, last: boolean): Promise<void> {
    const { movable, move } = r;
    const extents = decodeExtents((await movable.toDest(move.to, BlockOp.lbaStatus, lba, blocks, false)).payload) ?? [];
    if (extents.length > 0 && extents.every((e) => !e.mapped)) await movable.raw.unmap(lba, blocks, { fua: last });
    else {
      const data = (await movable.toDest(move.to, BlockOp.read, lba, blocks, false)).payload;
      if (data?.length !== blocks * movable.blockBytes) throw new PeersanError(`peer ${move.to} returned a short read`);
      await movable.raw.write(lba, data, { fua: last });
    }
  }

  private async commit(r: Running): Promise<void> {
    const { cp, move, movable } = r;
    cp.state = 'committing';
    await this.checkpoint(cp);
    const volume = this.requireVolume(cp.volumeId);
    const route = await this.retrying(r, async (): Promise<Route> => {
      try {
        return await this.o.catalog.setRoute(volume, cp.page, { owner: cp.from, version: cp.routeVersion }, cp.to);
      } catch (err) {
        // A commit made before a crash of this peer, found on restart.
        const now = await this.o.catalog.fetchRoute(volume, cp.page);
        if (now.owner === cp.to && now.version === cp.routeVersion + 1) return now;
        throw err;
      }
    });
    await this.o.rpc.finish(cp.to, { volumeId: cp.volumeId, page: cp.page, committed: true, version: route.version }).catch((err: Error) => {
      this.o.log.warn({ to: cp.to, page: cp.page, reason: err.message }, 'destination did not confirm the commit (it reads the catalog when it returns)');
    });
    await this.retrying(r, () => this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp));
    // Every piece is done: whatever still holds a piece lock is being forwarded to D. New
    // requests find the page gone and are re-routed (PageMovedError).
    movable.end(cp.page);
    await drain(move);
    await this.freeLocal(movable, volume, cp.page);
    await this.o.store.deleteRecord(checkpointKey(cp.volumeId, cp.page));
    this.running.delete(key(cp.volumeId, cp.page));
    this.counters.committed++;
    this.o.log.info({ volume: volume.name, page: cp.page, to: cp.to, version: route.version, bytesCopied: r.bytesCopied }, 'page move committed');
    this.o.event?.('page-moved', `page ${cp.page} of ${volume.name} moved from ${cp.from} to ${cp.to} (${Math.round((this.o.env.clock.nowMs() - cp.startedAtMs) / 100) / 10} s)`, volume.name);
    this.o.committed?.({ volumeId: cp.volumeId, page: cp.page, from: cp.from, to: cp.to });
    r.settle();
  }

  private async rollBack(r: Running): Promise<void> {
    const { cp, move, movable } = r;
    cp.state = 'cancelling';
    move.cursor.state = 'cancelling';
    await this.checkpoint(cp);
    while (move.cursor.done > 0) {
      const piece = move.cursor.done - 1;
      await this.step(cp.volumeId, () => move.locks[piece].runExclusive(async () => {
        move.cursor.transit = piece;
      }));
      await this.copyPiece(r, piece, true);
      await this.step(cp.volumeId, () => move.locks[piece].runExclusive(async () => {
        move.cursor.done = piece;
        move.cursor.transit = -1;
        cp.done = piece;
        await this.checkpoint(cp);
      }));
    }
    await this.retrying(r, () => this.o.rpc.finish(cp.to, { volumeId: cp.volumeId, page: cp.page, committed: false, version: 0 }));
    await this.retrying(r, () => this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp));
    movable.end(cp.page);
    await drain(move);
    await this.o.store.deleteRecord(checkpointKey(cp.volumeId, cp.page));
    this.running.delete(key(cp.volumeId, cp.page));
    this.counters.cancelled++;
    const name = this.o.catalog.volumeById(cp.volumeId)?.name ?? cp.volumeId;
    this.o.log.info({ volume: name, page: cp.page, to: cp.to }, 'page move cancelled and rolled back');
    this.o.event?.('migration', `the move of page ${cp.page} of ${name} to ${cp.to} was cancelled; the page stays on ${cp.from}`, name);
    r.settle(new PeersanError(`the move of page ${cp.page} to ${cp.to} was cancelled`));
  }

  private async freeLocal(movable: MovableVolume, volume: VolumeRecord, page: number): Promise<void> {
    const first = page * volume.pageBlocks;
    const blocks = Math.min(volume.pageBlocks, movable.blockCount - first);
    if (blocks > 0) await movable.raw.unmap(first, blocks);
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

  /** Run a step until it succeeds: a destination that is down is waited for, not given up on. */
  private async retrying<T>(r: Running, step: () => Promise<T>): Promise<T> {
    for (;;) {
      if (this.closed) throw new PeersanError('peer stopping; the move resumes at its next start');
      try {
        const v = await step();
        r.lastError = '';
        return v;
      } catch (err) {
        if (err instanceof ConflictError || err instanceof NotFoundError) throw err;
        if (r.lastError !== (err as Error).message) this.o.log.warn({ page: r.cp.page, to: r.cp.to, reason: (err as Error).message }, 'page move step failed; retrying');
        r.lastError = (err as Error).message;
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
      if (route.owner === cp.to && route.version === cp.routeVersion + 1) {
        // Committed before the crash: finish the clean-up.
        this.o.log.info({ volume: volume.name, page: cp.page, to: cp.to }, 'completing a page move committed before a restart');
        await this.o.rpc.finish(cp.to, { volumeId: cp.volumeId, page: cp.page, committed: true, version: route.version }).catch(() => undefined);
        await this.o.catalog.deleteMoveIntent(cp.volumeId, cp.page, cp);
        await this.freeLocal(movable, volume, cp.page);
        await this.o.store.deleteRecord(rec.key);
        this.o.committed?.({ volumeId: cp.volumeId, page: cp.page, from: cp.from, to: cp.to });
      } else if (route.owner === this.o.self && route.version === cp.routeVersion) {
        this.o.log.info({ volume: volume.name, page: cp.page, to: cp.to, done: cp.done, pieces: cp.pieces, state: cp.state }, 'resuming a page move after a restart');
        await this.launch(cp, movable, false);
      } else {
        this.o.log.error({ volume: volume.name, page: cp.page, route }, 'dropping a move checkpoint that contradicts the catalog');
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
      if (route.owner === this.o.self) {
        await this.o.store.deleteRecord(rec.key);
      } else if (intent && intent.to === this.o.self && intent.from === from) {
        this.incoming.set(key(volumeId, page), from);
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
