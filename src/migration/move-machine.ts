// The page move (DESIGN.md 4) as a state machine with no I/O, no timers and no promises
// (DESIGN.md 12; etcd raft's Step/Ready): `step(event)` takes what happened and returns what
// to do next, in order. The Migrator (migrator.ts) performs the actions with real I/O and feeds
// each outcome back as the next event. One move, on its source S, copying to destination D.
//
// The protocol, source side:
//   1. Before the machine: the intent is recorded in the catalog (CAS-create: one move per page),
//      the checkpoint (`MoveCheckpoint`, pieces.ts) is durable on S, D has prepared (it cleared
//      any stale copy and keeps a durable receiving record) and the page's I/O runs through its
//      pieces (movable.ts). A start that fails removes its own intent (by the move's id: never
//      the next attempt's); an intent write with no answer may have been recorded, so it is
//      removed too, in the background.
//   2. Pieces in order: set piece p in transit (host writes go to both copies), copy it in
//      chunks, then mark it done (S forwards its I/O to D from then on), and the next piece.
//   3. Commit: persist `committing`, read the route, CAS it {S, v'} → {D, v' + 1} (v' ≥ the
//      version the move began at: with replicas every change of the copies moves the epoch on),
//      FINISH on D, delete the intent, then release the page on S: end its movable, drain, free
//      it, delete the checkpoint.
//   4. Cancel (before the commit): persist `cancelling`, copy the done pieces back from D, last
//      first, the same way (set in transit, chunks, mark), then FINISH (cancel) on D, delete the
//      intent and release the page (not freed: it is S's again).
//
// Ordering rules, and why:
//   - A piece is marked done only after its last chunk is durable on D: that chunk is sent FUA,
//     and the mark waits for its answer. Marking it earlier would let S forward a piece to a D
//     that may lose it in a crash.
//   - The mark changes the piece cursor and persists the checkpoint under the piece's exclusive
//     lock, so host I/O to the piece resumes (at its new home) only once the checkpoint is
//     durable. Otherwise a crash of S right after a host write went to D only would resume from
//     the old checkpoint and copy S's stale piece over it.
//   - A forward piece that a dual write could not reach on D (movable.ts: transitDirty) is not
//     marked: it is copied again. S holds the truth for a piece in transit forward; D does for a
//     piece copied back, so a dual write D misses then fails instead.
//   - A chunk that fails starts its piece again from the first chunk: D may have restarted
//     meanwhile and lost the chunks before it, which were not durable there yet (only the last
//     chunk is FUA). The simulator found a move that retried just the failed chunk and committed
//     a page missing an earlier one (seed 104). A restart of D between two chunks need fail no
//     chunk (D may be back before the next one: pacing, a snapshot's hold), so D answers every
//     staging request with its start token, and a chunk answered with another token than the
//     pass's first chunk fails (the driver, Migrator.copyChunk): the piece is copied again. The
//     simulator found a move that went on after D's restart with the piece's later chunks; the
//     last one's FUA made the piece durable without the earlier ones, and the page committed
//     without a flushed write (seed 196915, one copy per page).
//   - The commit CAS is the single commit point: never two owners for one page version. An
//     answer lost (or a conflict) is settled by reading the route: D as primary is our own commit
//     once a CAS of ours may have been sent (this run's, or one before a restart of S in
//     `committing`: D holds no copy while the page moves there, since D's PREPARE checks the
//     catalog); before that it is a loss (seed 23891). S still primary, the CAS is tried again
//     from the version read (at once after a conflict, after retryMs with no answer).
//   - Lost: a takeover or handover gave the page another primary while it moved (the driver
//     hears it from the route table: `lost`). S's copy misses what it forwarded to D, so the move
//     never commits, even if S gets the role back: it is abandoned at the next piece boundary or
//     at the commit's route read (nothing copied back: FINISH (cancel) on D, the intent, release
//     without freeing) and S's copy is resynced whole (`lostPage`: the driver distrusts it).
//   - D confirms before it takes the page (and before a roll-back ends): the commit CAS runs after
//     a PREPARE again, under the same quiet (no change of the page in flight on S), which makes
//     D's copy durable; D refuses it (ConflictError) if it restarted while receiving a replicated
//     page: staging writes it acknowledged without FUA may be gone, while the page's other
//     copies hold them. Then neither copy here nor there is whole (S's misses what it forwarded):
//     S hands the primary role to another in-sync copy and the move is abandoned; with no other
//     in-sync copy, D's copy is the best there is and the move goes on unconfirmed. The
//     simulator found a D that lost two writes and committed (seed 1763, 3 replicas).
//   - Once `committing` is decided the move cannot be cancelled: a CAS may be on its way. A
//     cancel asked before the commit step begins is honoured there.
//   - Clean-up removes only this move's intent (same source, destination, route version and id:
//     catalog.deleteMoveIntent), after FINISH, and the checkpoint last: whatever a crash
//     interrupts, the restart finds the checkpoint and completes the rest.
//   - The page is freed on S only after its movable ended and every request holding a piece
//     drained: those are being forwarded to D.
//   - Steps: every piece state change, every chunk copy and the whole commit run as steps (the
//     `enterStep` action waits while a snapshot holds the volume, `leaveStep` ends one). A
//     snapshot's cut needs pieces and routes to stand still; it waits for the running steps.
//   - Failures: ConflictError and NotFoundError stop the move (the checkpoint resumes it at the
//     next start); anything else (D or the catalog out of reach) is tried again after `retryMs`
//     (`armTimer`). A failure of an action with no failure event (persist, set/mark/clear a
//     piece, release) stops the move the same way.
//
// Restart (Migrator.recover): a `committing` checkpoint whose route has D as primary committed
// before the crash (committedByMove): S completes its clean-up (FINISH, intent, free,
// checkpoint). One whose route still has S as primary resumes here (`resumed`): PREPARE again (not fresh: D keeps the pieces it holds), then
// from the checkpoint's cursor: pieces [0, done) are on D and the piece that was in transit is
// copied again from its first chunk; a `cancelling` checkpoint goes on copying back, a
// `committing` one commits (and cannot be cancelled). A route with another primary abandons the
// move (as `lost` does). Intents S recorded without a checkpoint (starts cut short) are
// removed.
//
// Destination D (procedural in the Migrator: each is a few steps): PREPARE checks the intent
// names this move, refuses while D still releases the page from an earlier move of its own
// away (the late free would erase the new copy; the simulator's seed 273), clears a stale copy
// when the move is fresh (or from another source), once the catalog says S is the primary and D
// holds no copy (seeds 3601, 23891), then persists its receiving record before
// answering, so a restart of D knows its staging traffic; a restart of D while receiving a
// replicated page makes it refuse the move's next PREPARE (see the confirm above). FINISH learns the committed route, or
// frees the copy on cancel (unless the route names D a copy: a new primary's rebuild may have
// chosen it after the source lost the page), then drops the record. On restart D keeps a record while the intent
// stands, drops it once D owns the page, and frees a copy whose move was abandoned.

