// The balancer's policy (DESIGN.md 5), pure: peer loads and page loads in, page moves out.
//
// Cost of a placement = wVar · variance(peer load) / mean² + wForward · forwarded / total
//                       + wChange · moves.
// The variance is taken relative to the squared mean (the squared coefficient of variation),
// so one pair of weights means the same at 50 IOPS and at 50 000: wChange = 0.01 reads "a
// move must lower the relative variance by at least 0.01 to be worth it".
// `forwarded` (pages follow their hosts, the traffic matrix): the load of the pages that arrives
// through a peer other than the page's primary (each page's load times the share of its
// arrivals that came in elsewhere), relative to the group's total load. Moving a page to the
// peer most of its I/O arrives through (or, with replicas, switching the primary role to that
// peer's in-sync copy) lowers it; moving a page away from its hosts raises it. A page without
// known arrivals counts nothing.
//
// Greedy: repeatedly apply the single move that lowers the cost most; stop when none does or
// at maxMovesPerRound. Guards against ping-pong:
// - hysteresis: plan only when some peer stands out (busiest above mean·(1+threshold) or
//   idlest below mean·(1−threshold)), and only when the mean load is worth balancing;
// - a page moved (or attempted) within cooldownMs is never moved;
// - a move may not make its destination stand out (destination after ≤ mean·(1+threshold)),
//   so the result never triggers a balancing round from the other side;
// - a move must strictly lower the cost, so shifting a hot spot from one peer to another
//   (same variance) is never chosen;
// - settling: within balancerSettleMs of a change (PlanInput.settling: the group's last move, or
//   the load rising from below minMeanLoad), no peer is taken to stand out. The load figures are
//   10 s averages taken a second apart by different peers; while they ramp up, or right after
//   moves (which change the hosts' speed too: a page that followed its host is served without the
//   hop), one peer's fresh figure against another's older one looked like a hot spot, and a page
//   its host wrote through that peer was sent away (then kept away for the cool-down).
// Follow moves (forwarded traffic) are planned even when no peer stands out (three equal hosts
// each writing through its own peer), then nothing else moves. Against ping-pong between two
// hosts on different peers sharing a page: a move gains from the forward term only towards a
// peer holding a clear majority of the page's arrivals (followShareMin); once there, any other
// peer holds at most 1 − followShareMin, so the page moves again only after its traffic really
// changed (and not within the cool-down anyway). The destination guard above holds for them too.
// Capacity: a destination must keep reserveFreeBytes free after receiving the page (counted
// at the page's full size: thin pages may need less). Membership: a peer that is not up
// (joining, draining, leaving) is never a destination, not even of a role switch, so the
// balancer never hands back what the copy keeper moves off a draining peer (DESIGN.md 11).
// Copies (replicated volumes): a peer holding an in-sync copy of the page takes the primary role
// with no data copied (a role switch, cheaper: roleSwitchCostShare of wChange, and no room
// needed); a peer holding a stale copy is never a destination, so no peer ever holds two copies.

import { balancerMovesPerRoundMax, balancerSettleMs } from '../limits';

export interface BalancerConfig {
  /** Automatic balancing on this peer (cluster.yaml); the group switch and per-volume flags live in the catalog. */
  enabled: boolean;
  /** Fraction of the mean load a peer must stand out by before anything moves. */
  threshold: number;
  wVar: number;
  /** Weight of the forwarded share of the load (arrivals at a peer other than the page's primary ÷ total load). */
  wForward: number;
  wChange: number;
  maxMovesPerRound: number;
  /** A page moved within this time is not moved again. */
  cooldownMs: number;
  /** How often each peer runs a balancing round. */
  intervalMs: number;
  /** Below this mean load (iops + bytes/s ÷ 64 KiB) there is nothing worth balancing. */
  minMeanLoad: number;
  /** Free bytes a destination keeps after receiving a page. */
  reserveFreeBytes: number;
}

