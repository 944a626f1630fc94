// The peer's local store of volume data.
//
// Layout: one data file per volume (`vol-<id>.dat`) cut into slots of limits.grainBytes; per
// page, a live grain map (grain within the page → slot, or -1 = never written / unmapped,
// reads as zeros; and the epoch each grain was born in, for copy-on-write). Maps live in
// memory and in LevelDB (`map/<volumeId>/<page>`). Snapshot layers (records, epochs, per
// snapshot exception maps) are described in layers.ts; slots are referenced by live and by
// exceptions, and a slot no layer references is free and gets reused.
//
// Ordering rules:
// - A write is acknowledged once its data and the map that points to it were handed to the
//   OS (they survive kill -9). FUA and flush() fdatasync the data file BEFORE syncing the
//   LevelDB log, so a durable map never points at data that is not durable. A write in place
//   into a new slot waits until the slot's map was handed over; a FUA write then syncs the log
//   too when a map commit requested before it is not durable yet (its grain's may be in it).
// - A power loss may keep an unsynced map and lose the unsynced data it points at, so a new
//   slot whose loss would not read as the grain's previous contents (a reused slot, or one
//   replacing a grain shared with a snapshot) is fdatasynced BEFORE its map is handed over.
// - A map is never handed to LevelDB pointing at a slot still being filled (grains being
//   allocated or copied are persisted as they were before; see persistPages).
// - Copy-on-write never writes into a slot a snapshot references: the new data goes to a new
//   slot, the old slot becomes the snapshot's exception, persisted in the same batch as the
//   live map that stops pointing at it (or earlier).
// - An unmapped or released slot is reused only after the maps without it are durable, so a
//   crash never makes a grain show another grain's data.
// - Unmap, compare-and-write, snapshot, delete, restore and page import/export take the volume
//   exclusively; reads and writes share it.

import type { Logger } from 'pino';
import { ClosedError, InvalidArgumentError } from '../errors';
import { grainBytes, pageBlocks, storeReserveAheadSlots } from '../limits';
import { noException, VolumeLayers, layerPrefix, type LayerOp } from './layers';
import { diskMedia, type MediaFile, type MediaKv, type StoreMedia } from './media';
import { ReadOnlyBackend } from './decorator';
import { SharedLock } from './shared-lock';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from './types';

const cleanKey = 'clean';

/** The record of the last start's token (PageStore.nextStartToken). */
const startTokenKey = 'start-token';

export class PageStore {
  private readonly media: StoreMedia;
  private readonly db: MediaKv;
  private readonly volumes = new Map<string, StoreVolume>();
  private closed = false;
  /** False when the last run did not shut down cleanly. */
  readonly wasClean: boolean;

  private constructor(media: StoreMedia, db: MediaKv, wasClean: boolean) {
    this.media = media;
    this.db = db;
    this.wasClean = wasClean;
  }

  /** The store in directory `dir` (made when absent). */
  static open(dir: string, opts: { log?: Logger } = {}): Promise<PageStore> {
    return PageStore.openOn(diskMedia(dir), { log: opts.log?.child({ dir }) });
  }

  static async openOn(media: StoreMedia, opts: { log?: Logger } = {}): Promise<PageStore> {
    const db = await media.openKv();
    // A store that holds no key at all never ran before (or never wrote anything): nothing can
    // have been lost, so its first start is a clean one. Looked at BEFORE the clean mark is cleared.
    const firstStart = await db.isEmpty();
    const wasClean = firstStart || (await db.get(cleanKey)) !== undefined;
    await db.del(cleanKey, { sync: true });
    if (!wasClean) opts.log?.warn('store was not shut down cleanly; synced writes are intact, unsynced ones may be lost');
    return new PageStore(media, db, wasClean);
  }

  async openVolume(volumeId: string, geometry: { blockBytes: number; blockCount: number }): Promise<StoreVolume> {
    this.assertOpen();
    if (!/^[0-9a-f]{16}$/.test(volumeId)) throw new InvalidArgumentError(`bad volume id ${volumeId}`);
    const open = this.volumes.get(volumeId);
    if (open) return open;
    const volume = await StoreVolume.open(this.db, this.media, volumeId, geometry);
    this.volumes.set(volumeId, volume);
    return volume;
  }

  async deleteVolume(volumeId: string): Promise<void> {
    this.assertOpen();
    const volume = this.volumes.get(volumeId);
    if (volume) {
      await volume.close();
      this.volumes.delete(volumeId);
    }
    await this.db.clear({ gte: `map/${volumeId}/`, lt: `map/${volumeId}0` });
    await this.db.clear({ gte: layerPrefix(volumeId), lt: `${layerPrefix(volumeId)}\xff` });
    await this.media.removeFile(dataFileName(volumeId));
  }

  /** Ids of the volumes this store holds data files for (open or not). */
  async storedVolumeIds(): Promise<string[]> {
    this.assertOpen();
    const names = await this.media.listFiles();
    return names.map((n) => /^vol-([0-9a-f]{16})\.dat$/.exec(n)?.[1]).filter((id): id is string => id !== undefined);
  }

  // ---- small local records (migration checkpoints), durable when `sync` -----------------

  async putRecord(key: string, value: Buffer, sync: boolean): Promise<void> {
    this.assertOpen();
    await this.db.put(`rec/${key}`, value, { sync });
  }

  async deleteRecord(key: string): Promise<void> {
    this.assertOpen();
    await this.db.del(`rec/${key}`, { sync: true });
  }

  async listRecords(prefix: string): Promise<{ key: string; value: Buffer }[]> {
    this.assertOpen();
    const out: { key: string; value: Buffer }[] = [];
    for await (const [key, value] of this.db.iterator({ gte: `rec/${prefix}`, lt: `rec/${prefix}\xff` })) out.push({ key: key.slice(4), value });
    return out;
  }