import { assert, ConflictError, NotFoundError } from '../errors';
import type { MoveCheckpoint } from './pieces';
import { ChunkPacer } from './rate';

/** Bytes copied per exclusive hold of a piece: small, so host writes to the piece wait little. */
export const chunkBytes = 64 * 1024;
/** After a failed step (D or the catalog unreachable), try again after this long. */
export const retryMs = 500;

/**
 * A route naming D as the page's primary is this move's own commit only if the move had reached
 * `committing`: its commit CAS is sent from there, and D holds no copy while the page moves there
 * (D's PREPARE checks the catalog). Before that, the route came from elsewhere: the page is lost
 * (simulator, seed 23891). The machine itself is finer (casSent: a CAS was sent, not only decided).
 */
export function committedByMove(cp: MoveCheckpoint, route: { owner: string; version: number }): boolean {
  return route.owner === cp.to && route.version > cp.routeVersion && cp.state === 'committing';
}

/** Where the page's blocks are; all the machine needs to cut pieces into chunks. */
export interface MoveGeometry {
  /** The page's first block. */
  pageLba: number;
  /** The volume's size in blocks (the last piece may be short). */
  blockCount: number;
  blockBytes: number;
}

export type MovePhase =
  /** Resumed after a restart: PREPARE (not fresh) until D answers. */
  | 'preparing'
  | 'copying'
  | 'committing'
  | 'cancelling'
  | 'committed'
  | 'cancelled'
  /** Ended early (peer stopping, a conflict): the checkpoint resumes the move at the next start. */
  | 'stopped';

