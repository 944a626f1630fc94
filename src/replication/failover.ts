// Failover (DESIGN.md 10, invariants 4-6): who may serve a page as its primary, and taking a
// page over from a primary that fell silent.
//
// - The guard (PrimaryGuard.run, called by the write path for every request of a replicated
//   page this peer owns): a page being taken over or stepped out of is held (requests wait,
//   bounded); a read needs a lease (leases.ts) from every other in-sync copy, waits leaseMs for
//   a missing one, else drops that copy from the in-sync set by CAS; and after the read the
//   leases are checked again (a read that outlived one is run again).
// - Promotion: eagerly, when a primary has renewed nothing with this peer for leaseMs + margin
//   and does not answer, for every page this peer holds data of where it is the first live
//   in-sync copy after that primary, if this peer reaches a majority of the group (an isolated
//   peer would take pages from primaries that are fine); on demand (message `promote`), after
//   the same silence, or at once when the primary itself hands the page over. In order: hold
//   the page here; fence the old primary's leases (leases.ts); CAS owner := this peer, the old
//   primary to the end of the copies and out of the in-sync set, epoch + 1; then reconcile:
//   ask every other in-sync copy for its recent grains (message `recent`: it learns the new
//   epoch first, so it refuses the old primary from then on), and write this peer's content of
//   the union (its own recent grains included) to each of them at the new epoch; a copy that
//   does not answer is dropped from the in-sync set. Only then the page is released to
//   requests. A CAS whose outcome is unknown keeps the page held until the catalog tells.
// - Restart (invariant 6): pages in the activity log are suspect (this peer may have lost
//   writes it had acknowledged as a copy). Each is held; the peer leaves its in-sync set (a CAS
//   by itself as a secondary, a handover to another in-sync copy as the primary) unless it is
//   the page's only in-sync copy, retrying until it can.

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { sleep, within, type Env } from '../env/env';
import { ConflictError, NotFoundError, PeersanError, PeerUnavailableError } from '../errors';
import { failoverWaitMsMax, handoverCallMsMax, leaseMs, leasePingMs, leaseReadRunsMax, promotionsInFlightMax, recentCallMsMax, reconcileRoundsMax, routeRetriesMax, silenceRefireMsMax } from '../limits';
import { PageMovedError } from '../routing/moved';
import { copiesOf, inSyncOf, type Route } from '../routing/table';
import type { PrimaryGuard, ReplicaPort } from './hooks';
import type { Leases } from './leases';
import { checkLed, checkPromote, checkRecent, checkRecentAnswer, checkRouteAnswer, type ReplicationHandler, type Takeover } from './messages';

export interface FailoverOptions {
  self: string;
  env: Env;
  log: Logger;
  catalog: Catalog;
  leases: Leases;
  /** The replicated layer of a volume open on this peer. */
  port(volumeId: string): ReplicaPort | undefined;
  /** CAS removing `peers` from the page's in-sync set (replicated.ts dropFromInSync); ConflictError if the route changed. */
  drop(volume: VolumeRecord, page: number, route: Route, peers: readonly string[]): Promise<Route>;
  /** Pages of the volume this peer's store holds data of (the ones to take over eagerly). */
  heldPages(volumeId: string): Iterable<number>;
  /** Pages of the volume in the activity log at start (activity.ts): suspect. */
  suspect(volumeId: string): Iterable<number> | Promise<Iterable<number>>;
  /**
   * A move of the page away from this peer still runs here (one the page was lost to, before its
   * abandon): this peer's I/O of the page goes through it to the destination's staging copy.
   */
  movingOut?(volumeId: string, page: number): boolean;
  /** Send a replication message, bounded by timeoutMs; its answer's body. */
  call(peer: string, kind: string, body: Record<string, unknown>, timeoutMs: number): Promise<Record<string, unknown>>;
  /**
   * Put the page in this peer's activity log, durably (activity.ts beforeChange): undefined when
   * it is there already. Done before a takeover: see takeOver.
   */
  logged?(volumeId: string, page: number): Promise<void> | undefined;
  /** Make this peer's store of the volume durable: every change it applied as a copy (done before a takeover: see takeOver). */
  flushStore(volumeId: string): Promise<void>;
}

