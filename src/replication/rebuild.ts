// Keeping every page at the number of copies its volume asks for, on the peers it should be on
// (DESIGN.md 10, 11): the replicas raised or lowered by `peersan volume set --replicas`, a volume
// made while fewer peers were up, the rebuild of the copies of a lost peer (the seeds' spare), and
// copies leaving a peer: a draining member's (`peersan peer drain`) and those the capacity spread
// asks to move (spread.ts: "this copy leaves X for Y"). The one place a page's copy set changes,
// so no two mechanisms fight over it.
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
// Leaving (evacuated): a peer whose copies must go although it is alive: a member draining (or
// removed), or the copy a capacity hint names. A leaving copy does not count toward the copies
// wanted, so a new copy is built elsewhere first; it is removed only once enough OTHER copies are
// in sync, never before, so no page ever has fewer in-sync copies than it had. A leaving primary
// first hands its role to an in-sync copy on a peer that stays (a role switch, no data copied);
// a one-copy page's primary moves whole (a page move, src/migration). The copies wanted do not
// drop while a member is away (wantedCopies): a restarting peer's copies are kept.
//
// Per page (decideCopies, pure):
//   1. copies on lost peers are removed (from copies and from the in-sync set);
//   2. beyond the copies wanted, non-primary copies are removed, stale ones first (leaving copies
//      aside: a copy being built to replace one is never "extra");
//   3. below, new STALE copies are added on peers placement.ts chooses (never a lost or leaving
//      one); resync (resync.ts) fills them and CASes them into the in-sync set. A copy that finds
//      no room is reported as missing bytes and the page stays degraded: nothing is half-added;
//   4. leaving copies are removed: stale ones at once, in-sync ones once the copies that stay
//      hold enough in-sync copies.
// All in one CAS per page, decided on the catalog's record of the page. Before it, a leaving
// primary's step (primaryStep): the role switch first, or the one-copy page's move.
//
// Paced: the keeper adds copies to at most copyBuildPagesInFlightMax pages whose new copies are
// not in sync yet, moves at most evacuationMovesInFlightMax one-copy pages at once, and makes at
// most copyChangesPerRunMax changes per run; the filling and moving run at the migration rate and
// duty (resync, migrator), so they give way to host I/O.
//
// A new copy gets the page's snapshot layers too, once in sync (src/snapshot/layer-sync.ts), so
// a snapshot outlives the copies that held the page at its cut.
//
// When: every copyKeeperTickMs, and soon after a volume change, a member change, a capacity hint,
// or a route change of a page this peer is primary of (a copy came in sync: room for the next one).

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import type { MemberState } from '../cluster/members';
import type { Env, TimerHandle } from '../env/env';
import { ConflictError } from '../errors';
import { copyBuildPagesInFlightMax, copyChangesPerRunMax, copyKeeperKickDelayMs, copyKeeperScanPagesMax, copyKeeperTickMs, evacuationMovesInFlightMax, relocationsMax, relocationWaitMsMax } from '../limits';
import { copiesOf, inSyncOf, staleCopiesOf, type Route } from '../routing/table';
import { changedCopies, chooseCopyPeers, copiesToRemove, noPeers, type Choice, type PeerCandidate, type Promised } from './placement';
import { followRoutes } from './route-watch';

/** What one page needs: copies to add and to remove (one CAS), and copies that found no peer. */
export interface CopyDecision {
  add: string[];
  remove: string[];
  why: 'rebuild' | 'evacuate' | 'raise' | 'lower' | 'none';
  missing: number;
  missingBytes: number;
}

/**
 * The change a page at `route` needs to hold `wanted` copies off the `leaving` peers (see the
 * top). `choose(count, excluded)` picks peers for new copies; `mayAdd` is false when the pacing
 * budget is spent.
 */