/** What the driver does. Only the last action of a step may have an outcome (the next event). */
export type MoveAction =
  /** PREPARE on D (fresh: false: keep the pieces it holds) → prepared | prepareFailed. */
  | { kind: 'prepare' }
  /** Wait while a snapshot holds the volume, then count a step running → stepEntered. */
  | { kind: 'enterStep' }
  /** The step ended (no outcome). */
  | { kind: 'leaveStep' }
  /** Take `bytes` from the peer's copy rate → throttled. */
  | { kind: 'throttle'; bytes: number }
  /** Under the piece's exclusive lock: it is in transit, not dirty → transitSet. */
  | { kind: 'setTransit'; piece: number }
  /**
   * Under the piece's exclusive lock: copy [lba, lba + blocks) from S to D (or back, D to S),
   * FUA when `last` → chunkCopied | chunkFailed.
   */
  | { kind: 'copyChunk'; piece: number; lba: number; blocks: number; last: boolean; back: boolean }
  /**
   * Under the piece's exclusive lock: unless `ifClean` and a dual write missed D (then clear the
   * transit → pieceDirty), set the cursor to `done`, out of transit, and persist `checkpoint`
   * before letting go → pieceMarked.
   */
  | { kind: 'markPiece'; piece: number; done: number; ifClean: boolean; checkpoint: MoveCheckpoint }
  /** Under the piece's exclusive lock: out of transit, not done (a cancel cut its copy short) → transitCleared. */
  | { kind: 'clearTransit'; piece: number }
  /** The cursor copies back from now on: reads of a piece in transit come from D (no outcome). */
  | { kind: 'turnBack' }
  /** Write the checkpoint durably → persisted. */
  | { kind: 'persist'; checkpoint: MoveCheckpoint }
  /**
   * CAS the route from {from, version} to {to, version + 1} → routeSet | routeSetFailed. With
   * `confirm`, first (under the same quiet) PREPARE on D again, which makes D's copy durable and
   * fails with a ConflictError if D restarted while receiving a replicated page → prepareFailed.
   */
  | { kind: 'setRoute'; version: number; confirm: boolean }
  /**
   * D's copy may miss acknowledged writes (it restarted mid-move) and so does this peer's (what it
   * forwarded to D is not here): hand the primary role to another in-sync copy → handedOff (handed:
   * false when there is none: D's copy is the best there is) | handOffFailed.
   */
  | { kind: 'handOff' }
  /** Read the page's route from the catalog → routeRead | routeReadFailed. */
  | { kind: 'readRoute' }
  /** FINISH on D → finished | finishFailed. */
  | { kind: 'finish'; committed: boolean; version: number }
  /** Delete this move's intent from the catalog → intentDeleted | intentDeleteFailed. */
  | { kind: 'deleteIntent' }
  /** End the page's movable, drain its requests, free it (when `free`), delete the checkpoint → released. */
  | { kind: 'release'; free: boolean }
  /** → timer, after `ms`. */
  | { kind: 'armTimer'; ms: number }
  /**
   * The source lost the page's primary role while the move ran (no outcome): its copy misses what
   * it forwarded to D, so it must be resynced whole.
   */
  | { kind: 'lostPage' }
  /** The move is over (no outcome). */
  | { kind: 'ended'; outcome: 'committed'; version: number }
  | { kind: 'ended'; outcome: 'cancelled' }
  | { kind: 'ended'; outcome: 'stopped'; error: Error };