/** The route after `self` took the page over from its primary: first, the old primary last and out of sync. */
export function promoted(now: Route, self: string): Omit<Route, 'version'> {
  const old = now.owner;
  const others = (peers: readonly string[]): string[] => peers.filter((p) => p !== self && p !== old);
  return { owner: self, copies: [self, ...others(copiesOf(now)), old], inSync: [self, ...others(inSyncOf(now))] };
}

/** The in-sync copies of a route other than its primary. */
function secondaries(route: Route): string[] {
  return inSyncOf(route).filter((p) => p !== route.owner);
}

function keyOf(volumeId: string, page: number): string {
  return `${volumeId}/${page}`;
}

/**
 * Learn a route a lease answer says another peer took over (leases.ts), into this peer's
 * tables: the route carried, or the catalog's when the taker did not know the CAS's outcome.
 */
export async function learnTakeover(catalog: Catalog, t: Takeover): Promise<void> {
  const volume = catalog.volumeById(t.volumeId);
  if (!volume) return; // not open here: nothing of it is served here
  if (t.route) catalog.routes(volume).learn(t.page, t.route);
  else await catalog.fetchRoute(volume, t.page);
}

/** Resolves true once the hold `held` ends within `ms`, false if not (it keeps running). */
async function releasedWithin(env: Env, held: Promise<void>, ms: number): Promise<boolean> {
  return (await within(env.timers, held.then(() => true), ms)) ?? false;
}

export class Failover implements PrimaryGuard {
  private readonly o: FailoverOptions;
  /** Pages not to serve yet (a takeover reconciling, a restart stepping out), by volumeId/page: settles when they may be. */
  private readonly held = new Map<string, Promise<void>>();
  /** Pages this peer steps out of at start: it never takes them over meanwhile. */
  private readonly suspects = new Set<string>();
  /** Takeovers whose CAS is in flight, by volumeId/page (one at a time per page). */
  private readonly promoting = new Map<string, Promise<Route>>();
  /** Volume records by id, for the data path's calls (Catalog.volumeById walks every volume); emptied on any volume change. */
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly unlisten: (() => void)[] = [];
  private closed = false;

  constructor(o: FailoverOptions) {
    this.o = o;
    this.unlisten.push(o.catalog.onVolumeChange(() => this.volumes.clear()));
  }

  /**
   * Hold every suspect page and start stepping out of them (in the background: it needs other
   * peers and the catalog), then take over from silent primaries from now on. Resolves once the
   * suspect pages are held, which must be before this peer serves anything.
   */
  async start(): Promise<void> {
    for (const volume of this.o.catalog.listVolumes()) {
      for (const page of await this.o.suspect(volume.id)) {
        const key = keyOf(volume.id, page);
        if (this.suspects.has(key)) continue;
        this.suspects.add(key);
        const release = this.hold(key);
        void this.stepOut(volume, page).finally(() => {
          this.suspects.delete(key);
          release();
        });
      }
    }
    this.unlisten.push(this.o.leases.onSilent((peer) => this.silentPeer(peer)));
  }

  close(): void {
    this.closed = true;
    for (const off of this.unlisten) off();
  }

  /** The message handlers of this part, by kind (composePeer registers them). */
  handlers(): [string, ReplicationHandler][] {
    return [
      ['promote', (from, body) => this.onPromote(from, body)],
      ['recent', (from, body) => this.onRecent(from, body)],
      ['led', async (_from, body) => ({ pages: this.ledBy(checkLed(body)) })],
    ];
  }

