// Capacity spreads by itself (DESIGN.md 11): every peer holds page copies in proportion to its
// capacity (the member record's `capacity`, default 1), so a new empty peer fills on its own and
// a peer given more capacity takes more. Load balancing (src/loadmon) moves primaries by load;
// this moves copies by count.
//
// The figure: each peer's stored page copies, counted from the catalog's routes of every volume
// (a placed page by the placement rule's arithmetic, a changed one by its record), so every peer
// computes the same figure with no call. Its share: total copies × its capacity ÷ the capacities
// of the placeable (up) peers summed.
//
// Planned (planSpread, pure) as flows "n copies from X to Y", the same on every peer:
// - only when some up peer is off its share by more than the hysteresis, max(1, spreadHysteresis
//   × share): then a source is an up peer above its share, counted low (copies already leaving
//   it: page moves from it, in-sync copies of pages whose copy set is changing), a destination an
//   up peer below its share, counted high (copies arriving: stale copies being built, page moves
//   to it). Joining, draining and leaving peers are neither (a draining peer's copies leave by
//   the copy keeper's evacuation);
// - a flow never takes a source below its share nor a destination above it, so no peer is ever
//   both, and what one round moves no later round moves back (no ping-pong).
// Carried out by each page's primary only, for its own pages (the one peer that may change a
// page's copy set): a peer takes its portion of each flow (the flow split evenly over the up
// peers other than the destination, so together they never move more than the flow). For each of
// its pages with a copy on X and none on Y (no copy being built, not moving, Y in the volume's
// span, no zone lost): if X is a secondary, a hint to the copy keeper ("this copy leaves X for Y",
// rebuild.ts: a copy built on Y, X's removed once Y is in sync); if X is this primary itself, a
// page move of the primary to Y (src/migration), only for a page without host load (below
// spreadBusyPageLoad): a busy primary is the load balancer's. Counts and load are two figures; a
// spread that moved busy primaries to the peer the balancer had just emptied of them undid its
// moves, and the balancer moved others away again, round after round (test/balance.test.ts, nine
// hot pages of 27). Paced: spreadMovesPerRoundMax per round, a
// round only once this peer's earlier hints have their copies added and its page moves are
// fewer than spreadPageMovesInFlightMax (so the figure the next round counts includes them);
// the copying runs at the migration rate and duty, giving way to host I/O, and runs when hosts
// are idle too.

import type { Logger } from 'pino';
import type { Catalog, MoveIntent, VolumeRecord } from '../cluster/catalog';
import type { Env, TimerHandle } from '../env/env';
import { copyKeeperTickMs, spreadBusyPageLoad, spreadHysteresisShare, spreadMovesPerRoundMax, spreadPageMovesInFlightMax } from '../limits';
import { copiesOf, inSyncOf, staleCopiesOf, type Route, type RouteTable } from '../routing/table';
import { scanPages } from './rebuild';

/** A peer's copies as every peer counts them. */
export interface CopyCount {
  /** Copies the routes name it for (stale ones included). */
  copies: number;
  /** Of those, copies that may be leaving it (in-sync copies of pages whose copy set is changing, page moves from it). */
  leaving: number;
  /** Copies arriving by a page move (not in the routes until its commit). */
  arriving: number;
}

const zero = (): CopyCount => ({ copies: 0, leaving: 0, arriving: 0 });

/** A page whose copy set is changing: a copy being built, or one more copy than asked (one is about to leave). */
function changing(route: Route, replicas: number): boolean {
  return staleCopiesOf(route).length > 0 || copiesOf(route).length > replicas;
}

/**
 * Every peer's copies from the volumes' routes (see the top): a placed page's copies by the
 * placement rule's arithmetic, a changed page's by its record, then the page moves in flight.
 */
export function countCopies(volumes: readonly { volume: VolumeRecord; table: RouteTable }[], moves: readonly MoveIntent[] = []): Map<string, CopyCount> {
  const counts = new Map<string, CopyCount>();
  const at = (peer: string): CopyCount => {
    let c = counts.get(peer);
    if (!c) counts.set(peer, (c = zero()));
    return c;
  };
  for (const { volume, table } of volumes) {
    const pages = Math.ceil(volume.sizeBytes / volume.blockBytes / volume.pageBlocks);
    placedCounts(table.peers, table.copyCount, pages).forEach((n, i) => (at(table.peers[i]).copies += n));
    for (const [page, route] of table.changed()) {
      if (page >= pages) continue;
      for (const p of copiesOf(table.placed(page))) at(p).copies--;
      for (const p of copiesOf(route)) at(p).copies++;
      if (changing(route, volume.replicas ?? 1)) for (const p of inSyncOf(route)) at(p).leaving++;
    }
  }
  for (const m of moves) {
    at(m.from).leaving++;
    at(m.to).arriving++;
  }
  return counts;
}

