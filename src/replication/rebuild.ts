// Keeping every page at the number of copies its volume asks for (DESIGN.md 10): the replicas
// raised or lowered by `peersan volume set --replicas`, a volume made while fewer peers were up,
// and the rebuild of the copies of a lost peer (the seeds' spare).
//
// Who decides: the primary of each page, for its pages only, so exactly one peer changes a
// page's copy set, always by compare-and-swap (Catalog.casRoute) from the route it looked at;
// a conflict means the route moved on, and the next run looks again.
//
// Lost: a peer whose load gossip (src/loadmon, each peer to every other each second) has not
// been heard for `downOutMs` (cluster.downOutMs, default 10 min; a peer never heard counts from
// this peer's start). Gossip is the group's liveness signal already kept by every peer with
// no extra calls; a lease (leases.ts) says more precisely whether a primary may serve, but only
// for peers sharing pages right now, and a down-out interval of minutes needs no precision.
//
// Per page (decideCopies, pure):
//   1. copies on lost peers are removed (from copies and from the in-sync set);
//   2. beyond the copies wanted, non-primary copies are removed, stale ones first;
//   3. below, new STALE copies are added on peers placement.ts chooses; resync (resync.ts)
//      fills them and CASes them into the in-sync set. A copy that finds no room is reported as
//      missing bytes and the page stays degraded: nothing is half-added.
// All three in one CAS per page, decided on the catalog's record of the page. Paced: the keeper adds copies to at most
// copyBuildPagesInFlightMax pages whose new copies are not in sync yet, and makes at most
// copyChangesPerRunMax changes per run; the filling itself runs at the migration rate (resync).
//
// A new copy gets the page's snapshot layers too, once in sync (src/snapshot/layer-sync.ts), so
// a snapshot outlives the copies that held the page at its cut.
//
// When: every copyKeeperTickMs, and soon after a volume change or a route change of a page this
// peer is primary of (a copy came in sync: room for the next one).

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import type { Env, TimerHandle } from '../env/env';
import { ConflictError } from '../errors';
import { copyBuildPagesInFlightMax, copyChangesPerRunMax, copyKeeperKickDelayMs, copyKeeperScanPagesMax, copyKeeperTickMs } from '../limits';
import { copiesOf, staleCopiesOf, type Route } from '../routing/table';
import { changedCopies, chooseCopyPeers, copiesToRemove, type Choice, type PeerCandidate, type Promised } from './placement';
import { followRoutes } from './route-watch';

/** What one page needs: copies to add and to remove (one CAS), and copies that found no peer. */
export interface CopyDecision {
  add: string[];
  remove: string[];
  why: 'rebuild' | 'raise' | 'lower' | 'none';
  missing: number;
  missingBytes: number;
}

/**
 * The change a page at `route` needs to hold `wanted` copies (see the top). `choose(count,
 * excluded)` picks peers for new copies; `mayAdd` is false when the pacing budget is spent.
 */
export function decideCopies(route: Route, wanted: number, lost: ReadonlySet<string>, mayAdd: boolean, choose: (count: number, excluded: readonly string[]) => Choice): CopyDecision {
  const lostCopies = copiesOf(route).filter((p) => p !== route.owner && lost.has(p));
  const kept = changedCopies(route, [], lostCopies);
  const extra = copiesToRemove({ ...kept, version: route.version }, wanted);
  const remove = [...lostCopies, ...extra];
  const need = wanted - copiesOf({ ...kept, version: route.version }).length;
  const chosen = need > 0 && mayAdd ? choose(need, [...lost]) : { peers: [], missing: 0, missingBytes: 0 };
  const why = lostCopies.length > 0 ? 'rebuild' : chosen.peers.length > 0 ? 'raise' : extra.length > 0 ? 'lower' : 'none';
  return { add: chosen.peers, remove, why, missing: chosen.missing, missingBytes: chosen.missingBytes };
}

/** Peers unreachable for `downOutMs`: a peer's silence is its gossip's age, or this peer's uptime if never heard. */
export function lostPeers(peers: readonly { id: string; ageMs: number }[], self: string, upMs: number, downOutMs: number): Set<string> {
  return new Set(peers.filter((p) => p.id !== self && (p.ageMs < 0 ? upMs : p.ageMs) >= downOutMs).map((p) => p.id));
}

/** A peer as the load view shows it (src/loadmon/view.ts PeerLoadView). */
export interface ViewedPeer {
  id: string;
  stale: boolean;
  ageMs: number;
  freeBytes: number;
  load: number;
}