  /**
   * How many pages of the volume this peer holds, as an in-sync copy, whose primary is still
   * `primary`: a flush that primary did not answer waits for none (src/routing/router.ts flush;
   * this peer takes those pages over once the primary is silent, silentPeer). Pages held by no
   * in-sync copy hold no acknowledged write.
   */
  private ledBy({ volumeId, primary }: { volumeId: string; primary: string }): number {
    const volume = this.o.catalog.volumeById(volumeId);
    if (!volume) return 0;
    const table = this.o.catalog.routes(volume);
    let n = 0;
    for (const page of this.o.heldPages(volumeId)) {
      const route = table.route(page);
      if (route.owner === primary && inSyncOf(route).includes(this.o.self)) n++;
    }
    return n;
  }

  /**
   * The page is held here: stepped out of as suspect at start (this peer's copy may miss writes
   * it acknowledged), or taken over and reconciling. Its copy here is then no source for a page
   * move or a role switch (they bypass the guard).
   */
  isHeld(volumeId: string, page: number): boolean {
    return this.held.has(keyOf(volumeId, page));
  }

  /** Resolves true once the page is not held here, false if it still is after failoverWaitMsMax. */
  async settled(volumeId: string, page: number): Promise<boolean> {
    const held = this.held.get(keyOf(volumeId, page));
    return !held || releasedWithin(this.o.env, held, failoverWaitMsMax);
  }

  /**
   * Copies of the volume's pages this peer is the primary of and holds unreconciled (stepping out
   * as suspect after a restart, or taking over and reconciling): a change the page's primary had
   * in flight (this peer's previous incarnation, or the primary it took over from) may have
   * reached some of them and not others, and nobody acknowledged it, so they may differ until the
   * reconcile; a snapshot frozen meanwhile must keep one copy's layer of the page, not several
   * (src/snapshot/service.ts). Every in-sync copy but the one whose content wins the reconcile:
   * this peer's, or, as it steps out, the first secondary's (the one handOver asks first).
   */
  unreconciledCopies(volumeId: string): { page: number; peer: string }[] {
    const volume = this.o.catalog.volumeById(volumeId);
    if (!volume) return [];
    const table = this.o.catalog.routes(volume);
    const out: { page: number; peer: string }[] = [];
    for (const key of this.held.keys()) {
      const [id, pageText] = key.split('/');
      const page = Number(pageText);
      const route = table.route(page);
      if (id !== volumeId || route.owner !== this.o.self) continue;
      const others = secondaries(route);
      for (const peer of this.suspects.has(key) ? others.slice(1) : others) out.push({ page, peer });
    }
    return out;
  }

  /** This peer steps out of the page as suspect (its copy may miss writes it acknowledged): no source for a resync. */
  isSteppingOut(volumeId: string, page: number): boolean {
    return this.suspects.has(keyOf(volumeId, page));
  }

  // ---- the guard -----------------------------------------------------------------------------

  async run<T>(volumeId: string, page: number, route: Route, read: boolean, op: () => Promise<T>): Promise<T> {
    const volume = this.volumeOf(volumeId);
    for (let runs = 1; ; runs++) {
      await this.unheld(volumeId, page);
      let current = this.ours(volume, page, route);
      // A route heard in a MOVED answer names no copies: the catalog's record does.
      if (!current.copies) current = this.ours(volume, page, await this.o.catalog.fetchRoute(volume, page));
      if (!read) return op();
      current = await this.leased(volume, page, current);
      const result = await op();
      // The lease must have held until the read's data was taken, the route unchanged: else a new
      // primary may have written meanwhile (one that has handed the page back since included: a
      // lease that lapsed counts again once the routes are learned, seed 37724).
      const after = this.ours(volume, page, current);
      if (after.version === current.version && this.leasedNow(after)) return result;
      if (runs >= leaseReadRunsMax) throw new PeerUnavailableError(this.o.self, `page ${page}: leases keep running out, or its route changing, during reads`, false, { transient: true });
    }
  }

  /** Wait while the page is held (bounded: then BUSY to the host, which asks again). */
  private async unheld(volumeId: string, page: number): Promise<void> {
    const held = this.held.get(keyOf(volumeId, page));
    if (!held) return;
    if (!(await releasedWithin(this.o.env, held, failoverWaitMsMax))) {
      throw new PeerUnavailableError(this.o.self, `page ${page} is still failing over after ${failoverWaitMsMax} ms`, false, { transient: true });
    }
  }