  /**
   * A new start token, one more than the last start's (durable before it resolves, so no two
   * starts share one; never 0). A peer answers it to staging and replica requests
   * (src/routing/page-service.ts): their senders see it restart between two requests, which
   * loses what it had not synced (src/migration/move-machine.ts, src/replication/resync.ts).
   */
  async nextStartToken(): Promise<number> {
    const last = (await this.listRecords(startTokenKey)).find((rec) => rec.key === startTokenKey);
    const token = ((last ? Number(last.value.toString()) : 0) + 1) % 0x1_0000_0000 || 1;
    await this.putRecord(startTokenKey, Buffer.from(String(token)), true);
    return token;
  }

  usage(): { volumes: number; allocatedBytes: number } {
    let allocatedBytes = 0;
    for (const v of this.volumes.values()) allocatedBytes += v.allocatedBytes();
    return { volumes: this.volumes.size, allocatedBytes };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const v of this.volumes.values()) await v.close();
    this.volumes.clear();
    await this.db.put(cleanKey, Buffer.from('1'), { sync: true });
    await this.db.close();
  }

  private assertOpen(): void {
    if (this.closed) throw new ClosedError('page store is closed');
  }
}

const dataFileName = (volumeId: string): string => `vol-${volumeId}.dat`;
const pageKey = (volumeId: string, page: number): string => `map/${volumeId}/${page.toString(16).padStart(12, '0')}`;

/** A grain whose new slot is being filled: waiters wait for `done`; persisting masks it with its previous state. */
interface Allocation {
  done: Promise<void>;
  prevSlot: number;
  prevBorn: number;
  /** The slot is filled (and durable when it must be): maps handed over from now on show it. */
  filled: boolean;
}

/** A group commit of live maps (and every dirty exception page) to LevelDB. */
interface Commit {
  pages: Set<number>;
  sync: boolean;
  done: Promise<void>;
}

export interface SnapshotInfo {
  id: string;
  epoch: number;
  createdMs: number;
  /** Grains where this snapshot's view differs from the layer above it. */
  exceptionGrains: number;
  /** Bytes deleting this snapshot would free now. */
  uniqueBytes: number;
}

export interface LayerUsage {
  /** Bytes of grains mapped in the live view. */
  liveBytes: number;
  /** Bytes of every slot in use (live and snapshots, shared slots once). */
  allocatedBytes: number;
  snapshots: SnapshotInfo[];
}

/** One grain of a page layer, for carrying a page's layers to another peer. */
export interface PageLayerGrain {
  /** Grain index within the page. */
  grain: number;
  /** The grain's bytes (grainBytes), or null: unmapped, reads as zeros. */
  data: Buffer | null;
}

/**
 * All layers of one page, oldest snapshot first, by snapshot id (epochs are local to a peer).
 * `live[i].shared`: the newest snapshot sees that grain through live (the next write copies).
 */
export interface PageLayers {
  snapshots: { id: string; grains: PageLayerGrain[] }[];
  live: (PageLayerGrain & { shared: boolean })[];
}

export class StoreVolume implements BlockBackend {
  readonly volumeId: string;
  readonly blockBytes: number;
  blockCount: number;
  readonly grainBlocks: number;
  private readonly grainsPerPage: number;
  private readonly db: MediaKv;
  private readonly file: MediaFile;
  /** Per page: [0, grainsPerPage) grain → slot (-1 unmapped); [grainsPerPage, 2·grainsPerPage) the epoch each was born in. */
  private readonly maps = new Map<number, Int32Array>();
  private readonly layers: VolumeLayers;
  private readonly freeSlots: number[] = [];
  /** Slots at or past this index have never been written: the file is a hole there. */
  private slotHighWater: number;
  /** The file is at least this many slots long (see reserveAhead). */
  private reservedSlots: number;
  /** Distinct slots referenced by live or by a snapshot. */
  private usedSlots = 0;
  /** Grains whose new slot is being filled (global grain index). */
  private readonly allocating = new Map<number, Allocation>();
  private commitPending: Commit | undefined;
  private committing: Promise<void> = Promise.resolve();
  /** Map commits requested so far, and how many of those a completed synced commit covered. */
  private commitRequests = 0;
  private commitRequestsDurable = 0;
  private readonly lock = new SharedLock();
  private closed = false;

  private constructor(db: MediaKv, file: MediaFile, volumeId: string, geometry: { blockBytes: number; blockCount: number }, slotHighWater: number) {
    this.db = db;
    this.file = file;
    this.volumeId = volumeId;
    this.blockBytes = geometry.blockBytes;
    this.blockCount = geometry.blockCount;
    this.grainBlocks = grainBytes / geometry.blockBytes;
    this.grainsPerPage = (pageBlocks * geometry.blockBytes) / grainBytes;
    this.slotHighWater = slotHighWater;
    this.reservedSlots = slotHighWater;
    this.layers = new VolumeLayers(volumeId, this.grainsPerPage);
  }

  static async open(db: MediaKv, media: StoreMedia, volumeId: string, geometry: { blockBytes: number; blockCount: number }): Promise<StoreVolume> {
    if (geometry.blockBytes !== 512 && geometry.blockBytes !== 4096) throw new InvalidArgumentError(`bad block size ${geometry.blockBytes}`);
    const file = await media.openFile(dataFileName(volumeId));
    const size = await file.size();
    const v = new StoreVolume(db, file, volumeId, geometry, Math.ceil(size / grainBytes));
    await v.loadMaps();
    return v;
  }

