// The balancer on one peer (DESIGN.md 5: on every peer, no leader). Every intervalMs it
// plans with the group view, exactly as every other peer does, and starts only the moves of
// pages this peer owns; the other owners start theirs from their own (near-identical) plan.
//
// The view lags: a page's meters stay high on its old owner and build up on its new one over
// tens of seconds. So the plan input does not take each peer's reported total as is: every
// reported page load is summed over the peers that report it and attributed to the page's
// current owner (route table, or the destination of a move still in flight), and the rest of
// each peer's total (pages too cool to be reported) stays with that peer. Right after a move
// the group therefore already looks the way it will once the meters catch up, and the
// balancer does not overshoot.
//
// Each page's arrivals by receiving peer (the traffic matrix) are summed the same way: the part
// each reporting owner received through its own portal, plus what every other peer forwarded.
// They do not depend on who owns the page when they were measured, so a move does not disturb them.
//
// The migration engine (src/migration) is reached only through PageMover.

import type { Logger } from 'pino';
import type { Clock } from '../env/env';
import { loadRecentMovesMax } from '../limits';
import { plan, type BalancerConfig, type PageHolders, type Plan, type PlanInput, type PlanPage, type PlannedMove } from './balancer';
import type { RecentMove } from './monitor';
import type { GroupLoadView, KnownMove } from './view';

export interface PageMover {
  /** Start moving a page this peer owns to `to`; resolves when the move committed. */
  movePage(volumeName: string, page: number, to: string): Promise<void>;
  /** Moves in flight on this peer. */
  movesInFlight(): number;
}


export type MoveState = 'moving' | 'done' | 'failed';

export interface VolumeFacts {
  name: string;
  /** Bytes of one full page (pageBlocks × blockBytes). */
  pageBytes: number;
  autoBalance: boolean;
}

export interface PlanContext {
  nowMs: number;
  cooldownMs: number;
  /** The page's owner in this peer's route table. */
  ownerOf(volumeId: string, page: number): string | undefined;
  /** The page's other copies in this peer's route table (replicated volumes). */
  holdersOf?(volumeId: string, page: number): PageHolders | undefined;
  volume(volumeId: string): VolumeFacts | undefined;
  /** Manual rebalance: volumes with automatic balancing off take part too. */
  manual: boolean;
  /** Moves known to the view plus this peer's own, with their state. */
  moves: KnownMove[];
  /** The peers that may receive pages (members up); absent: every fresh peer. */
  placeable?: readonly string[];
}

/** The planner's input from the group view (see the comment at the top). */
export function planInputFromView(view: GroupLoadView, ctx: PlanContext): PlanInput {
  const fresh = view.peers.filter((p) => !p.stale);
  const freshIds = new Set(fresh.map((p) => p.id));
  const reportedBy = new Map<string, number>();
  const pages = new Map<string, PlanPage>();
  const latest = new Map<string, KnownMove>();
  const arrivals = new Map<string, Map<string, number>>();
  const arrive = (key: string, peer: string, load: number): void => {
    if (load <= 0) return;
    let at = arrivals.get(key);
    if (!at) arrivals.set(key, (at = new Map()));
    at.set(peer, (at.get(peer) ?? 0) + load);
  };
  for (const m of ctx.moves) {
    const key = `${m.volumeId}/${m.page}`;
    const held = latest.get(key);
    if (!held || held.atMs < m.atMs || (held.atMs === m.atMs && m.state === 'failed')) latest.set(key, m);
  }
  for (const v of view.volumes) {
    const facts = ctx.volume(v.volumeId);
    if (!facts) continue; // deleted since it was measured
    for (const p of v.pages) {
      reportedBy.set(p.peer, (reportedBy.get(p.peer) ?? 0) + p.load);
      const key = `${v.volumeId}/${p.page}`;
      arrive(key, p.peer, p.local ?? 0);
      const held = pages.get(key);
      if (held) {
        held.load += p.load;
        continue;
      }
      const move = latest.get(key);
      const inFlight = move && move.state !== 'failed' && ctx.nowMs - move.atMs < ctx.cooldownMs;
      const owner = inFlight ? move.to : (ctx.ownerOf(v.volumeId, p.page) ?? p.peer);
      const holders = inFlight ? undefined : ctx.holdersOf?.(v.volumeId, p.page);
      pages.set(key, {
        volumeId: v.volumeId, volumeName: facts.name, page: p.page, owner, load: p.load, bytesMax: facts.pageBytes,
        lastMovedAtMs: move?.atMs, pinned: !ctx.manual && !facts.autoBalance, ...(holders ? { holders } : {}),
      });
    }
    for (const f of v.forwarded ?? []) if (pages.has(`${v.volumeId}/${f.page}`)) arrive(`${v.volumeId}/${f.page}`, f.peer, f.load);
  }
  for (const [key, at] of arrivals) {
    const page = pages.get(key);
    if (page) page.arrivals = [...at].map(([peer, load]) => ({ peer, load })).sort((a, b) => a.peer.localeCompare(b.peer));
  }
  const loads = new Map(fresh.map((p) => [p.id, Math.max(0, p.load - (reportedBy.get(p.id) ?? 0))]));
  const owned = [...pages.values()].filter((p) => freshIds.has(p.owner));
  for (const p of owned) loads.set(p.owner, loads.get(p.owner)! + p.load);
  const placeable = (id: string): boolean => ctx.placeable?.includes(id) ?? true;
  return { nowMs: ctx.nowMs, peers: fresh.map((p) => ({ id: p.id, load: loads.get(p.id)!, freeBytes: p.freeBytes, placeable: placeable(p.id) })), pages: owned };
}