  /** The newer of `route` and the table's, if this peer is its primary; else PageMovedError. */
  private ours(volume: VolumeRecord, page: number, route: Route): Route {
    const known = this.o.catalog.routes(volume).route(page);
    const newest = known.version > route.version ? known : route;
    if (newest.owner !== this.o.self) throw new PageMovedError(page, newest);
    return newest;
  }

  private leasedNow(route: Route): boolean {
    return secondaries(route).every((p) => this.o.leases.valid(p));
  }

  /**
   * The route once this peer holds a lease from every other in-sync copy: a copy whose lease
   * did not come back within leaseMs is dropped from the in-sync set (CAS) first.
   */
  private async leased(volume: VolumeRecord, page: number, route: Route): Promise<Route> {
    for (let round = 0; round < leaseReadRunsMax; round++) {
      const expired = secondaries(route).filter((p) => !this.o.leases.valid(p));
      if (expired.length === 0) return route;
      const renewed = await Promise.all(expired.map((p) => this.o.leases.awaitLease(p, leaseMs)));
      const gone = expired.filter((_, i) => !renewed[i]);
      route = this.ours(volume, page, gone.length === 0 ? route : await this.dropOrReread(volume, page, route, gone));
    }
    throw new PeerUnavailableError(this.o.self, `page ${page}: no lease from its in-sync copies`, false, { transient: true });
  }

  /** Drop `peers` from the in-sync set; if the route changed meanwhile, the catalog's route instead (the caller decides again). */
  private async dropOrReread(volume: VolumeRecord, page: number, route: Route, peers: readonly string[]): Promise<Route> {
    try {
      const next = await this.o.drop(volume, page, route, peers);
      this.o.log.warn({ volume: volume.name, page, dropped: peers, epoch: next.version }, 'dropped copies from the in-sync set');
      return next;
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
      return this.o.catalog.fetchRoute(volume, page);
    }
  }

  // ---- promotion -----------------------------------------------------------------------------

  /**
   * Take the page over from `from.owner` (CAS), then reconcile in the background with the page
   * held. Without `handover`, only while we have granted that primary nothing for leaseMs +
   * margin. Resolves to the route after (unchanged: refused; another's: someone else won).
   */
  promote(volume: VolumeRecord, page: number, from: Route, handover: boolean): Promise<Route> {
    const key = keyOf(volume.id, page);
    let p = this.promoting.get(key);
    if (!p) {
      p = this.takeOver(volume, page, from, handover).finally(() => this.promoting.delete(key));
      this.promoting.set(key, p);
    }
    return p;
  }

  private async takeOver(volume: VolumeRecord, page: number, from: Route, handover: boolean): Promise<Route> {
    const { self, catalog, leases } = this.o;
    const key = keyOf(volume.id, page);
    const port = this.o.port(volume.id);
    const old = from.owner;
    if (!port || old === self || this.suspects.has(key) || !inSyncOf(from).includes(self)) return from;
    // A lost move of the page from here is not abandoned yet: as primary this peer would serve
    // the page through it (reads and writes of its moved pieces go to the destination's copy).
    if (this.o.movingOut?.(volume.id, page)) return from;
    // The page is in the activity log before this peer may become its primary, and stays there
    // while it is held (the log's sweep spares held pages): a crash before the reconcile ends
    // leaves it suspect at the next start, and another copy takes it over and reconciles. Else
    // the restarted primary served the page with its copies apart on a change the old primary
    // had in flight (simulator, seed 36720).
    const logging = this.o.logged?.(volume.id, page);
    if (logging) await logging;
    // Every change this peer applied as a copy is made durable before it may become the page's
    // primary. A host's flush does not wait for a secondary it cannot reach (router.ts flush):
    // another in-sync copy made the change durable. But a takeover drops the old primary from
    // the in-sync set, and this peer may be left its only copy: a power loss after that lost a
    // flushed write for good (simulator, seed 128201: the old primary, cut off, had flushed it;
    // this peer had applied it and took over without syncing, then crashed).
    await this.o.flushStore(volume.id);
    // From the silence check to the fence, one synchronous step: no renewal is granted in between.
    if (!handover && !leases.book.silent(old, leases.now())) return from;
    const release = this.hold(key);
    leases.book.fence(old, volume.id, page);
    let route: Route;
    try {
      route = await catalog.casRoute(volume, page, from, (now) => promoted(now, self));
    } catch (err) {
      // The old primary learns whatever the catalog says now (nothing known: it reads the catalog itself).
      const current = await catalog.fetchRoute(volume, page).catch(() => undefined);
      leases.book.fenced(old, volume.id, page, current);
      if (err instanceof ConflictError && current) {
        release();
        return current;
      }
      // Unknown outcome: the CAS may have taken effect. The page stays held until the catalog tells.
      void this.settle(volume, page, current, port).finally(release);
      throw err;
    }
    leases.book.fenced(old, volume.id, page, route);
    this.o.log.info({ volume: volume.name, page, from: old, epoch: route.version, handover }, 'took over as primary; reconciling');
    void this.settle(volume, page, route, port).finally(release);
    return route;
  }