export const balancerDefaults: Readonly<BalancerConfig> = {
  enabled: true,
  threshold: 0.25,
  wVar: 1,
  wForward: 1,
  wChange: 0.01,
  maxMovesPerRound: 4,
  cooldownMs: 120_000,
  intervalMs: 5_000,
  minMeanLoad: 20,
  reserveFreeBytes: 512 * 1024 * 1024,
};

export interface PlanPeer {
  id: string;
  load: number;
  freeBytes: number;
  /** May receive pages (a member `up`); false: joining, draining or leaving, a source only (absent: true). */
  placeable?: boolean;
}

export interface PlanPage {
  volumeId: string;
  volumeName: string;
  page: number;
  owner: string;
  load: number;
  /** Bytes the destination may need for it (a full page). */
  bytesMax: number;
  /** When it last moved (or a move was attempted), on the planner's clock. */
  lastMovedAtMs?: number;
  /** Automatic balancing is off for its volume: it counts, it does not move. */
  pinned?: boolean;
  /** Peers holding a copy of the page (src/replication), the owner aside: in sync (the primary role can switch to them, no data copied) or stale (never a destination). */
  holders?: PageHolders;
  /** The page's load by receiving peer (the traffic matrix; the owner's own arrivals included). Absent: unknown, no forward term. */
  arrivals?: readonly PageArrivals[];
}

export interface PageArrivals {
  peer: string;
  load: number;
}

/** A page follows its hosts only to a peer that receives at least this share of its I/O. */
export const followShareMin = 0.6;

export interface PageHolders {
  inSync: readonly string[];
  stale: readonly string[];
}

/** A role switch copies no data: it costs this share of a move's wChange, so the balancer prefers it. */
export const roleSwitchCostShare = 0.25;

export interface PlanInput {
  nowMs: number;
  /** The last change the loads are still settling from (balancerSettleMs); absent: none known, or a manual round (which does not wait). */
  settling?: Settling;
  /** The peers that can take part (fresh in the view). Every page's owner should be one of them. */
  peers: PlanPeer[];
  /** Page loads; each is part of its owner's load. */
  pages: PlanPage[];
}

export interface Settling {
  /** How long ago. */
  agoMs: number;
  /** What changed, for the reason line: "a move", "the load began". */
  after: string;
}

export interface PlannedMove {
  volumeId: string;
  volumeName: string;
  page: number;
  from: string;
  to: string;
  load: number;
}

export interface PeerLoadFigure {
  id: string;
  before: number;
  after: number;
}

export interface Plan {
  /** Some peer stands out beyond the threshold, or some page's I/O arrives mostly through another peer than its primary. */
  triggered: boolean;
  /** One line for humans: why these moves, or why none. */
  reason: string;
  moves: PlannedMove[];
  meanLoad: number;
  varianceBefore: number;
  varianceAfter: number;
  costBefore: number;
  costAfter: number;
  loads: PeerLoadFigure[];
}

export function variance(loads: readonly number[]): number {
  if (loads.length === 0) return 0;
  const mean = loads.reduce((a, b) => a + b, 0) / loads.length;
  return loads.reduce((a, b) => a + (b - mean) * (b - mean), 0) / loads.length;
}

/**
 * wVar · variance / mean² + wForward · forwarded / total + wChange · moves (0 variance and
 * forward terms when there is no load). `forwarded`: load arriving elsewhere than at the pages' primaries.
 */
export function cost(loads: readonly number[], moves: number, c: Pick<BalancerConfig, 'wVar' | 'wChange'> & Partial<Pick<BalancerConfig, 'wForward'>>, forwarded = 0): number {
  const total = loads.reduce((a, b) => a + b, 0);
  const mean = loads.length ? total / loads.length : 0;
  const relative = mean > 0 ? variance(loads) / (mean * mean) : 0;
  return c.wVar * relative + (total > 0 ? ((c.wForward ?? 0) * forwarded) / total : 0) + c.wChange * moves;
}

/** The share of the page's arrivals that came in through `peer` (0 when unknown). */
export function arrivalShare(page: PlanPage, peer: string): number {
  let total = 0;
  let at = 0;
  for (const a of page.arrivals ?? []) {
    total += a.load;
    if (a.peer === peer) at += a.load;
  }
  return total > 0 ? at / total : 0;
}

