// The simulated network between peers (and the transport each peer's protocols use over it).
//
// A call is a request message and a reply message. Each message takes a random delay (so
// concurrent messages overtake each other: reordering), may be lost (the caller then hears
// nothing and fails at its own deadline, exactly as a real RPC deadline; a lost REPLY means the
// request did happen: the ambiguous case protocols must handle), and may be duplicated when the
// real transport could deliver it twice. A partition between two peers loses everything between
// them, both ways, while it lasts. A peer that is down refuses connections (the caller fails
// after one network delay). A crashed peer's pending calls are never answered.
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
}

export class SimNetwork {
  readonly counts = { drops: 0, duplicates: 0, reorders: 0, partitions: 0, messages: 0 };
  faults: NetworkFaults = calmNetwork();
  private readonly cut = new Set<string>();
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
    if (on && !this.cut.has(k)) this.counts.partitions++;
    if (on) this.cut.add(k);
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

  /** Send one message; `deliver` runs at its arrival unless it is lost. Returns false if lost at once. */
  private send(from: string, to: string, deliver: () => void): void {
    this.counts.messages++;
    const dir = `${from}>${to}`;
    const seq = (this.sent.get(dir) ?? 0) + 1;
    this.sent.set(dir, seq);
    if (this.partitioned(from, to)) return;
    if (this.faults.dropRate > 0 && this.random.float() < this.faults.dropRate) {
      this.counts.drops++;
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
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const finish = (fn: () => void): void => {
        if (done || caller.incarnation() !== callerInc) return;
        done = true;
        caller.timers().clearTimeout(deadline);
        fn();
      };
      const deadline = caller.timers().setTimeout(() => finish(() => reject(new PeerUnavailableError(to, `${what}: no answer within ${timeoutMs} ms`, true))), timeoutMs);
      const arrive = (answer: boolean): void => {
        const target = this.endpoints.get(to);
        const core = target?.core();
        if (!target || !core) {
          // Nobody listens: the connection is refused, the caller hears it one delay later.
          if (answer) this.send(to, from, () => finish(() => reject(new PeerUnavailableError(to, `${what}: connection refused`, false))));
          return;
        }
        const inc = target.incarnation();
        let result: Promise<T>;
        try {
          result = handle(core);
        } catch (err) {
          result = Promise.reject(err);
        }
        result.then(
          (value) => answer && target.incarnation() === inc && this.send(to, from, () => finish(() => resolve(value))),
          (err: Error) => answer && target.incarnation() === inc && this.send(to, from, () => finish(() => reject(err))),
        );
      };
      this.send(from, to, () => arrive(true));
      if (idempotent && this.faults.duplicateRate > 0 && this.random.float() < this.faults.duplicateRate) {
        this.counts.duplicates++;
        this.send(from, to, () => arrive(false));
      }
    });
  }

  /** The transport one peer's protocols use. */
  transport(self: string): PeerTransport {
    const blocks = (to: string): BlockSender => ({
      send: (req) => this.call(self, to, 'blocks', peerRequestMsMax, async (core) => copyReply(await core.pages.handle(copyRequest(req)))),
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
        snapshotRelease: (id, abort, ms) => c('snapshotRelease', ms, (core) => core.handlers.snapshotRelease(id, abort), true),
        gossip: (summary, ms) => c('gossip', ms, async (core) => core.handlers.gossip?.(self, structuredClone(summary)), true),
        startMoves: (moves, ms) => c('startMoves', ms, (core) => core.handlers.startMoves!(structuredClone(moves))),
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