  private async loadMaps(): Promise<void> {
    const G = this.grainsPerPage;
    let seen = new Uint8Array(Math.max(1024, this.slotHighWater));
    // Every reference to a slot (live or exception): the first makes it used, later ones are shared.
    const reference = (slot: number): void => {
      if (slot >= seen.length) {
        const grown = new Uint8Array(Math.max(slot + 1, seen.length * 2));
        grown.set(seen);
        seen = grown;
      }
      if (seen[slot]) return this.layers.addLoadedRef(slot);
      seen[slot] = 1;
      this.usedSlots++;
      this.slotHighWater = Math.max(this.slotHighWater, slot + 1);
    };
    for await (const [key, value] of this.db.iterator({ gte: pageKey(this.volumeId, 0), lt: `map/${this.volumeId}0` })) {
      const page = parseInt(key.slice(key.lastIndexOf('/') + 1), 16);
      const map = new Int32Array(2 * G).fill(-1, 0, G).fill(0, G);
      // Maps written before snapshot layers hold slots only: born 0 (copied on the first write after a snapshot).
      map.set(new Int32Array(value.buffer.slice(value.byteOffset, value.byteOffset + value.length)).subarray(0, 2 * G));
      this.maps.set(page, map);
      for (let i = 0; i < G; i++) if (map[i] >= 0) reference(map[i]);
    }
    await this.layers.load(this.db, reference);
    for (let s = this.slotHighWater - 1; s >= 0; s--) if (s >= seen.length || !seen[s]) this.freeSlots.push(s);
  }

  allocatedBytes(): number {
    return this.usedSlots * grainBytes;
  }

  // ---- grain helpers -------------------------------------------------------------------------

  private slotOf(grain: number): number {
    const map = this.maps.get(Math.floor(grain / this.grainsPerPage));
    return map ? map[grain % this.grainsPerPage] : -1;
  }

  /** Epoch the live grain was born in; 0 (before every snapshot) when unknown. */
  private bornOf(grain: number): number {
    const map = this.maps.get(Math.floor(grain / this.grainsPerPage));
    return map ? map[this.grainsPerPage + (grain % this.grainsPerPage)] : 0;
  }

  private setLive(grain: number, slot: number, born: number): void {
    const page = Math.floor(grain / this.grainsPerPage);
    let map = this.maps.get(page);
    if (!map) {
      map = new Int32Array(2 * this.grainsPerPage).fill(-1, 0, this.grainsPerPage).fill(0, this.grainsPerPage);
      this.maps.set(page, map);
    }
    map[grain % this.grainsPerPage] = slot;
    map[this.grainsPerPage + (grain % this.grainsPerPage)] = born;
  }

  private takeSlot(): { slot: number; reused: boolean } {
    this.usedSlots++;
    if (this.freeSlots.length > 0) return { slot: this.freeSlots.pop()!, reused: true };
    if (this.slotHighWater + storeReserveAheadSlots / 2 >= this.reservedSlots) this.reserveAhead();
    return { slot: this.slotHighWater++, reused: false };
  }

  /**
   * Grow the file (sparse) well past the slots in use, so new slots are written inside the
   * file: a write that extends a file while reads of it run is an order of magnitude slower
   * (measured on ext4: 64 KiB read+copy into new slots, 3.9k/s extending vs 21k/s inside).
   * One zero byte at the new end: a write never shrinks the file, so no ordering with writes
   * in flight is needed, and the slots in between stay holes (zeros). Only a hint: errors are
   * ignored (the slot writes themselves report a full disk).
   */
  private reserveAhead(): void {
    this.reservedSlots = this.slotHighWater + storeReserveAheadSlots;
    this.file.write(Buffer.alloc(1), 0, 1, this.reservedSlots * grainBytes - 1).catch(() => undefined);
  }

  /** Slots whose last reference is gone: call only once the maps without them are durable. */
  private freeReleased(released: number[]): void {
    for (const slot of released) this.freeSlots.push(slot);
    this.usedSlots -= released.length;
  }

  /**
   * Hand live maps of `pages` and every dirty exception page to LevelDB in one batch (group
   * commit: requests made while a batch runs share the next one). Each map is encoded when the
   * batch is built, with grains whose new slot is still being filled shown as they were
   * before, so a crash never finds a map pointing at a slot that is not written yet.
   */
  private persistPages(pages: Iterable<number>, sync: boolean): Promise<void> {
    let commit = this.commitPending;
    if (!commit) {
      const c: Commit = { pages: new Set(), sync: false, done: Promise.resolve() };
      c.done = this.committing.then(() => this.runCommit(c));
      this.committing = c.done.catch(() => undefined);
      this.commitPending = commit = c;
    }
    for (const page of pages) commit.pages.add(page);
    if (sync) commit.sync = true;
    this.commitRequests++;
    return commit.done;
  }

  /**
   * Whether a map requested for commit may not survive a power loss yet: put without sync, or
   * its synced commit still running. Counted when requested: a write whose new slot was just
   * filled requests its commit before any later write to that grain can finish its own I/O.
   */
  private mapsNotDurable(): boolean {
    return this.commitRequests > this.commitRequestsDurable;
  }

  private async runCommit(c: Commit): Promise<void> {
    if (this.commitPending === c) this.commitPending = undefined;
    // Requests made from here on join the next commit; a synced one covers every op before it.
    const covers = this.commitRequests;
    const ops: LayerOp[] = this.layers.takeDirtyOps();
    for (const page of c.pages) ops.push(this.pageOp(page));
    if (ops.length > 0) await this.db.batch(ops, { sync: c.sync });
    else if (c.sync) await this.db.put(`sync/${this.volumeId}`, Buffer.alloc(0), { sync: true });
    if (c.sync) this.commitRequestsDurable = Math.max(this.commitRequestsDurable, covers);
  }

