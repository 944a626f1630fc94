// Where a page's copies go and how its copy set changes (DESIGN.md 10), pure: routes, peers and
// figures in, peer choices and route changes out; the catalog's compare-and-swap applies them.
//
// Choosing a peer for a new copy, in this order of preference:
//   1. a live peer of the group that holds no copy of the page (never two copies on one peer);
//   2. in a zone no copy of the page is in, when peers declare `zone:` in cluster.yaml (a peer
//      without a zone is a zone of its own);
//   3. with room: free bytes minus what this choice already gave it stay above the reserve
//      (counted at the page's full size: thin pages may need less);
//   4. most free space, then least load, then the id (so every peer decides the same).
// Removing copies (fewer replicas asked): never the primary; stale copies first (they hold
// the least), then in-sync ones from the end of the copy list (the newest).

import { copiesOf, inSyncOf, type Route } from '../routing/table';

export interface PeerCandidate {
  id: string;
  /** cluster.yaml `zone:`; absent: a zone of its own. */
  zone?: string;
  /** Reachable now (the load view's gossip is fresh). */
  alive: boolean;
  freeBytes: number;
  /** The balancer's load figure (iops + bytes/s ÷ 64 KiB). */
  load: number;
}

/** Bytes already promised to each peer by choices made in the same run. */
export type Promised = Map<string, number>;

export interface ChoiceInput {
  route: Route;
  /** New copies wanted. */
  count: number;
  candidates: readonly PeerCandidate[];
  /** Peers that may not take a copy (lost ones whose copy is being replaced). */
  excluded?: readonly string[];
  /** Bytes a new copy may need (a full page). */
  pageBytes: number;
  /** Free bytes a peer keeps after taking a copy. */
  reserveFreeBytes: number;
  promised: Promised;
}

export interface Choice {
  peers: string[];
  /** New copies that found no peer: for lack of room (bytes) or of a peer at all. */
  missing: number;
  /** Of `missing`, the copies a peer would have taken but for room: what is missing is missingBytes. */
  missingBytes: number;
}

const zoneOf = (p: PeerCandidate): string => p.zone ?? `peer:${p.id}`;

/** Up to `count` peers for new copies of the page (see the order at the top); records the bytes promised. */
export function chooseCopyPeers(input: ChoiceInput): Choice {
  const byId = new Map(input.candidates.map((p) => [p.id, p]));
  const holders = copiesOf(input.route);
  const zones = new Set(holders.map((id) => (byId.get(id) ? zoneOf(byId.get(id)!) : `peer:${id}`)));
  const free = (p: PeerCandidate): number => p.freeBytes - (input.promised.get(p.id) ?? 0);
  const better = (a: PeerCandidate, b: PeerCandidate): number =>
    Number(zones.has(zoneOf(a))) - Number(zones.has(zoneOf(b))) || free(b) - free(a) || a.load - b.load || a.id.localeCompare(b.id);
  let pool = input.candidates.filter((p) => p.alive && !holders.includes(p.id) && !(input.excluded ?? []).includes(p.id));
  const peers: string[] = [];
  while (peers.length < input.count) {
    const roomy = pool.filter((p) => free(p) - input.pageBytes >= input.reserveFreeBytes);
    if (roomy.length === 0) break;
    const best = roomy.reduce((x, y) => (better(y, x) < 0 ? y : x));
    peers.push(best.id);
    zones.add(zoneOf(best));
    input.promised.set(best.id, (input.promised.get(best.id) ?? 0) + input.pageBytes);
    pool = pool.filter((p) => p.id !== best.id);
  }
  const missing = input.count - peers.length;
  // A copy that found no peer while some live peer without a copy is left lacks room, not a peer.
  return { peers, missing, missingBytes: Math.min(missing, pool.length) * input.pageBytes };
}

/**
 * The copies to remove to bring the page down to `count` copies (see the order at the top).
 * Copies on `uncounted` peers (leaving: src/replication/rebuild.ts) neither count nor are chosen here.
 */
export function copiesToRemove(route: Route, count: number, uncounted: ReadonlySet<string> = noPeers): string[] {
  const copies = copiesOf(route).filter((p) => !uncounted.has(p));
  const extra = copies.length - Math.max(1, count);
  if (extra <= 0) return [];
  const inSync = inSyncOf(route);
  const stale = copies.filter((p) => !inSync.includes(p));
  const syncedNewestFirst = copies.filter((p) => p !== route.owner && inSync.includes(p)).reverse();
  return [...stale, ...syncedNewestFirst].slice(0, extra);
}

export const noPeers: ReadonlySet<string> = new Set();

/** The route with `added` as new stale copies (at the end) and `removed` gone from copies and the in-sync set. */
export function changedCopies(now: Route, added: readonly string[], removed: readonly string[]): Omit<Route, 'version'> {
  if (removed.includes(now.owner)) throw new Error(`assertion failed: the primary ${now.owner} is never removed from its own page`);
  const copies = [...copiesOf(now).filter((p) => !removed.includes(p)), ...added.filter((p) => !copiesOf(now).includes(p))];
  const inSync = inSyncOf(now).filter((p) => !removed.includes(p));
  return { owner: now.owner, copies, inSync };
}

/**
 * The route with `to` (an in-sync copy) as primary: first in copies and in the in-sync set, the
 * others in their order; the old primary stays in sync only if `keepOld` (no change in flight).
 */
export function switchedPrimary(now: Route, to: string, keepOld: boolean): Omit<Route, 'version'> {
  if (!inSyncOf(now).includes(to) || to === now.owner) throw new Error(`assertion failed: ${to} is not an in-sync secondary of the page`);
  const first = (peers: readonly string[]): string[] => [to, ...peers.filter((p) => p !== to)];
  const inSync = first(inSyncOf(now)).filter((p) => keepOld || p !== now.owner);
  return { owner: to, copies: first(copiesOf(now)), inSync };
}

/** What `to` holds of the page at `route`: the primary role, an in-sync copy, a stale copy or nothing. */
export function roleOf(route: Route, peer: string): 'primary' | 'in-sync' | 'stale' | 'none' {
  if (route.owner === peer) return 'primary';
  if (inSyncOf(route).includes(peer)) return 'in-sync';
  return copiesOf(route).includes(peer) ? 'stale' : 'none';
}

/**
 * The group's peers in an order in which every `copies` consecutive peers (the placement rule,
 * routing/table.ts, puts page i's copies on peers i … i + copies − 1 of a volume's list) span
 * distinct zones as far as the zones allow: each next peer is taken from the zone with the most
 * peers left among the zones not in the window before it (ties: the zones' first-seen order).
 */
export function zoneSpread(peers: readonly string[], zone: (id: string) => string | undefined, copies: number): string[] {
  const groups = new Map<string, string[]>();
  for (const id of peers) {
    const z = zone(id) ?? `peer:${id}`;
    groups.set(z, [...(groups.get(z) ?? []), id]);
  }
  const out: string[] = [];
  const recent: string[] = [];
  while (out.length < peers.length) {
    const open = [...groups.entries()].filter(([, q]) => q.length > 0);
    const fresh = open.filter(([z]) => !recent.includes(z));
    const [z, q] = (fresh.length > 0 ? fresh : open).reduce((a, b) => (b[1].length > a[1].length ? b : a));
    out.push(q.shift()!);
    recent.push(z);
    if (recent.length >= copies) recent.shift();
  }
  return out;
}
