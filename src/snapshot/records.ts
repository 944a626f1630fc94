// Snapshot records in the catalog (DESIGN.md 3, 6): one per volume and snapshot name, under
// snapshots/<volumeId>/<name>, plus a per-volume sequence counter. The sequence number is the
// snapshot's layer id in every peer's store and in forwarded read frames. A record in state
// `taking` belongs to a snapshot being created; `ready` ones are served as read-only targets.
// Deleting the record is how a snapshot is deleted: every peer drops its layer on the watch
// (or at its next start).

import { AlreadyExistsError, ConflictError, InvalidArgumentError } from '../errors';
import type { MetaStore } from '../cluster/metastore';
import { copiesOf, inSyncOf, RouteTable, type Route } from '../routing/table';

export const snapshotPrefix = 'snapshots/';
const seqPrefix = 'snapseq/';

export type SnapshotMode = 'barrier' | 'timestamp';

/** A page being moved at the cut: its pieces [0, done) were on `to`, the rest on `from`. */
export interface MovingAtCut {
  volumeId: string;
  page: number;
  from: string;
  to: string;
  done: number;
  pieceBlocks: number;
  /**
   * `to` reported the page suspect where it froze: it restarted while receiving a replicated
   * page, so its pieces may lack writes it acknowledged without FUA (src/migration/migrator.ts
   * `restarted`). The page's other in-sync copies hold those pieces instead (simulator, seed 32298).
   */
  toSuspect?: boolean;
}

/**
 * A page whose copy on `peer` may lack writes acknowledged before that peer froze it: the page
 * is suspect in its activity log (src/replication/activity.ts: it restarted with the page
 * logged, so unflushed writes may be lost, or a move lost it the primary role), from then until
 * a whole resync trusts it again. Stepping out of the in-sync set takes the catalog, so such a
 * copy may still be in sync, even primary, at the cut: it holds no layer of the page (seeds 8
 * and 92: a primary restarted without a write its secondary kept, snapshotted before it could
 * hand the page over; the two layers differed). Also a copy its primary names (`peer` another
 * peer): a change failed on it and the drop that must follow waits for the catalog, so it is
 * still in sync without the change (seed 138; replicated.ts undroppedCopies).
 */
export interface SuspectAtCut {
  volumeId: string;
  page: number;
  peer: string;
}

/** What a peer reports once its layers froze: the pages it was moving away, and its suspect copies. */
export interface FrozenReport {
  moving: MovingAtCut[];
  suspect: SuspectAtCut[];
}

export interface SnapshotRecord {
  volumeId: string;
  volume: string;
  name: string;
  seq: number;
  mode: SnapshotMode;
  /** Consistency group: snapshots of several volumes taken as one cut. */
  group: string;
  state: 'taking' | 'ready';
  createdAtMs: number;
  /** Longest time any peer held host I/O for this snapshot (barrier mode). */
  heldMs: number;
  /** Milliseconds from the command to the snapshot being ready. */
  tookMs: number;
  /** The volume's size and block size at the cut (the snapshot target's capacity). */
  sizeBytes: number;
  blockBytes: number;
  /** Placement set and the pages that had moved at the cut: where each page's layer lives. */
  peers: string[];
  pageBlocks: number;
  moved: [number, Route][];
  moving: MovingAtCut[];
  /** Copies per page of the volume's placement rule at the cut (catalog.ts VolumeRecord.placedCopies; absent: 1). */
  placedCopies?: number;
  /** Timestamp mode: the cut, a hybrid-clock stamp (src/snapshot/hlc.ts); writes stamped before it are in. */
  cut?: number;
  /**
   * Per page, the copies that took the page's layer from its holders after the cut (a copy
   * stale at the cut and resynced since, a copy built later: layer-sync.ts), in the order they
   * joined; holders after those of the cut. Absent: none.
   */
  joined?: [number, string[]][];
}

const namePattern = /^[a-z0-9][a-z0-9-]{0,63}$/;

export function validateSnapshotName(name: string): void {
  if (!namePattern.test(name)) throw new InvalidArgumentError(`bad snapshot name "${name}": use 1-64 of a-z, 0-9 and '-', starting with a letter or digit`);
}

export function snapshotKey(volumeId: string, name: string): string {
  return `${snapshotPrefix}${volumeId}/${name}`;
}

export function decodeSnapshot(b: Buffer): SnapshotRecord {
  return JSON.parse(b.toString('utf8')) as SnapshotRecord;
}