  /**
   * This peer became the page's primary by a page move's commit (the old primary's copy moved
   * here, no takeover): reconcile as after a takeover, the page held meanwhile. A change that
   * failed on the old primary (its forward to this peer failed) may have reached the other
   * in-sync copies: they keep its grains recent, and nobody else would ever make them agree.
   */
  adopt(volumeId: string, page: number): void {
    const volume = this.o.catalog.volumeById(volumeId);
    const port = this.o.port(volumeId);
    if (!volume || !port || this.closed) return;
    const release = this.hold(keyOf(volumeId, page));
    void this.settle(volume, page, undefined, port).finally(release);
  }

  /**
   * The primary is about to hand the page to a move's destination (the commit CAS): every other
   * in-sync copy gets this peer's content of the grains a change touched without being
   * acknowledged everywhere (a change whose forward to the destination failed may have reached
   * a copy; one a copy missed while it could not be dropped may be on the destination only).
   * The new primary would not know those grains: they are recent here, and this peer leaves.
   */
  async reconcileBeforeHandoff(volumeId: string, page: number): Promise<void> {
    const volume = this.o.catalog.volumeById(volumeId);
    const port = this.o.port(volumeId);
    if (!volume || !port) return;
    const route = this.o.catalog.routes(volume).route(page);
    if (route.copies && copiesOf(route).length > 1) await this.reconcile(volume, page, route, port);
  }

  /**
   * A move of the page away from this primary was cancelled (its pieces copied back from the
   * destination): as before a handoff, the other in-sync copies get this peer's content of its
   * recent grains (a change whose forward failed may be on them only), in the background until
   * done or the page is not ours.
   */
  settleOwn(volumeId: string, page: number): void {
    const volume = this.o.catalog.volumeById(volumeId);
    const port = this.o.port(volumeId);
    if (!volume || !port || this.closed) return;
    const route = this.o.catalog.routes(volume).route(page);
    if (route.copies && copiesOf(route).length > 1) void this.settle(volume, page, route, port);
  }

  /**
   * Reconcile until done, or until the page is not ours (route undefined: not known yet, read
   * from the catalog); the page stays held meanwhile.
   */
  private async settle(volume: VolumeRecord, page: number, route: Route | undefined, port: ReplicaPort): Promise<void> {
    for (let delayMs = leasePingMs; !this.closed; delayMs = Math.min(2 * delayMs, silenceRefireMsMax)) {
      try {
        route ??= await this.o.catalog.fetchRoute(volume, page);
        await this.reconcile(volume, page, route, port);
        return;
      } catch (err) {
        if (err instanceof PageMovedError) return;
        this.o.log.warn({ volume: volume.name, page, reason: (err as Error).message }, 'reconcile failed; trying again');
      }
      await sleep(this.o.env.timers, delayMs);
      route = await this.o.catalog.fetchRoute(volume, page).catch(() => route);
    }
  }