export interface MoveOutcome extends PlannedMove {
  started: boolean;
  /** Why it did not start (not the owner here, cooling down, mover refused). */
  error: string;
}

interface OwnMove {
  volumeId: string;
  volumeName: string;
  page: number;
  from: string;
  to: string;
  atMs: number;
  state: MoveState;
  error?: string;
}

export interface BalancerDriverOptions {
  self: string;
  config: () => BalancerConfig;
  mover: () => PageMover;
  /** Its monotonic ms are the view's time too. */
  clock: Clock;
  /** The group view with every reported page (not cut to the top N). */
  view: () => GroupLoadView;
  ownerOf(volumeId: string, page: number): string | undefined;
  holdersOf?(volumeId: string, page: number): PageHolders | undefined;
  volume(volumeId: string): VolumeFacts | undefined;
  /** The group switch (catalog). */
  groupAuto: () => boolean;
  /** The peers that may receive pages (members up); absent: every fresh peer. */
  placeable?(): readonly string[];
  log: Logger;
}

export class BalancerDriver {
  private readonly o: BalancerDriverOptions;
  private readonly own = new Map<string, OwnMove>();
  private readonly errorsLogged = new Set<string>();
  /** Why the last automatic round did or did not move anything (for `top`). */
  lastRound = 'no round yet';
  /** When a page move was last seen in flight (any peer's, from the view, or this peer's own), on the clock. */
  private lastMoveAtMs = -Infinity;
  /** The round at which the group's mean load last rose to minMeanLoad (this peer's start included); undefined while below. */
  private loadBeganAtMs: number | undefined;

  constructor(opts: BalancerDriverOptions) {
    this.o = opts;
  }

  /** The group's plan as this peer sees it now. */
  plan(manual: boolean): Plan {
    const config = this.o.config();
    const nowMs = this.o.clock.monotonicMs();
    this.forgetOld(nowMs, config.cooldownMs);
    const view = this.o.view();
    const moves = [...view.recentMoves, ...[...this.own.values()]];
    // A move seen in flight (within the cool-down, as planInputFromView takes it: a peer that died
    // under a move reports it moving for ever), or started since and not failed: the loads are
    // settling (balancer.ts). A failed move changed no route. A manual round does not wait.
    for (const m of moves) {
      if (m.state !== 'failed') this.lastMoveAtMs = Math.max(this.lastMoveAtMs, m.state === 'moving' && nowMs - m.atMs < config.cooldownMs ? nowMs : m.atMs);
    }
    const input = planInputFromView(view, {
      nowMs, cooldownMs: config.cooldownMs, manual, moves, ...(this.o.placeable ? { placeable: this.o.placeable() } : {}),
      ownerOf: (v, p) => this.o.ownerOf(v, p), holdersOf: (v, p) => this.o.holdersOf?.(v, p), volume: (v) => this.o.volume(v),
    });
    const mean = input.peers.reduce((a, p) => a + p.load, 0) / Math.max(1, input.peers.length);
    if (mean < config.minMeanLoad) this.loadBeganAtMs = undefined;
    else this.loadBeganAtMs ??= nowMs;
    if (manual) return plan(input, config);
    const began = this.loadBeganAtMs ?? -Infinity;
    const settling = this.lastMoveAtMs >= began ? { atMs: this.lastMoveAtMs, after: 'a move' } : { atMs: began, after: 'the load began' };
    return plan(settling.atMs === -Infinity ? input : { ...input, settling: { agoMs: nowMs - settling.atMs, after: settling.after } }, config);
  }

  /** One automatic round: plan, start this peer's moves. Undefined when switched off. */
  async round(): Promise<{ plan: Plan; outcomes: MoveOutcome[] } | undefined> {
    const config = this.o.config();
    if (!config.enabled || !this.o.groupAuto()) {
      this.lastRound = !config.enabled ? 'off in cluster.yaml (balancer.enabled)' : 'off for the group (peersan rebalance --auto on)';
      return undefined;
    }
    if (this.o.mover().movesInFlight() > 0) {
      this.lastRound = 'waiting for this peer\'s moves in flight';
      return undefined;
    }
    const p = this.plan(false);
    const mine = p.moves.filter((m) => m.from === this.o.self);
    const outcomes = await this.start(mine);
    const started = outcomes.filter((o) => o.started).length;
    this.lastRound = `${p.reason}${p.moves.length ? `; started ${started} of this peer's ${mine.length}` : ''}`;
    return { plan: p, outcomes };
  }

