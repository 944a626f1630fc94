// The snapshot participant (DESIGN.md 6, 12) as a state machine: every snapshot this peer has
// been asked to prepare, in which state, and what each request may do in it. No I/O, no timers,
// no promises: the service (service.ts) feeds it requests (PREPARE, TAKE, RELEASE/FINISH/ABORT),
// the ends of the effects it asked for (pre-flushed, gates closed, frozen, sealed, finished,
// failed) and expiry timers, and performs the actions it returns, in order. Each request ends
// with exactly one `answer` or `refuse` (an `open` with a request answers it with the hold).
// The effects themselves (close and drain the gates, freeze the layers, write the recorded
// changes) are the service's; the order between them and the holds is decided here.
//
// Barrier mode:
//   PREPARE: pre-flush first (hosts still run; bounded, failures ignored). If RELEASE came
//   meanwhile (another peer failed), refuse: closing now would hold hosts for nothing. Else
//   hold the volumes (their page moves take no new step until let go), arm the expiry
//   (holdMsMax: the coordinator may be gone), then close the gates and drain (the service also
//   waits for the page-move step in progress); READY once all are closed. A gate that fails
//   refuses PREPARE and lets go of everything.
//   TAKE: only for a snapshot prepared here (the service refuses too if a gate reopened by
//   itself: the hold outlived holdMsMax); the layers freeze; answer with the pages moving and
//   this peer's suspect copies (records.ts FrozenReport).
//   RELEASE (or the expiry): forget the snapshot, let go of the volumes, open the gates.
// Timestamp mode:
//   PREPARE: refuse a snapshot already prepared here; arm the expiry, hold the volumes, then
//   pre-flush, then record and freeze (the service, volume by volume); answer with this peer's
//   clock, read once everything froze (every write that reached the store before the freeze
//   was stamped below it), and with what TAKE reports in barrier mode. Dropped meanwhile
//   (ABORT, expiry): refuse.
//   TAKE(T): only once prepared here; remember T; the service moves the clock past T and waits
//   for host writes stamped before T, and for the replicated changes stamped before T this
//   peer is primary of (service.ts step 3); answer with the copies that may lack one of those
//   changes (their drop from the in-sync set not made yet: records.ts SuspectAtCut).
//   FINISH: only once TAKE(T) came; the service writes the recorded changes before T into the
//   layers; then, done or failed, the recording is dropped and the volumes let go. FINISH of a
//   snapshot this peer does not know is refused: it restarted since PREPARE, and the writes it
//   recorded after its freeze are gone with it, so its layer would not be the cut (found by the
//   simulator, seed 1539).
//   ABORT (or the expiry): drop the recording, let go of the volumes.

import { assert, PeersanError } from '../errors';
import type { PrepareReply, PrepareSnapshot, TakeSnapshot } from './service';
import type { FrozenReport, SuspectAtCut } from './records';

/** A peer reopens its gates by itself this long after PREPARE (the coordinator is gone). */
export const holdMsMax = 10_000;

type Layers = { volumeId: string; seq: number }[];

export type ParticipantEvent =
  | { kind: 'prepare'; req: number; prepare: PrepareSnapshot }
  | { kind: 'take'; req: number; take: TakeSnapshot }
  | { kind: 'release'; req: number; snapshotId: string; abort: boolean; finish: boolean }
  /** The effect asked for by request `req` ended (`ms`: how long it took, for the log). */
  | { kind: 'flushed'; req: number; ms: number }
  | { kind: 'closed'; req: number; ms: number }
  | ({ kind: 'frozen'; req: number } & FrozenReport)
  /** TAKE(T) sealed: `suspect`, the copies that may lack a change before T (records.ts SuspectAtCut). */
  | { kind: 'sealed'; req: number; suspect: SuspectAtCut[] }
  | { kind: 'finished'; req: number }
  | { kind: 'failed'; req: number; error: Error }
  /** The expiry armed for this snapshot fired. */
  | { kind: 'expired'; snapshotId: string; expiry: number };