  /**
   * Make every other in-sync copy hold this peer's content of every grain that one of them (or
   * this peer) changed without knowing it acknowledged everywhere. Throws PageMovedError when
   * the page is not ours any more.
   */
  private async reconcile(volume: VolumeRecord, page: number, route: Route, port: ReplicaPort): Promise<Route> {
    for (let round = 0; round < reconcileRoundsMax; round++) {
      route = this.ours(volume, page, route);
      const others = inSyncOf(route).filter((p) => p !== this.o.self);
      const answers = await Promise.all(others.map((p) => this.askRecent(p, volume.id, page, route)));
      if (answers.some((a) => a && 'route' in a)) {
        // A copy knows a newer epoch: the route changed under us; decide again by the catalog's.
        route = await this.o.catalog.fetchRoute(volume, page);
        continue;
      }
      const grains = new Set(port.recentGrains(page));
      for (const a of answers) if (a && 'grains' in a) for (const g of a.grains) grains.add(g);
      const reached = others.filter((_, i) => answers[i] !== undefined);
      const missed = await this.spread(volume, page, route, port, [...grains].sort((a, b) => a - b), reached);
      const out = others.filter((p) => !reached.includes(p) || missed.has(p));
      if (out.length === 0) return route;
      const next = await this.dropOrReread(volume, page, route, out);
      if (!inSyncOf(next).some((p) => out.includes(p))) return this.ours(volume, page, next);
      route = next;
    }
    throw new PeersanError(`page ${page} of ${volume.name}: its route kept changing during the reconcile`);
  }

  private async askRecent(peer: string, volumeId: string, page: number, route: Route): Promise<{ grains: number[] } | { route: Route } | undefined> {
    try {
      return checkRecentAnswer(await this.o.call(peer, 'recent', { volumeId, page, version: route.version }, recentCallMsMax));
    } catch (err) {
      this.o.log.warn({ peer, page, reason: (err as Error).message }, 'an in-sync copy did not say which grains it changed');
      return undefined;
    }
  }

  /** Write this peer's content of `grains` to `peers` at `route`'s epoch; the peers that missed one. */
  private async spread(volume: VolumeRecord, page: number, route: Route, port: ReplicaPort, grains: number[], peers: string[]): Promise<Set<string>> {
    const missed = new Set<string>();
    const { local } = port;
    const pageLba = page * volume.pageBlocks;
    await port.exclusive(page, pageLba, Math.min(volume.pageBlocks, local.blockCount - pageLba), async () => {
      for (const g of grains) {
        const lba = pageLba + g * local.grainBlocks;
        const blocks = Math.min(local.grainBlocks, local.blockCount - lba, pageLba + volume.pageBlocks - lba);
        const live = peers.filter((p) => !missed.has(p));
        if (blocks <= 0 || live.length === 0) continue;
        // An unmapped grain here is unmapped there too: this peer's content wins, holes included.
        const mapped = (await local.lbaStatus(lba, blocks)).some((e) => e.mapped);
        const data = mapped ? await local.read(lba, blocks) : undefined;
        await Promise.all(live.map((p) => port.send(p, route, mapped ? 'write' : 'unmap', lba, blocks, data, false).catch(() => void missed.add(p))));
      }
    });
    return missed;
  }

  /** The first in-sync copy after the primary that we take for alive (ourselves included). */
  private successor(route: Route): string | undefined {
    return secondaries(route).find((p) => p === this.o.self || this.o.leases.alive(p));
  }

  /**
   * We reach a strict majority of the group (ourselves included), or the group has two peers:
   * a peer cut off from the others (but not from the catalog) must not take every page over from
   * primaries that are fine, leaving their hosts without the pages.
   */
  private quorate(): boolean {
    const others = this.o.leases.otherPeers();
    const alive = 1 + others.filter((p) => this.o.leases.alive(p)).length;
    return others.length < 2 || 2 * alive > others.length + 1;
  }