export type MoveEvent =
  /** The move is registered with its page's I/O path: go. */
  | { kind: 'begin' }
  | { kind: 'prepared' }
  | { kind: 'prepareFailed'; error: Error }
  | { kind: 'stepEntered' }
  | { kind: 'throttled' }
  | { kind: 'transitSet' }
  /** `ms`: how long the chunk took, lock wait included (the pacer's measure of waiting behind host I/O). */
  | { kind: 'chunkCopied'; ms: number }
  | { kind: 'chunkFailed'; error: Error }
  | { kind: 'pieceMarked' }
  | { kind: 'pieceDirty' }
  | { kind: 'transitCleared' }
  | { kind: 'persisted' }
  | { kind: 'routeSet'; version: number }
  | { kind: 'routeSetFailed'; error: Error }
  | { kind: 'routeRead'; owner: string; version: number }
  | { kind: 'routeReadFailed'; error: Error }
  | { kind: 'finished' }
  | { kind: 'finishFailed'; error: Error }
  | { kind: 'intentDeleted' }
  | { kind: 'intentDeleteFailed'; error: Error }
  | { kind: 'released' }
  | { kind: 'handedOff'; handed: boolean }
  | { kind: 'handOffFailed'; error: Error }
  | { kind: 'timer' }
  /** Asked from outside at any time (refused by the driver once `cancellable` is false). */
  | { kind: 'cancel' }
  /** From outside at any time: a newer route of the page names another primary (a takeover, a handover). */
  | { kind: 'lost' }
  /** The pending action failed with no failure event of its own, or the peer is stopping. */
  | { kind: 'stop'; error: Error };

type Outcome = Exclude<MoveEvent['kind'], 'cancel' | 'lost'>;

/** Which outcome each action awaits (one of them), or none. */
const outcomesOf: Partial<Record<MoveAction['kind'], Outcome[]>> = {
  prepare: ['prepared', 'prepareFailed'],
  enterStep: ['stepEntered'],
  throttle: ['throttled'],
  setTransit: ['transitSet'],
  copyChunk: ['chunkCopied', 'chunkFailed'],
  markPiece: ['pieceMarked', 'pieceDirty'],
  clearTransit: ['transitCleared'],
  persist: ['persisted'],
  setRoute: ['routeSet', 'routeSetFailed', 'prepareFailed'],
  handOff: ['handedOff', 'handOffFailed'],
  readRoute: ['routeRead', 'routeReadFailed'],
  finish: ['finished', 'finishFailed'],
  deleteIntent: ['intentDeleted', 'intentDeleteFailed'],
  release: ['released'],
  armTimer: ['timer'],
};

/** What comes after a step is entered or a timer fires. */
type Next = 'prepare' | 'transit' | 'chunk' | 'pass' | 'mark' | 'clear' | 'commit' | 'readRoute' | 'setRoute' | 'finish' | 'deleteIntent' | 'handOff';

export class MoveMachine {
  /** The machine's record of the move: what the next persisted checkpoint says. */
  readonly cp: MoveCheckpoint;
  private readonly g: MoveGeometry;
  private readonly pacer: ChunkPacer;
  private readonly chunkBlocks: number;
  private phaseNow: MovePhase;
  /** The piece being copied (forward or back), or -1. */
  private transitPiece = -1;
  /** The next chunk's first block, in the piece in transit. */
  private chunkLba = 0;
  private cancelAsked: boolean;
  /** The source stopped being the page's primary at some point since the move began (see `lost`). */
  private lostAsked = false;
  /** The route version the commit CAS starts from: the latest read while this peer is primary. */
  private casVersion: number;
  /** The commit CAS was tried (its answer may have been lost): a route read settles it. */
  private casTried = false;
  /**
   * A commit CAS of this move may be in the catalog: one was sent in this run, or before a
   * restart (a `committing` checkpoint). Only then can a route naming D as primary be ours.
   */
  private casSent: boolean;
  private error = '';
  private copiedBytes = 0;
  /** The outcomes of the pending action (`stop` is always one too); at first, begin. */
  private awaiting: Outcome[] = ['begin'];
  private inStep = false;
  private next: Next = 'transit';
  /** The route version the commit CAS made (reported when the move ends). */
  private committedVersion = 0;
  /** Why the commit CAS failed, while the route is read to settle it. */
  private casError?: Error;
  private readonly resumed: boolean;
  /** A piece came back from D: D confirms (PREPARE again) before the roll-back ends (`backConfirmed`). */
  private cameBack = false;
  private backConfirmed = false;
  /** No other in-sync copy could take the role when D's copy was found suspect: D's copy is the best there is, commit it. */
  private unconfirmable = false;

