// How well a volume is protected (DESIGN.md 10), as `volume show`, `status`, `top`, the console
// and /metrics say it. Pure: the volume's routes, the copies asked and the peers' liveness in,
// one state and its counts out. Per page, with `wanted` = min(replicas asked, peers of the group):
//   unavailable — no in-sync copy on a live peer: nobody can serve the page;
//   healthy     — at least `wanted` in-sync copies on live peers;
//   rebuilding  — fewer, but enough copies on live peers: the stale ones are being filled (resync);
//   degraded    — fewer, and no copy on a live peer to fill (no room, no peer, not placed yet).
// The volume takes its worst page's state (unavailable, degraded, rebuilding, healthy); the
// counts of every state are given alongside. Progress and ETA of a rebuild come from how fast
// the rebuilding count falls, as this peer watched it (RebuildProgress).

import { formatBytes } from '../cluster/catalog';
import { copiesOf, inSyncOf, type Route, type RouteTable } from '../routing/table';
import type { ReadRepairResult } from './read-repair';

/** Running totals for /metrics: bytes sent to fill copies, by the resync (quick resync of returning copies) and for new copies; read repairs. */
export interface ReplicationCounters {
  resyncBytes: number;
  rebuildBytes: number;
  /** Reads this peer's store failed on a replicated page this peer is primary of, by how they ended (read-repair.ts). */
  readRepairs: Record<ReadRepairResult, number>;
}

export function newReplicationCounters(): ReplicationCounters {
  return { resyncBytes: 0, rebuildBytes: 0, readRepairs: { repaired: 0, unrepaired: 0, unserved: 0 } };
}

export type ProtectionState = 'healthy' | 'degraded' | 'rebuilding' | 'unavailable';

export interface Protection {
  state: ProtectionState;
  pages: number;
  /** Copies asked per page, as far as the group has peers. */
  wanted: number;
  degradedPages: number;
  rebuildingPages: number;
  unavailablePages: number;
  /** While rebuilding: share of the pages rebuilt since it began (0-100) and the time left (-1: not known yet). */
  progressPercent: number;
  etaSeconds: number;
  /** Bytes of copies that found no peer with room, as the copy keeper of the peer asked counted them (its pages only). */
  missingBytes: number;
}

export interface ProtectionInput {
  /** Each distinct route with the number of pages that have it. */
  routes: Iterable<readonly [Route, number]>;
  replicas: number;
  groupPeers: number;
  alive(peer: string): boolean;
}

/** One page's state (see the top). */
export function pageState(route: Route, wanted: number, alive: (peer: string) => boolean): ProtectionState {
  const inSyncLive = inSyncOf(route).filter(alive).length;
  if (inSyncLive === 0) return 'unavailable';
  if (inSyncLive >= wanted) return 'healthy';
  return copiesOf(route).filter(alive).length >= wanted ? 'rebuilding' : 'degraded';
}

/** The volume's protection from its routes (progress, ETA and missing bytes left unknown: see RebuildProgress, CopyKeeper). */
export function protectionOf(input: ProtectionInput): Protection {
  const wanted = Math.max(1, Math.min(input.replicas, input.groupPeers));
  const count: Record<ProtectionState, number> = { healthy: 0, degraded: 0, rebuilding: 0, unavailable: 0 };
  let pages = 0;
  for (const [r, n] of input.routes) {
    count[pageState(r, wanted, input.alive)] += n;
    pages += n;
  }
  const state: ProtectionState = count.unavailable > 0 ? 'unavailable' : count.degraded > 0 ? 'degraded' : count.rebuilding > 0 ? 'rebuilding' : 'healthy';
  return {
    state, pages, wanted, degradedPages: count.degraded, rebuildingPages: count.rebuilding, unavailablePages: count.unavailable,
    progressPercent: state === 'healthy' ? 100 : 0, etaSeconds: -1, missingBytes: 0,
  };
}

/** The routes of a volume's `pages` pages, each with how many pages have it (RouteTable.classes: no cost per page). */
export function weightedRoutes(table: RouteTable, pages: number): [Route, number][] {
  return table.classes(pages).map((c) => [c.route, c.pages]);
}

/** One line for people: `healthy`, `degraded (N pages with fewer copies than asked)`, … */
export function protectionText(p: Protection): string {
  const rebuilding = p.rebuildingPages > 0 ? `${p.rebuildingPages} pages rebuilding, ${p.progressPercent}% done${p.etaSeconds >= 0 ? `, ETA ${p.etaSeconds} s` : ''}` : '';
  const also = rebuilding ? `; ${rebuilding}` : '';
  if (p.state === 'unavailable') return `unavailable (${p.unavailablePages} pages with no live in-sync copy${also})`;
  const room = p.missingBytes > 0 ? `; ${formatBytes(p.missingBytes)} missing for lack of room` : '';
  if (p.state === 'degraded') return `degraded (${p.degradedPages} pages with fewer copies than asked${room}${also})`;
  if (p.state === 'rebuilding') return `rebuilding (${rebuilding})`;
  return 'healthy';
}

/**
 * Progress of each volume's rebuild as one peer sees it: a rebuild begins when some pages are
 * rebuilding and ends when none are; its size is the most pages seen rebuilding at once, its
 * rate the pages done over the time since it began. Time is passed in (monotonic ms).
 */
export class RebuildProgress {
  private readonly runs = new Map<string, { startMs: number; most: number }>();

  /** `p` with progressPercent and etaSeconds filled in for volume `key`. */
  observe(key: string, p: Protection, nowMs: number): Protection {
    const left = p.rebuildingPages;
    if (left === 0) {
      this.runs.delete(key);
      return p;
    }
    const run = this.runs.get(key) ?? { startMs: nowMs, most: 0 };
    run.most = Math.max(run.most, left);
    this.runs.set(key, run);
    const done = run.most - left;
    const elapsedMs = nowMs - run.startMs;
    const etaSeconds = done > 0 && elapsedMs > 0 ? Math.ceil((left * elapsedMs) / done / 1000) : -1;
    return { ...p, progressPercent: Math.floor((done * 100) / run.most), etaSeconds };
  }

  forget(key: string): void {
    this.runs.delete(key);
  }
}

/** How many volumes are in each state (status, top, the console). */
export type ProtectionSummary = Record<ProtectionState, number>;

export function summarize(states: readonly ProtectionState[]): ProtectionSummary {
  const s: ProtectionSummary = { healthy: 0, degraded: 0, rebuilding: 0, unavailable: 0 };
  for (const x of states) s[x]++;
  return s;
}

/** "3 healthy, 1 degraded": volumes per state, the empty states left out. */
export function summaryText(s: ProtectionSummary): string {
  const parts = (['healthy', 'rebuilding', 'degraded', 'unavailable'] as const).filter((k) => s[k] > 0).map((k) => `${s[k]} ${k}`);
  return parts.length > 0 ? parts.join(', ') : 'none';
}