export type ParticipantAction =
  | { kind: 'answer'; req: number; value: PrepareReply | FrozenReport | number }
  | { kind: 'refuse'; req: number; error: Error }
  /** Report `expired` after `ms` unless disarmed. */
  | { kind: 'arm'; snapshotId: string; expiry: number; ms: number }
  | { kind: 'disarm'; expiry: number }
  /** The first snapshot holds the volume: its page moves wait from now. */
  | { kind: 'hold'; volumeId: string }
  /** The last snapshot let go of the volume: its page moves go on. */
  | { kind: 'letGo'; volumeId: string }
  /** Effects, each ending with an event for `req`. */
  | { kind: 'preflush'; req: number; volumeIds: string[] }
  | { kind: 'close'; req: number; snapshotId: string; volumeIds: string[] }
  | { kind: 'freeze'; req: number; snapshotId: string; volumeIds: string[]; layers: Layers; flushMs: number; drainMs: number }
  | { kind: 'record'; req: number; snapshotId: string; layers: Layers }
  | { kind: 'seal'; req: number; snapshotId: string; cut: number; volumeIds: string[] }
  | { kind: 'finish'; req: number; snapshotId: string; layers: Layers; cut: number }
  /** Open the snapshot's gates on these volumes; with `req`, answer it with the longest hold. */
  | { kind: 'open'; req?: number; snapshotId: string; volumeIds: string[] }
  | { kind: 'dropRecording'; snapshotId: string; volumeId: string };

/** A barrier snapshot prepared here; `expiry` once the pre-flush ended (the volumes held from then). */
interface Barrier {
  volumeIds: string[];
  flushMs: number;
  drainMs: number;
  expiry?: number;
}

/** A timestamp snapshot prepared here and not finished. */
interface Stamped {
  layers: Layers;
  cut?: number;
  expiry: number;
}

/** A request waiting for an effect: whose, for which snapshot entry. */
type Pending =
  | { step: 'prepare'; snapshotId: string; barrier: Barrier }
  | { step: 'prepare'; snapshotId: string; stamped: Stamped }
  | { step: 'take' | 'seal' | 'finish'; snapshotId: string };

export interface ParticipantOptions {
  self: string;
  /** This peer's hybrid clock; read when a timestamp PREPARE is answered. */
  clock(): number;
}

export class SnapshotParticipant {
  private readonly prepared = new Map<string, Barrier>();
  private readonly stamping = new Map<string, Stamped>();
  /** Volumes held by snapshots (barrier: gates closed; timestamp: recording), counted. */
  private readonly holds = new Map<string, number>();
  private readonly pending = new Map<number, Pending>();
  private expiries = 0;

  constructor(private readonly o: ParticipantOptions) {}

  /** Snapshots prepared here: barrier ones, then timestamp ones. */
  get snapshots(): { barrier: string[]; timestamp: string[] } {
    return { barrier: [...this.prepared.keys()], timestamp: [...this.stamping.keys()] };
  }

  /** How many snapshots hold the volume. */
  holding(volumeId: string): number {
    return this.holds.get(volumeId) ?? 0;
  }

  step(ev: ParticipantEvent): ParticipantAction[] {
    switch (ev.kind) {
      case 'prepare':
        return ev.prepare.mode === 'timestamp' ? this.prepareStamped(ev.req, ev.prepare) : this.prepareBarrier(ev.req, ev.prepare);
      case 'take':
        return ev.take.cut !== undefined ? this.seal(ev.req, ev.take, ev.take.cut) : this.take(ev.req, ev.take);
      case 'release':
        return this.release(ev.req, ev.snapshotId, ev.abort, ev.finish);
      case 'expired':
        return this.expired(ev.snapshotId, ev.expiry);
      default:
        return this.effectEnded(ev);
    }
  }

  private refuse(req: number, message: string): ParticipantAction[] {
    return [{ kind: 'refuse', req, error: new PeersanError(message) }];
  }

  private prepareBarrier(req: number, p: PrepareSnapshot): ParticipantAction[] {
    const barrier: Barrier = { volumeIds: p.volumeIds, flushMs: 0, drainMs: 0 };
    this.prepared.set(p.snapshotId, barrier);
    this.pending.set(req, { step: 'prepare', snapshotId: p.snapshotId, barrier });
    return [{ kind: 'preflush', req, volumeIds: p.volumeIds }];
  }

