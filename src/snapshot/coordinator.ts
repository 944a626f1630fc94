// The snapshot coordinator (DESIGN.md 6, 12) as a state machine: no I/O, no timers, no
// promises. The service (service.ts) drives it: it feeds events to `step` (a peer answered or
// failed, a timer fired, a record was written) and performs the actions it returns, in order
// ("send this to peer p", "arm this timer", "write this record", "the snapshot is taken").
// Every action that does I/O reports back with an event; nothing else moves the machine.
//
// One snapshot, one machine. Its life, for a volume or a consistency group:
//   1. records: one catalog record per volume in state `taking`, one after another (each gets
//      its layer number, seq). A record that cannot be written aborts (nothing is held yet);
//   2. rounds: each round sends one step to its peers; the next round starts only once every
//      peer of this one has answered (the barrier rule, `rounds`):
//        barrier:   REACH, PREPARE, TAKE, RELEASE
//        timestamp: REACH, PREPARE, TAKE(T), FINISH
//      REACH: every peer connected, before anything is held or frozen (one that is down aborts
//      here, and nothing needs releasing).
//      Barrier: TAKE goes out only once every peer answered PREPARE, i.e. every peer has closed
//      the volumes' gates and drained the requests already inside (forwarded parts included):
//      no request can then reach an owner that has not frozen yet. RELEASE goes out only once
//      every peer answered TAKE (every peer frozen), so a request released early on one peer
//      cannot reach an owner that has not frozen. The routes are read at the cut (`cut`, after
//      the last TAKE answer and before any RELEASE: moves are held on every peer meanwhile).
//      Timestamp: T = max(the coordinator's clock, every peer's clock in its PREPARE answer) + 1.
//      Each peer answered once frozen and recording, so every write that reached a store before
//      its freeze was stamped below T, and every write stamped at or after T reaches its owner
//      after the freeze and is recorded. TAKE(T) moves each peer's clock past T and waits for
//      its host writes stamped before T; FINISH writes the recorded changes before T into the
//      frozen layers. A peer that does not know the snapshot refuses FINISH: it restarted since
//      PREPARE and the writes it recorded after its freeze are gone, so its layer is not the cut
//      (found by the simulator, seeds 1539 and 1778); the refusal aborts like any failure;
//   3. publish: each record becomes `ready` (with the longest hold), one after another; then
//      `taken`. A record that cannot be updated aborts (the peers have let go already).
// Any failure (a peer's error, a deadline, a record write) aborts: once PREPARE may have gone
// out, every peer gets RELEASE (barrier) or ABORT (timestamp) and the machine waits for each
// answer or failure (the driver's RPCs are bounded: no stall forever); then the records written
// are deleted, one after another (peers drop the layers they froze when a record goes); then
// `aborted`, with the first failure as the reason. RELEASE failures are not failures: a peer
// reopens its gates by itself after holdMsMax. Answers and timers that do not belong to the
// current step of a peer still waiting (late, duplicated, from an earlier step) are ignored.

import { assert, PeersanError } from '../errors';
import { divergedKeepMs } from '../limits';
import type { PrepareReply, PrepareSnapshot, TakeSnapshot } from './service';
import type { FrozenReport, MovingAtCut, SnapshotMode, SuspectAtCut } from './records';

/** How long a peer may take to drain its requests and answer PREPARE. */
export const prepareMsMax = 3_000;
/** How long TAKE(T) of a timestamp snapshot may wait for host writes stamped before T. */
export const sealMsMax = 5_000;
assert(divergedKeepMs > 2 * sealMsMax, 'a primary names the copies a lost change may differ on for longer than a seal waits for it');

export type Step = 'REACH' | 'PREPARE' | 'TAKE' | 'RELEASE' | 'FINISH' | 'ABORT';

/** One step sent to some peers; the next round waits for all of their answers. */
export interface Round {
  step: Step;
  peers: readonly string[];
}

/** What a peer answered, per step. */
export type Answer =
  | { step: 'REACH' }
  | { step: 'PREPARE'; reply: PrepareReply }
  | ({ step: 'TAKE' } & FrozenReport)
  /** RELEASE: how long the peer held host I/O; FINISH and ABORT: 0. */
  | { step: 'RELEASE' | 'FINISH' | 'ABORT'; heldMs: number };

