// The admin operations on volumes (create, list, show, delete, resize, access, page map): the
// catalog records the change, then this peer's iSCSI target is made to reflect it before the
// caller hears back, so a host that logs in to this peer right after "created" finds the
// target. The other peers follow the catalog's watch on their own.

import type { Logger } from 'pino';
import { InvalidArgumentError } from '../errors';
import type { SessionInfo } from '../iscsi/portal';
import { targetNameFor } from '../iscsi/target';
import type { Protection, ProtectionState } from '../replication/protection';
import { pageMapChangedMax, pageMapPagesMax } from '../limits';
import { copiesOf, inSyncOf, type Route, type RouteTable } from '../routing/table';
import type { Catalog, ChapSettings, CreateVolumeInput, VolumeRecord } from './catalog';
import type { GroupStatus } from './group-status';

export interface VolumeView {
  name: string;
  id: string;
  sizeBytes: number;
  blockBytes: number;
  allow: string[];
  chapEnabled: boolean;
  chapUser: string;
  mutualChap: boolean;
  allocatedBytes: number;
  targetName: string;
  sessions: number;
  createdAtMs: number;
  version: number;
  peers: string[];
  /** Copies asked per page (src/replication). */
  replicas: number;
  /** healthy, degraded, rebuilding or unavailable, with its counts (src/replication/protection.ts); absent when not computed. */
  protection?: ProtectionState;
  protectionDetail?: Protection;
}

/** One page's route. owner: the primary; copies: every peer holding a copy, primary first; inSync: the copies with every acknowledged write. */
export interface PageRouteView {
  page: number;
  owner: string;
  version: number;
  copies: string[];
  inSync: string[];
}

/**
 * A volume's page map, bounded whatever its size (a 64 TiB volume has 16 M pages): the summary
 * (the placement rule, counts per peer, the pages whose route changed since placement, the lowest
 * of them listed) and the detail of one range of pages, at most pageMapPagesMax.
 */
export interface PageMapView {
  volume: string;
  pageBlocks: number;
  /** The placement set: page i starts on peers[i % n] and the next replicas - 1 of them. */
  peers: string[];
  replicas: number;
  totalPages: number;
  /** Per peer of the placement set or of a changed route: pages it is primary of, pages it holds a copy of. */
  perPeer: { peer: string; primaries: number; copies: number }[];
  /** Pages whose route changed since placement, and the lowest pageMapChangedMax of them. */
  changedPages: number;
  changed: PageRouteView[];
  /** The detail: pages [from, from + count). */
  from: number;
  count: number;
  pages: PageRouteView[];
  /** The first page after the detail when the volume goes on (ask again from there). */
  next?: number;
}

/** Which pages a page map details; absent: from 0, as many as pageMapPagesMax. */
export interface PageRange {
  from?: number;
  count?: number;
}

export interface VolumeAdmin {
  createVolume(input: CreateVolumeInput): Promise<VolumeView>;
  listVolumes(): Promise<VolumeView[]>;
  getVolume(name: string): Promise<VolumeView>;
  /** Refused while hosts are logged in anywhere in the group, unless forced. */
  deleteVolume(name: string, force: boolean): Promise<void>;
  resizeVolume(name: string, size: string): Promise<VolumeView>;
  /** Change who may log in (allow list, CHAP). Sessions already in stay. */
  setVolumeAccess(name: string, access: { allow: string[]; chap?: ChapSettings | null }): Promise<VolumeView>;
  pageMap(name: string, range?: PageRange): Promise<PageMapView>;
}

export interface VolumeAdminOptions {
  catalog: Catalog;
  /** This peer's iSCSI targets (server/targets.ts): `apply` resolves once the target reflects the record. */
  targets: { apply(name: string, record: VolumeRecord | undefined): Promise<void>; allocatedBytes(volumeName: string): number };
  /** Sessions logged in through this peer (a volume's view counts them). */
  localSessions(): SessionInfo[];
  group: Pick<GroupStatus, 'sessions'>;
  log: Logger;
  /** The volume's protection as this peer sees it (src/replication/admin.ts); absent: not shown. */
  protection?(record: VolumeRecord): Protection;
}

