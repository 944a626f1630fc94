// A graceful leave (DESIGN.md 11: SIGTERM, `peersan peer stop ID`): a short drain of roles, so a
// planned restart costs hosts no error. In order:
//   1. the peer marks itself `leaving` (CAS of its member record): nothing new is placed there,
//      no peer hands it a role, and its portal redirects every login elsewhere;
//   2. its moves of pages that have an in-sync copy on an `up` peer are cancelled (a page being
//      moved cannot switch roles; it would fail over after the stop instead: a pause of a lease
//      for its hosts); moves of one-copy pages go on and resume from their checkpoints at the
//      next start. Then each page it is primary of whose copy on an `up` peer is in sync gets that copy as its
//      primary (a role switch: one CAS once the page's writes are quiet, no data copied), a few
//      at a time, the roles spread over the in-sync copies (and once more after step 3: a role
//      another peer switched here before it heard of the leave);
//   3. it steps out of the in-sync set of each page it holds a copy of whose primary is up (one
//      CAS per page, as a primary drops a copy that failed it: the primary's writes at the old
//      epoch are refused here and sent again without it, and its dirty grains for this copy
//      start, so the copy resyncs quickly once back). Otherwise each primary would find out by
//      waiting for this copy on its next write to the page: a pause per page for its hosts;
//   4. (the caller) its hosts are asked to log out, then it stops.
// Bounded: after leaveHandoverMs the peer stops anyway (pages not handed over fail over as on a
// crash). A peer handing roles only to `up` peers is why a whole group stopping at once hands
// nothing around: every peer is marked leaving first (stopGroup, src/server/peer.ts).

import type { Logger } from 'pino';
import { within, type Env } from '../env/env';
import { ConflictError } from '../errors';
import { leaveHandoverMs, leaveSwitchesInFlightMax } from '../limits';
import type { Migrator } from '../migration/migrator';
import { dropFromInSync } from '../replication/replicated';
import { inSyncOf, type Route } from '../routing/table';
import type { Catalog } from './catalog';
import type { Members, MemberState } from './members';

export interface RoleHandover {
  volume: string;
  page: number;
  to: string;
}

/** A volume's pages with a copy on the leaving peer, lazily (RouteTable.pagesWith: nothing held per page). */
export interface HeldPages {
  name: string;
  routes: Iterable<readonly [number, Route]>;
}

/**
 * The pages `self` is primary of that an in-sync copy on a placeable peer can take, each with
 * the copy that has taken the fewest roles so far (pure; lazy: the leave takes what its time allows).
 */
export function* rolesToHandOver(self: string, volumes: Iterable<HeldPages>, placeable: readonly string[]): Generator<RoleHandover> {
  const given = new Map<string, number>();
  for (const v of volumes) {
    for (const [page, r] of v.routes) {
      if (r.owner !== self) continue;
      const candidates = inSyncOf(r).filter((p) => p !== self && placeable.includes(p));
      if (candidates.length === 0) continue;
      const to = candidates.reduce((a, b) => ((given.get(b) ?? 0) < (given.get(a) ?? 0) ? b : a));
      given.set(to, (given.get(to) ?? 0) + 1);
      yield { volume: v.name, page, to };
    }
  }
}

export interface LeaveOptions {
  self: string;
  members: Pick<Members, 'setState' | 'get' | 'placeable'>;
  catalog: Pick<Catalog, 'listVolumes' | 'routes' | 'casRoute'>;
  migrator: Pick<Migrator, 'start' | 'list' | 'cancel' | 'wait'>;
  env: Env;
  log: Logger;
  /** Who asked, for the record and the events: "p1 (SIGTERM)". */
  why: string;
  /** Before step 3: this peer asks for no resync any more (Resyncer.stopAsking). */
  stopAsking?(): void;
}

/** Steps 1 and 2 above, within leaveHandoverMs; never throws (a stop goes on whatever happens). */
/** The pages whose in-sync set `self` steps out of (step 3): it is a copy, not the primary, and the primary is up (pure; lazy). */
export function* copiesToStepOutOf(self: string, volumes: Iterable<HeldPages>, placeable: readonly string[]): Generator<{ volume: string; page: number; route: Route }> {
  for (const v of volumes) {
    for (const [page, route] of v.routes) {
      if (route.owner !== self && inSyncOf(route).includes(self) && placeable.includes(route.owner)) yield { volume: v.name, page, route };
    }
  }
}

/**
 * Run `work` over `items` (taken lazily), leaveSwitchesInFlightMax at a time, while `left()` ms
 * remain: how many succeeded, how many were tried, and whether items were left untried.
 */
async function paced<T>(o: Pick<LeaveOptions, 'env'>, items: Iterable<T>, left: () => number, work: (item: T) => Promise<void>): Promise<{ done: number; tried: number; more: boolean }> {
  const it = items[Symbol.iterator]();
  let done = 0;
  let tried = 0;
  let more = true;
  const worker = async (): Promise<void> => {
    while (more && left() > 0) {
      const next = it.next();
      if (next.done) {
        more = false;
        return;
      }
      tried++;
      try {
        await work(next.value);
        done++;
      } catch {
        // Said by `work`'s caller in its count: a role not handed over fails over, a copy not stepped out is dropped by its primary.
      }
    }
  };
  await within(o.env.timers, Promise.all(Array.from({ length: leaveSwitchesInFlightMax }, worker)), Math.max(0, left()));
  return { done, tried, more };
}

