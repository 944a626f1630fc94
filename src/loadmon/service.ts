// The load monitor, the group view, gossip and the balancer of one peer, on timers. Every
// loadTickMs: fold the meters, build this peer's summary, keep it in the view and send it to
// every other peer (short timeout, failures ignored, at most one call per peer in flight).
// Every balancer.intervalMs: one balancing round. Transport and catalog are injected, so a
// test drives tick() and round() by hand.

import type { Logger } from 'pino';
import type { Env, TimerHandle } from '../env/env';
import { loadHottestPagesPerVolume, loadTickMs, loadTopPagesMax } from '../limits';
import type { BalancerConfig, PageHolders, Plan, PlannedMove } from './balancer';
import { BalancerDriver, type MoveOutcome, type PageMover, type VolumeFacts } from './balancer-driver';
import { LoadMonitor, type LoadSummary, type PeerFacts } from './monitor';
import { GroupView, type GroupLoadView, type HostLoadView, type PeerLoadView } from './view';

export interface LoadServiceOptions {
  self: string;
  /** The group's peers now, this one included (members join and leave while it runs). */
  peers(): readonly string[];
  /** Those that may receive pages (members up): the balancer's destinations; absent: every fresh peer. */
  placeable?(): readonly string[];
  config: BalancerConfig;
  log: Logger;
  /** Sessions and capacity of this peer (called once per tick; may be slow, never awaited twice at once). */
  facts(): Promise<PeerFacts>;
  sendGossip(peerId: string, summary: LoadSummary): Promise<void>;
  ownerOf(volumeId: string, page: number): string | undefined;
  /** The page's other copies (replicated volumes; see balancer.ts PlanPage.holders). */
  holdersOf?(volumeId: string, page: number): PageHolders | undefined;
  volume(volumeId: string): VolumeFacts | undefined;
  /** Ids of the volumes in the catalog (meters of others are dropped). */
  volumeIds(): ReadonlySet<string>;
  groupAuto(): boolean;
  /** `peersan rebalance`: ask another peer (the pages' owner) to start these moves. */
  startMovesOn(peerId: string, moves: PlannedMove[]): Promise<MoveOutcome[]>;
  /** Page migration (src/migration/migrator.ts). */
  mover: PageMover;
  /** Monotonic clock of the meters and the view; timers of the ticks and rounds. */
  env: Env;
}

export interface MoveView {
  volumeId: string;
  volumeName: string;
  page: number;
  from: string;
  to: string;
  agoMs: number;
  state: string;
}

export interface BalancerStatus {
  enabled: boolean;
  auto: boolean;
  lastRound: string;
  movesInFlight: number;
}

/** AdminService Top: the group view, moves aged for display, the balancer's state. */
export interface TopReply extends Omit<GroupLoadView, 'recentMoves'> {
  recentMoves: MoveView[];
  balancer: BalancerStatus;
}

/** AdminService Rebalance: the plan and, unless a dry run, what each owner started. */
export interface RebalanceReply extends Omit<Plan, 'moves'> {
  dryRun: boolean;
  moves: MoveOutcome[];
}

export class LoadService {
  readonly monitor: LoadMonitor;
  readonly view: GroupView;
  readonly driver: BalancerDriver;
  private readonly o: LoadServiceOptions;
  private facts: PeerFacts = { sessions: 0, freeBytes: 0, totalBytes: 0, allocatedBytes: 0 };
  private factsPending = false;
  private readonly sending = new Set<string>();
  private intervals: TimerHandle[] = [];
  private readonly tickListeners: (() => void)[] = [];

  constructor(opts: LoadServiceOptions) {
    this.o = opts;
    this.monitor = new LoadMonitor({ self: opts.self, clock: opts.env.clock });
    this.view = new GroupView(opts.self, () => this.o.peers());
    this.driver = new BalancerDriver({
      self: opts.self, config: () => this.o.config, mover: () => this.o.mover, clock: opts.env.clock,
      view: () => this.view.snapshot(this.nowMs(), loadHottestPagesPerVolume * this.o.peers().length),
      ownerOf: opts.ownerOf, holdersOf: opts.holdersOf, volume: opts.volume, groupAuto: opts.groupAuto, placeable: opts.placeable, log: opts.log.child({ component: 'balancer' }),
    });
  }

  private nowMs(): number {
    return this.o.env.clock.monotonicMs();
  }

  get config(): BalancerConfig {
    return this.o.config;
  }

  movesInFlight(): number {
    return this.o.mover.movesInFlight();
  }