export function decideCopies(route: Route, wanted: number, lost: ReadonlySet<string>, mayAdd: boolean, choose: (count: number, excluded: readonly string[]) => Choice, leaving: ReadonlySet<string> = noPeers): CopyDecision {
  const lostCopies = copiesOf(route).filter((p) => p !== route.owner && lost.has(p));
  const kept: Route = { ...changedCopies(route, [], lostCopies), version: route.version };
  const uncounted = uncountedCopies(kept, wanted, leaving);
  const extra = copiesToRemove(kept, wanted, uncounted);
  const staying = copiesOf(kept).filter((p) => !uncounted.has(p));
  const need = wanted - staying.length;
  const chosen = need > 0 && mayAdd ? choose(need, [...lost, ...leaving]) : { peers: [], missing: 0, missingBytes: 0 };
  // Leaving copies: stale ones hold nothing the others lack; in-sync ones wait for enough others.
  const inSyncStaying = inSyncOf(kept).filter((p) => !uncounted.has(p) && !extra.includes(p));
  const leavers = copiesOf(kept).filter((p) => p !== kept.owner && uncounted.has(p));
  const ready = inSyncStaying.length >= Math.max(1, wanted);
  const gone = leavers.filter((p) => ready || !inSyncOf(kept).includes(p));
  const remove = [...lostCopies, ...extra, ...gone];
  const why = lostCopies.length > 0 ? 'rebuild' : leavers.length > 0 && (gone.length > 0 || chosen.peers.length > 0) ? 'evacuate' : chosen.peers.length > 0 ? 'raise' : extra.length > 0 ? 'lower' : 'none';
  return { add: chosen.peers, remove, why, missing: chosen.missing, missingBytes: chosen.missingBytes };
}

/**
 * The copies of the page on leaving peers: they do not count toward the copies wanted. The
 * primary's own counts while the page has one copy (it leaves by a move, not a rebuild).
 */
function uncountedCopies(route: Route, wanted: number, leaving: ReadonlySet<string>): ReadonlySet<string> {
  return new Set(copiesOf(route).filter((p) => leaving.has(p) && (p !== route.owner || wanted > 1)));
}

/** What a primary on a leaving peer does before any copy change: see the top. */
export type PrimaryStep = { kind: 'stay' } | { kind: 'switch'; to: string } | { kind: 'move' };

/**
 * The primary leaves: its role goes to an in-sync copy on a peer that stays (the first in the
 * in-sync order); with none, a one-copy page moves whole, and a page of more copies stays until
 * the copy keeper has built one (decideCopies), then switches.
 */
export function primaryStep(route: Route, wanted: number, lost: ReadonlySet<string>, leaving: ReadonlySet<string>): PrimaryStep {
  if (!leaving.has(route.owner)) return { kind: 'stay' };
  const to = inSyncOf(route).find((p) => p !== route.owner && !leaving.has(p) && !lost.has(p));
  if (to) return { kind: 'switch', to };
  return wanted <= 1 && copiesOf(route).length === 1 ? { kind: 'move' } : { kind: 'stay' };
}

/**
 * Copies wanted of a volume's pages: its replicas, at most one per peer it may be on. They do not
 * drop while a peer is leaving or draining (the span shrinks, the volume's needs do not): the
 * copies of a draining peer are rebuilt elsewhere, a restarting peer's are kept.
 */
export function wantedCopies(volume: Pick<VolumeRecord, 'replicas' | 'peers'>, span: readonly string[]): number {
  return Math.min(volume.replicas ?? 1, Math.max(volume.peers.length, span.length));
}

/**
 * Visit a window of a volume's pages: from where the last window stopped (`cursor`), at most
 * copyKeeperScanPagesMax pages (a 64 TiB volume has 16 M), until `visit` has changed something
 * `changesMax` times. Returns the changes made.
 */
export async function scanPages(cursor: Map<string, number>, volume: VolumeRecord, changesMax: number, visit: (page: number) => Promise<boolean>): Promise<number> {
  const pages = Math.ceil(volume.sizeBytes / volume.blockBytes / volume.pageBlocks);
  const first = (cursor.get(volume.id) ?? 0) % pages;
  const scan = Math.min(pages, copyKeeperScanPagesMax);
  let changes = 0;
  let k = 0;
  for (; k < scan && changes < changesMax; k++) if (await visit((first + k) % pages)) changes++;
  cursor.set(volume.id, (first + k) % pages);
  return changes;
}