export type Send =
  | { kind: 'send'; peer: string; step: 'REACH' | 'RELEASE' | 'FINISH' | 'ABORT' }
  | { kind: 'send'; peer: string; step: 'PREPARE'; req: PrepareSnapshot }
  | { kind: 'send'; peer: string; step: 'TAKE'; req: TakeSnapshot };

export type CoordinatorAction =
  | { kind: 'createRecord'; volume: number }
  | Send
  /** Report `timer` for this peer and step after `ms`, unless disarmed first. */
  | { kind: 'arm'; peer: string; step: Step; ms: number }
  | { kind: 'disarm'; peer: string; step: Step }
  /** The cut is fixed: read the routes now (moves are held), with the pages moving at it, the suspect copies and T. */
  | ({ kind: 'cut'; cut?: number } & FrozenReport)
  /** Timestamp mode, TAKE(T) answered: these copies may lack a change before T; the routes at the cut leave them out of the holders. */
  | { kind: 'distrust'; suspect: SuspectAtCut[] }
  | { kind: 'updateRecord'; volume: number; heldMs: number }
  | { kind: 'deleteRecord'; volume: number }
  | { kind: 'taken'; heldMs: number }
  | { kind: 'aborted'; reason: Error };

export type CoordinatorEvent =
  | { kind: 'start' }
  | { kind: 'recordCreated'; volume: number; seq: number }
  | { kind: 'recordUpdated'; volume: number }
  | { kind: 'recordDeleted'; volume: number }
  | { kind: 'recordFailed'; volume: number; error: Error }
  | ({ kind: 'answer'; peer: string } & Answer)
  | { kind: 'failed'; peer: string; step: Step; error: Error }
  | { kind: 'timer'; peer: string; step: Step };

export type Phase = 'idle' | 'records' | 'rounds' | 'publish' | 'releasing' | 'deleting' | 'taken' | 'aborted';

export interface CoordinatorPlan {
  snapshotId: string;
  mode: SnapshotMode;
  volumeIds: readonly string[];
  peers: readonly string[];
  /** The coordinator's hybrid clock; read once, when T is chosen (timestamp mode). */
  clock(): number;
}

/** How long the coordinator waits for a peer's answer to each step; none: the RPC's own bound. */
function deadlineMs(mode: SnapshotMode, step: Step): number | undefined {
  if (step === 'PREPARE') return prepareMsMax + 1_000;
  if (step === 'TAKE') return mode === 'timestamp' ? sealMsMax + 1_000 : prepareMsMax;
  if (step === 'FINISH') return prepareMsMax;
  return undefined;
}

export class SnapshotCoordinator {
  private phaseNow: Phase = 'idle';
  /** Layer number of each volume's record, in the plan's order: one per record written. */
  private readonly seqs: number[] = [];
  private plan: Round[] = [];
  private round = -1;
  /** The peers of the current round (or of the abort's releases) that answered it. */
  private readonly answers = new Map<string, Answer>();
  private readonly moving: MovingAtCut[] = [];
  private readonly suspect: SuspectAtCut[] = [];
  private heldMsMax = 0;
  /** Timestamp mode: the cut T, once every peer answered PREPARE. */
  private cutT: number | undefined;
  private reason: Error | undefined;
  /** The record being updated (publish) or deleted (abort). */
  private next = 0;

  constructor(readonly o: CoordinatorPlan) {
    assert(o.volumeIds.length > 0, 'a snapshot has a volume');
  }

  get phase(): Phase {
    return this.phaseNow;
  }

  /** The step the machine waits for: the current round's, or the abort's releases. */
  get current(): Step | undefined {
    if (this.phaseNow === 'releasing') return this.releaseStep;
    return this.phaseNow === 'rounds' ? this.plan[this.round].step : undefined;
  }

  /** Peers that answered the current step. */
  get answered(): string[] {
    return [...this.answers.keys()];
  }

