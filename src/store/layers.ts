// Copy-on-write snapshot layers of one volume in the page store: the bookkeeping, with no
// file I/O (StoreVolume in page-store.ts moves the bytes and owns the locks).
//
// Model (oldest snapshot S1 … newest Sn, then the live layer on top):
// - The volume has a current epoch E. `snapshot` records "Sk = epoch E" and bumps E: O(1),
//   nothing is copied or walked.
// - Every live grain remembers the epoch its slot was written in (`born`). born > epoch(Sn)
//   means only live references the slot: writes go in place (the common path, one compare).
//   born <= epoch(Sn) means Sn sees the grain through live: the write goes to a new slot
//   (a partial-grain write merges the old grain's bytes first) and the old slot (or -1,
//   "zeros", when the grain was unmapped) becomes Sn's *exception* for the grain, unless Sn
//   already has one (after a restore). UNMAP of such a grain does the same.
// - Exceptions of Sk = where Sk's view differs from the layer above it (Sk+1, …, live).
//   Reading Sk, grain g: the first exception for g among Sk, Sk+1, …, Sn; else the live
//   slot. Snapshot space = its exceptions; copy-on-write copies one grain (64 KiB).
// - Invariant: if a snapshot exists and born > epoch(Sn), Sn has an exception for the grain
//   (the change that made born > epoch(Sn) put one there, and deleting Sn moves its
//   exceptions down). So treating an unknown born as 0 (legacy maps, pages whose map was
//   deleted because every grain was unmapped) is always safe, only sometimes one copy more.
// - Slots are shared after a restore (live and an exception point at one slot), so slots
//   have reference counts: 1 implicitly, `extraRefs` for the rare slots with more. A slot is
//   released when its last reference goes; the caller frees it only after the maps without
//   it are durable (the store's ordering rule).
// - deleteSnapshot(Sk): each exception of Sk moves to Sk-1 when Sk-1 has none for that
//   grain (Sk-1 was reading through it), else it is dropped (slot released at refcount 0).
// - restore(Sk) (driven by StoreVolume): for each grain whose live slot differs from Sk's
//   view, the old live slot is retired into Sn as by a write, live points at Sk's slot (one
//   more reference) with born = 0, so the next write copies it again.
//
// Persistence (LevelDB, next to the live maps `map/<vol>/<page>`):
//   layer/<vol>/epoch                     current epoch (u32 LE)
//   layer/<vol>/snap/<epoch:8 hex>        snapshot record (JSON {id, epoch, createdMs})
//   layer/<vol>/exc/<epoch:8 hex>/<page:12 hex>   Int32Array[grainsPerPage]: slot, -1 zeros, -2 none
// Ordering: a snapshot record is written (synced) after an fdatasync of the data file, so
// everything acknowledged before it is durable with it. An exception page is written in the
// same batch as, or before, the live map that stops pointing at the old slot (never after):
// an exception persisted early is harmless (it names the slot live still names; on reload
// that slot simply has two references).

import { AlreadyExistsError, InvalidArgumentError, NotFoundError } from '../errors';
import { snapshotIdBytesMax, snapshotsPerVolumeMax } from '../limits';
import type { KvOp, MediaKv } from './media';

/** In an exception map: no exception for this grain (read through the layer above). */
export const noException = -2;

export interface SnapshotRecord {
  id: string;
  /** The epoch the snapshot froze: live slots born at or before it are its view. */
  epoch: number;
  createdMs: number;
}

export type LayerOp = KvOp;

const hex = (n: number, width: number): string => n.toString(16).padStart(width, '0');

export const layerPrefix = (volumeId: string): string => `layer/${volumeId}/`;
const epochKey = (volumeId: string): string => `${layerPrefix(volumeId)}epoch`;
const snapPrefix = (volumeId: string): string => `${layerPrefix(volumeId)}snap/`;
const snapKey = (volumeId: string, epoch: number): string => `${snapPrefix(volumeId)}${hex(epoch, 8)}`;
const excPrefix = (volumeId: string): string => `${layerPrefix(volumeId)}exc/`;
const excKey = (volumeId: string, epoch: number, page: number): string => `${excPrefix(volumeId)}${hex(epoch, 8)}/${hex(page, 12)}`;