/**
 * scanPages when only `candidates` (ascending page numbers) can need anything: every other page
 * of the window would be a visit that changes nothing, so it is passed over. The same window, the
 * same cursor, and `wrap()` where scanPages would visit page 0 (a pass through the volume ends),
 * for a cost in the candidates, not in the window's pages.
 */
export async function scanCandidates(cursor: Map<string, number>, volume: VolumeRecord, changesMax: number, candidates: readonly number[], visit: (page: number) => Promise<boolean>, wrap: () => void): Promise<number> {
  if (changesMax <= 0) return 0;
  const pages = Math.ceil(volume.sizeBytes / volume.blockBytes / volume.pageBlocks);
  const first = (cursor.get(volume.id) ?? 0) % pages;
  // The window in unwrapped numbers: [first, end), page u % pages; page 0 is at `zero`.
  const end = first + Math.min(pages, copyKeeperScanPagesMax);
  const zero = first === 0 ? 0 : pages;
  const inWindow = [...candidates.filter((p) => p >= first && p < end), ...candidates.filter((p) => p + pages < end).map((p) => p + pages)];
  let changes = 0;
  let reached = end;
  let wrapped = false;
  for (const u of inWindow) {
    if (changes >= changesMax) break;
    if (!wrapped && u >= zero) {
      wrapped = true;
      wrap();
    }
    if ((await visit(u % pages)) && ++changes >= changesMax) reached = u + 1;
  }
  if (!wrapped && zero < reached) wrap();
  cursor.set(volume.id, reached % pages);
  return changes;
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
  /**
   * Give the page's primary role to `to` (src/migration/migrator.ts start): a role switch when
   * `to` holds an in-sync copy, else a page move; resolves once switched, or once the move is under way.
   */
  movePrimary(volume: VolumeRecord, page: number, to: string): Promise<void>;
  /** Something a person watching the group wants to know (the console's events). */
  event(message: string, volume: string): void;
}

/** A capacity hint (spread.ts): the copy on `from` leaves for `to`. */
interface Relocation {
  volumeId: string;
  page: number;
  from: string;
  to: string;
  atMs: number;
}

/** One run's look at a volume: where its copies may go. */
interface VolumeRun {
  volume: VolumeRecord;
  span: readonly string[];
  candidates: PeerCandidate[];
  pageBytes: number;
  /** Bytes promised to peers by this run's choices. */
  promised: Promised;
}

/** Members whose copies leave: drained, or removed by force. */
const leavingStates: ReadonlySet<MemberState> = new Set(['draining', 'removed']);

export class CopyKeeper {
  private readonly o: CopyKeeperOptions;
  private readonly startedMs: number;
  /** Where the next run resumes in each volume (copyKeeperScanPagesMax pages per run). */
  private readonly cursor = new Map<string, number>();
  /** Pages this keeper gave new copies that are not in sync yet: `volumeId/page` → the peers. */
  private readonly building = new Map<string, { volumeId: string; page: number; peers: string[] }>();
  /** One-copy pages this keeper is moving off a leaving peer: `volumeId/page`. */
  private readonly moving = new Map<string, { volumeId: string; page: number }>();
  /** Capacity hints by `volumeId/page`, kept until done or given up (relocationWaitMsMax). */
  private readonly relocations = new Map<string, Relocation>();
  private readonly shortages = new Map<string, Shortage>();
  /** Shortage being summed over the current pass through a volume. */
  private readonly counting = new Map<string, Shortage>();
  private interval: TimerHandle | undefined;
  /** Pages whose copy change (CAS) is under way: `volumeId/page`. */
  private readonly changingPages = new Set<string>();
  private scheduled = false;
  private running = false;
  private again = false;
  private closed = false;
  private unfollow: (() => void) | undefined;

  constructor(o: CopyKeeperOptions) {
    this.o = o;
    this.startedMs = o.env.clock.monotonicMs();
  }

