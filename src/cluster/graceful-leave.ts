// A graceful leave (DESIGN.md 11: SIGTERM, `peersan peer stop ID`): a short drain of roles, so a
// planned restart costs hosts no error. In order:
//   1. the peer marks itself `leaving` (CAS of its member record): nothing new is placed there,
//      no peer hands it a role, and its portal redirects every login elsewhere;
//   2. each page it is primary of whose copy on an `up` peer is in sync gets that copy as its
//      primary (a role switch: one CAS once the page's writes are quiet, no data copied), a few
//      at a time, the roles spread over the in-sync copies;
//   3. (the caller) its hosts are asked to log out, then it stops.
// Bounded: after leaveHandoverMs the peer stops anyway (pages not handed over fail over as on a
// crash). A peer handing roles only to `up` peers is why a whole group stopping at once hands
// nothing around: every peer is marked leaving first (stopGroup, src/server/peer.ts).

import type { Logger } from 'pino';
import { within, type Env } from '../env/env';
import { ConflictError } from '../errors';
import { leaveHandoverMs, leaveSwitchesInFlightMax } from '../limits';
import type { Migrator } from '../migration/migrator';
import { inSyncOf, type Route } from '../routing/table';
import type { Catalog } from './catalog';
import type { Members, MemberState } from './members';

export interface RoleHandover {
  volume: string;
  page: number;
  to: string;
}

/**
 * The pages `self` is primary of that an in-sync copy on a placeable peer can take, each with
 * the copy that has taken the fewest roles so far (pure).
 */
export function rolesToHandOver(self: string, volumes: readonly { name: string; routes: readonly Route[] }[], placeable: readonly string[]): RoleHandover[] {
  const given = new Map<string, number>();
  const out: RoleHandover[] = [];
  for (const v of volumes) {
    v.routes.forEach((r, page) => {
      if (r.owner !== self) return;
      const candidates = inSyncOf(r).filter((p) => p !== self && placeable.includes(p));
      if (candidates.length === 0) return;
      const to = candidates.reduce((a, b) => ((given.get(b) ?? 0) < (given.get(a) ?? 0) ? b : a));
      given.set(to, (given.get(to) ?? 0) + 1);
      out.push({ volume: v.name, page, to });
    });
  }
  return out;
}

export interface LeaveOptions {
  self: string;
  members: Pick<Members, 'setState' | 'get' | 'placeable'>;
  catalog: Pick<Catalog, 'listVolumes' | 'routes'>;
  migrator: Pick<Migrator, 'start'>;
  env: Env;
  log: Logger;
  /** Who asked, for the record and the events: "p1 (SIGTERM)". */
  why: string;
}

/** Steps 1 and 2 above, within leaveHandoverMs; never throws (a stop goes on whatever happens). */
export async function leave(o: LeaveOptions): Promise<{ handed: number; kept: number }> {
  const startedMs = o.env.clock.monotonicMs();
  const left = (): number => leaveHandoverMs - (o.env.clock.monotonicMs() - startedMs);
  try {
    const marked = await within(o.env.timers, markLeaving(o), leaveHandoverMs);
    if (!marked) return { handed: 0, kept: 0 };
    const plan = rolesToHandOver(o.self, o.catalog.listVolumes().map((v) => ({ name: v.name, routes: o.catalog.routes(v).owners(v.sizeBytes / v.blockBytes) })), o.members.placeable());
    let handed = 0;
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < plan.length && left() > 0) {
        const h = plan[next++];
        try {
          await o.migrator.start(h.volume, h.page, h.to);
          handed++;
        } catch (err) {
          o.log.info({ volume: h.volume, page: h.page, to: h.to, reason: (err as Error).message }, 'primary role not handed over before stopping (it fails over instead)');
        }
      }
    };
    const workers = Array.from({ length: Math.min(leaveSwitchesInFlightMax, plan.length) }, worker);
    await within(o.env.timers, Promise.all(workers), Math.max(0, left()));
    o.log.info({ handed, kept: plan.length - handed, ms: o.env.clock.monotonicMs() - startedMs }, 'primary roles handed over before stopping');
    return { handed, kept: plan.length - handed };
  } catch (err) {
    o.log.warn({ reason: (err as Error).message }, 'graceful leave failed; stopping anyway');
    return { handed: 0, kept: 0 };
  }
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