  private pageOp(page: number): LayerOp {
    const key = pageKey(this.volumeId, page);
    const live = this.maps.get(page);
    if (!live) return { type: 'del', key };
    const map = live.slice();
    if (this.allocating.size > 0) {
      const first = page * this.grainsPerPage;
      for (const [grain, a] of this.allocating) {
        if (a.filled || grain < first || grain >= first + this.grainsPerPage) continue;
        map[grain - first] = a.prevSlot;
        map[this.grainsPerPage + grain - first] = a.prevBorn;
      }
    }
    // Only born > the newest snapshot's epoch tells anything (older ones all mean "shared"); a
    // born of 0 is always safe (see layers.ts). So without snapshots, or when no grain was
    // born since the newest, the record is slots only, as small as before layers.
    const newest = this.layers.newestEpoch;
    let mapped = false;
    let bornNeeded = false;
    for (let i = 0; i < this.grainsPerPage; i++) {
      if (map[i] >= 0) mapped = true;
      if (newest >= 0 && map[this.grainsPerPage + i] > newest) bornNeeded = true;
    }
    // A page with nothing mapped needs no record.
    if (!mapped) return { type: 'del', key };
    return { type: 'put', key, value: Buffer.from(map.buffer, 0, (bornNeeded ? 2 : 1) * this.grainsPerPage * 4) };
  }

  private check(lba: number, blocks: number): void {
    if (this.closed) throw new ClosedError('volume is closed');
    if (!Number.isSafeInteger(lba) || lba < 0 || blocks < 0 || lba + blocks > this.blockCount) {
      throw new InvalidArgumentError(`range ${lba}+${blocks} outside volume of ${this.blockCount} blocks`);
    }
  }

  /**
   * Split [lba, lba+blocks) into per-grain pieces: grain, byte offset in the grain, byte offset
   * in the caller's buffer, length. `fn` returns true to stop early.
   */
  private forEachPiece(lba: number, blocks: number, fn: (grain: number, inGrain: number, inBuf: number, bytes: number) => boolean | void): void {
    let at = lba;
    const end = lba + blocks;
    while (at < end) {
      const grain = Math.floor(at / this.grainBlocks);
      const first = at - grain * this.grainBlocks;
      const n = Math.min(this.grainBlocks - first, end - at);
      if (fn(grain, first * this.blockBytes, (at - lba) * this.blockBytes, n * this.blockBytes) === true) return;
      at += n;
    }
  }

  /** A first write in progress on one of these grains, if any. */
  private pendingAllocation(lba: number, blocks: number): Promise<void> | undefined {
    if (this.allocating.size === 0) return undefined;
    let pending: Promise<void> | undefined;
    this.forEachPiece(lba, blocks, (grain) => (pending = this.allocating.get(grain)?.done) !== undefined);
    return pending;
  }

  // ---- BlockBackend --------------------------------------------------------------------------

  async read(lba: number, blocks: number): Promise<Buffer> {
    this.check(lba, blocks);
    // Not zero-filled: readInto fills every byte, zeros where a grain is unmapped.
    const out = Buffer.allocUnsafe(blocks * this.blockBytes);
    const wait = this.lock.acquireShared();
    if (wait) await wait;
    try {
      // No await between the last check and looking at the maps: another first write could slip in.
      for (let p = this.pendingAllocation(lba, blocks); p; p = this.pendingAllocation(lba, blocks)) await p;
      await this.readInto(out, lba, blocks, -1);
      return out;
    } finally {
      this.lock.releaseShared();
    }
  }

  /**
   * The slot a run walk uses for a grain, or -1 to hand the grain to `onOther`. Live view
   * (`view` -1): the live slot, unless the grain is born at or before `cowEpoch` (the newest
   * snapshot sees it: a write must copy). Snapshot view k: the slot resolved through the layers.
   */
  private runSlot(grain: number, cowEpoch: number, view: number): number {
    if (view >= 0) return this.layers.resolve(view, grain, this.slotOf(grain));
    const map = this.maps.get(Math.floor(grain / this.grainsPerPage));
    if (!map) return -1;
    const i = grain % this.grainsPerPage;
    return map[this.grainsPerPage + i] <= cowEpoch ? -1 : map[i];
  }

  /**
   * Walk the range as runs of bytes contiguous both in the caller's buffer and on disk
   * (adjacent slots coalesce into one syscall), and the other grains between them (unmapped,
   * or shared with a snapshot when `cowEpoch` says so). A plain loop with callbacks: this is
   * the hot path of every read and write.
   */
  private forEachRun(
    lba: number,
    blocks: number,
    cowEpoch: number,
    view: number,
    onMapped: (inBuf: number, pos: number, bytes: number) => void,
    onOther: (grain: number, inBuf: number, bytes: number, inGrain: number) => void,
  ): void {
    let runInBuf = 0;
    let runPos = -1;
    let runBytes = 0;
    this.forEachPiece(lba, blocks, (grain, inGrain, inBuf, bytes) => {
      const slot = this.runSlot(grain, cowEpoch, view);
      if (slot < 0) {
        if (runBytes > 0) onMapped(runInBuf, runPos, runBytes);
        runBytes = 0;
        onOther(grain, inBuf, bytes, inGrain);
        return;
      }
      const pos = slot * grainBytes + inGrain;
      if (runBytes > 0 && runPos + runBytes === pos && runInBuf + runBytes === inBuf) {
        runBytes += bytes;
        return;
      }
      if (runBytes > 0) onMapped(runInBuf, runPos, runBytes);
      runInBuf = inBuf;
      runPos = pos;
      runBytes = bytes;
    });
    if (runBytes > 0) onMapped(runInBuf, runPos, runBytes);
  }

  /** Read the live view (`view` -1) or snapshot k's view. */
  private async readInto(out: Buffer, lba: number, blocks: number, view: number): Promise<void> {
    const reads: Promise<unknown>[] = [];
    this.forEachRun(
      lba,
      blocks,
      -1,
      view,
      (inBuf, pos, bytes) => reads.push(this.file.read(out, inBuf, bytes, pos)),
      (_grain, inBuf, bytes) => out.fill(0, inBuf, inBuf + bytes),
    );
    if (reads.length === 1) await reads[0];
    else await Promise.all(reads);
  }

  async write(lba: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    if (data.length % this.blockBytes !== 0) throw new InvalidArgumentError('write of a partial block');
    const blocks = data.length / this.blockBytes;
    this.check(lba, blocks);
    const wait = this.lock.acquireShared();
    if (wait) await wait;
    try {
      await this.writeLocked(lba, data, opts);
    } finally {
      this.lock.releaseShared();
    }
  }