  /** Peers the current step still waits for. */
  get waiting(): string[] {
    return this.stepPeers().filter((p) => !this.answers.has(p));
  }

  /**
   * The rounds, in order. The barrier rule is here: every round goes to every peer, so a step
   * starts on any peer only once every peer has answered the one before.
   */
  protected rounds(): Round[] {
    const last: Step = this.o.mode === 'timestamp' ? 'FINISH' : 'RELEASE';
    return (['REACH', 'PREPARE', 'TAKE', last] as const).map((step) => ({ step, peers: this.o.peers }));
  }

  step(ev: CoordinatorEvent): CoordinatorAction[] {
    switch (ev.kind) {
      case 'start':
        assert(this.phaseNow === 'idle', 'a coordinator starts once');
        this.phaseNow = 'records';
        return [{ kind: 'createRecord', volume: 0 }];
      case 'recordCreated':
        assert(this.phaseNow === 'records' && ev.volume === this.seqs.length, `record ${ev.volume} created in order`);
        this.seqs.push(ev.seq);
        if (this.seqs.length < this.o.volumeIds.length) return [{ kind: 'createRecord', volume: this.seqs.length }];
        this.plan = this.rounds();
        return this.startRound(0);
      case 'recordUpdated':
        assert(this.phaseNow === 'publish' && ev.volume === this.next, `record ${ev.volume} updated in order`);
        return this.publish(this.next + 1);
      case 'recordDeleted':
        assert(this.phaseNow === 'deleting' && ev.volume === this.next, `record ${ev.volume} deleted in order`);
        return this.deleteRecords(this.next + 1);
      case 'recordFailed':
        assert(this.phaseNow === 'records' || this.phaseNow === 'publish', 'only writing a record fails');
        return this.abort(ev.error);
      case 'answer':
        return this.answer(ev.peer, ev);
      case 'failed':
        return this.failed(ev.peer, ev.step, ev.error);
      case 'timer':
        if (!this.awaits(ev.peer, ev.step)) return [];
        return this.abort(new PeersanError(`peer ${ev.peer} did not answer ${ev.step} within ${deadlineMs(this.o.mode, ev.step)} ms`));
    }
  }

  private get releaseStep(): Step {
    return this.o.mode === 'timestamp' ? 'ABORT' : 'RELEASE';
  }

  private stepPeers(): readonly string[] {
    if (this.phaseNow === 'releasing') return this.o.peers;
    return this.phaseNow === 'rounds' ? this.plan[this.round].peers : [];
  }

  /** Whether `peer`'s answer to `step` is still awaited (else the event is late, a duplicate or from another step). */
  private awaits(peer: string, step: Step): boolean {
    return this.current === step && this.stepPeers().includes(peer) && !this.answers.has(peer);
  }

  private layers(): { volumeId: string; seq: number }[] {
    return this.o.volumeIds.map((volumeId, i) => ({ volumeId, seq: this.seqs[i] }));
  }

  private startRound(round: number): CoordinatorAction[] {
    this.phaseNow = 'rounds';
    this.round = round;
    this.answers.clear();
    const { step, peers } = this.plan[round];
    const ms = deadlineMs(this.o.mode, step);
    return peers.flatMap((peer): CoordinatorAction[] => [this.message(peer, step), ...(ms === undefined ? [] : [{ kind: 'arm' as const, peer, step, ms }])]);
  }

  /** The timers of these peers' answers to `step` (steps without a deadline have none). */
  private disarm(peers: readonly string[], step: Step): CoordinatorAction[] {
    if (deadlineMs(this.o.mode, step) === undefined) return [];
    return peers.map((peer) => ({ kind: 'disarm', peer, step }));
  }

  private message(peer: string, step: Step): Send {
    const { snapshotId, volumeIds } = this.o;
    if (step === 'PREPARE') {
      const req: PrepareSnapshot = this.o.mode === 'timestamp' ? { snapshotId, volumeIds: [...volumeIds], mode: 'timestamp', layers: this.layers() } : { snapshotId, volumeIds: [...volumeIds] };
      return { kind: 'send', peer, step, req };
    }
    if (step === 'TAKE') return { kind: 'send', peer, step, req: { snapshotId, layers: this.layers(), ...(this.cutT === undefined ? {} : { cut: this.cutT }) } };
    return { kind: 'send', peer, step };
  }