  /**
   * `cp`: the move's checkpoint as persisted (a fresh move: done 0, copying). `resumed`: after a
   * restart of S (PREPARE again before copying). `duty`: see ChunkPacer.
   */
  constructor(cp: MoveCheckpoint, geometry: MoveGeometry, opts: { resumed: boolean; duty: number }) {
    this.cp = { ...cp };
    this.g = geometry;
    this.pacer = new ChunkPacer(opts.duty);
    this.chunkBlocks = Math.max(1, Math.floor(chunkBytes / geometry.blockBytes));
    this.resumed = opts.resumed;
    this.casVersion = cp.routeVersion;
    this.casSent = opts.resumed && cp.state === 'committing';
    this.cancelAsked = cp.state === 'cancelling';
    // A `cancelling` checkpoint turns back again at the first piece boundary (persisting it
    // again, harmless); a `committing` one has every piece done and commits.
    this.phaseNow = opts.resumed ? 'preparing' : 'copying';
  }

  // ---- inspection -----------------------------------------------------------------------------

  get phase(): MovePhase {
    return this.phaseNow;
  }

  /** Pieces [0, done) are on D. */
  get done(): number {
    return this.cp.done;
  }

  get transit(): number {
    return this.transitPiece;
  }

  get lastError(): string {
    return this.error;
  }

  get bytesCopied(): number {
    return this.copiedBytes;
  }

  get cancelRequested(): boolean {
    return this.cancelAsked;
  }

  /** False once the commit is decided (a CAS may be on its way) or the move is over. */
  get cancellable(): boolean {
    return this.cp.state !== 'committing' && !this.over;
  }

  get over(): boolean {
    return this.phaseNow === 'committed' || this.phaseNow === 'cancelled' || this.phaseNow === 'stopped';
  }

  // ---- step -----------------------------------------------------------------------------------

  step(ev: MoveEvent): MoveAction[] {
    if (ev.kind === 'cancel') {
      // Recorded; acted on at the next piece boundary or chunk (the pending action goes on).
      if (this.cancellable) this.cancelAsked = true;
      return [];
    }
    if (ev.kind === 'lost') {
      // Recorded; acted on at the next piece boundary, or by the commit (which never commits then).
      this.lostAsked = true;
      return [];
    }
    if (this.over) return [];
    assert(ev.kind === 'stop' || this.awaiting.includes(ev.kind), `move machine: ${ev.kind} while awaiting ${this.awaiting.join(' or ')}`);
    const out = this.on(ev);
    // One action at a time: only the last may have an outcome, and until the move is over there
    // is always one pending (else nothing would ever step the machine again).
    for (const a of out.slice(0, -1)) assert(!outcomesOf[a.kind], `move machine: ${a.kind} before the last action`);
    const last = out.at(-1);
    this.awaiting = last ? [...(outcomesOf[last.kind] ?? [])] : [];
    assert(this.awaiting.length > 0 || this.over, `move machine: nothing pending after ${ev.kind}`);
    return out;
  }