/** The page's load that arrives through peers other than `owner`. */
function forwardedLoad(page: PlanPage, owner: string): number {
  return page.arrivals?.length ? page.load * (1 - arrivalShare(page, owner)) : 0;
}

/**
 * How much moving the page from its owner to `to` changes the forwarded load: a gain only
 * towards a peer with a clear majority of its arrivals (no ping-pong of shared pages), a loss
 * whenever `to` receives less of it than the owner.
 */
export function forwardedChange(page: PlanPage, to: string): number {
  const from = arrivalShare(page, page.owner);
  const at = arrivalShare(page, to);
  if (at >= followShareMin || at < from) return page.load * (from - at);
  return 0;
}

/** The peer the page should follow to: a placeable peer other than its owner with a clear majority of its arrivals. */
function followTarget(page: PlanPage, destinations: ReadonlySet<string>): string | undefined {
  for (const a of page.arrivals ?? []) {
    if (a.peer !== page.owner && destinations.has(a.peer) && arrivalShare(page, a.peer) >= followShareMin) return a.peer;
  }
  return undefined;
}

export function inCooldown(page: PlanPage, nowMs: number, cooldownMs: number): boolean {
  return page.lastMovedAtMs !== undefined && nowMs - page.lastMovedAtMs < cooldownMs;
}

const pct = (x: number): string => `${Math.round(x * 100)}%`;

export function plan(input: PlanInput, config: BalancerConfig): Plan {
  const ids = input.peers.map((p) => p.id);
  const loads = new Map(input.peers.map((p) => [p.id, p.load]));
  const destinations = new Set(input.peers.filter((p) => p.placeable !== false).map((p) => p.id));
  const n = ids.length;
  const before = ids.map((id) => loads.get(id)!);
  const mean = n ? before.reduce((a, b) => a + b, 0) / n : 0;
  const forwardedBefore = input.pages.reduce((a, p) => a + forwardedLoad(p, p.owner), 0);
  const result = (triggered: boolean, reason: string, moves: WeighedMove[]): Plan => {
    const after = ids.map((id) => loads.get(id)!);
    const forwardedAfter = forwardedBefore + moves.reduce((a, m) => a + m.forwardedChange, 0);
    return {
      triggered, reason, moves: moves.map(({ forwardedChange: _, ...m }) => m), meanLoad: mean, varianceBefore: variance(before), varianceAfter: variance(after),
      costBefore: cost(before, 0, config, forwardedBefore), costAfter: cost(after, moves.length, config, forwardedAfter),
      loads: ids.map((id, i) => ({ id, before: before[i], after: after[i] })),
    };
  };
  if (n < 2) return result(false, 'fewer than two peers to balance between', []);
  if (mean < config.minMeanLoad) return result(false, `mean load ${mean.toFixed(1)} is below ${config.minMeanLoad}: nothing worth balancing`, []);
  const busiest = ids.reduce((a, b) => (loads.get(b)! > loads.get(a)! ? b : a));
  const idlest = ids.reduce((a, b) => (loads.get(b)! < loads.get(a)! ? b : a));
  const high = loads.get(busiest)! / mean - 1;
  const low = 1 - loads.get(idlest)! / mean;
  const outstanding = high > config.threshold || low > config.threshold;
  const settling = input.settling !== undefined && input.settling.agoMs < balancerSettleMs;
  const standsOut = outstanding && !settling;
  const candidates = input.pages
    .filter((p) => !p.pinned && p.load > 0 && loads.has(p.owner) && !inCooldown(p, input.nowMs, config.cooldownMs))
    .sort((a, b) => b.load - a.load || a.volumeId.localeCompare(b.volumeId) || a.page - b.page);
  // Loads even: only pages whose I/O arrives mostly through another peer may move, and only there.
  const followers = config.wForward > 0 ? candidates.filter((p) => followTarget(p, destinations) !== undefined) : [];
  const forwarded = `forwarded ${pct(mean > 0 ? forwardedBefore / (n * mean) : 0)} of the load`;
  const figures = `busiest ${busiest} is ${pct(high)} above the mean, idlest ${idlest} ${pct(low)} below (threshold ${pct(config.threshold)})`;
  const settlingNote = outstanding && settling ? `; loads settling after ${input.settling!.after} ${(input.settling!.agoMs / 1000).toFixed(0)} s ago, so only pages following their hosts move` : '';
  if (!standsOut && followers.length === 0) {
    return result(false, `${outstanding ? figures : `balanced: ${figures}`}, ${forwarded}${settlingNote}`, []);
  }
  const moves = greedy(input, config, standsOut ? candidates : followers, loads, destinations, !standsOut);
  const why = standsOut ? (high > config.threshold ? `busiest ${busiest} is ${pct(high)} above the mean` : `idlest ${idlest} is ${pct(low)} below the mean`) : `${forwarded}, pages follow their hosts${settlingNote}`;
  if (moves.length === 0) return result(true, `${why}, but no allowed move lowers the cost (pages cooling down, too hot to move, or no room)`, []);
  return result(true, `${why} (threshold ${pct(config.threshold)}): ${moves.length} move(s)`, moves);
}