/** The next sequence number of a volume's snapshots (compare-and-swap on a counter). */
export async function nextSnapshotSeq(meta: MetaStore, volumeId: string): Promise<number> {
  for (let tries = 0; tries < 16; tries++) {
    const current = await meta.get(seqPrefix + volumeId);
    const seq = (current ? Number(current.value.toString()) : 0) + 1;
    try {
      await meta.put(seqPrefix + volumeId, Buffer.from(String(seq)), current?.version ?? 0);
      return seq;
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
    }
  }
  throw new ConflictError(`could not allocate a snapshot number for volume ${volumeId} (too much contention)`);
}

export async function createSnapshotRecord(meta: MetaStore, r: SnapshotRecord): Promise<number> {
  try {
    return (await meta.put(snapshotKey(r.volumeId, r.name), Buffer.from(JSON.stringify(r)), 0)).version;
  } catch (err) {
    if (err instanceof ConflictError) throw new AlreadyExistsError(`volume ${r.volume} already has a snapshot named ${r.name}`);
    throw err;
  }
}

export async function updateSnapshotRecord(meta: MetaStore, r: SnapshotRecord, version: number): Promise<void> {
  await meta.put(snapshotKey(r.volumeId, r.name), Buffer.from(JSON.stringify(r)), version);
}

export async function deleteSnapshotRecord(meta: MetaStore, volumeId: string, name: string): Promise<boolean> {
  const r = await meta.get(snapshotKey(volumeId, name));
  if (!r) return false;
  await meta.delete(r.key, r.version).catch(() => undefined);
  return true;
}

export async function listSnapshotRecords(meta: MetaStore, volumeId?: string): Promise<SnapshotRecord[]> {
  return (await meta.list(volumeId ? `${snapshotPrefix}${volumeId}/` : snapshotPrefix)).map((r) => decodeSnapshot(r.value));
}

/**
 * The peers holding page `page`'s layer of the snapshot, for the blocks from `lba` on (and how
 * many): the primary at the cut first (for a page that was moving, the source or the destination
 * by piece), then the page's other in-sync copies at the cut. Every peer froze its own copy at
 * the cut, and in-sync copies held the same blocks then (barrier: host writes drained; timestamp:
 * copies record replicated writes with the host write's stamp), so any of them serves the page
 * when the first is gone (DESIGN.md 10: a snapshot fails over like its volume). Then the copies
 * that took the page's layer from those after the cut (`joined`).
 */
export function snapshotHolders(r: SnapshotRecord, page: number, lba: number, routes: RouteTable, moving: Map<number, MovingAtCut>): { holders: string[]; blocks: number } {
  const atCut = holdersAtCut(r, page, lba, routes, moving);
  // A copy that joined took the whole page from these holders: it serves every piece of it.
  const joined = (joinedOf(r).get(page) ?? []).filter((p) => !atCut.holders.includes(p));
  return joined.length === 0 ? atCut : { holders: [...atCut.holders, ...joined], blocks: atCut.blocks };
}

/** Each record's `joined` by page, made once (a reader looks up a page per run). */
const joinedByPage = new WeakMap<SnapshotRecord, Map<number, string[]>>();

function joinedOf(r: SnapshotRecord): Map<number, string[]> {
  let byPage = joinedByPage.get(r);
  if (!byPage) joinedByPage.set(r, (byPage = new Map(r.joined ?? [])));
  return byPage;
}

function holdersAtCut(r: SnapshotRecord, page: number, lba: number, routes: RouteTable, moving: Map<number, MovingAtCut>): { holders: string[]; blocks: number } {
  const pageEnd = (page + 1) * r.pageBlocks;
  const route = routes.route(page);
  const inSync = inSyncOf(route);
  // Of a replicated page, only the primary's move counts: a peer that lost the page to another
  // copy (a takeover while it was down) may still report a move it is winding up, whose
  // destination holds old data; the page may have one copy left by then (simulator, seed 1046:
  // its other copy dropped, the old primary's move still reported). Nor the move of a primary
  // left out of the in-sync copies at the cut (suspect where it froze: it restarted and resumed
  // the move before its resync): its pieces may lack acknowledged writes that the in-sync copies
  // hold (seed 631). A page of a one-copy volume has no takeovers: its mover is its owner, whose
  // report stands even if the coordinator's route does not know that move's commit yet.
  const m = moving.get(page);
  const replicated = (r.placedCopies ?? 1) > 1 || copiesOf(route).length > 1;
  if (m && (!replicated || (m.from === route.owner && inSync.includes(m.from)))) {
    const piece = Math.floor((lba - page * r.pageBlocks) / m.pieceBlocks);
    const boundary = page * r.pageBlocks + m.done * m.pieceBlocks;
    const others = inSync.filter((p) => p !== m.from && p !== m.to);
    // A suspect destination's pieces are left to the other in-sync copies (each of them got every
    // write); with none, its copy is the best there is (as its move would commit it: move-machine.ts).
    const first = piece >= m.done ? [m.from] : m.toSuspect && others.length > 0 ? [] : [m.to];
    return { holders: [...first, ...others], blocks: (piece < m.done ? Math.min(boundary, pageEnd) : pageEnd) - lba };
  }
  return { holders: [...inSync], blocks: pageEnd - lba };
}

