// The operator's membership commands (DESIGN.md 7, 11): `peersan peer drain | undrain | remove |
// stop ID`. Every state change is a compare-and-swap of the member record (members.ts setState),
// with the refusal checked on the record as it is at that moment; `by` says who asked ("admin via
// p2"). The effects of a state are not here: the peers see the record change through their watch
// (nothing new placed on a draining peer, moves aimed at it cancelled, its hosts redirected and
// asked to log out: src/server/member-effects.ts; its copies moved away by the CopyKeeper).
//
// Refusals (pure, below), each one line:
//   drain   an unknown or removed peer; the last placeable peer; when the other placeable peers
//           lack the space for its copies (how much is missing);
//   remove  while the peer holds a copy (how many pages) or is not drained, unless --force;
//   --force only for a peer that does not answer, and only when no page loses its last in-sync
//           copy (which volume/page would).
//
// remove --force, in order: (1) the peer is marked draining, so nothing new is placed there
// while (2) its copies are taken out of the routes (one CAS per page, as the CopyKeeper takes a
// lost peer's out; the primaries then rebuild the missing copies elsewhere), and only then (3) it
// is marked removed: a route never names a removed peer.

import { ConflictError, InvalidArgumentError, NotFoundError } from '../errors';
import type { SessionInfo } from '../iscsi/portal';
import { changedCopies } from '../replication/placement';
import { wantedCopies } from '../replication/rebuild';
import { copiesOf, inSyncOf, type Route } from '../routing/table';
import { formatBytes, type Catalog, type VolumeRecord } from './catalog';
import type { GroupStatus, PeerStatusView } from './group-status';
import type { MemberRecord, Members, MemberState } from './members';

/** One copy of a page a peer holds. */
/** What `peer` holds, summed over every page of every volume (counts, and an example of each kind for messages). */
export interface Holding {
  /** Pages with a copy on the peer. */
  copies: number;
  /** Among them, those it is primary of, and those whose only in-sync copy it is (removing it loses their data). */
  primaries: number;
  lastInSync: number;
  /** The volumes with a copy there. */
  volumes: string[];
  /** The lowest such page of the first volume that has one, for the refusals' messages. */
  firstPrimary?: PageRef;
  firstLost?: PageRef;
}

export interface PageRef {
  volume: string;
  page: number;
}

/**
 * What `peer` holds, by the routes this peer knows: from each volume's distinct routes (the
 * placement classes and the changed pages, RouteTable.classes), so it costs no time per page.
 * Slice E's CopyKeeper keeps the same answer for its evacuation; this is the one place to swap it in.
 */
export function copiesOn(catalog: Pick<Catalog, 'listVolumes' | 'routes'>, peer: string): Holding {
  const out: Holding = { copies: 0, primaries: 0, lastInSync: 0, volumes: [] };
  const lower = (a: PageRef | undefined, b: PageRef): PageRef => (a && (a.volume !== b.volume || a.page <= b.page) ? a : b);
  for (const v of catalog.listVolumes()) {
    const table = catalog.routes(v);
    let held = false;
    for (const c of table.classes(table.pageCount(v.sizeBytes / v.blockBytes))) {
      if (!copiesOf(c.route).includes(peer)) continue;
      held = true;
      out.copies += c.pages;
      const at = { volume: v.name, page: c.first };
      if (c.route.owner === peer) {
        out.primaries += c.pages;
        out.firstPrimary = lower(out.firstPrimary, at);
      }
      if (inSyncOf(c.route).every((p) => p === peer)) {
        out.lastInSync += c.pages;
        out.firstLost = lower(out.firstLost, at);
      }
    }
    if (held) out.volumes.push(v.name);
  }
  return out;
}

// ---- refusals (pure) ---------------------------------------------------------------------------

/** A member that exists and is not removed. */
function requireMember(id: string, record: MemberRecord | undefined, ids: readonly string[]): MemberRecord {
  if (!record) throw new NotFoundError(`no peer "${id}" in the group (members: ${ids.join(', ') || 'none'})`);
  if (record.state === 'removed') throw new InvalidArgumentError(`peer ${id} was removed from the group (by ${record.changedBy})`);
  return record;
}

export interface DrainSpace {
  /** Bytes the draining peer stores (its copies). */
  heldBytes: number;
  /** Free bytes of the other placeable peers that answer. */
  freeBytes: number;
}

/** Why `id` may not be drained now, thrown; nothing when it may (draining it again is fine). */
export function checkDrain(id: string, record: MemberRecord | undefined, ids: readonly string[], placeable: readonly string[], space: DrainSpace | undefined): void {
  requireMember(id, record, ids);
  const others = placeable.filter((p) => p !== id);
  if (others.length === 0) throw new ConflictError(`peer ${id} is the last placeable peer of the group: its copies would have nowhere to go (start another peer first)`);
  if (space && space.heldBytes > space.freeBytes) {
    throw new ConflictError(`the other peers (${others.join(', ')}) lack ${formatBytes(space.heldBytes - space.freeBytes)} for the copies on ${id} (${formatBytes(space.heldBytes)} held, ${formatBytes(space.freeBytes)} free): add a peer or free space first`);
  }
}