/** Copies per peer of `pages` placed pages, `copies` each on consecutive peers of `peers` (routing/table.ts). */
function placedCounts(peers: readonly string[], copies: number, pages: number): number[] {
  const n = peers.length;
  const pagesAt = (r: number): number => (r < pages ? Math.floor((pages - r - 1) / n) + 1 : 0);
  return peers.map((_, j) => Array.from({ length: copies }, (_unused, k) => pagesAt((((j - k) % n) + n) % n)).reduce((a, b) => a + b, 0));
}

/** A peer as the planner sees it. */
export interface SpreadPeer {
  id: string;
  capacity: number;
  /** Up: may receive copies (and give some away). */
  placeable: boolean;
  count: CopyCount;
}

export interface SpreadFlow {
  from: string;
  to: string;
  copies: number;
}

export interface PeerFill {
  id: string;
  copies: number;
  capacity: number;
  /** Copies it should hold; 0 for a peer that may not receive any (joining, draining, leaving). */
  shareCopies: number;
  /** copies ÷ share (1: at its share); undefined when it has no share. */
  fill?: number;
}

export interface SpreadPlan {
  flows: SpreadFlow[];
  /** One line for humans: why these flows, or why none. */
  reason: string;
  fills: PeerFill[];
}

/** Each peer's fill relative to its share (status, top, the console; and the planner's input). */
export function fillsOf(peers: readonly SpreadPeer[]): PeerFill[] {
  const total = peers.reduce((a, p) => a + p.count.copies, 0);
  const capacity = peers.filter((p) => p.placeable).reduce((a, p) => a + p.capacity, 0);
  return peers.map((p) => {
    const shareCopies = p.placeable && capacity > 0 ? (total * p.capacity) / capacity : 0;
    return { id: p.id, copies: p.count.copies, capacity: p.capacity, shareCopies, ...(shareCopies > 0 ? { fill: p.count.copies / shareCopies } : {}) };
  });
}

/** The flows that bring every up peer to its share (see the top), in a deterministic order. */
export function planSpread(peers: readonly SpreadPeer[], hysteresisShare = spreadHysteresisShare): SpreadPlan {
  const fills = fillsOf(peers);
  const share = new Map(fills.map((f) => [f.id, f.shareCopies]));
  const up = peers.filter((p) => p.placeable);
  const low = (p: SpreadPeer): number => p.count.copies - p.count.leaving;
  const high = (p: SpreadPeer): number => p.count.copies + p.count.arriving;
  const standsOut = (p: SpreadPeer, copies: number): boolean => Math.abs(copies - share.get(p.id)!) > Math.max(1, hysteresisShare * share.get(p.id)!);
  const outliers = up.filter((p) => standsOut(p, low(p)) || standsOut(p, high(p))).map((p) => p.id);
  if (outliers.length === 0) return { flows: [], reason: 'every up peer within its share', fills };
  const over = new Map(up.map((p) => [p.id, Math.floor(low(p) - share.get(p.id)!)] as const).filter(([, n]) => n > 0));
  const under = new Map(up.map((p) => [p.id, Math.floor(share.get(p.id)! - high(p))] as const).filter(([, n]) => n > 0));
  const flows: SpreadFlow[] = [];
  const byMost = (m: Map<string, number>): string[] => [...m.keys()].sort((a, b) => m.get(b)! - m.get(a)! || a.localeCompare(b));
  for (const from of byMost(over)) {
    for (const to of byMost(under)) {
      const copies = Math.min(over.get(from)!, under.get(to)!);
      if (copies <= 0) continue;
      flows.push({ from, to, copies });
      over.set(from, over.get(from)! - copies);
      under.set(to, under.get(to)! - copies);
    }
  }
  const off = `${outliers.join(', ')} off ${outliers.length > 1 ? 'their shares' : 'its share'}`;
  const reason = flows.length > 0
    ? `${off}: ${flows.map((f) => `${f.copies} from ${f.from} to ${f.to}`).join(', ')}`
    : `${off}, but the copies on their way already make up for it`;
  return { flows, reason, fills };
}

