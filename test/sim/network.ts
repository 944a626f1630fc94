// The simulated network between peers (and the transport each peer's protocols use over it).
//
// A call is a request message and a reply message. Each message takes a random delay (so
// concurrent messages overtake each other: reordering). Peers talk over TCP, so a message is not
// lost silently: a loss is a broken connection, which the caller learns one delay later (and, if
// the REPLY was lost, the request did happen: the ambiguous case protocols must handle). A
// partition between two peers is a black hole, both ways, while it lasts: calls fail only at
// the caller's deadline. A peer that is down refuses connections (the caller fails after one
// delay). A crashed peer's pending calls are never answered by it; their callers learn it from
// the broken connection.
//
// What is duplicated: gRPC unary calls are at-most-once on the wire (no retries are configured)
// and block requests ride one ordered stream, so the simulator duplicates only the calls the
// protocols declare idempotent and may repeat themselves (gossip, snapshot RELEASE, move FINISH,
// reservation notices, readiness probes). Duplicating a non-idempotent call would model a
// transport peersan does not have.

import type { PeerCalls, PeerTransport } from '../../src/cluster/transport';
import { PeerUnavailableError } from '../../src/errors';
import { peerConnectMsMax, peerRequestMsMax } from '../../src/limits';
import type { BlockSender } from '../../src/routing/router';
import type { BlockReply, BlockRequest } from '../../src/routing/frame';
import type { PeerCore } from '../../src/server/compose';
import type { SeededRandom } from '../../src/env/manual';
import { replicationIdempotent } from '../../src/replication/messages';
import type { PeerTimers, SimWorld } from './world';

/** Knobs the fault schedule turns while faults are on; all zero once they stop. */
export interface NetworkFaults {
  dropRate: number;
  duplicateRate: number;
  /** Chance that a message takes a long detour (up to spikeMsMax). */
  spikeRate: number;
  spikeMsMax: number;
}

export const calmNetwork = (): NetworkFaults => ({ dropRate: 0, duplicateRate: 0, spikeRate: 0, spikeMsMax: 0 });

/** What the network needs of a peer: its live incarnation (undefined while down or starting). */
export interface Endpoint {
  core(): PeerCore | undefined;
  incarnation(): number;
  timers(): PeerTimers;
  /** Run `fn` if this incarnation crashes (until offCrash). */
  onCrash(fn: () => void): void;
  offCrash(fn: () => void): void;
}

export class SimNetwork {
  readonly counts = { drops: 0, duplicates: 0, reorders: 0, partitions: 0, messages: 0 };
  faults: NetworkFaults = calmNetwork();
  /** Pair → partitions of it in force (they overlap: a pair's and a peer's isolation; each heals its own). */
  private readonly cut = new Map<string, number>();
  /** Per direction: the sequence number of the next message sent, and the highest delivered. */
  private readonly sent = new Map<string, number>();
  private readonly delivered = new Map<string, number>();

  constructor(
    private readonly world: SimWorld,
    private readonly random: SeededRandom,
    private readonly endpoints: Map<string, Endpoint>,
    private readonly trace: (line: string) => void,
  ) {}

  partition(a: string, b: string, on: boolean): void {
    const k = [a, b].sort().join('|');
    const n = (this.cut.get(k) ?? 0) + (on ? 1 : -1);
    if (on && n === 1) this.counts.partitions++;
    if (n > 0) this.cut.set(k, n);
    else this.cut.delete(k);
  }

  healAll(): void {
    this.cut.clear();
  }

  partitioned(a: string, b: string): boolean {
    return this.cut.has([a, b].sort().join('|'));
  }

  private delay(): number {
    const f = this.faults;
    if (f.spikeRate > 0 && this.random.float() < f.spikeRate) return 1 + this.random.float() * f.spikeMsMax;
    return 0.05 + this.random.float() * 0.6;
  }

  /**
   * Send one message; `deliver` runs at its arrival. A message into a partition vanishes; a
   * dropped one breaks the connection: `broken` runs (at the sender's end) one delay later.
   */
  private send(from: string, to: string, deliver: () => void, broken: () => void): void {
    this.counts.messages++;
    const dir = `${from}>${to}`;
    const seq = (this.sent.get(dir) ?? 0) + 1;
    this.sent.set(dir, seq);
    if (this.partitioned(from, to)) return;
    if (this.faults.dropRate > 0 && this.random.float() < this.faults.dropRate) {
      this.counts.drops++;
      this.world.after(this.delay(), broken);
      return;
    }
    this.world.after(this.delay(), () => {
      if (this.partitioned(from, to)) return;
      const high = this.delivered.get(dir) ?? 0;
      if (seq < high) this.counts.reorders++;
      else this.delivered.set(dir, seq);
      deliver();
    });
  }