  /** The page's copies are being changed by this keeper now (Migrator.start waits for it to end). */
  changing(volumeId: string, page: number): boolean {
    return this.changingPages.has(`${volumeId}/${page}`);
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

  /**
   * A capacity hint (spread.ts): the copy of the page on `from` should leave for `to`. Taken only
   * for a page this peer is primary of and whose primary is not `from` (that copy moves by a page
   * move); false when refused or when relocationsMax hints wait already.
   */
  relocate(volumeId: string, page: number, from: string, to: string): boolean {
    const volume = this.o.catalog.volumeById(volumeId);
    const route = volume && this.o.catalog.routes(volume).route(page);
    const key = `${volumeId}/${page}`;
    if (!route || route.owner !== this.o.self || from === route.owner || !copiesOf(route).includes(from) || copiesOf(route).includes(to)) return false;
    if (!this.relocations.has(key) && this.relocations.size >= relocationsMax) return false;
    this.relocations.set(key, { volumeId, page, from, to, atMs: this.o.env.clock.monotonicMs() });
    this.kick();
    return true;
  }

  /** Capacity hints whose new copy is not added yet (the spread driver waits for them: the routes do not show them). */
  relocationsPending(): number {
    this.forgetRelocations();
    return [...this.relocations.values()].filter((h) => !this.holds(h.volumeId, h.page, h.to)).length;
  }

  private holds(volumeId: string, page: number, peer: string): boolean {
    const volume = this.o.catalog.volumeById(volumeId);
    return volume !== undefined && copiesOf(this.o.catalog.routes(volume).route(page)).includes(peer);
  }

  /** Look again soon (route, volume or member changed). */
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

  /** One pass: the hinted pages first, then (a window of) every volume's pages this peer is primary of. */
  async run(): Promise<void> {
    if (this.running || this.closed) return;
    this.running = true;
    try {
      const peers = this.o.peers();
      const lost = lostPeers(peers, this.o.self, this.o.env.clock.monotonicMs() - this.startedMs, this.o.downOutMs);
      this.forgetBuilt();
      this.forgetRelocations();
      const runs = new Map(this.o.catalog.listVolumes().map((v) => [v.id, this.volumeRun(v, peers, lost)]));
      let changes = 0;
      for (const h of [...this.relocations.values()]) {
        const v = runs.get(h.volumeId);
        if (changes >= copyChangesPerRunMax || this.closed) break;
        if (v && (await this.keepPage(v, h.page, lost, false))) changes++;
      }
      for (const v of runs.values()) {
        if (changes >= copyChangesPerRunMax || this.closed) break;
        changes += await this.keepVolume(v, lost, copyChangesPerRunMax - changes);
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

  /** Pages whose new copies came in sync (or went) leave the pacing budget; so do one-copy pages moved. */
  private forgetBuilt(): void {
    for (const [key, b] of this.building) {
      const volume = this.o.catalog.volumeById(b.volumeId);
      const route = volume && this.o.catalog.routes(volume).route(b.page);
      if (!route || route.owner !== this.o.self || !b.peers.some((p) => staleCopiesOf(route).includes(p))) this.building.delete(key);
    }
    for (const [key, m] of this.moving) if (!this.o.movingAway(m.volumeId, m.page)) this.moving.delete(key);
  }

  /**
   * Hints done (the copy left), moot (the page has another primary, or its primary is the copy
   * to move), or given up (the new copy was not added within relocationWaitMsMax).
   */
  private forgetRelocations(): void {
    const nowMs = this.o.env.clock.monotonicMs();
    for (const [key, h] of this.relocations) {
      const volume = this.o.catalog.volumeById(h.volumeId);
      const route = volume && this.o.catalog.routes(volume).route(h.page);
      const started = this.holds(h.volumeId, h.page, h.to);
      const moot = !route || route.owner !== this.o.self || route.owner === h.from || !copiesOf(route).includes(h.from);
      if (moot || (!started && nowMs - h.atMs > relocationWaitMsMax)) this.relocations.delete(key);
    }
  }

  private volumeRun(volume: VolumeRecord, peers: readonly ViewedPeer[], lost: ReadonlySet<string>): VolumeRun {
    const span = this.o.catalog.spanOf(volume);
    const candidates: PeerCandidate[] = peers
      .filter((p) => span.includes(p.id))
      .map((p) => ({ id: p.id, zone: this.o.zoneOf(p.id), alive: (p.id === this.o.self || !p.stale) && !lost.has(p.id), freeBytes: p.freeBytes, load: p.load }));
    return { volume, span, candidates, pageBytes: volume.pageBlocks * volume.blockBytes, promised: new Map() };
  }

  /**
   * A window of the volume's pages. The pages that never changed share their placement by page
   * mod the peer count: when no such class needs anything here (the usual case), only the changed
   * pages this peer is primary of and the hinted ones are visited, so a run costs the pages that
   * changed, not the volume's size (a 64 TiB volume has 16 M pages).
   */
  private keepVolume(v: VolumeRun, lost: ReadonlySet<string>, changesMax: number): Promise<number> {
    const visit = (page: number): Promise<boolean> => this.keepPage(v, page, lost, true);
    const table = this.o.catalog.routes(v.volume);
    const pages = table.pageCount(v.volume.sizeBytes / v.volume.blockBytes);
    const quiet = Array.from({ length: Math.min(table.peers.length, pages) }, (_, k) => this.quiet(v, table.placed(k), lost));
    if (!quiet.every((q) => q)) {
      return scanPages(this.cursor, v.volume, changesMax, async (page) => {
        if (page === 0) this.endPass(v.volume);
        return visit(page);
      });
    }
    const changed = [...table.changed()].filter(([page, r]) => page < pages && r.owner === this.o.self).map(([page]) => page);
    const hinted = [...this.relocations.values()].filter((h) => h.volumeId === v.volume.id && h.page < pages).map((h) => h.page);
    const candidates = [...new Set([...changed, ...hinted])].sort((a, b) => a - b);
    return scanCandidates(this.cursor, v.volume, changesMax, candidates, visit, () => this.endPass(v.volume));
  }

  /**
   * An unchanged, unhinted page at placement route `route` needs nothing of this keeper: not its
   * primary, or its primary stays and keepPage would decide no copy change and count no shortage.
   */
  private quiet(v: VolumeRun, route: Route, lost: ReadonlySet<string>): boolean {
    if (route.owner !== this.o.self) return true;
    const wanted = wantedCopies(v.volume, v.span);
    const leaving = this.membersLeaving(route);
    if (primaryStep(route, wanted, lost, leaving).kind !== 'stay') return false;
    const d = this.decidePage(v, route, wanted, lost, leaving, v.candidates, new Map(v.promised));
    return d.add.length === 0 && d.remove.length === 0 && d.missingBytes === 0;
  }

  /** The copy decision of a page at `route` (keepPage's, and quiet's for a whole placement class). */
  private decidePage(v: VolumeRun, route: Route, wanted: number, lost: ReadonlySet<string>, leaving: ReadonlySet<string>, candidates: PeerCandidate[], promising: Promised): CopyDecision {
    const choose = (count: number, excluded: readonly string[]): Choice =>
      chooseCopyPeers({ route, count, candidates, excluded, pageBytes: v.pageBytes, reserveFreeBytes: this.o.reserveFreeBytes, promised: promising });
    return this.decide(route, wanted, lost, this.building.size < copyBuildPagesInFlightMax, choose, leaving);
  }

  /** The peers of the route whose copies leave by their member state (draining, removed). */
  private membersLeaving(route: Route): Set<string> {
    return new Set(copiesOf(route).filter((p) => leavingStates.has(this.o.catalog.options.members.get(p)?.state ?? 'up')));
  }

  /**
   * The peers whose copies of the page leave: members draining (or removed), else a capacity
   * hint's. A drain goes first: counting the hint's copy as leaving too could leave too few
   * copies staying for either to go, each waiting for the other (simulator, seed 24728: a
   * drain that never ended).
   */
  private leavingOf(volumeId: string, page: number, route: Route): ReadonlySet<string> {
    const leaving = this.membersLeaving(route);
    const hint = this.relocations.get(`${volumeId}/${page}`);
    if (hint && leaving.size === 0) leaving.add(hint.from);
    return leaving;
  }

  /** One page this peer is primary of: a leaving primary's role switch, else its copy change, else a one-copy page's move. True if something changed. */
  private async keepPage(v: VolumeRun, page: number, lost: ReadonlySet<string>, countShortage: boolean): Promise<boolean> {
    const { volume } = v;
    const route = this.o.catalog.routes(volume).route(page);
    if (route.owner !== this.o.self || this.o.movingAway(volume.id, page)) return false;
    const leaving = this.leavingOf(volume.id, page, route);
    const wanted = wantedCopies(volume, v.span);
    const step = primaryStep(route, wanted, lost, leaving);
    if (step.kind === 'switch') return this.handOver(volume, page, step.to, 'its peer is leaving');
    // A hint names the one peer its copy goes to; anything else is placement's choice. Once
    // that peer holds a copy the hint only waits for its source's to go, and any other need
    // (a draining peer's copy, with a hint's source and a draining peer in one page's copies)
    // is placement's again: limited to the hint's peer it could never be met (simulator, seeds
    // 2031 and 2829: a drain that never ended).
    const hint = this.relocations.get(`${volume.id}/${page}`);
    const hintOpen = hint !== undefined && !copiesOf(route).includes(hint.to);
    const candidates = hintOpen ? v.candidates.filter((c) => c.id === hint.to) : v.candidates;
    const choose = (r: Route, promising: Promised) => (count: number, excluded: readonly string[]): Choice =>
      chooseCopyPeers({ route: r, count, candidates, excluded, pageBytes: v.pageBytes, reserveFreeBytes: this.o.reserveFreeBytes, promised: promising });
    // Decided on the table's route to skip pages with nothing to do, then again on the
    // catalog's record inside the CAS (the table may lack the copies: a route heard in MOVED).
    const decide = (r: Route, promising: Promised): CopyDecision => this.decidePage(v, r, wanted, lost, this.leavingOf(volume.id, page, r), candidates, promising);
    const d = decide(route, new Map(v.promised));
    if (countShortage && !hint) this.countShortage(volume.id, d);
    if (d.add.length > 0 || d.remove.length > 0) {
      // No move of the page starts until the CAS is over (Migrator.start), and none was starting
      // when it was decided (movingAway): a move must not find a copy added on its destination.
      const k = `${volume.id}/${page}`;
      this.changingPages.add(k);
      try {
        await this.apply(volume, page, route, (now) => decide(now, v.promised));
      } finally {
        this.changingPages.delete(k);
      }
      return true;
    }
    return step.kind === 'move' ? this.moveWhole(v, page, route, choose(route, v.promised), [...lost, ...leaving]) : false;
  }

  /** A page's copy change (decideCopies); the simulator's negative control overrides it (test/sim/controls). */
  protected decide(...args: Parameters<typeof decideCopies>): CopyDecision {
    return decideCopies(...args);
  }

  /** The primary role to `to` (a role switch); refused for now (page busy, copy not settled): the next run tries again. */
  private async handOver(volume: VolumeRecord, page: number, to: string, why: string): Promise<boolean> {
    try {
      await this.o.movePrimary(volume, page, to);
      this.o.log.info({ volume: volume.name, page, to, why }, 'primary role handed over');
    } catch (err) {
      this.o.log.debug({ volume: volume.name, page, to, reason: (err as Error).message }, 'primary role not handed over yet');
    }
    return true;
  }

  /** A one-copy page whose peer is leaving moves whole (paced: evacuationMovesInFlightMax at once). */
  private async moveWhole(v: VolumeRun, page: number, route: Route, choose: (count: number, excluded: readonly string[]) => Choice, excluded: readonly string[]): Promise<boolean> {
    if (this.moving.size >= evacuationMovesInFlightMax) return false;
    const to = choose(1, excluded).peers[0];
    if (!to) {
      this.countShortage(v.volume.id, { add: [], remove: [], why: 'none', missing: 1, missingBytes: v.pageBytes });
      return false;
    }
    this.moving.set(`${v.volume.id}/${page}`, { volumeId: v.volume.id, page });
    try {
      await this.o.movePrimary(v.volume, page, to);
      this.o.log.info({ volume: v.volume.name, page, from: route.owner, to }, 'one-copy page moving off a leaving peer');
    } catch (err) {
      this.moving.delete(`${v.volume.id}/${page}`);
      this.o.log.debug({ volume: v.volume.name, page, to, reason: (err as Error).message }, 'one-copy page not moved yet');
    }
    return true;
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