/**
 * The part of `flow` that `self` carries out: the flow split evenly over `executors` (the up
 * peers but the destination, in one order every peer shares); the remainder goes to peers in a
 * rotation that moves as the flow shrinks and with `turn` (the round's number, the same on
 * every peer: the wall clock's tick), so no peer is left with it round after round, and a
 * remainder given to a peer that cannot carry it (it is primary of no page with a copy on the
 * source: a one-copy page's copy is its primary's to move) reaches one that can.
 */
export function portionOf(flow: SpreadFlow, self: string, executors: readonly string[], turn = 0): number {
  const others = executors.filter((p) => p !== flow.to);
  const i = others.indexOf(self);
  if (i < 0) return 0;
  const n = others.length;
  return Math.floor(flow.copies / n) + ((i + flow.copies + turn) % n < flow.copies % n ? 1 : 0);
}

/** Can the copy of `route` on `from` go to `to`? Not while its copy set changes; never a second copy on a peer; no zone lost. */
export function movable(route: Route, replicas: number, from: string, to: string, zoneOf: (peer: string) => string | undefined): boolean {
  const copies = copiesOf(route);
  if (changing(route, replicas) || !copies.includes(from) || copies.includes(to)) return false;
  const zone = (p: string): string => zoneOf(p) ?? `peer:${p}`;
  const zonesBefore = new Set(copies.map(zone)).size;
  const zonesAfter = new Set([...copies.filter((p) => p !== from), to].map(zone)).size;
  return zonesAfter >= zonesBefore;
}

export interface SpreadDriverOptions {
  self: string;
  env: Env;
  log: Logger;
  /** Routes, volumes, members (catalog.options.members) and each volume's span. */
  catalog: Catalog;
  zoneOf(peer: string): string | undefined;
  /** Automatic balancing on (cluster.yaml balancer.enabled and the group switch): the spread follows it. */
  enabled(): boolean;
  /** The copy keeper's hint (rebuild.ts CopyKeeper.relocate), and its hints whose copy is not added yet. */
  relocate(volumeId: string, page: number, from: string, to: string): boolean;
  relocationsPending(): number;
  /** A page move of this peer's primary copy to `to` (migrator); resolves once under way. */
  movePage(volume: VolumeRecord, page: number, to: string): Promise<void>;
  /** A move of the page away from this peer is running. */
  movingAway(volumeId: string, page: number): boolean;
  /**
   * Peers carrying more host load than the average (hotPeers): the spread sends them nothing, so
   * it never moves load onto a peer the load balancer moves load away from (found with
   * test/balance.test.ts: the two moved one-copy pages back and forth).
   */
  hot?(): ReadonlySet<string>;
  /** The load of a page this peer is primary of (the balancer's figure; 0 without host I/O). */
  pageLoad?(volumeId: string, page: number): number;
}

/**
 * The peers whose host load stands out above the mean by more than the load balancer's
 * threshold (src/loadmon/balancer.ts), when there is load worth balancing at all (pure).
 */
export function hotPeers(loads: readonly { id: string; load: number }[], threshold: number, minMeanLoad: number): Set<string> {
  const mean = loads.length ? loads.reduce((a, p) => a + p.load, 0) / loads.length : 0;
  if (mean < minMeanLoad) return new Set();
  return new Set(loads.filter((p) => p.load > mean * (1 + threshold)).map((p) => p.id));
}

/** The spread on one peer: a round every copyKeeperTickMs (see the top). */
export class SpreadDriver {
  private readonly o: SpreadDriverOptions;
  private interval: TimerHandle | undefined;
  private running = false;
  /** Page moves this driver started: `volumeId/page`. */
  private readonly moving = new Map<string, { volumeId: string; page: number }>();
  /** Where the next round's look at each volume resumes. */
  private readonly cursor = new Map<string, number>();
  /** Why the last round did or did not move anything (for `top`). */
  lastRound = 'no round yet';

  constructor(o: SpreadDriverOptions) {
    this.o = o;
  }

  start(): void {
    this.interval = this.o.env.timers.setInterval(() => void this.round(), copyKeeperTickMs);
    this.interval.unref();
  }

  stop(): void {
    this.o.env.timers.clearInterval(this.interval);
  }

  /** Every member's copies and share now, with the page moves in flight `moves` (the catalog's intents). */
  peers(moves: readonly MoveIntent[]): SpreadPeer[] {
    const { catalog } = this.o;
    const { members } = catalog.options;
    const counts = countCopies(catalog.listVolumes().map((volume) => ({ volume, table: catalog.routes(volume) })), moves);
    const placeable = new Set(members.placeable());
    return members.ids().map((id) => ({ id, capacity: members.get(id)?.capacity ?? 1, placeable: placeable.has(id), count: counts.get(id) ?? zero() }));
  }