/** A planned move and the change of forwarded load it brings (for the plan's cost figures). */
type WeighedMove = PlannedMove & { forwardedChange: number };

/**
 * Repeatedly apply the single allowed move that lowers the cost most (updating `loads`), until
 * none does or the round's bound. `followOnly`: each page may only go to the peer it follows.
 */
function greedy(input: PlanInput, config: BalancerConfig, candidates: PlanPage[], loads: Map<string, number>, destinations: ReadonlySet<string>, followOnly: boolean): WeighedMove[] {
  const ids = input.peers.map((p) => p.id);
  const free = new Map(input.peers.map((p) => [p.id, p.freeBytes]));
  const n = ids.length;
  const mean = ids.reduce((a, id) => a + loads.get(id)!, 0) / n;
  const ceiling = mean * (1 + config.threshold);
  const moved = new Set<PlanPage>();
  const moves: WeighedMove[] = [];
  const movesMax = Math.min(config.maxMovesPerRound, balancerMovesPerRoundMax);
  while (moves.length < movesMax) {
    let best: { page: PlanPage; to: string; delta: number; forwarded: number } | undefined;
    for (const page of candidates) {
      if (moved.has(page)) continue;
      const x = page.load;
      const la = loads.get(page.owner)!;
      const only = followOnly ? followTarget(page, destinations) : undefined;
      for (const to of ids) {
        if (to === page.owner || page.holders?.stale.includes(to) || !destinations.has(to) || (followOnly && to !== only)) continue;
        const lb = loads.get(to)!;
        if (lb + x > ceiling) continue;
        const switchRole = page.holders?.inSync.includes(to) === true;
        if (!switchRole && free.get(to)! - page.bytesMax < config.reserveFreeBytes) continue;
        const forwarded = forwardedChange(page, to);
        // Moving x from a to b changes Σ(L − mean)² by 2x(x + Lb − La); the mean stays.
        const delta = (config.wVar * 2 * x * (x + lb - la)) / (n * mean * mean) + (config.wForward * forwarded) / (n * mean) + config.wChange * (switchRole ? roleSwitchCostShare : 1);
        if (delta < 0 && (!best || delta < best.delta)) best = { page, to, delta, forwarded };
      }
    }
    if (!best) break;
    const { page, to } = best;
    loads.set(page.owner, loads.get(page.owner)! - page.load);
    loads.set(to, loads.get(to)! + page.load);
    if (!page.holders?.inSync.includes(to)) free.set(to, free.get(to)! - page.bytesMax);
    moved.add(page);
    moves.push({ volumeId: page.volumeId, volumeName: page.volumeName, page: page.page, from: page.owner, to, load: page.load, forwardedChange: best.forwarded });
  }
  return moves;
}