  /**
   * One call from `from` to `to`: `handle` runs on the target's live incarnation; its result comes
   * back unless a message is lost, the target dies meanwhile, or the caller's deadline passes.
   */
  call<T>(from: string, to: string, what: string, timeoutMs: number, handle: (core: PeerCore) => Promise<T>, idempotent = false): Promise<T> {
    const caller = this.endpoints.get(from)!;
    const callerInc = caller.incarnation();
    if (process.env.SIM_NET) this.trace(`net ${from}->${to} ${what}`);
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const finish = (fn: () => void): void => {
        if (done || caller.incarnation() !== callerInc) return;
        done = true;
        if (process.env.SIM_NET) this.trace(`net ${from}->${to} ${what} settled`);
        caller.timers().clearTimeout(deadline);
        fn();
      };
      const deadline = caller.timers().setTimeout(() => finish(() => reject(new PeerUnavailableError(to, `${what}: no answer within ${timeoutMs} ms`, true))), timeoutMs);
      const broken = (): void => finish(() => reject(new PeerUnavailableError(to, `${what}: connection reset`, false, { transient: true })));
      const arrive = (answer: boolean): void => {
        const target = this.endpoints.get(to);
        const core = target?.core();
        if (!target || !core) {
          // Nobody listens: the connection is refused, the caller hears it one delay later.
          if (answer) this.world.after(this.delay(), () => finish(() => reject(new PeerUnavailableError(to, `${what}: connection refused`, false, { unsent: true }))));
          return;
        }
        // The target dies before it answers: the caller sees the connection break.
        const onCrash = (): void => void (answer && this.world.after(this.delay(), broken));
        target.onCrash(onCrash);
        const inc = target.incarnation();
        let result: Promise<T>;
        try {
          result = handle(core);
        } catch (err) {
          result = Promise.reject(err);
        }
        const reply = (outcome: () => void): void => {
          target.offCrash(onCrash);
          if (answer && target.incarnation() === inc) this.send(to, from, () => finish(outcome), broken);
        };
        result.then((value) => reply(() => resolve(value)), (err: Error) => reply(() => reject(err)));
      };
      this.send(from, to, () => arrive(true), broken);
      if (idempotent && this.faults.duplicateRate > 0 && this.random.float() < this.faults.duplicateRate) {
        this.counts.duplicates++;
        this.send(from, to, () => arrive(false), () => undefined);
      }
    });
  }

  /** The transport one peer's protocols use. */
  transport(self: string): PeerTransport {
    const blocks = (to: string): BlockSender => ({
      send: (req) => this.call(self, to, process.env.SIM_NET ? `blocks op${req.op} ${req.lba}+${req.blocks}${req.staging ? ' staging' : ''}${req.fua ? ' fua' : ''}` : 'blocks', peerRequestMsMax, async (core) => {
        const reply = copyReply(await core.pages.handle(copyRequest(req)));
        if (process.env.SIM_NET) this.trace(`net ${self}->${to} blocks op${req.op} ${req.lba}+${req.blocks} answered ${reply.status}`);
        return reply;
      }),
    });
    const calls = (to: string): PeerCalls => {
      const c = <T>(what: string, ms: number, fn: (core: PeerCore) => Promise<T>, idempotent = false): Promise<T> => this.call(self, to, what, ms, fn, idempotent);
      const unsupported = (what: string) => (): never => {
        throw new Error(`the simulator does not carry ${what}`);
      };
      return {
        ready: (ms) => c('ready', Math.min(ms, peerConnectMsMax), async () => undefined, true),
        reservationChanged: (n, ms) => c('reservationChanged', ms, (core) => core.handlers.reservationChanged(n), true),
        startMove: (v, p, t, ms) => c('startMove', ms, (core) => core.handlers.startMove(v, p, t)),
        cancelMove: (v, p, ms) => c('cancelMove', ms, (core) => core.handlers.cancelMove(v, p)),
        moves: (ms) => c('moves', ms, async (core) => core.handlers.moves(), true),
        movePrepare: (req, ms) => c('movePrepare', ms, (core) => core.handlers.movePrepare({ ...req })),
        moveFinish: (req, ms) => c('moveFinish', ms, (core) => core.handlers.moveFinish({ ...req }), true),
        snapshotPrepare: (req, ms) => c('snapshotPrepare', ms, (core) => core.handlers.snapshotPrepare(structuredClone(req))),
        snapshotTake: (req, ms) => c('snapshotTake', ms, (core) => core.handlers.snapshotTake(structuredClone(req))),
        snapshotRelease: (id, abort, ms, finish) => c('snapshotRelease', ms, (core) => core.handlers.snapshotRelease(id, abort, finish), true),
        gossip: (summary, ms) => c('gossip', ms, async (core) => core.handlers.gossip?.(self, structuredClone(summary)), true),
        startMoves: (moves, ms) => c('startMoves', ms, (core) => core.handlers.startMoves!(structuredClone(moves))),
        // Replication messages are JSON text, copied by nature; the replication module says which kinds may repeat.
        replication: (kind, body, ms) => c(`replication ${kind}`, ms, (core) => core.handlers.replication(self, kind, body), replicationIdempotent(kind)),
        status: unsupported('status'),
        moveSession: unsupported('moveSession'),
        planHostMove: unsupported('planHostMove'),
      };
    };
    return { blocks, calls, close: () => undefined };
  }
}

function copyRequest(req: Omit<BlockRequest, 'id'>): BlockRequest {
  return { ...req, id: 0, ...(req.data ? { data: Buffer.from(req.data) } : {}) };
}

function copyReply(r: BlockReply): BlockReply {
  return { ...r, ...(r.payload ? { payload: Buffer.from(r.payload) } : {}) };
}