/**
 * Why draining `id` would leave a volume with fewer peers than the copies it keeps, thrown: its
 * copies on `id` could go nowhere (a page's copies are on distinct peers) and the page would stay
 * short of a copy. `volumes`: each volume holding a copy on `id`, with the copies it keeps and
 * the placeable peers of its span (pure).
 */
export function checkDrainCopies(id: string, volumes: readonly { name: string; copies: number; span: readonly string[] }[]): void {
  for (const v of volumes) {
    const rest = v.span.filter((p) => p !== id).length;
    if (rest < v.copies) {
      throw new ConflictError(`volume ${v.name} keeps ${v.copies} copies of each page and would have ${rest} peer(s) for them without ${id}: add a peer first, or lower its copies (peersan volume set ${v.name} --replicas ${Math.max(1, rest)})`);
    }
  }
}

/** Why `id` may not be undrained, thrown. */
export function checkUndrain(id: string, record: MemberRecord | undefined, ids: readonly string[]): void {
  const r = requireMember(id, record, ids);
  if (r.state !== 'draining' && r.state !== 'up') throw new ConflictError(`peer ${id} is ${r.state}, not draining`);
}

/** Why `id` may not be removed, thrown: see the top. `reachable`: the peer answers now. */
export function checkRemove(id: string, record: MemberRecord | undefined, ids: readonly string[], held: Holding, force: boolean, reachable: boolean): void {
  const r = requireMember(id, record, ids);
  if (!force) {
    if (held.copies > 0) {
      throw new ConflictError(`peer ${id} still holds copies of ${held.copies} page(s) (${held.primaries} as primary): drain it first (peersan peer drain ${id} --wait), or --force if it is dead for good`);
    }
    if (r.state !== 'draining') throw new ConflictError(`peer ${id} is ${r.state}: drain it first (peersan peer drain ${id} --wait), then remove it`);
    return;
  }
  if (reachable) throw new ConflictError(`peer ${id} answers: --force is only for a peer that is dead for good; drain it instead (peersan peer drain ${id} --wait)`);
  const lost = held.firstLost;
  if (lost) {
    const more = held.lastInSync > 1 ? ` (and ${held.lastInSync - 1} more page(s))` : '';
    throw new ConflictError(`removing ${id} would lose the last in-sync copy of page ${lost.page} of volume ${lost.volume}${more}: bring ${id} back, or delete that volume first`);
  }
  const primary = held.firstPrimary;
  if (primary) throw new ConflictError(`page ${primary.page} of volume ${primary.volume} still has its primary on ${id}: failover has not promoted another copy yet; try again in a few seconds`);
}

/** The route without `peer`'s copy (never its primary: checkRemove refused that). */
export function withoutCopy(now: Route, peer: string): Omit<Route, 'version'> {
  if (now.owner === peer) throw new ConflictError(`the primary of the page is still ${peer}`);
  return changedCopies(now, [], [peer]);
}

// ---- drain progress ----------------------------------------------------------------------------

export interface PinnedSession {
  tsih: number;
  initiatorName: string;
  targetName: string;
}

export interface DrainProgress {
  peer: string;
  state: MemberState;
  changedBy: string;
  /** Pages with a copy on the peer, and among them those it is primary of. */
  copies: number;
  primaries: number;
  /** Host sessions still logged in on it (Normal), and those a SCSI reservation pins there (left for the operator). */
  sessions: number;
  pinned: PinnedSession[];
  /** The peer answers (its sessions are known). */
  reachable: boolean;
  /** Nothing left that the drain moves: no copy, no session but the pinned ones. */
  done: boolean;
}

/** Progress of a drain from the copies held and the peer's status (pure). */
export function drainProgressOf(record: MemberRecord, held: Holding, status: PeerStatusView | undefined, pinned: (s: SessionInfo) => boolean): DrainProgress {
  const sessions = status?.up ? status.sessions.filter((s) => s.sessionType === 'Normal') : [];
  const pins = sessions.filter(pinned).map((s) => ({ tsih: s.tsih, initiatorName: s.initiatorName, targetName: s.targetName }));
  return {
    peer: record.id, state: record.state, changedBy: record.changedBy,
    copies: held.copies, primaries: held.primaries,
    sessions: sessions.length, pinned: pins, reachable: status?.up === true,
    done: held.copies === 0 && sessions.length === pins.length,
  };
}

// ---- the admin operations ----------------------------------------------------------------------