/** Whether `peer` holds the snapshot's layer of every block of the page (for a page moving at the cut: of every piece). */
export function holdsPage(r: SnapshotRecord, page: number, peer: string, routes: RouteTable, moving: Map<number, MovingAtCut>): boolean {
  for (let at = page * r.pageBlocks; at < (page + 1) * r.pageBlocks; ) {
    const { holders, blocks } = snapshotHolders(r, page, at, routes, moving);
    if (!holders.includes(peer)) return false;
    at += blocks;
  }
  return true;
}

/** `joined` with `peer` added to each of `pages` (a new list; pages in order). */
export function withJoined(joined: readonly [number, string[]][] | undefined, pages: readonly number[], peer: string): [number, string[]][] {
  const byPage = new Map((joined ?? []).map(([page, peers]): [number, string[]] => [page, [...peers]]));
  for (const page of pages) {
    const peers = byPage.get(page) ?? [];
    if (!peers.includes(peer)) byPage.set(page, [...peers, peer]);
  }
  return [...byPage].sort(([a], [b]) => a - b);
}

/**
 * Record that `peer` now holds the snapshot's layer of `pages` (compare-and-swap on the record).
 * False when the snapshot is gone (deleted, or its name reused by a newer one: another seq):
 * nothing is recorded, so a deleted snapshot never comes back.
 */
export async function joinHolders(meta: MetaStore, at: { volumeId: string; name: string; seq: number }, pages: readonly number[], peer: string): Promise<boolean> {
  for (let tries = 0; tries < joinTriesMax; tries++) {
    const current = await meta.get(snapshotKey(at.volumeId, at.name));
    const r = current && decodeSnapshot(current.value);
    if (!current || !r || r.seq !== at.seq || r.state !== 'ready') return false;
    const joined = withJoined(r.joined, pages, peer);
    if (JSON.stringify(joined) === JSON.stringify(r.joined ?? [])) return true;
    try {
      await meta.put(current.key, Buffer.from(JSON.stringify({ ...r, joined })), current.version);
      return true;
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
    }
  }
  throw new ConflictError(`could not record ${peer} as a holder of snapshot ${at.name} (too much contention); it tries again`);
}

/** Compare-and-swap attempts of one join: every copy catching up a page may update the record at once. */
const joinTriesMax = 32;

/**
 * `route` (a page's route at the cut) with its in-sync copies narrowed to those in sync in
 * `other` too (the page's route at another moment of the snapshot: before the first freeze,
 * or after the last FINISH): a copy out of sync at either moment may lack writes its layer
 * needs (a resync that put it back in sync after it froze; a drop for a write stamped before
 * the cut that it never got). The first one alone when none would be left (keepInSync).
 */
export function narrowInSync(route: Route, other: Route): Route {
  return keepInSync(route, (p) => inSyncOf(other).includes(p));
}

/** `route` (a page's route at the cut) without `suspect` among its in-sync copies (SuspectAtCut). The first one alone when none would be left (keepInSync). */
export function withoutSuspects(route: Route, suspect: readonly string[]): Route {
  return keepInSync(route, (p) => !suspect.includes(p));
}

/**
 * When none would be left, the first in-sync copy alone: every copy is in doubt then, and their
 * layers may differ from each other (seed 3662: the primary at the cut, dropped by a takeover
 * after it, held a compare-and-write its secondary never got, and named that copy), while the
 * holders of a page must hold one layer (a reader reads the first; layer-sync.ts gives it to the
 * other copies).
 */
function keepInSync(route: Route, keep: (peer: string) => boolean): Route {
  const inSync = inSyncOf(route);
  const kept = inSync.filter(keep);
  if (kept.length === 0) kept.push(inSync[0]);
  return kept.length === inSync.length ? route : { ...route, inSync: kept };
}

/** The routes of the volume's pages at the cut, as a table (placement rule plus the pages that had changed). */
export function routesAtCut(r: SnapshotRecord): RouteTable {
  return new RouteTable(r.peers, r.pageBlocks, new Map(r.moved), r.placedCopies ?? 1);
}