  /**
   * Start moves of pages this peer owns (others are refused with a reason). Resolves once
   * each move is under way or was refused at once by the mover; does not wait for commits.
   */
  async start(moves: PlannedMove[]): Promise<MoveOutcome[]> {
    const config = this.o.config();
    const nowMs = this.o.clock.monotonicMs();
    const begun = moves.slice(0, config.maxMovesPerRound).map((m) => this.startOne(m, nowMs, config.cooldownMs));
    // Let a mover that refuses at once (no migration engine, page busy) say so in the reply.
    await new Promise<void>((resolve) => setImmediate(resolve));
    return begun.map(({ outcome, record }) => (record?.state === 'failed' ? { ...outcome, started: false, error: record.error ?? 'failed' } : outcome));
  }

  private startOne(m: PlannedMove, nowMs: number, cooldownMs: number): { outcome: MoveOutcome; record?: OwnMove } {
    const refuse = (error: string): { outcome: MoveOutcome } => ({ outcome: { ...m, started: false, error } });
    const owner = this.o.ownerOf(m.volumeId, m.page);
    if (owner !== this.o.self) return refuse(`${this.o.self} does not own page ${m.page} of ${m.volumeName} (${owner ?? 'unknown'} does)`);
    const key = `${m.volumeId}/${m.page}`;
    const held = this.own.get(key);
    if (held && nowMs - held.atMs < cooldownMs) return refuse(`page ${m.page} of ${m.volumeName} moved ${Math.round((nowMs - held.atMs) / 1000)} s ago (cool-down ${cooldownMs / 1000} s)`);
    if (this.own.size >= loadRecentMovesMax) return refuse('too many recent moves remembered on this peer');
    const record: OwnMove = { volumeId: m.volumeId, volumeName: m.volumeName, page: m.page, from: this.o.self, to: m.to, atMs: nowMs, state: 'moving' };
    this.own.set(key, record);
    let promise: Promise<void>;
    try {
      promise = this.o.mover().movePage(m.volumeName, m.page, m.to);
    } catch (err) {
      promise = Promise.reject(err);
    }
    promise.then(
      () => {
        record.state = 'done';
        this.lastMoveAtMs = Math.max(this.lastMoveAtMs, this.o.clock.monotonicMs());
        this.o.log.info({ volume: m.volumeName, page: m.page, to: m.to, load: m.load }, 'balancer moved a page');
      },
      (err: Error) => {
        record.state = 'failed';
        record.error = err.message;
        // The same reason every round (e.g. no migration engine) is logged once, not per round.
        if (this.errorsLogged.has(err.message)) return;
        this.errorsLogged.add(err.message);
        this.o.log.warn({ volume: m.volumeName, page: m.page, to: m.to, reason: err.message }, 'balancer could not move a page (logged once per reason)');
      },
    );
    return { outcome: { ...m, started: true, error: '' }, record };
  }

  /**
   * A move of a page this peer owned committed (the migrator says so for every move: one this
   * driver started, one an operator started, one resumed after a restart that this driver has
   * never seen). The cool-down runs from the commit: a long move's start may be older than the
   * cool-down, and after a restart there is no record at all. It reaches the new owner's
   * balancer through this peer's gossip (recentMoves).
   */
  noteCommitted(m: { volumeId: string; page: number; to: string }): void {
    const nowMs = this.o.clock.monotonicMs();
    const key = `${m.volumeId}/${m.page}`;
    const held = this.own.get(key);
    if (held) {
      held.atMs = nowMs;
      held.state = 'done';
      held.to = m.to;
      return;
    }
    this.forgetOld(nowMs, this.o.config().cooldownMs);
    // Full (a burst of manual moves): the oldest finished record gives way, the newest commit counts more.
    if (this.own.size >= loadRecentMovesMax) {
      const oldest = [...this.own].find(([, o]) => o.state !== 'moving');
      if (!oldest) return;
      this.own.delete(oldest[0]);
    }
    const volumeName = this.o.volume(m.volumeId)?.name ?? m.volumeId;
    this.own.set(key, { volumeId: m.volumeId, volumeName, page: m.page, from: this.o.self, to: m.to, atMs: nowMs, state: 'done' });
  }

  /** This peer's moves still in cool-down, for its gossip summary. */
  recentMoves(): RecentMove[] {
    const nowMs = this.o.clock.monotonicMs();
    this.forgetOld(nowMs, this.o.config().cooldownMs);
    return [...this.own.values()].map((m) => ({ volumeId: m.volumeId, page: m.page, to: m.to, agoMs: Math.max(0, nowMs - m.atMs), state: m.state }));
  }

  private forgetOld(nowMs: number, cooldownMs: number): void {
    for (const [key, m] of this.own) if (nowMs - m.atMs >= cooldownMs && m.state !== 'moving') this.own.delete(key);
  }
}