export interface MembershipAdmin {
  drainPeer(id: string): Promise<DrainProgress>;
  undrainPeer(id: string): Promise<MemberRecord>;
  removePeer(id: string, force: boolean): Promise<MemberRecord>;
  /** Only the peer itself: it marks itself leaving and stops (a graceful leave). */
  stopPeer(id: string): Promise<MemberRecord>;
  drainProgress(id: string): Promise<DrainProgress>;
}

export interface MembershipAdminOptions {
  self: string;
  members: Pick<Members, 'get' | 'ids' | 'placeable' | 'setState'>;
  catalog: Pick<Catalog, 'listVolumes' | 'routes' | 'fetchRoute' | 'casRoute' | 'volume' | 'spanOf'>;
  group: Pick<GroupStatus, 'status'>;
  /** A session of `peer` is pinned there by a SCSI reservation (host-balance-wiring.ts). */
  pinned(peer: string, session: SessionInfo): boolean;
  /** This peer's graceful stop (leave, then stop), started now; the reply goes out first. */
  requestStop(): void;
}

export function membershipAdmin(o: MembershipAdminOptions): MembershipAdmin {
  const { self, members, catalog } = o;
  const by = `admin via ${self}`;
  const statusOf = async (id: string): Promise<{ target: PeerStatusView | undefined; peers: PeerStatusView[] }> => {
    const peers = (await o.group.status()).peers;
    return { target: peers.find((p) => p.id === id), peers };
  };
  const progress = async (record: MemberRecord): Promise<DrainProgress> =>
    drainProgressOf(record, copiesOn(catalog, record.id), (await statusOf(record.id)).target, (s) => o.pinned(record.id, s));

  return {
    async drainPeer(id) {
      const { target, peers } = await statusOf(id);
      const placeable = members.placeable();
      const others = peers.filter((p) => p.id !== id && p.up && placeable.includes(p.id));
      const space = target?.up ? { heldBytes: target.allocatedBytes, freeBytes: others.reduce((n, p) => n + p.freeBytes, 0) } : undefined;
      checkDrain(id, members.get(id), members.ids(), placeable, space);
      const held = new Set(copiesOn(catalog, id).volumes);
      checkDrainCopies(id, catalog.listVolumes().filter((v) => held.has(v.name)).map((v) => ({ name: v.name, copies: wantedCopies(v, catalog.spanOf(v)), span: catalog.spanOf(v) })));
      const r = await members.setState(id, 'draining', by, (now) => checkDrain(id, now, members.ids(), members.placeable(), undefined));
      return progress(r);
    },
    async undrainPeer(id) {
      return members.setState(id, 'up', by, (now) => checkUndrain(id, now, members.ids()));
    },
    async removePeer(id, force) {
      const reachable = (await statusOf(id)).target?.up === true;
      const check = (now: MemberRecord | undefined): void => checkRemove(id, now, members.ids(), copiesOn(catalog, id), force, reachable);
      check(members.get(id));
      if (force) {
        await members.setState(id, 'draining', by, check);
        await dropCopies(catalog, id);
      }
      return members.setState(id, 'removed', by, check);
    },
    async stopPeer(id) {
      if (id !== self) throw new InvalidArgumentError(`peer stop goes to the peer itself: this is ${self}, not ${id}`);
      const r = await members.setState(id, 'leaving', `${by} (peer stop)`, (now) => requireMember(id, now, members.ids()));
      o.requestStop();
      return r;
    },
    async drainProgress(id) {
      return progress(requireMember(id, members.get(id), members.ids()));
    },
  };
}

/** Take a dead peer's copies out of every route that names it (one CAS per page; a conflict is read again). */
async function dropCopies(catalog: Pick<Catalog, 'listVolumes' | 'routes' | 'fetchRoute' | 'casRoute' | 'volume'>, peer: string): Promise<void> {
  // One CAS per page that names it: walked lazily (nothing held per page), each page read again before its CAS.
  for (const v of catalog.listVolumes()) {
    const table = catalog.routes(v);
    for (const [page] of table.pagesWith(peer, table.pageCount(v.sizeBytes / v.blockBytes))) {
      const volume = catalog.volume(v.name);
      if (volume) await dropCopy(catalog, volume, page, peer);
    }
  }
}

/** Routes change under us (failover, the keeper): a few tries, each on the catalog's record. */
const dropTriesMax = 3;

async function dropCopy(catalog: Pick<Catalog, 'fetchRoute' | 'casRoute'>, volume: VolumeRecord, page: number, peer: string): Promise<void> {
  for (let i = 1; ; i++) {
    const route = await catalog.fetchRoute(volume, page);
    if (!copiesOf(route).includes(peer)) return;
    try {
      await catalog.casRoute(volume, page, route, (now) => withoutCopy(now, peer));
      return;
    } catch (err) {
      if (!(err instanceof ConflictError) || i >= dropTriesMax) throw err;
    }
  }
}