export function checkSnapshotId(id: string): void {
  if (typeof id !== 'string' || !/^[A-Za-z0-9._:-]+$/.test(id) || Buffer.byteLength(id) > snapshotIdBytesMax) {
    throw new InvalidArgumentError(`bad snapshot id ${JSON.stringify(id)}: 1 to ${snapshotIdBytesMax} of A-Z a-z 0-9 . _ : -`);
  }
}

/** What loading reads of the store's KV. */
export type LayerIterator = Pick<MediaKv, 'iterator' | 'get'>;

export class VolumeLayers {
  private readonly volumeId: string;
  private readonly grainsPerPage: number;
  /** Current epoch: live slots written now are born in it. Starts at 1 (0 = "before any snapshot"). */
  epoch = 1;
  /** Oldest first; epochs strictly increasing. */
  readonly snapshots: SnapshotRecord[] = [];
  /** snapshot epoch → page → exception map (noException, -1 zeros, or a slot). */
  private readonly exceptions = new Map<number, Map<number, Int32Array>>();
  /** References beyond the first, for the few slots shared by several layers. */
  private readonly extraRefs = new Map<number, number>();
  /** Exception pages changed in memory and not yet handed to LevelDB: "epoch/page". */
  private readonly dirty = new Map<string, { epoch: number; page: number }>();

  constructor(volumeId: string, grainsPerPage: number) {
    this.volumeId = volumeId;
    this.grainsPerPage = grainsPerPage;
  }

  /** Epoch of the newest snapshot, -1 without snapshots: live grains born at or before it are copied on write. */
  get newestEpoch(): number {
    return this.snapshots.length === 0 ? -1 : this.snapshots[this.snapshots.length - 1].epoch;
  }

  // ---- loading -------------------------------------------------------------------------------

  /** Reads records and exception maps; calls `onSlot` for every slot an exception references. */
  async load(db: LayerIterator, onSlot: (slot: number) => void): Promise<void> {
    const epoch = await db.get(epochKey(this.volumeId));
    if (epoch) this.epoch = epoch.readUInt32LE(0);
    for await (const [, value] of db.iterator({ gte: snapPrefix(this.volumeId), lt: `${snapPrefix(this.volumeId)}\xff` })) {
      this.snapshots.push(JSON.parse(value.toString()) as SnapshotRecord);
    }
    this.snapshots.sort((a, b) => a.epoch - b.epoch);
    const known = new Set(this.snapshots.map((s) => s.epoch));
    for await (const [key, value] of db.iterator({ gte: excPrefix(this.volumeId), lt: `${excPrefix(this.volumeId)}\xff` })) {
      const [epochHex, pageHex] = key.slice(excPrefix(this.volumeId).length).split('/');
      const snapEpoch = parseInt(epochHex, 16);
      // A snapshot whose record is gone was deleted; its batch removed the exceptions too, so this
      // cannot happen short of a broken store: refuse rather than leak or misread.
      if (!known.has(snapEpoch)) throw new Error(`store: exceptions of unknown snapshot epoch ${snapEpoch} in volume ${this.volumeId}`);
      const map = new Int32Array(this.grainsPerPage).fill(noException);
      map.set(new Int32Array(value.buffer.slice(value.byteOffset, value.byteOffset + value.length)).subarray(0, this.grainsPerPage));
      this.pagesOf(snapEpoch, true).set(parseInt(pageHex, 16), map);
      for (const slot of map) if (slot >= 0) onSlot(slot);
    }
  }

  /** Called by the loader for a slot seen a second (third, …) time. */
  addLoadedRef(slot: number): void {
    this.incref(slot);
  }

  // ---- snapshots -----------------------------------------------------------------------------

  indexOf(id: string): number {
    const k = this.snapshots.findIndex((s) => s.id === id);
    if (k < 0) throw new NotFoundError(`no snapshot ${id} in volume ${this.volumeId}`);
    return k;
  }