  private on(ev: Exclude<MoveEvent, { kind: 'cancel' | 'lost' }>): MoveAction[] {
    switch (ev.kind) {
      case 'begin':
        return this.resumed ? [{ kind: 'prepare' }] : this.nextPiece();
      case 'prepared':
        this.error = '';
        if (this.back) this.backConfirmed = true;
        return this.nextPiece();
      case 'handedOff':
        this.error = '';
        if (ev.handed) return this.abandon();
        this.unconfirmable = true;
        return this.phaseNow === 'committing' ? [{ kind: 'readRoute' }] : this.nextPiece();
      case 'handOffFailed':
        return this.retry(ev.error, 'handOff');
      case 'stepEntered':
        this.inStep = true;
        return this.inStepNow();
      case 'timer':
        return this.afterTimer();
      case 'throttled':
        return this.enter('chunk');
      case 'transitSet':
        return [this.leave(), ...this.startPass()];
      case 'chunkCopied':
        return [this.leave(), ...this.chunkDone(ev.ms)];
      case 'pieceMarked':
        if (this.back) this.cameBack = true;
        this.cp.done = this.back ? this.transitPiece : this.transitPiece + 1;
        this.transitPiece = -1;
        return [this.leave(), ...this.nextPiece()];
      case 'pieceDirty':
      case 'transitCleared':
        // Dirty: the same piece again. Cleared: a cancel cut the copy short; roll back.
        this.transitPiece = -1;
        return [this.leave(), ...this.nextPiece()];
      case 'persisted':
        return this.afterPersist();
      case 'routeSet':
        return this.committedAt(ev.version);
      case 'routeRead':
        return this.settleCas(ev.owner, ev.version);
      case 'finished':
        this.error = '';
        return [{ kind: 'deleteIntent' }];
      case 'intentDeleted':
        this.error = '';
        return [{ kind: 'release', free: this.phaseNow === 'committing' }];
      case 'released':
        return this.phaseNow === 'committing' ? this.end('committed') : this.end('cancelled');
      case 'routeSetFailed':
        this.casError = ev.error;
        return [{ kind: 'readRoute' }];
      case 'finishFailed':
        // The commit stands without D's answer: D reads the catalog when it returns.
        if (this.phaseNow === 'committing') return this.unconfirmed(ev.error);
        return this.retry(ev.error, 'finish');
      case 'prepareFailed':
        // D refused a move it holds: it restarted while receiving a replicated page (or lost the
        // move): its copy may miss writes the other copies hold, so it must not become primary.
        // (At the commit, the CAS was not sent: the route read that follows need not wait for it.)
        this.casTried = false;
        if (ev.error instanceof ConflictError) return [{ kind: 'handOff' }];
        return this.retry(ev.error, this.phaseNow === 'committing' ? 'readRoute' : 'prepare');
      case 'chunkFailed':
        return [this.leave(), ...this.retry(ev.error, 'pass')];
      case 'routeReadFailed':
        return this.retry(ev.error, 'readRoute');
      case 'intentDeleteFailed':
        return this.retry(ev.error, 'deleteIntent');
      case 'stop':
        return this.stop(ev.error);
    }
  }

  private get back(): boolean {
    return this.phaseNow === 'cancelling';
  }

  /** The loop's head: the next piece forward or back, the commit, or the roll-back's end. */
  private nextPiece(): MoveAction[] {
    if (this.phaseNow === 'preparing') this.phaseNow = 'copying';
    // Lost while copying back too: the new primary holds every acknowledged write, and D may
    // refuse this peer's staging reads by then (its epoch is older: page-service.ts), so a
    // roll-back that went on would never end (simulator, seed 1237).
    if (this.lostAsked && (this.phaseNow === 'copying' || this.back)) return this.abandon();
    if (this.cancelAsked && this.phaseNow === 'copying') return this.turnBack();
    if (this.back) {
      // What came back from D is confirmed whole (D did not restart meanwhile) before it is S's again.
      if (this.cp.done === 0) return !this.cameBack || this.backConfirmed || this.unconfirmable ? [{ kind: 'finish', committed: false, version: 0 }] : [{ kind: 'prepare' }];
      this.transitPiece = this.cp.done - 1;
      return this.enter('transit');
    }
    if (this.cp.done < this.cp.pieces) {
      this.transitPiece = this.cp.done;
      return this.enter('transit');
    }
    return this.enter('commit');
  }