  private async writeLocked(lba: number, data: Buffer, opts: WriteOptions): Promise<void> {
    const blocks = data.length / this.blockBytes;
    for (let p = this.pendingAllocation(lba, blocks); p; p = this.pendingAllocation(lba, blocks)) await p;
    const writes: Promise<unknown>[] = [];
    const released: number[] = [];
    this.forEachRun(
      lba,
      blocks,
      this.layers.newestEpoch,
      -1,
      (inBuf, pos, bytes) => writes.push(this.file.write(data, inBuf, bytes, pos)),
      (grain, inBuf, bytes, inGrain) => void writes.push(this.writeNewSlot(grain, data.subarray(inBuf, inBuf + bytes), inGrain, released)),
    );
    if (writes.length === 1) await writes[0];
    else await Promise.all(writes);
    // The data and the maps of new slots were handed over. FUA: the data durable first, then the
    // maps it relies on (its own new slots', or those of the writes whose new slots it wrote into
    // in place: put without sync, or their synced commit still running) by a synced commit after
    // theirs. A released slot may be reused only once the map without it is durable.
    if (opts.fua) await this.file.datasync();
    if (released.length > 0 || (opts.fua && this.mapsNotDurable())) await this.persistPages([], true);
    this.freeReleased(released);
  }

  /**
   * A write to a grain that needs a new slot: unmapped, or shared with the newest snapshot
   * (copy-on-write). Takes the slot and changes the maps now (so concurrent writers and readers
   * see it and wait), fills the slot, hands its map to LevelDB (without sync), then lets
   * waiters in: a write in place into the slot is acknowledged only after the map that makes
   * it visible was handed over. The old slot stays intact: it is the snapshot's exception now,
   * or released into `released` (freed by the caller when durable).
   */
  private writeNewSlot(grain: number, part: Buffer, inGrain: number, released: number[]): Promise<void> {
    const prevSlot = this.slotOf(grain);
    const prevBorn = this.bornOf(grain);
    if (prevBorn <= this.layers.newestEpoch) {
      const gone = this.layers.retire(grain, prevSlot);
      if (gone >= 0) released.push(gone);
    } else if (prevSlot >= 0) {
      throw new Error('store: a grain owned by live alone reached the new-slot path');
    }
    const { slot, reused } = this.takeSlot();
    this.setLive(grain, slot, this.layers.epoch);
    // The allocation masks the new slot in the maps handed to LevelDB (see persistPages) until it
    // is filled. A power loss may keep such an unsynced map and lose the unsynced fill: then the
    // grain would show the slot's old bytes (another grain's data, or data unmapped for good) or,
    // in a fresh slot, zeros instead of the grain it replaces (shared with a snapshot). So those
    // fills are durable before the map is handed over. A fresh slot replacing zeros needs no
    // sync: if its bytes are lost it reads as the zeros it replaced.
    const durableFirst = reused || prevSlot >= 0;
    const allocation: Allocation = { done: Promise.resolve(), prevSlot, prevBorn, filled: false };
    allocation.done = this.fillSlot(slot, reused, prevSlot, part, inGrain)
      .then(() => (durableFirst ? this.file.datasync() : undefined))
      .then(() => {
        allocation.filled = true;
        return this.persistPages([Math.floor(grain / this.grainsPerPage)], false);
      })
      .then(() => {
        this.allocating.delete(grain);
      });
    this.allocating.set(grain, allocation);
    return allocation.done;
  }

  private async fillSlot(slot: number, reused: boolean, prevSlot: number, part: Buffer, inGrain: number): Promise<void> {
    const pos = slot * grainBytes;
    if (part.length === grainBytes) return this.file.write(part, 0, grainBytes, pos);
    if (prevSlot >= 0) {
      // Copy-on-write of a partial grain: the old grain's bytes around the new ones.
      const full = Buffer.allocUnsafe(grainBytes);
      await this.file.read(full, 0, grainBytes, prevSlot * grainBytes);
      part.copy(full, inGrain);
      return this.file.write(full, 0, grainBytes, pos);
    }
    if (reused) {
      // A reused slot holds an old grain's bytes: write the whole grain, zeros around the data.
      const full = Buffer.alloc(grainBytes);
      part.copy(full, inGrain);
      return this.file.write(full, 0, grainBytes, pos);
    }
    // A fresh slot lies in the file's hole (zeros).
    return this.file.write(part, 0, part.length, pos + inGrain);
  }

  async unmap(lba: number, blocks: number, opts: WriteOptions = {}): Promise<void> {
    this.check(lba, blocks);
    await this.lock.runExclusive(async () => {
      const released: number[] = [];
      const pages = new Set<number>();
      const partial: number[] = [];
      const newest = this.layers.newestEpoch;
      this.forEachPiece(lba, blocks, (grain, inGrain, _inBuf, bytes) => {
        const slot = this.slotOf(grain);
        if (slot < 0) return;
        if (bytes < grainBytes) {
          partial.push(grain * this.grainBlocks + inGrain / this.blockBytes, bytes / this.blockBytes);
          return;
        }
        if (this.bornOf(grain) <= newest) {
          const gone = this.layers.retire(grain, slot);
          if (gone >= 0) released.push(gone);
        } else {
          released.push(slot);
        }
        this.setLive(grain, -1, this.layers.epoch);
        pages.add(Math.floor(grain / this.grainsPerPage));
      });
      // Partial grains are written with zeros: in place, or copied when a snapshot shares them.
      for (let i = 0; i < partial.length; i += 2) await this.writeLocked(partial[i], Buffer.alloc(partial[i + 1] * this.blockBytes), opts);
      // FUA: everything written to the volume before is durable when the unmap answers, as for
      // a FUA write (a page move marks a piece done on this; the simulator found a move that
      // lost a piece whose last chunk was an unmap of nothing). Data file first, then the maps.
      if (opts.fua) await this.file.datasync();
      // Durable before reuse: see the ordering rules at the top.
      if (pages.size > 0 || opts.fua) await this.persistPages(pages, true);
      this.freeReleased(released);
    });
  }