  private answer(peer: string, a: Answer): CoordinatorAction[] {
    if (!this.awaits(peer, a.step)) return [];
    const disarm = this.disarm([peer], a.step);
    this.answers.set(peer, a);
    if (this.waiting.length > 0) return disarm;
    return [...disarm, ...(this.phaseNow === 'releasing' ? this.deleteRecords(0) : this.roundDone())];
  }

  private failed(peer: string, step: Step, error: Error): CoordinatorAction[] {
    if (!this.awaits(peer, step)) return [];
    // Letting go cannot fail the snapshot: a peer reopens its gates by itself after holdMsMax.
    if (step === 'RELEASE' || step === 'ABORT') return this.answer(peer, { step, heldMs: 0 });
    // A peer out of reach: the transport's reason as it is (it names the peer).
    return this.abort(step === 'REACH' ? error : new PeersanError(`${step} failed: ${error.message}`));
  }

  /** Every peer of the round answered: what the step's answers decide, then the next round (or publish). */
  private roundDone(): CoordinatorAction[] {
    const { step, peers } = this.plan[this.round];
    const done: CoordinatorAction[] = [];
    const answers = peers.map((p) => this.answers.get(p)!);
    for (const a of answers) {
      const frozen = a.step === 'TAKE' ? a : a.step === 'PREPARE' ? a.reply : undefined;
      this.moving.push(...(frozen?.moving ?? []));
      this.suspect.push(...(frozen?.suspect ?? []));
      if (a.step === 'RELEASE') this.heldMsMax = Math.max(this.heldMsMax, a.heldMs);
    }
    if (step === 'PREPARE' && this.o.mode === 'timestamp') {
      this.cutT = Math.max(this.o.clock(), ...answers.map((a) => (a.step === 'PREPARE' ? a.reply.clock : 0))) + 1;
      done.push({ kind: 'cut', moving: [...this.moving], suspect: [...this.suspect], cut: this.cutT });
    }
    if (step === 'TAKE' && this.o.mode === 'barrier') done.push({ kind: 'cut', moving: [...this.moving], suspect: [...this.suspect] });
    if (step === 'TAKE' && this.o.mode === 'timestamp') {
      const late = answers.flatMap((a) => (a.step === 'TAKE' ? a.suspect : []));
      if (late.length > 0) done.push({ kind: 'distrust', suspect: late });
    }
    if (this.round + 1 < this.plan.length) return [...done, ...this.startRound(this.round + 1)];
    return [...done, ...this.publish(0)];
  }

  private publish(volume: number): CoordinatorAction[] {
    this.phaseNow = 'publish';
    this.next = volume;
    if (volume < this.seqs.length) return [{ kind: 'updateRecord', volume, heldMs: this.heldMsMax }];
    this.phaseNow = 'taken';
    return [{ kind: 'taken', heldMs: this.heldMsMax }];
  }

  /** The first failure: let go on every peer if anything may be held there, then delete the records. */
  private abort(reason: Error): CoordinatorAction[] {
    this.reason = reason;
    const disarm = this.phaseNow === 'rounds' ? this.disarm(this.waiting, this.plan[this.round].step) : [];
    const held = this.phaseNow === 'rounds' && this.plan[this.round].step !== 'REACH';
    this.answers.clear();
    if (!held) return [...disarm, ...this.deleteRecords(0)];
    this.phaseNow = 'releasing';
    return [...disarm, ...this.o.peers.map((peer) => this.message(peer, this.releaseStep))];
  }

  private deleteRecords(volume: number): CoordinatorAction[] {
    this.phaseNow = 'deleting';
    this.next = volume;
    if (volume < this.seqs.length) return [{ kind: 'deleteRecord', volume }];
    this.phaseNow = 'aborted';
    assert(this.reason, 'an abort has a reason');
    return [{ kind: 'aborted', reason: this.reason }];
  }
}