  /** `peer` renewed nothing with us for leaseMs + margin: take over its pages we hold and are next in line for. */
  private silentPeer(peer: string): void {
    if (this.closed || this.o.leases.alive(peer) || !this.quorate()) return;
    const work: [VolumeRecord, number, Route][] = [];
    for (const volume of this.o.catalog.listVolumes()) {
      const table = this.o.catalog.routes(volume);
      for (const page of this.o.heldPages(volume.id)) {
        const route = table.route(page);
        if (route.owner === peer && this.successor(route) === this.o.self) work.push([volume, page, route]);
      }
    }
    const next = async (): Promise<void> => {
      for (let item = work.shift(); item && !this.closed; item = work.shift()) {
        const [volume, page, route] = item;
        await this.promote(volume, page, route, false).catch((err: Error) => this.o.log.warn({ volume: volume.name, page, reason: err.message }, 'could not take over a page'));
      }
    };
    for (let i = 0; i < Math.min(promotionsInFlightMax, work.length); i++) void next();
  }

  // ---- restart: stepping out of suspect pages --------------------------------------------------

  private async stepOut(volume: VolumeRecord, page: number): Promise<void> {
    // The first try by the table (as the catalog was when it opened, moments ago): most suspect pages have one copy, and cost no catalog read.
    for (let delayMs = leasePingMs, route = this.o.catalog.routes(volume).route(page); !this.closed; delayMs = Math.min(2 * delayMs, silenceRefireMsMax)) {
      try {
        // Resynced whole meanwhile (activity.ts trusted): the copy here is whole again, nothing to leave.
        if (![...(await this.o.suspect(volume.id))].includes(page)) return;
        if (await this.stepOutOnce(volume, page, route)) return;
      } catch (err) {
        this.o.log.warn({ volume: volume.name, page, reason: (err as Error).message }, 'could not leave the in-sync set of a suspect page yet');
      }
      await sleep(this.o.env.timers, delayMs);
      route = await this.o.catalog.fetchRoute(volume, page).catch(() => route);
    }
  }

  /** True once this peer is out of the page's in-sync set, or its only member. */
  private async stepOutOnce(volume: VolumeRecord, page: number, route: Route): Promise<boolean> {
    const { self } = this.o;
    const inSync = inSyncOf(route);
    if (!inSync.includes(self) || inSync.length === 1) return true;
    if (route.owner !== self) {
      const next = await this.o.drop(volume, page, route, [self]);
      this.o.log.info({ volume: volume.name, page, epoch: next.version }, 'left the in-sync set of a suspect page (it resyncs)');
      return true;
    }
    // The primary hands the page over: the new one reconciles with the others, without us.
    const answer = await this.handOver(volume, page, route, 'suspect after a restart');
    // Someone else's change may have come first: then the next try decides again.
    return answer !== undefined && !inSyncOf(answer).includes(self);
  }

  /**
   * This peer, the page's primary at `route`, asks its other in-sync copies in turn to take the
   * page over (message promote, handover): the route after, once one did (newer than `route`,
   * naming another primary); undefined when none did. The new primary reconciles with the
   * others, without us. A copy whose route is newer and still names this peer (the in-sync set
   * changed meanwhile: a copy dropped) took nothing over: the copies are asked again at that
   * route (at most routeRetriesMax rounds). Taken for a handover, it let a move's source abandon
   * its move as if the page had gone (nothing copied back, the destination's copy freed) and stay
   * the primary with a copy that missed the writes made to moved pieces (simulator, seed 42545).
   */
  async handOver(volume: VolumeRecord, page: number, route: Route, why: string): Promise<Route | undefined> {
    let asked = route;
    for (let round = 0; round <= routeRetriesMax; round++) {
      const answer = await this.firstNewer(volume, page, asked);
      if (!answer) return undefined;
      this.o.catalog.routes(volume).learn(page, answer);
      if (answer.owner !== this.o.self) {
        this.o.log.info({ volume: volume.name, page, to: answer.owner, epoch: answer.version, why }, 'handed a page over');
        return answer;
      }
      asked = answer;
    }
    return undefined;
  }