  start(): void {
    this.refreshFacts(); // so the first summary already carries capacity and sessions
    const { timers } = this.o.env;
    this.intervals.push(timers.setInterval(() => {
      try {
        this.tick();
      } catch (err) {
        this.o.log.error({ err }, 'load monitor tick failed');
      }
    }, loadTickMs));
    this.intervals.push(timers.setInterval(() => this.round(), this.o.config.intervalMs));
    for (const t of this.intervals) t.unref();
  }

  stop(): void {
    for (const t of this.intervals) this.o.env.timers.clearInterval(t);
    this.intervals = [];
  }

  /** Fold, summarise, keep and gossip. Returns this peer's summary. */
  tick(): LoadSummary {
    this.refreshFacts();
    this.monitor.retainVolumes(this.o.volumeIds());
    this.monitor.tick();
    const summary = this.monitor.summary(this.facts, this.driver.recentMoves());
    this.view.put(summary, this.nowMs());
    for (const peer of this.o.peers()) {
      if (peer === this.o.self || this.sending.has(peer)) continue;
      this.sending.add(peer);
      // A peer that is down costs one failed call per tick; the view marks it stale on its side.
      this.o.sendGossip(peer, summary).catch(() => undefined).finally(() => this.sending.delete(peer));
    }
    for (const listener of this.tickListeners) listener();
    return summary;
  }

  private refreshFacts(): void {
    if (this.factsPending) return;
    this.factsPending = true;
    this.o.facts().then(
      (f) => (this.facts = f),
      (err: Error) => this.o.log.debug({ reason: err.message }, 'could not read peer facts for the load summary'),
    ).finally(() => (this.factsPending = false));
  }

  /**
   * Called after every tick: which peers are stale moves on with the clock, not only with the
   * summaries that arrive, so what depends on it reads the view again here.
   */
  onTick(listener: () => void): void {
    this.tickListeners.push(listener);
  }

  /** A summary from another peer (authenticated by the RPC layer as `from`). */
  received(from: string, summary: LoadSummary): boolean {
    if (summary.peerId !== from || from === this.o.self) return false;
    return this.view.put(summary, this.nowMs());
  }

  round(): Promise<{ plan: Plan; outcomes: MoveOutcome[] } | undefined> {
    return this.driver.round().catch((err: unknown) => {
      this.o.log.error({ err }, 'balancing round failed');
      return undefined;
    });
  }

  /** Every peer's load as gossiped (stale peers marked), without the per-page detail. */
  peerLoads(): PeerLoadView[] {
    return this.view.snapshot(this.nowMs(), 0, 0).peers;
  }

  /** The host sessions the fresh peers gossip (this one's included). */
  hostLoads(): HostLoadView[] {
    return this.view.snapshot(this.nowMs(), 0, 0).hosts;
  }

  top(pages = 16): TopReply {
    const now = this.nowMs();
    const view = this.view.snapshot(now, pages, loadTopPagesMax);
    return {
      ...view,
      recentMoves: view.recentMoves.map((m) => ({ volumeId: m.volumeId, volumeName: this.o.volume(m.volumeId)?.name ?? m.volumeId, page: m.page, from: m.from, to: m.to, agoMs: Math.round(now - m.atMs), state: m.state })),
      balancer: { enabled: this.o.config.enabled, auto: this.o.groupAuto(), lastRound: this.driver.lastRound, movesInFlight: this.o.mover.movesInFlight() },
    };
  }

  /**
   * `peersan rebalance`: plan with this peer's view (volumes with automatic balancing off
   * included: the operator asked) and, unless a dry run, have each owner start its moves.
   */
  async rebalance(dryRun: boolean): Promise<RebalanceReply> {
    const p = this.driver.plan(true);
    if (dryRun || p.moves.length === 0) return { ...p, dryRun, moves: p.moves.map((m) => ({ ...m, started: false, error: '' })) };
    const byOwner = new Map<string, PlannedMove[]>();
    for (const m of p.moves) byOwner.set(m.from, [...(byOwner.get(m.from) ?? []), m]);
    const outcomes = await Promise.all(
      [...byOwner.entries()].map(async ([owner, moves]): Promise<MoveOutcome[]> => {
        if (owner === this.o.self) return await this.driver.start(moves);
        try {
          return await this.o.startMovesOn(owner, moves);
        } catch (err) {
          return moves.map((m) => ({ ...m, started: false, error: `${owner} did not answer: ${(err as Error).message}` }));
        }
      }),
    );
    return { ...p, dryRun, moves: outcomes.flat() };
  }
}