  private turnBack(): MoveAction[] {
    this.phaseNow = 'cancelling';
    this.cp.state = 'cancelling';
    return [{ kind: 'turnBack' }, { kind: 'persist', checkpoint: { ...this.cp } }];
  }

  private enter(next: Next): MoveAction[] {
    this.next = next;
    return [{ kind: 'enterStep' }];
  }

  private leave(): MoveAction {
    this.inStep = false;
    return { kind: 'leaveStep' };
  }

  /** The step is counted: its action. */
  private inStepNow(): MoveAction[] {
    const piece = this.transitPiece;
    switch (this.next) {
      case 'transit':
        return [{ kind: 'setTransit', piece }];
      case 'chunk':
        return [this.chunkAction()];
      case 'mark':
        return [{ kind: 'markPiece', piece, done: this.back ? piece : piece + 1, ifClean: !this.back, checkpoint: { ...this.cp, done: this.back ? piece : piece + 1 } }];
      case 'clear':
        return [{ kind: 'clearTransit', piece }];
      case 'commit':
        // A cancel asked while the commit step waited for its turn: honoured, nothing is decided yet.
        if (this.cancelAsked) return [this.leave(), ...this.turnBack()];
        this.phaseNow = 'committing';
        this.cp.state = 'committing';
        return [{ kind: 'persist', checkpoint: { ...this.cp } }];
      default:
        throw new Error(`assertion failed: move machine: a step for ${this.next}`);
    }
  }

  private afterTimer(): MoveAction[] {
    switch (this.next) {
      case 'prepare':
        return [{ kind: 'prepare' }];
      case 'pass':
        // A chunk that failed after the page was lost is not tried again (see nextPiece).
        return this.lostAsked ? this.abandon() : this.startPass();
      case 'chunk':
        return this.nextChunk();
      case 'readRoute':
        return [{ kind: 'readRoute' }];
      case 'setRoute':
        return this.casNow();
      case 'finish':
        return [{ kind: 'finish', committed: false, version: 0 }];
      case 'deleteIntent':
        return [{ kind: 'deleteIntent' }];
      case 'handOff':
        return [{ kind: 'handOff' }];
      default:
        throw new Error(`assertion failed: move machine: a timer for ${this.next}`);
    }
  }

  private afterPersist(): MoveAction[] {
    // The route is read first: its version moves with every change of the copies (resync, a copy
    // dropped), not only with owners; the CAS starts from the version read.
    if (this.phaseNow === 'committing') return [{ kind: 'readRoute' }];
    return this.nextPiece();
  }

  // ---- a piece's chunks -----------------------------------------------------------------------

  private pieceFirst(): number {
    return this.g.pageLba + this.transitPiece * this.cp.pieceBlocks;
  }

  private pieceEnd(): number {
    return Math.min(this.pieceFirst() + this.cp.pieceBlocks, this.g.blockCount);
  }

  /** A pass over the piece in transit from its first chunk (again, after a failed chunk). */
  private startPass(): MoveAction[] {
    this.chunkLba = this.pieceFirst();
    return this.nextChunk();
  }

  private nextChunk(): MoveAction[] {
    // A cancel stops a forward copy at the next chunk (the piece is not marked); copying back goes on.
    if (this.chunkLba >= this.pieceEnd() || (this.cancelAsked && !this.back)) return this.enter(this.cancelAsked && !this.back ? 'clear' : 'mark');
    return [{ kind: 'throttle', bytes: this.chunkBlocksNow() * this.g.blockBytes }];
  }

  private chunkBlocksNow(): number {
    return Math.min(this.chunkBlocks, this.pieceEnd() - this.chunkLba);
  }

  private chunkAction(): MoveAction {
    const blocks = this.chunkBlocksNow();
    return { kind: 'copyChunk', piece: this.transitPiece, lba: this.chunkLba, blocks, last: this.chunkLba + blocks >= this.pieceEnd(), back: this.back };
  }