  /** The batch that records a new snapshot of the current epoch; apply with `addSnapshot` once durable. */
  snapshotOps(id: string, createdMs: number): { record: SnapshotRecord; ops: LayerOp[] } {
    checkSnapshotId(id);
    if (this.snapshots.some((s) => s.id === id)) throw new AlreadyExistsError(`snapshot ${id} exists in volume ${this.volumeId}`);
    if (this.snapshots.length >= snapshotsPerVolumeMax) throw new InvalidArgumentError(`volume ${this.volumeId} has ${snapshotsPerVolumeMax} snapshots, the most it may have`);
    const record: SnapshotRecord = { id, epoch: this.epoch, createdMs };
    const next = Buffer.alloc(4);
    next.writeUInt32LE(this.epoch + 1, 0);
    return {
      record,
      ops: [
        { type: 'put', key: snapKey(this.volumeId, record.epoch), value: Buffer.from(JSON.stringify(record)) },
        { type: 'put', key: epochKey(this.volumeId), value: next },
      ],
    };
  }

  addSnapshot(record: SnapshotRecord): void {
    if (record.epoch !== this.epoch) throw new Error('store: snapshot of a stale epoch');
    this.snapshots.push(record);
    this.epoch++;
  }

  /**
   * Drop snapshot k from memory; returns the batch that makes it durable and the slots whose
   * last reference went (free them only after the batch is durable).
   */
  deleteSnapshot(k: number): { ops: LayerOp[]; released: number[] } {
    const record = this.snapshots[k];
    const older = k > 0 ? this.snapshots[k - 1] : undefined;
    const ops: LayerOp[] = [];
    const released: number[] = [];
    for (const [page, exc] of this.exceptions.get(record.epoch) ?? []) {
      let olderExc = older ? this.exceptions.get(older.epoch)?.get(page) : undefined;
      for (let i = 0; i < exc.length; i++) {
        const slot = exc[i];
        if (slot === noException) continue;
        if (older && (olderExc === undefined || olderExc[i] === noException)) {
          // The older snapshot was reading this grain through k: it inherits the exception.
          olderExc ??= this.exceptionMap(older.epoch, page);
          olderExc[i] = slot;
          this.markDirty(older.epoch, page);
        } else if (this.decref(slot)) {
          released.push(slot);
        }
      }
      ops.push({ type: 'del', key: excKey(this.volumeId, record.epoch, page) });
      this.dirty.delete(`${record.epoch}/${page}`);
    }
    this.exceptions.delete(record.epoch);
    this.snapshots.splice(k, 1);
    ops.push({ type: 'del', key: snapKey(this.volumeId, record.epoch) }, ...this.takeDirtyOps());
    return { ops, released };
  }

  // ---- grains --------------------------------------------------------------------------------

  /**
   * Live grain `grain` (slot `oldSlot`, -1 when unmapped) is about to change while the newest
   * snapshot may see it through live. Returns the slot released by the change, or -1.
   */
  retire(grain: number, oldSlot: number): number {
    const newest = this.snapshots[this.snapshots.length - 1];
    const page = Math.floor(grain / this.grainsPerPage);
    const i = grain % this.grainsPerPage;
    const exc = this.exceptionMap(newest.epoch, page);
    if (exc[i] === noException) {
      exc[i] = oldSlot; // live's reference moves to the exception
      this.markDirty(newest.epoch, page);
      return -1;
    }
    return this.decref(oldSlot) ? oldSlot : -1;
  }

  /** Snapshot k's slot for a grain (-1: zeros), given the live slot. */
  resolve(k: number, grain: number, liveSlot: number): number {
    const page = Math.floor(grain / this.grainsPerPage);
    const i = grain % this.grainsPerPage;
    for (let j = k; j < this.snapshots.length; j++) {
      const exc = this.exceptions.get(this.snapshots[j].epoch)?.get(page);
      if (exc !== undefined && exc[i] !== noException) return exc[i];
    }
    return liveSlot;
  }

  incref(slot: number): void {
    if (slot >= 0) this.extraRefs.set(slot, (this.extraRefs.get(slot) ?? 0) + 1);
  }

  /** True when that was the slot's last reference. */
  decref(slot: number): boolean {
    if (slot < 0) return false;
    const extra = this.extraRefs.get(slot);
    if (extra === undefined) return true;
    if (extra === 1) this.extraRefs.delete(slot);
    else this.extraRefs.set(slot, extra - 1);
    return false;
  }