  private prepareStamped(req: number, p: PrepareSnapshot): ParticipantAction[] {
    const layers = p.layers ?? [];
    if (this.stamping.has(p.snapshotId)) return this.refuse(req, `snapshot ${p.snapshotId} is already prepared on ${this.o.self}`);
    // The coordinator gone: recordings do not outlive holdMsMax.
    const stamped: Stamped = { layers, expiry: ++this.expiries };
    this.stamping.set(p.snapshotId, stamped);
    this.pending.set(req, { step: 'prepare', snapshotId: p.snapshotId, stamped });
    return [
      { kind: 'arm', snapshotId: p.snapshotId, expiry: stamped.expiry, ms: holdMsMax },
      ...layers.flatMap(({ volumeId }) => this.hold(volumeId)),
      { kind: 'preflush', req, volumeIds: layers.map((l) => l.volumeId) },
    ];
  }

  private take(req: number, t: TakeSnapshot): ParticipantAction[] {
    const p = this.prepared.get(t.snapshotId);
    if (!p) return this.refuse(req, `snapshot ${t.snapshotId} was not prepared on ${this.o.self}`);
    this.pending.set(req, { step: 'take', snapshotId: t.snapshotId });
    return [{ kind: 'freeze', req, snapshotId: t.snapshotId, volumeIds: p.volumeIds, layers: t.layers, flushMs: p.flushMs, drainMs: p.drainMs }];
  }

  private seal(req: number, t: TakeSnapshot, cut: number): ParticipantAction[] {
    const s = this.stamping.get(t.snapshotId);
    if (!s) return this.refuse(req, `snapshot ${t.snapshotId} was not prepared on ${this.o.self}`);
    s.cut = cut;
    this.pending.set(req, { step: 'seal', snapshotId: t.snapshotId });
    const volumeIds = new Set([...s.layers.map((l) => l.volumeId), ...t.layers.map((l) => l.volumeId)]);
    return [{ kind: 'seal', req, snapshotId: t.snapshotId, cut, volumeIds: [...volumeIds] }];
  }

  private release(req: number, snapshotId: string, abort: boolean, finish: boolean): ParticipantAction[] {
    const s = this.stamping.get(snapshotId);
    if (s && abort) return [...this.dropStamped(snapshotId), { kind: 'answer', req, value: 0 }];
    if (s) {
      if (s.cut === undefined) return this.refuse(req, `snapshot ${snapshotId} was not taken on ${this.o.self}`);
      this.pending.set(req, { step: 'finish', snapshotId });
      return [{ kind: 'finish', req, snapshotId, layers: s.layers, cut: s.cut }];
    }
    if (finish && !abort) return this.refuse(req, `snapshot ${snapshotId} is not recorded on ${this.o.self} (it restarted since PREPARE): the layer would miss writes before the cut`);
    const p = this.dropPrepared(snapshotId);
    if (!p) return [{ kind: 'answer', req, value: 0 }];
    return [...p.actions, { kind: 'open', req, snapshotId, volumeIds: p.volumeIds }];
  }

  private expired(snapshotId: string, expiry: number): ParticipantAction[] {
    if (this.stamping.get(snapshotId)?.expiry === expiry) return this.dropStamped(snapshotId);
    if (this.prepared.get(snapshotId)?.expiry !== expiry) return [];
    const p = this.dropPrepared(snapshotId)!;
    return [...p.actions, { kind: 'open', snapshotId, volumeIds: p.volumeIds }];
  }

  private effectEnded(ev: Exclude<ParticipantEvent, { kind: 'prepare' | 'take' | 'release' | 'expired' }>): ParticipantAction[] {
    const w = this.pending.get(ev.req);
    assert(w, `an effect of request ${ev.req} ended while none was asked for`);
    if (ev.kind !== 'flushed') this.pending.delete(ev.req);
    if (ev.kind === 'failed') return this.effectFailed(ev.req, w, ev.error);
    if ('barrier' in w) return this.barrierPrepared(ev, w.snapshotId, w.barrier);
    if ('stamped' in w) return this.stampedPrepared(ev, w.snapshotId, w.stamped);
    if (ev.kind === 'frozen') return [{ kind: 'answer', req: ev.req, value: { moving: ev.moving, suspect: ev.suspect } }];
    if (w.step === 'finish') return [...this.dropStamped(w.snapshotId), { kind: 'answer', req: ev.req, value: 0 }];
    // TAKE(T) sealed: the freeze was reported at PREPARE; the copies a change before T may have missed now.
    return [{ kind: 'answer', req: ev.req, value: { moving: [], suspect: ev.kind === 'sealed' ? ev.suspect : [] } }];
  }