/** Copies a volume lacks for want of a peer with room, as this peer's last full look found them. */
export interface Shortage {
  pages: number;
  bytes: number;
}

export interface CopyKeeperOptions {
  self: string;
  env: Env;
  log: Logger;
  catalog: Catalog;
  /** cluster.yaml: how long a peer may be unreachable before its copies are rebuilt elsewhere. */
  downOutMs: number;
  /** cluster.yaml `zone:` of a peer. */
  zoneOf(peer: string): string | undefined;
  /** Free bytes a peer keeps after taking a copy (the balancer's reserve). */
  reserveFreeBytes: number;
  /** Every peer as the load view sees it now. */
  peers(): readonly ViewedPeer[];
  /** This peer is moving the page away (its copy set is the move's to change). */
  movingAway(volumeId: string, page: number): boolean;
  /** Something a person watching the group wants to know (the console's events). */
  event(message: string, volume: string): void;
}

export class CopyKeeper {
  private readonly o: CopyKeeperOptions;
  private readonly startedMs: number;
  /** Where the next run resumes in each volume (copyKeeperScanPagesMax pages per run). */
  private readonly cursor = new Map<string, number>();
  /** Pages this keeper gave new copies that are not in sync yet: `volumeId/page` → the peers. */
  private readonly building = new Map<string, { volumeId: string; page: number; peers: string[] }>();
  private readonly shortages = new Map<string, Shortage>();
  /** Shortage being summed over the current pass through a volume. */
  private readonly counting = new Map<string, Shortage>();
  private interval: TimerHandle | undefined;
  private scheduled = false;
  private running = false;
  private again = false;
  private closed = false;
  private unfollow: (() => void) | undefined;

  constructor(o: CopyKeeperOptions) {
    this.o = o;
    this.startedMs = o.env.clock.monotonicMs();
  }

  start(): void {
    this.interval = this.o.env.timers.setInterval(() => this.kick(), copyKeeperTickMs);
    this.interval.unref();
    this.unfollow = followRoutes(this.o.catalog, (volume, page, route) => {
      if (route.owner === this.o.self || this.building.has(`${volume.id}/${page}`)) this.kick();
    }, () => this.kick());
  }

  stop(): void {
    this.closed = true;
    this.o.env.timers.clearInterval(this.interval);
    this.unfollow?.();
  }

  /** The copies the volume lacks for want of room, from this peer's pages (undefined: none). */
  shortage(volumeId: string): Shortage | undefined {
    return this.shortages.get(volumeId);
  }

  /** Look again soon (route or volume changed). */
  kick(): void {
    if (this.closed) return;
    if (this.running) {
      this.again = true;
      return;
    }
    if (this.scheduled) return;
    this.scheduled = true;
    this.o.env.timers.setTimeout(() => {
      this.scheduled = false;
      void this.run();
    }, copyKeeperKickDelayMs).unref();
  }

  /** One pass over (a window of) every volume's pages this peer is primary of. */
  async run(): Promise<void> {
    if (this.running || this.closed) return;
    this.running = true;
    try {
      const peers = this.o.peers();
      const lost = lostPeers(peers, this.o.self, this.o.env.clock.monotonicMs() - this.startedMs, this.o.downOutMs);
      this.forgetBuilt();
      let changes = 0;
      for (const volume of this.o.catalog.listVolumes()) {
        if (changes >= copyChangesPerRunMax || this.closed) break;
        changes += await this.keepVolume(volume, peers, lost, copyChangesPerRunMax - changes);
      }
      if (changes >= copyChangesPerRunMax) this.again = true;
    } catch (err) {
      this.o.log.warn({ reason: (err as Error).message }, 'copy keeper run failed; the next one tries again');
    } finally {
      this.running = false;
      if (this.again) {
        this.again = false;
        this.kick();
      }
    }
  }

  /** Pages whose new copies came in sync (or went) leave the pacing budget. */
  private forgetBuilt(): void {
    for (const [key, b] of this.building) {
      const volume = this.o.catalog.volumeById(b.volumeId);
      const route = volume && this.o.catalog.routes(volume).route(b.page);
      if (!route || route.owner !== this.o.self || !b.peers.some((p) => staleCopiesOf(route).includes(p))) this.building.delete(key);
    }
  }