export function volumeAdmin(o: VolumeAdminOptions): VolumeAdmin {
  const { catalog, targets, log } = o;
  const view = (v: VolumeRecord): VolumeView => ({
    name: v.name, id: v.id, sizeBytes: v.sizeBytes, blockBytes: v.blockBytes, allow: v.allow,
    chapEnabled: v.chap !== undefined, chapUser: v.chap?.user ?? '', mutualChap: v.chap?.mutualUser !== undefined,
    allocatedBytes: targets.allocatedBytes(v.name), targetName: targetNameFor(v.name),
    sessions: o.localSessions().filter((s) => s.targetName === targetNameFor(v.name)).length,
    createdAtMs: v.createdAtMs, version: v.version, peers: v.peers, replicas: v.replicas ?? 1,
    ...(o.protection ? protectionFields(o.protection(v)) : {}),
  });
  const applied = async (record: VolumeRecord): Promise<VolumeView> => {
    await targets.apply(record.name, record);
    return view(record);
  };
  return {
    createVolume: async (input) => applied(await catalog.createVolume(input)),
    listVolumes: async () => catalog.listVolumes().map(view),
    getVolume: async (name) => view(catalog.require(name)),
    resizeVolume: async (name, size) => applied(await catalog.resizeVolume(name, size)),
    async deleteVolume(name, force) {
      const record = catalog.require(name);
      const target = targetNameFor(name);
      const holders = (await o.group.sessions()).filter((x) => x.session.targetName === target).map((x) => x.peer);
      if (holders.length > 0 && !force) {
        throw new InvalidArgumentError(`volume ${name} has ${holders.length} session(s) logged in (through ${[...new Set(holders)].join(', ')}); log them out first or use --force`);
      }
      await catalog.deleteVolume(name);
      await targets.apply(name, undefined);
      log.info({ volume: name, id: record.id, force }, 'volume deleted by admin');
    },
    async setVolumeAccess(name, access) {
      const record = await catalog.setAccess(name, access);
      const v = await applied(record);
      log.info({ volume: name, allow: record.allow.length, chap: record.chap !== undefined }, 'volume access changed by admin');
      return v;
    },
    async pageMap(name, range) {
      return pageMapOf(catalog.require(name), catalog.routes(catalog.require(name)), range);
    },
  };
}

/** A volume's page map (see PageMapView): costs the peers, the changed pages and the range asked, never the whole volume (pure). */
export function pageMapOf(v: VolumeRecord, table: RouteTable, range: PageRange = {}): PageMapView {
  const totalPages = table.pageCount(v.sizeBytes / v.blockBytes);
  const from = range.from ?? 0;
  const asked = range.count ?? pageMapPagesMax;
  if (!Number.isInteger(from) || from < 0 || from >= Math.max(1, totalPages)) throw new InvalidArgumentError(`--from must be a page of the volume, 0 to ${totalPages - 1} (got ${from})`);
  if (!Number.isInteger(asked) || asked < 1 || asked > pageMapPagesMax) throw new InvalidArgumentError(`--count must be 1 to ${pageMapPagesMax} pages (got ${asked})`);
  const count = Math.min(asked, totalPages - from);
  const perPeer = new Map<string, { peer: string; primaries: number; copies: number }>(table.peers.map((p) => [p, { peer: p, primaries: 0, copies: 0 }]));
  const at = (p: string): { peer: string; primaries: number; copies: number } => perPeer.get(p) ?? perPeer.set(p, { peer: p, primaries: 0, copies: 0 }).get(p)!;
  for (const c of table.classes(totalPages)) {
    at(c.route.owner).primaries += c.pages;
    for (const p of copiesOf(c.route)) at(p).copies += c.pages;
  }
  const changedAll = [...table.changed()].filter(([page]) => page < totalPages);
  const changed = changedAll.sort((a, b) => a[0] - b[0]).slice(0, pageMapChangedMax).map(([page, r]) => routeView(page, r));
  const next = from + count < totalPages ? from + count : undefined;
  return {
    volume: v.name, pageBlocks: v.pageBlocks, peers: v.peers, replicas: table.copyCount, totalPages,
    perPeer: [...perPeer.values()], changedPages: changedAll.length, changed,
    from, count, pages: table.routesIn(from, count).map((r, i) => routeView(from + i, r)),
    ...(next !== undefined ? { next } : {}),
  };
}

function routeView(page: number, r: Route): PageRouteView {
  return { page, owner: r.owner, version: r.version, copies: [...copiesOf(r)], inSync: [...inSyncOf(r)] };
}

function protectionFields(p: Protection): Pick<VolumeView, 'protection' | 'protectionDetail'> {
  return { protection: p.state, protectionDetail: p };
}