export async function leave(o: LeaveOptions): Promise<{ handed: number; kept: number }> {
  const startedMs = o.env.clock.monotonicMs();
  const left = (): number => leaveHandoverMs - (o.env.clock.monotonicMs() - startedMs);
  try {
    const marked = await within(o.env.timers, markLeaving(o), leaveHandoverMs);
    if (!marked) return { handed: 0, kept: 0 };
    await cancelHandOverableMoves(o, left);
    // Walked lazily, once per step: the second walk sees the roles the first handed over.
    // Only pages with another copy can be handed over or stepped out of (RouteTable.sharedPagesWith).
    const volumes = (): HeldPages[] => o.catalog.listVolumes().map((v) => {
      const table = o.catalog.routes(v);
      return { name: v.name, routes: table.sharedPagesWith(o.self, table.pageCount(v.sizeBytes / v.blockBytes)) };
    });
    const handOver = () => paced(o, rolesToHandOver(o.self, volumes(), o.members.placeable()), left, async (h) => {
      await o.migrator.start(h.volume, h.page, h.to).catch((err: Error) => {
        o.log.info({ volume: h.volume, page: h.page, to: h.to, reason: err.message }, 'primary role not handed over before stopping (it fails over instead)');
        throw err;
      });
    });
    const roles = await handOver();
    o.log.info({ handed: roles.done, kept: roles.tried - roles.done, untried: roles.more, ms: o.env.clock.monotonicMs() - startedMs }, 'primary roles handed over before stopping');
    o.stopAsking?.();
    const copies = await paced(o, copiesToStepOutOf(o.self, volumes(), o.members.placeable()), left, async (c) => {
      const volume = o.catalog.listVolumes().find((v) => v.name === c.volume);
      if (volume) await dropFromInSync(o.catalog, volume, c.page, c.route, [o.self]);
    });
    o.log.info({ steppedOut: copies.done, kept: copies.tried - copies.done, untried: copies.more }, 'stepped out of the in-sync sets of the copies held here (their primaries resync them once back)');
    // Another peer may have switched a role here while the first walk ran (it had not heard of
    // this leave yet: a drain's evacuation, the balancer); a step out above that lost its CAS to
    // such a switch left this peer primary. Out of the in-sync sets, this peer can be handed no
    // more roles of those pages (a switch's CAS wants an in-sync copy), and a peer that has heard
    // of the leave hands it none (Migrator.switchRole): one more walk finds the ones that came.
    const late = await handOver();
    if (late.tried > 0) o.log.info({ handed: late.done, kept: late.tried - late.done, untried: late.more }, 'primary roles switched here during the leave handed over too');
    // A role the first walk could not hand over is tried again by the second: kept is what is left.
    const kept = late.tried === 0 && late.more ? roles.tried - roles.done : late.tried - late.done;
    return { handed: roles.done + late.done, kept };
  } catch (err) {
    o.log.warn({ reason: (err as Error).message }, 'graceful leave failed; stopping anyway');
    return { handed: 0, kept: 0 };
  }
}

/** Step 2's first part: this peer's moves of pages another up copy can take the role of are cancelled, and waited for (bounded). */
async function cancelHandOverableMoves(o: LeaveOptions, left: () => number): Promise<void> {
  const placeable = o.members.placeable();
  const cancelled = o.migrator.list().filter((m) => {
    const volume = o.catalog.listVolumes().find((v) => v.id === m.volumeId);
    const route = volume && o.catalog.routes(volume).route(m.page);
    if (!route || !inSyncOf(route).some((p) => p !== o.self && placeable.includes(p))) return false;
    try {
      o.migrator.cancel(m.volumeId, m.page);
      return true;
    } catch {
      return false; // committing: it ends by itself, and step 2 finds the page's new primary
    }
  });
  if (cancelled.length === 0) return;
  await within(o.env.timers, Promise.all(cancelled.map((m) => o.migrator.wait(m.volumeId, m.page).catch(() => undefined))), Math.max(0, left()));
  o.log.info({ moves: cancelled.length }, 'page moves cancelled before stopping: their pages\' roles are handed over instead');
}

/**
 * Step 1: `leaving`, from up or joining. A draining peer stays draining (its restart must not end
 * the drain), a removed one removed; either way it takes no role, as a leaving one.
 */
export async function markLeaving(o: Pick<LeaveOptions, 'self' | 'members' | 'why'>): Promise<true> {
  const leaves = (state: MemberState | undefined): boolean => state === 'up' || state === 'joining';
  if (!leaves(o.members.get(o.self)?.state)) return true;
  await o.members.setState(o.self, 'leaving', o.why, (r) => {
    if (!leaves(r.state)) throw new ConflictError(`peer ${o.self} is ${r.state}`);
  });
  return true;
}