  private async keepVolume(volume: VolumeRecord, peers: readonly ViewedPeer[], lost: ReadonlySet<string>, changesMax: number): Promise<number> {
    const { self, catalog } = this.o;
    // New copies go to the peers the volume spans now (placeable members); the copies wanted do
    // not drop while a peer is leaving or draining (the span shrinks, the volume's needs do not).
    const span = catalog.spanOf(volume);
    const wanted = Math.min(volume.replicas ?? 1, Math.max(volume.peers.length, span.length));
    const candidates: PeerCandidate[] = peers
      .filter((p) => span.includes(p.id))
      .map((p) => ({ id: p.id, zone: this.o.zoneOf(p.id), alive: (p.id === self || !p.stale) && !lost.has(p.id), freeBytes: p.freeBytes, load: p.load }));
    const pageBytes = volume.pageBlocks * volume.blockBytes;
    const promised = new Map<string, number>();
    const table = catalog.routes(volume);
    const pages = Math.ceil(volume.sizeBytes / volume.blockBytes / volume.pageBlocks);
    const first = (this.cursor.get(volume.id) ?? 0) % pages;
    const scan = Math.min(pages, copyKeeperScanPagesMax);
    let changes = 0;
    let k = 0;
    for (; k < scan && changes < changesMax; k++) {
      const page = (first + k) % pages;
      if (page === 0) this.endPass(volume);
      const route = table.route(page);
      if (route.owner !== self || this.o.movingAway(volume.id, page)) continue;
      // Decided on the table's route to skip pages with nothing to do, then again on the
      // catalog's record inside the CAS (the table may lack the copies: a route heard in MOVED).
      const decide = (r: Route, promising: Promised): CopyDecision => decideCopies(r, wanted, lost, this.building.size < copyBuildPagesInFlightMax, (count, excluded) =>
        chooseCopyPeers({ route: r, count, candidates, excluded, pageBytes, reserveFreeBytes: this.o.reserveFreeBytes, promised: promising }));
      const d = decide(route, new Map(promised));
      this.countShortage(volume.id, d);
      if (d.add.length === 0 && d.remove.length === 0) continue;
      changes++;
      await this.apply(volume, page, route, (now) => decide(now, promised));
    }
    this.cursor.set(volume.id, (first + k) % pages);
    return changes;
  }

  /** One CAS deciding on the catalog's record; nothing when the route changed meanwhile or needs nothing after all (the next run looks again). */
  private async apply(volume: VolumeRecord, page: number, route: Route, decide: (now: Route) => CopyDecision): Promise<void> {
    let made: CopyDecision | undefined;
    try {
      await this.o.catalog.casRoute(volume, page, route, (now) => {
        const d = decide(now);
        if (d.add.length === 0 && d.remove.length === 0) throw new ConflictError(`page ${page} of ${volume.name} needs no copy change after all`);
        made = d;
        return changedCopies(now, d.add, d.remove);
      });
    } catch (err) {
      if (err instanceof ConflictError) return;
      throw err;
    }
    if (made) this.changed(volume, page, made);
  }

  private changed(volume: VolumeRecord, page: number, d: CopyDecision): void {
    if (d.add.length > 0) this.building.set(`${volume.id}/${page}`, { volumeId: volume.id, page, peers: d.add });
    this.o.log.info({ volume: volume.name, page, why: d.why, add: d.add, remove: d.remove }, 'page copies changed');
    if (d.why === 'rebuild') this.o.event(`rebuilding page ${page} of ${volume.name}: copy on ${d.remove.join(', ')} replaced${d.add.length ? ` by ${d.add.join(', ')}` : ' (no peer with room yet)'}`, volume.name);
  }

  private countShortage(volumeId: string, d: CopyDecision): void {
    if (d.missingBytes === 0) return;
    const s = this.counting.get(volumeId) ?? { pages: 0, bytes: 0 };
    this.counting.set(volumeId, { pages: s.pages + 1, bytes: s.bytes + d.missingBytes });
  }

  /** A pass through the volume's pages ended: its shortage is what that pass counted (said once when it changes). */
  private endPass(volume: VolumeRecord): void {
    const now = this.counting.get(volume.id);
    const before = this.shortages.get(volume.id);
    this.counting.delete(volume.id);
    if (now) this.shortages.set(volume.id, now);
    else this.shortages.delete(volume.id);
    if (now && now.bytes !== before?.bytes) {
      this.o.log.warn({ volume: volume.name, pages: now.pages, missingBytes: now.bytes }, 'not enough room for every copy asked; the volume stays degraded');
      this.o.event(`volume ${volume.name} lacks room for ${now.pages} page copies (${now.bytes} bytes missing); it stays degraded`, volume.name);
    }
  }
}