  async compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions = {}): Promise<CompareAndWriteResult> {
    if (compare.length !== data.length || data.length % this.blockBytes !== 0) throw new InvalidArgumentError('compare and write buffers differ in size');
    const blocks = data.length / this.blockBytes;
    this.check(lba, blocks);
    return this.lock.runExclusive(async () => {
      for (let p = this.pendingAllocation(lba, blocks); p; p = this.pendingAllocation(lba, blocks)) await p;
      const current = Buffer.allocUnsafe(data.length);
      await this.readInto(current, lba, blocks, -1);
      if (!current.equals(compare)) {
        let i = 0;
        while (current[i] === compare[i]) i++;
        return { ok: false, miscompareOffsetBytes: i };
      }
      await this.writeLocked(lba, data, opts);
      return { ok: true };
    });
  }

  async flush(): Promise<void> {
    if (this.closed) throw new ClosedError('volume is closed');
    await this.file.datasync();
    // Maps put without sync sit in LevelDB's log in the OS cache; one synced write flushes them.
    await this.db.put(`sync/${this.volumeId}`, Buffer.alloc(0), { sync: true });
  }

  async lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    this.check(lba, 0);
    return this.extents(lba, blocksMax, -1);
  }

  private extents(lba: number, blocksMax: number, view: number): LbaExtent[] {
    const end = Math.min(this.blockCount, lba + blocksMax);
    const extents: LbaExtent[] = [];
    for (let at = lba; at < end; ) {
      const grain = Math.floor(at / this.grainBlocks);
      const next = Math.min(end, (grain + 1) * this.grainBlocks);
      const mapped = this.runSlot(grain, -1, view) >= 0;
      const last = extents[extents.length - 1];
      if (last && last.mapped === mapped) last.blocks += next - at;
      else extents.push({ lba: at, blocks: next - at, mapped });
      at = next;
    }
    return extents;
  }

  async resize(blockCount: number): Promise<void> {
    if (blockCount < this.blockCount) {
      await this.unmap(blockCount, this.blockCount - blockCount);
    }
    this.blockCount = blockCount;
  }

  // ---- snapshot layers (see layers.ts) -------------------------------------------------------

  /**
   * Freeze the current data as snapshot `id`: O(1) (an fdatasync of the data file and one
   * synced LevelDB batch; no map is copied or walked). Waits for in-flight writes, holds new
   * ones meanwhile. Durable when it resolves: it contains every write acknowledged before.
   * `createdMs` (wall clock) is recorded with it; the store reads no clock of its own.
   */
  async snapshot(id: string, createdMs: number): Promise<SnapshotInfo> {
    if (this.closed) throw new ClosedError('volume is closed');
    return this.lock.runExclusive(async () => {
      const { record, ops } = this.layers.snapshotOps(id, createdMs);
      await this.file.datasync();
      await this.db.batch(ops, { sync: true });
      this.layers.addSnapshot(record);
      return { ...record, exceptionGrains: 0, uniqueBytes: 0 };
    });
  }

  /** Whether this volume has a layer of snapshot `id` (cheap: no space is counted). */
  hasSnapshot(id: string): boolean {
    return this.layers.snapshots.some((s) => s.id === id);
  }

  /** Snapshots oldest first, with their space. */
  listSnapshots(): SnapshotInfo[] {
    return this.layers.snapshots.map((s, k) => ({ ...s, exceptionGrains: this.layers.exceptionGrains(k), uniqueBytes: this.layers.uniqueGrains(k) * grainBytes }));
  }

  /** Delete snapshot `id`: its exceptions move to the next older snapshot or are freed. */
  async deleteSnapshot(id: string): Promise<void> {
    if (this.closed) throw new ClosedError('volume is closed');
    await this.lock.runExclusive(async () => {
      const { ops, released } = this.layers.deleteSnapshot(this.layers.indexOf(id));
      await this.db.batch(ops, { sync: true });
      this.freeReleased(released);
    });
  }

  /**
   * Roll the live view back to snapshot `id` (the snapshot and newer ones stay). Live grains
   * that differ are retired into the newest snapshot as a write would retire them, then point
   * at the snapshot's slots (shared, copied on the next write). The host must be told its data
   * changed (unit attention): the SCSI layer's job, once this resolves.
   */
  async restore(id: string): Promise<void> {
    if (this.closed) throw new ClosedError('volume is closed');
    await this.lock.runExclusive(async () => {
      const k = this.layers.indexOf(id);
      const released: number[] = [];
      const changed = new Set<number>();
      const pages = this.layers.pagesFrom(k);
      for (const page of this.maps.keys()) pages.add(page);
      for (const page of pages) {
        for (let grain = page * this.grainsPerPage; grain < (page + 1) * this.grainsPerPage; grain++) {
          const live = this.slotOf(grain);
          const target = this.layers.resolve(k, grain, live);
          if (target === live) continue;
          // The newest snapshot may read this grain through live: retire it there first.
          const gone = this.layers.retire(grain, live);
          if (gone >= 0) released.push(gone);
          this.layers.incref(target);
          this.setLive(grain, target, 0);
          changed.add(page);
        }
      }
      await this.persistPages(changed, true);
      this.freeReleased(released);
    });
  }

  /**
   * Change snapshot `id`'s view (a timestamp-mode snapshot taking in the writes stamped before
   * its cut that reached this peer after it froze): `changes` apply in order, data or zeros
   * (null). Each touched grain gets a new slot as the snapshot's exception; live is not
   * touched. An older snapshot that read the grain through this one keeps its old view (it
   * gets the old slot as its own exception). Durable when it resolves.
   */
  async writeIntoSnapshot(id: string, changes: readonly { lba: number; blocks: number; data: Buffer | null }[]): Promise<void> {
    if (this.closed) throw new ClosedError('volume is closed');
    for (const c of changes) {
      this.check(c.lba, c.blocks);
      if (c.data && c.data.length !== c.blocks * this.blockBytes) throw new InvalidArgumentError('snapshot change data does not match its blocks');
    }
    await this.lock.runExclusive(async () => {
      const k = this.layers.indexOf(id);
      const images = new Map<number, Buffer>();
      for (const c of changes) this.forEachPiece(c.lba, c.blocks, (grain) => void images.set(grain, Buffer.alloc(grainBytes)));
      await Promise.all(
        [...images].map(([grain, img]) => {
          const lba = grain * this.grainBlocks;
          return this.readInto(img, lba, Math.min(this.grainBlocks, this.blockCount - lba), k);
        }),
      );
      for (const c of changes) {
        this.forEachPiece(c.lba, c.blocks, (grain, inGrain, inBuf, bytes) => {
          const img = images.get(grain)!;
          if (c.data) c.data.copy(img, inGrain, inBuf, inBuf + bytes);
          else img.fill(0, inGrain, inGrain + bytes);
        });
      }
      await this.setSnapshotGrainsLocked(k, [...images]);
    });
  }

  /**
   * Replace snapshot `id`'s view of consecutive grains from `lba` (grain-aligned) with `grains`
   * (each its bytes, or null for zeros): a copy of a page that lacked the snapshot takes the
   * page's layer from the copies that hold it (src/snapshot/layer-sync.ts). Live is not touched;
   * an older snapshot that read these grains through this one keeps its old view. Durable when
   * it resolves.
   */
  async replaceSnapshotGrains(id: string, lba: number, grains: readonly (Buffer | null)[]): Promise<void> {
    this.check(lba, Math.min(grains.length * this.grainBlocks, this.blockCount - lba));
    if (lba % this.grainBlocks !== 0 || grains.some((g) => g !== null && g.length !== grainBytes)) {
      throw new InvalidArgumentError(`snapshot grains start at a grain boundary and are ${grainBytes} bytes or null`);
    }
    await this.lock.runExclusive(async () => {
      const first = lba / this.grainBlocks;
      await this.setSnapshotGrainsLocked(this.layers.indexOf(id), grains.map((data, i) => [first + i, data] as const));
    });
  }

  /**
   * Under the exclusive lock: snapshot k's view of each grain becomes the data given (a new slot
   * as its exception; null: zeros, no slot), the next older snapshot keeping the view it read
   * through k. Slots are written and synced BEFORE the exception maps that name them.
   */
  private async setSnapshotGrainsLocked(k: number, grains: readonly (readonly [number, Buffer | null])[]): Promise<void> {
    const released: number[] = [];
    const writes: Promise<void>[] = [];
    for (const [grain, data] of grains) {
      const page = Math.floor(grain / this.grainsPerPage);
      const i = grain % this.grainsPerPage;
      const before = this.layers.resolve(k, grain, this.slotOf(grain));
      if (k > 0 && (this.layers.exceptionsOf(k - 1, page)?.[i] ?? noException) === noException) {
        // The next older snapshot read this grain through us: it keeps the old view.
        this.layers.incref(before);
        this.layers.setException(k - 1, grain, before);
      }
      const own = this.layers.exceptionsOf(k, page)?.[i] ?? noException;
      if (own !== noException && this.layers.decref(own)) released.push(own);
      let slot = -1;
      if (data) {
        slot = this.takeSlot().slot;
        writes.push(this.file.write(data, 0, grainBytes, slot * grainBytes));
      }
      this.layers.setException(k, grain, slot);
    }
    await Promise.all(writes);
    await this.file.datasync();
    await this.db.batch(this.layers.takeDirtyOps(), { sync: true });
    this.freeReleased(released);
  }

  /** A read-only BlockBackend on snapshot `id`'s view. */
  snapshotView(id: string): SnapshotView {
    this.layers.indexOf(id);
    return new SnapshotView(this, id);
  }

  /** @internal SnapshotView's read. */
  async readSnapshot(id: string, lba: number, blocks: number): Promise<Buffer> {
    this.check(lba, blocks);
    const out = Buffer.allocUnsafe(blocks * this.blockBytes);
    const wait = this.lock.acquireShared();
    if (wait) await wait;
    try {
      // No wait for pending allocations: a grain being copied keeps its old slot in the snapshot.
      await this.readInto(out, lba, blocks, this.layers.indexOf(id));
      return out;
    } finally {
      this.lock.releaseShared();
    }
  }

  /** @internal SnapshotView's lbaStatus. */
  snapshotExtents(id: string, lba: number, blocksMax: number): LbaExtent[] {
    this.check(lba, 0);
    return this.extents(lba, blocksMax, this.layers.indexOf(id));
  }

  /** Space of live and of each snapshot. */
  layerUsage(): LayerUsage {
    let liveGrains = 0;
    for (const map of this.maps.values()) for (let i = 0; i < this.grainsPerPage; i++) if (map[i] >= 0) liveGrains++;
    return { liveBytes: liveGrains * grainBytes, allocatedBytes: this.allocatedBytes(), snapshots: this.listSnapshots() };
  }

  // ---- a page's layers, for carrying them to another peer --------------------------------------

  /** Every layer of one page (a consistent cut: writes are held while it is read). */
  async exportPageLayers(page: number): Promise<PageLayers> {
    if (this.closed) throw new ClosedError('volume is closed');
    return this.lock.runExclusive(async () => {
      const first = page * this.grainsPerPage;
      const readSlot = async (slot: number): Promise<Buffer | null> => {
        if (slot < 0) return null;
        const buf = Buffer.allocUnsafe(grainBytes);
        await this.file.read(buf, 0, grainBytes, slot * grainBytes);
        return buf;
      };
      const snapshots: PageLayers['snapshots'] = [];
      for (let k = 0; k < this.layers.snapshots.length; k++) {
        const exc = this.layers.exceptionsOf(k, page);
        const grains: PageLayerGrain[] = [];
        for (let i = 0; exc && i < this.grainsPerPage; i++) if (exc[i] !== noException) grains.push({ grain: i, data: await readSlot(exc[i]) });
        snapshots.push({ id: this.layers.snapshots[k].id, grains });
      }
      const live: PageLayers['live'] = [];
      const newest = this.layers.newestEpoch;
      for (let i = 0; i < this.grainsPerPage; i++) {
        const slot = this.slotOf(first + i);
        const shared = this.bornOf(first + i) <= newest;
        if (slot >= 0 || shared) live.push({ grain: i, data: await readSlot(slot), shared });
      }
      return { snapshots, live };
    });
  }

  /**
   * Replace one page's layers with `layers` from another peer (whose snapshot list, by id and
   * order, must be this volume's). Durable when it resolves.
   */
  async importPageLayers(page: number, layers: PageLayers): Promise<void> {
    if (this.closed) throw new ClosedError('volume is closed');
    const ids = this.layers.snapshots.map((s) => s.id);
    if (layers.snapshots.length !== ids.length || layers.snapshots.some((s, k) => s.id !== ids[k])) {
      throw new InvalidArgumentError(`page layers carry snapshots [${layers.snapshots.map((s) => s.id).join(', ')}], volume ${this.volumeId} has [${ids.join(', ')}]`);
    }
    const all = [...layers.snapshots.flatMap((s) => s.grains), ...layers.live];
    if (all.some((g) => !Number.isInteger(g.grain) || g.grain < 0 || g.grain >= this.grainsPerPage || (g.data !== null && g.data.length !== grainBytes))) {
      throw new InvalidArgumentError('page layers with a bad grain');
    }
    await this.lock.runExclusive(async () => {
      const released = this.dropPageLocked(page);
      await this.persistPages([page], true);
      this.freeReleased(released);
      const first = page * this.grainsPerPage;
      const writes: Promise<void>[] = [];
      const place = (data: Buffer | null): number => {
        if (data === null) return -1;
        const { slot } = this.takeSlot();
        writes.push(this.file.write(data, 0, grainBytes, slot * grainBytes));
        return slot;
      };
      layers.snapshots.forEach((s, k) => s.grains.forEach((g) => this.layers.setException(k, first + g.grain, place(g.data))));
      for (const g of layers.live) this.setLive(first + g.grain, place(g.data), g.shared ? 0 : this.layers.epoch);
      await Promise.all(writes);
      await this.file.datasync();
      await this.persistPages([page], true);
    });
  }

  /** Pages of which this volume holds anything, live or in a snapshot layer. */
  heldPages(): number[] {
    return [...new Set([...this.maps.keys(), ...this.layers.pagesFrom(0)])];
  }

  /** True when the page has live data here (what the replication reaper frees). */
  holdsPage(page: number): boolean {
    return this.maps.has(page);
  }

  /**
   * Forget one page's live data (the replication reaper: the page is nobody's copy here any
   * more). What the snapshots see stays, as after an unmap: this peer froze its copy of the
   * page at each snapshot's cut, and a snapshot reads the page from any copy in sync at its cut
   * (src/snapshot/records.ts snapshotHolders), wherever the page went since. Those slots are
   * freed with the snapshots.
   */
  async dropPage(page: number): Promise<void> {
    if (this.closed) throw new ClosedError('volume is closed');
    await this.lock.runExclusive(async () => {
      const released = this.dropLiveLocked(page);
      await this.persistPages([page], true);
      this.freeReleased(released);
    });
  }

  /** The page's live map goes; a slot a snapshot sees moves into the newest one's layer (as by unmap), the others are released. */
  private dropLiveLocked(page: number): number[] {
    const map = this.maps.get(page);
    if (!map) return [];
    const released: number[] = [];
    const newest = this.layers.newestEpoch;
    for (let i = 0; i < this.grainsPerPage; i++) {
      const slot = map[i];
      if (slot < 0) continue;
      const gone = map[this.grainsPerPage + i] <= newest ? this.layers.retire(page * this.grainsPerPage + i, slot) : this.layers.decref(slot) ? slot : -1;
      if (gone >= 0) released.push(gone);
    }
    // A deleted map reads as unmapped, born 0: safe for every snapshot (layers.ts, the invariant).
    this.maps.delete(page);
    return released;
  }

  /** Forget one page in every layer, snapshots included (before another peer's layers of it replace them). */
  private dropPageLocked(page: number): number[] {
    const released = this.layers.dropPage(page);
    const map = this.maps.get(page);
    for (let i = 0; map && i < this.grainsPerPage; i++) if (this.layers.decref(map[i])) released.push(map[i]);
    this.maps.delete(page);
    return released;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.lock.runExclusive(async () => {
      await this.flush();
      this.closed = true;
      await this.file.close();
    });
  }
}

/**
 * Snapshot `id` of a volume as a read-only BlockBackend (the SCSI layer will answer writes
 * with DATA PROTECT / WRITE PROTECTED). Reads fail with NotFoundError once the snapshot is deleted.
 */
export class SnapshotView extends ReadOnlyBackend {
  readonly blockBytes: number;
  readonly grainBlocks: number;
  protected readonly what: string;

  constructor(
    private readonly volume: StoreVolume,
    readonly snapshotId: string,
  ) {
    super();
    this.blockBytes = volume.blockBytes;
    this.grainBlocks = volume.grainBlocks;
    this.what = `snapshot ${snapshotId} of volume ${volume.volumeId}`;
  }

  get blockCount(): number {
    return this.volume.blockCount;
  }

  read(lba: number, blocks: number): Promise<Buffer> {
    return this.volume.readSnapshot(this.snapshotId, lba, blocks);
  }

  async lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.volume.snapshotExtents(this.snapshotId, lba, blocksMax);
  }
}