  /** Barrier PREPARE: pre-flushed, then gates closed. */
  private barrierPrepared(ev: ParticipantEvent & { req: number }, snapshotId: string, b: Barrier): ParticipantAction[] {
    if (ev.kind === 'closed') {
      b.drainMs = ev.ms;
      return [{ kind: 'answer', req: ev.req, value: { clock: 0, moving: [], suspect: [] } }];
    }
    assert(ev.kind === 'flushed', 'a barrier PREPARE pre-flushes, then closes');
    b.flushMs = ev.ms;
    // Released meanwhile (another peer failed PREPARE; RELEASE came): closing now would hold hosts for nothing.
    if (this.prepared.get(snapshotId) !== b) {
      this.pending.delete(ev.req);
      return this.refuse(ev.req, `snapshot ${snapshotId} was released while ${this.o.self} prepared it`);
    }
    // Held from here: page moves of the volumes take no new step. The gates reopen by
    // themselves after holdMsMax (the coordinator is gone); the hold ends then too.
    b.expiry = ++this.expiries;
    return [...b.volumeIds.flatMap((id) => this.hold(id)), { kind: 'arm', snapshotId, expiry: b.expiry, ms: holdMsMax }, { kind: 'close', req: ev.req, snapshotId, volumeIds: b.volumeIds }];
  }

  /** Timestamp PREPARE: pre-flushed, then recording and frozen. */
  private stampedPrepared(ev: ParticipantEvent & { req: number }, snapshotId: string, s: Stamped): ParticipantAction[] {
    if (ev.kind === 'flushed') return [{ kind: 'record', req: ev.req, snapshotId, layers: s.layers }];
    assert(ev.kind === 'frozen', 'a timestamp PREPARE pre-flushes, then records and freezes');
    if (!this.stamping.has(snapshotId)) return this.refuse(ev.req, `snapshot ${snapshotId} was dropped while ${this.o.self} prepared it`);
    return [{ kind: 'answer', req: ev.req, value: { clock: this.o.clock(), moving: ev.moving, suspect: ev.suspect } }];
  }

  private effectFailed(req: number, w: Pending, error: Error): ParticipantAction[] {
    const refuse: ParticipantAction = { kind: 'refuse', req, error };
    // A barrier PREPARE whose gates failed (the service reopened those it closed): let go, unless released meanwhile.
    if ('barrier' in w) return [...(this.prepared.get(w.snapshotId) === w.barrier ? this.dropPrepared(w.snapshotId)!.actions : []), refuse];
    // A timestamp PREPARE or a FINISH that failed: the recording goes (FINISH's, done or not).
    if ('stamped' in w || w.step === 'finish') return [...this.dropStamped(w.snapshotId), refuse];
    return [refuse];
  }

  /** A snapshot holds the volume (counted: several may, one per consistency group and mode). */
  private hold(volumeId: string): ParticipantAction[] {
    const n = this.holding(volumeId);
    this.holds.set(volumeId, n + 1);
    return n === 0 ? [{ kind: 'hold', volumeId }] : [];
  }

  /** One snapshot lets go of the volume; the last one wakes the page moves waiting on it. */
  private letGo(volumeId: string): ParticipantAction[] {
    const n = this.holding(volumeId);
    if (n === 0) return [];
    if (n > 1) return void this.holds.set(volumeId, n - 1), [];
    this.holds.delete(volumeId);
    return [{ kind: 'letGo', volumeId }];
  }

  /** Barrier: forget a prepared snapshot; the volumes it held are let go (its gates are the caller's to open). */
  private dropPrepared(snapshotId: string): { volumeIds: string[]; actions: ParticipantAction[] } | undefined {
    const p = this.prepared.get(snapshotId);
    if (!p) return undefined;
    this.prepared.delete(snapshotId);
    if (p.expiry === undefined) return { volumeIds: p.volumeIds, actions: [] };
    return { volumeIds: p.volumeIds, actions: [{ kind: 'disarm', expiry: p.expiry }, ...p.volumeIds.flatMap((id) => this.letGo(id))] };
  }

  /** Timestamp: forget a snapshot; its recordings dropped, its volumes let go. */
  private dropStamped(snapshotId: string): ParticipantAction[] {
    const s = this.stamping.get(snapshotId);
    if (!s) return [];
    this.stamping.delete(snapshotId);
    return [{ kind: 'disarm', expiry: s.expiry }, ...s.layers.flatMap(({ volumeId }): ParticipantAction[] => [{ kind: 'dropRecording', snapshotId, volumeId }, ...this.letGo(volumeId)])];
  }
}