  /** The first route newer than `route` that its secondaries, asked in turn to take the page over, answer; undefined if none does. */
  private async firstNewer(volume: VolumeRecord, page: number, route: Route): Promise<Route | undefined> {
    for (const peer of secondaries(route)) {
      const body = { volumeId: volume.id, page, version: route.version, handover: true };
      const answer = await this.o.call(peer, 'promote', body, handoverCallMsMax).then(checkRouteAnswer, () => undefined);
      if (answer && answer.version > route.version) return answer;
    }
    return undefined;
  }

  // ---- handlers ------------------------------------------------------------------------------

  /**
   * `promote`: the asker cannot reach the page's primary (a router), or is the primary handing
   * the page over. The answer is the route after: newer if we (or someone) took over.
   */
  private async onPromote(from: string, body: Record<string, unknown>): Promise<{ route: Route }> {
    const { volumeId, page, version, handover } = checkPromote(body);
    const volume = this.volumeOf(volumeId);
    let route = await this.atLeast(volume, page, version);
    if (route.version !== version || route.owner === this.o.self) return { route };
    const byPrimary = handover && from === route.owner;
    // Not the primary's own wish: only after its leases with us ran out (we wait that long at most).
    if (!byPrimary) await this.silenceOf(route.owner);
    route = this.o.catalog.routes(volume).route(page);
    if (route.version !== version) return { route };
    return { route: await this.promote(volume, page, route, byPrimary) };
  }

  /** Wait until `peer`'s leases with us have run out, unless it renews (at most leaseMs + margin). */
  private async silenceOf(peer: string): Promise<void> {
    const { leases } = this.o;
    const waitMs = leases.book.silentAtMs(peer) - leases.now() + 1;
    if (waitMs > 0) await sleep(this.o.env.timers, waitMs);
  }

  /**
   * `recent`: a new primary at epoch `version` asks which grains this copy changed without
   * knowing them acknowledged everywhere. Learn the epoch FIRST (from then on this copy refuses
   * the old primary's changes), wait out changes in flight, then answer.
   */
  private async onRecent(from: string, body: Record<string, unknown>): Promise<{ grains: number[] } | { route: Route }> {
    const { volumeId, page, version } = checkRecent(body);
    const volume = this.volumeOf(volumeId);
    const port = this.o.port(volumeId);
    if (!port) throw new NotFoundError(`volume ${volumeId} is not open on ${this.o.self}`);
    const route = await this.atLeast(volume, page, version);
    if (route.version !== version || route.owner !== from) return { route };
    if (!inSyncOf(route).includes(this.o.self)) throw new ConflictError(`${this.o.self} is not an in-sync copy of page ${page} at epoch ${version}`);
    const pageLba = page * volume.pageBlocks;
    const grains = await port.exclusive(page, pageLba, Math.min(volume.pageBlocks, port.local.blockCount - pageLba), async () => port.recentGrains(page));
    return { grains };
  }

  /** The page's route, read from the catalog first when the asker knows a newer epoch than our table. */
  private async atLeast(volume: VolumeRecord, page: number, version: number): Promise<Route> {
    const known = this.o.catalog.routes(volume).route(page);
    return known.version >= version ? known : this.o.catalog.fetchRoute(volume, page);
  }

  private volumeOf(volumeId: string): VolumeRecord {
    const volume = this.volumes.get(volumeId) ?? this.o.catalog.volumeById(volumeId);
    if (!volume) throw new NotFoundError(`no volume ${volumeId} on ${this.o.self}`);
    this.volumes.set(volumeId, volume);
    return volume;
  }

  /** Hold the page (requests wait) until the returned function is called. */
  private hold(key: string): () => void {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const previous = this.held.get(key);
    // Two holds of one page (a takeover while stepping out cannot happen; a second takeover after the first's reconcile can): chain them.
    const chained = previous ? Promise.all([previous, held]).then(() => undefined) : held;
    this.held.set(key, chained);
    return () => {
      release();
      void chained.then(() => {
        if (this.held.get(key) === chained) this.held.delete(key);
      });
    };
  }
}