  /** Every member's stored copies, capacity and fill relative to its share (status, top, the console). */
  fills(): PeerFill[] {
    return fillsOf(this.peers([]));
  }

  /** One round: plan, then start this peer's portion. Returns the number of copies it started moving. */
  async round(): Promise<number> {
    if (this.running) return 0;
    this.running = true;
    try {
      return await this.roundNow();
    } catch (err) {
      this.o.log.warn({ reason: (err as Error).message }, 'capacity spread round failed; the next one tries again');
      return 0;
    } finally {
      this.running = false;
    }
  }

  private async roundNow(): Promise<number> {
    for (const [key, m] of this.moving) if (!this.o.movingAway(m.volumeId, m.page)) this.moving.delete(key);
    if (!this.o.enabled()) return this.said('off (automatic balancing is off)');
    if (this.o.relocationsPending() > 0 || this.moving.size >= spreadPageMovesInFlightMax) return this.said('waiting for this peer\'s copies on their way');
    const planned = planSpread(this.peers((await this.o.catalog.moveIntents()).map((m) => m.intent)));
    const hot = this.o.hot?.() ?? new Set<string>();
    const plan = { ...planned, flows: planned.flows.filter((f) => !hot.has(f.to)) };
    const executors = this.o.catalog.options.members.placeable();
    const turn = Math.floor(this.o.env.clock.nowMs() / copyKeeperTickMs);
    const budget = new Map(plan.flows.map((f) => [`${f.from}>${f.to}`, Math.min(portionOf(f, this.o.self, executors, turn), spreadMovesPerRoundMax)]));
    let started = 0;
    for (const volume of this.o.catalog.listVolumes()) {
      if (started >= spreadMovesPerRoundMax || ![...budget.values()].some((n) => n > 0)) break;
      started += await this.spreadVolume(volume, plan.flows, budget, spreadMovesPerRoundMax - started);
    }
    return this.said(`${plan.reason}${plan.flows.length ? `; started ${started} here` : ''}`, started);
  }

  private said(why: string, started = 0): number {
    this.lastRound = why;
    return started;
  }

  /** This peer's pages of one volume (a window from its cursor) that can carry a flow: a hint or a page move each. */
  private spreadVolume(volume: VolumeRecord, flows: readonly SpreadFlow[], budget: Map<string, number>, startsMax: number): Promise<number> {
    if (volume.autoBalance === false) return Promise.resolve(0);
    const span = this.o.catalog.spanOf(volume);
    const table = this.o.catalog.routes(volume);
    const key = (f: SpreadFlow): string => `${f.from}>${f.to}`;
    return scanPages(this.cursor, volume, startsMax, async (page) => {
      const route = table.route(page);
      if (route.owner !== this.o.self || this.o.movingAway(volume.id, page)) return false;
      const flow = flows.find((f) => (budget.get(key(f)) ?? 0) > 0 && span.includes(f.to) && movable(route, volume.replicas ?? 1, f.from, f.to, this.o.zoneOf));
      if (!flow || !(await this.startOne(volume, page, route, flow))) return false;
      budget.set(key(flow), budget.get(key(flow))! - 1);
      return true;
    });
  }

  private async startOne(volume: VolumeRecord, page: number, route: Route, flow: SpreadFlow): Promise<boolean> {
    if (flow.from !== route.owner) return this.o.relocate(volume.id, page, flow.from, flow.to);
    if (this.moving.size >= spreadPageMovesInFlightMax) return false;
    // A busy primary is the load balancer's (see the top).
    if ((this.o.pageLoad?.(volume.id, page) ?? 0) >= spreadBusyPageLoad) return false;
    try {
      await this.o.movePage(volume, page, flow.to);
    } catch (err) {
      this.o.log.debug({ volume: volume.name, page, to: flow.to, reason: (err as Error).message }, 'capacity spread: page not moved');
      return false;
    }
    this.moving.set(`${volume.id}/${page}`, { volumeId: volume.id, page });
    this.o.log.info({ volume: volume.name, page, from: flow.from, to: flow.to }, 'capacity spread: page moving to an emptier peer');
    return true;
  }
}

/** The copies `peer` still holds, from the routes (a drain's progress: 0 when it is empty). */
export function copiesHeldBy(catalog: Catalog, peer: string): number {
  return countCopies(catalog.listVolumes().map((volume) => ({ volume, table: catalog.routes(volume) }))).get(peer)?.copies ?? 0;
}