  private chunkDone(ms: number): MoveAction[] {
    this.error = '';
    const blocks = this.chunkBlocksNow();
    this.chunkLba += blocks;
    this.copiedBytes += blocks * this.g.blockBytes;
    // The last chunk of a piece waits for a sync on D: slow by design, not a sign of load.
    if (this.chunkLba >= this.pieceEnd()) return this.nextChunk();
    const pauseMs = this.pacer.pauseAfter(ms);
    if (pauseMs < 1) return this.nextChunk();
    this.next = 'chunk';
    return [{ kind: 'armTimer', ms: pauseMs }];
  }

  // ---- commit and clean-up --------------------------------------------------------------------

  /**
   * The route read before the commit CAS, or after one failed: D as primary is our own commit
   * once a CAS of ours may have gone through (D holds no copy of the page while it moves there,
   * so nothing else makes it primary; before any CAS of ours, a route naming D as primary came
   * from elsewhere, and the page is lost: simulator, seed 23891, where D had been made primary by
   * another move before this one's start, and the source freed its in-sync copy); this peer
   * as primary, and primary all along, CASes from the version read (a conflict there was a change
   * of the copies: tried again at once, a CAS with no answer after retryMs); another primary took
   * the page over (or this peer lost the role and got it back, its copy missing what it forwarded
   * meanwhile): the move is abandoned.
   */
  private settleCas(owner: string, version: number): MoveAction[] {
    if (owner === this.cp.to && version > this.cp.routeVersion && this.casSent) return this.committedAt(version);
    if (owner !== this.cp.from || this.lostAsked) return this.abandon();
    const unanswered = this.casTried && !(this.casError instanceof ConflictError) && version === this.casVersion;
    this.casVersion = version;
    if (!unanswered) return this.casNow();
    this.error = this.casError?.message ?? 'the route CAS had no answer';
    this.next = 'setRoute';
    return [{ kind: 'armTimer', ms: retryMs }];
  }

  private casNow(): MoveAction[] {
    this.casTried = true;
    this.casSent = true;
    return [{ kind: 'setRoute', version: this.casVersion, confirm: !this.unconfirmable }];
  }

  /**
   * The source is not the page's primary any more: nothing is copied back (the new primary holds
   * every acknowledged write; this peer's copy, missing what it forwarded to D, is resynced whole).
   * D frees its copy, the intent goes, the page is released here without being freed.
   */
  private abandon(): MoveAction[] {
    this.phaseNow = 'cancelling';
    this.cp.state = 'cancelling';
    return [{ kind: 'lostPage' }, { kind: 'finish', committed: false, version: 0 }];
  }

  private committedAt(version: number): MoveAction[] {
    this.error = '';
    this.casError = undefined;
    this.committedVersion = version;
    return [{ kind: 'finish', committed: true, version }];
  }

  private end(outcome: 'committed' | 'cancelled'): MoveAction[] {
    this.phaseNow = outcome;
    const out: MoveAction[] = this.inStep ? [this.leave()] : [];
    out.push(outcome === 'committed' ? { kind: 'ended', outcome, version: this.committedVersion } : { kind: 'ended', outcome });
    return out;
  }

  // ---- failures -------------------------------------------------------------------------------

  /** A failed action: stop on a conflict or a missing record, else try `next` again after retryMs. */
  private retry(error: Error, next: Next): MoveAction[] {
    if (error instanceof ConflictError || error instanceof NotFoundError) return this.stop(error);
    this.error = error.message;
    this.next = next;
    return [{ kind: 'armTimer', ms: retryMs }];
  }

  /** FINISH after the commit had no answer: shown, and the clean-up goes on. */
  private unconfirmed(error: Error): MoveAction[] {
    this.error = `destination did not confirm the commit (it reads the catalog when it returns): ${error.message}`;
    return [{ kind: 'deleteIntent' }];
  }

  private stop(error: Error): MoveAction[] {
    this.error = error.message;
    this.phaseNow = 'stopped';
    const out: MoveAction[] = this.inStep ? [this.leave()] : [];
    out.push({ kind: 'ended', outcome: 'stopped', error });
    return out;
  }
}