  refs(slot: number): number {
    return slot < 0 ? 0 : 1 + (this.extraRefs.get(slot) ?? 0);
  }

  /** Pages for which snapshots k … newest hold exceptions. */
  pagesFrom(k: number): Set<number> {
    const pages = new Set<number>();
    for (let j = k; j < this.snapshots.length; j++) for (const page of this.exceptions.get(this.snapshots[j].epoch)?.keys() ?? []) pages.add(page);
    return pages;
  }

  /** Snapshot k's exception map for a page, if it has one (do not modify). */
  exceptionsOf(k: number, page: number): Int32Array | undefined {
    return this.exceptions.get(this.snapshots[k].epoch)?.get(page);
  }

  /** Set snapshot k's exception for a grain (import); the slot's reference is the caller's. */
  setException(k: number, grain: number, slot: number): void {
    const epoch = this.snapshots[k].epoch;
    const page = Math.floor(grain / this.grainsPerPage);
    this.exceptionMap(epoch, page)[grain % this.grainsPerPage] = slot;
    this.markDirty(epoch, page);
  }

  /** Remove every exception of one page (page dropped or replaced); returns the released slots. */
  dropPage(page: number): number[] {
    const released: number[] = [];
    for (const s of this.snapshots) {
      const exc = this.exceptions.get(s.epoch)?.get(page);
      if (!exc) continue;
      for (const slot of exc) if (this.decref(slot)) released.push(slot);
      exc.fill(noException);
      this.markDirty(s.epoch, page);
    }
    return released;
  }

  /** Unique bytes per snapshot: what deleting it would free now. */
  uniqueGrains(k: number): number {
    const record = this.snapshots[k];
    const older = k > 0 ? this.snapshots[k - 1] : undefined;
    let n = 0;
    for (const [page, exc] of this.exceptions.get(record.epoch) ?? []) {
      const olderExc = older ? this.exceptions.get(older.epoch)?.get(page) : undefined;
      for (let i = 0; i < exc.length; i++) {
        const slot = exc[i];
        if (slot < 0 || this.refs(slot) > 1) continue;
        if (older && (olderExc === undefined || olderExc[i] === noException)) continue;
        n++;
      }
    }
    return n;
  }

  /** Exceptions of snapshot k (grains whose view differs from the layer above). */
  exceptionGrains(k: number): number {
    let n = 0;
    for (const exc of this.exceptions.get(this.snapshots[k].epoch)?.values() ?? []) for (const slot of exc) if (slot !== noException) n++;
    return n;
  }

  // ---- persistence ---------------------------------------------------------------------------

  /** Ops for every exception page changed since the last call (each encoded as it is now). */
  takeDirtyOps(): LayerOp[] {
    if (this.dirty.size === 0) return [];
    const ops: LayerOp[] = [];
    for (const { epoch, page } of this.dirty.values()) {
      const key = excKey(this.volumeId, epoch, page);
      const exc = this.exceptions.get(epoch)?.get(page);
      if (!exc || exc.every((s) => s === noException)) {
        this.exceptions.get(epoch)?.delete(page);
        ops.push({ type: 'del', key });
      } else {
        ops.push({ type: 'put', key, value: Buffer.from(exc.slice().buffer) });
      }
    }
    this.dirty.clear();
    return ops;
  }

  private markDirty(epoch: number, page: number): void {
    this.dirty.set(`${epoch}/${page}`, { epoch, page });
  }

  private pagesOf(epoch: number, create: boolean): Map<number, Int32Array> {
    let pages = this.exceptions.get(epoch);
    if (!pages && create) {
      pages = new Map();
      this.exceptions.set(epoch, pages);
    }
    return pages ?? new Map();
  }

  private exceptionMap(epoch: number, page: number): Int32Array {
    const pages = this.pagesOf(epoch, true);
    let exc = pages.get(page);
    if (!exc) {
      exc = new Int32Array(this.grainsPerPage).fill(noException);
      pages.set(page, exc);
    }
    return exc;
  }
}
