// The peer's local store of volume data.
//
// Layout: one data file per volume (`vol-<id>.dat`) cut into slots of limits.grainBytes; per
// page, a grain map (grain within the page → slot, or -1 = never written / unmapped, reads as
// zeros). Maps live in memory and in LevelDB (`map/<volumeId>/<page>`). Slots not referenced
// by any map are free and get reused.
//
// Ordering rules:
// - A write is acknowledged once its data and the map that points to it were handed to the
//   OS (they survive kill -9). FUA and flush() fdatasync the data file BEFORE syncing the
//   LevelDB log, so a durable map never points at data that is not durable.
// - An unmapped grain's slot is reused only after the map without it is durable, so a crash
//   never makes an unmapped grain show another grain's data.
// - Unmap and compare-and-write take the volume exclusively; reads and writes share it.
//
// Later: snapshot layers put a stack of maps per page (copy-on-write at grain size), and
// page migration copies a page's mapped grains; both fit this map-of-slots shape.

import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { ClassicLevel } from 'classic-level';
import type { Logger } from 'pino';
import { ClosedError, InvalidArgumentError } from '../errors';
import { grainBytes, pageBlocks } from '../limits';
import { DataFile } from './data-file';
import { SharedLock } from './shared-lock';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from './types';

type Db = ClassicLevel<string, Buffer>;

const cleanKey = 'clean';

export class PageStore {
  private readonly dir: string;
  private readonly db: Db;
  private readonly log: Logger | undefined;
  private readonly volumes = new Map<string, StoreVolume>();
  private closed = false;
  /** False when the last run did not shut down cleanly. */
  readonly wasClean: boolean;

  private constructor(dir: string, db: Db, wasClean: boolean, log?: Logger) {
    this.dir = dir;
    this.db = db;
    this.wasClean = wasClean;
    this.log = log;
  }

  static async open(dir: string, opts: { log?: Logger } = {}): Promise<PageStore> {
    await fsp.mkdir(dir, { recursive: true });
    const db: Db = new ClassicLevel<string, Buffer>(join(dir, 'meta'), { valueEncoding: 'buffer' });
    await db.open();
    const wasClean = (await db.get(cleanKey)) !== undefined;
    await db.del(cleanKey, { sync: true });
    if (!wasClean) opts.log?.warn({ dir }, 'store was not shut down cleanly; synced writes are intact, unsynced ones may be lost');
    return new PageStore(dir, db, wasClean, opts.log);
  }

  async openVolume(volumeId: string, geometry: { blockBytes: number; blockCount: number }): Promise<StoreVolume> {
    this.assertOpen();
    if (!/^[0-9a-f]{16}$/.test(volumeId)) throw new InvalidArgumentError(`bad volume id ${volumeId}`);
    const open = this.volumes.get(volumeId);
    if (open) return open;
    const volume = await StoreVolume.open(this.db, join(this.dir, `vol-${volumeId}.dat`), volumeId, geometry);
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
    await fsp.rm(join(this.dir, `vol-${volumeId}.dat`), { force: true });
  }

  /** Ids of the volumes this store holds data files for (open or not). */
  async storedVolumeIds(): Promise<string[]> {
    this.assertOpen();
    const names = await fsp.readdir(this.dir);
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

const pageKey = (volumeId: string, page: number): string => `map/${volumeId}/${page.toString(16).padStart(12, '0')}`;

export class StoreVolume implements BlockBackend {
  readonly volumeId: string;
  readonly blockBytes: number;
  blockCount: number;
  readonly grainBlocks: number;
  private readonly grainsPerPage: number;
  private readonly db: Db;
  private readonly file: DataFile;
  private readonly maps = new Map<number, Int32Array>();
  private readonly freeSlots: number[] = [];
  /** Slots at or past this index have never been written: the file is a hole there. */
  private slotHighWater: number;
  private usedSlots = 0;
  /** Grains whose first write is in progress (global grain index → done). */
  private readonly allocating = new Map<number, Promise<void>>();
  private readonly lock = new SharedLock();
  private closed = false;

  private constructor(db: Db, file: DataFile, volumeId: string, geometry: { blockBytes: number; blockCount: number }, slotHighWater: number) {
    this.db = db;
    this.file = file;
    this.volumeId = volumeId;
    this.blockBytes = geometry.blockBytes;
    this.blockCount = geometry.blockCount;
    this.grainBlocks = grainBytes / geometry.blockBytes;
    this.grainsPerPage = (pageBlocks * geometry.blockBytes) / grainBytes;
    this.slotHighWater = slotHighWater;
  }

  static async open(db: Db, path: string, volumeId: string, geometry: { blockBytes: number; blockCount: number }): Promise<StoreVolume> {
    if (geometry.blockBytes !== 512 && geometry.blockBytes !== 4096) throw new InvalidArgumentError(`bad block size ${geometry.blockBytes}`);
    const file = await DataFile.open(path);
    const size = await file.size();
    const v = new StoreVolume(db, file, volumeId, geometry, Math.ceil(size / grainBytes));
    await v.loadMaps();
    return v;
  }

  private async loadMaps(): Promise<void> {
    const used = new Uint8Array(this.slotHighWater);
    for await (const [key, value] of this.db.iterator({ gte: pageKey(this.volumeId, 0), lt: `map/${this.volumeId}0` })) {
      const page = parseInt(key.slice(key.lastIndexOf('/') + 1), 16);
      const map = new Int32Array(this.grainsPerPage).fill(-1);
      const stored = new Int32Array(value.buffer.slice(value.byteOffset, value.byteOffset + value.length));
      map.set(stored.subarray(0, this.grainsPerPage));
      this.maps.set(page, map);
      for (const slot of map) {
        if (slot < 0) continue;
        if (slot >= used.length) this.slotHighWater = Math.max(this.slotHighWater, slot + 1);
        else used[slot] = 1;
        this.usedSlots++;
      }
    }
    for (let s = used.length - 1; s >= 0; s--) if (!used[s]) this.freeSlots.push(s);
  }

  allocatedBytes(): number {
    return this.usedSlots * grainBytes;
  }

  // ---- grain helpers -------------------------------------------------------------------------

  private slotOf(grain: number): number {
    const map = this.maps.get(Math.floor(grain / this.grainsPerPage));
    return map ? map[grain % this.grainsPerPage] : -1;
  }

  private setSlot(grain: number, slot: number): void {
    const page = Math.floor(grain / this.grainsPerPage);
    let map = this.maps.get(page);
    if (!map) {
      map = new Int32Array(this.grainsPerPage).fill(-1);
      this.maps.set(page, map);
    }
    map[grain % this.grainsPerPage] = slot;
  }

  private persistPage(page: number, sync: boolean): Promise<void> {
    const map = this.maps.get(page);
    const key = pageKey(this.volumeId, page);
    if (!map || map.every((s) => s < 0)) return this.db.del(key, { sync });
    return this.db.put(key, Buffer.from(map.buffer, map.byteOffset, map.byteLength), { sync });
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
    this.forEachPiece(lba, blocks, (grain) => (pending = this.allocating.get(grain)) !== undefined);
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
      await this.readInto(out, lba, blocks);
      return out;
    } finally {
      this.lock.releaseShared();
    }
  }

  /**
   * Walk the range as runs of bytes contiguous both in the caller's buffer and on disk
   * (adjacent slots coalesce into one syscall), and the unmapped grains between them. A plain
   * loop with callbacks: this is the hot path of every read and write.
   */
  private forEachRun(
    lba: number,
    blocks: number,
    onMapped: (inBuf: number, pos: number, bytes: number) => void,
    onUnmapped: (grain: number, inBuf: number, bytes: number, inGrain: number) => void,
  ): void {
    let runInBuf = 0;
    let runPos = -1;
    let runBytes = 0;
    this.forEachPiece(lba, blocks, (grain, inGrain, inBuf, bytes) => {
      const slot = this.slotOf(grain);
      if (slot < 0) {
        if (runBytes > 0) onMapped(runInBuf, runPos, runBytes);
        runBytes = 0;
        onUnmapped(grain, inBuf, bytes, inGrain);
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

  private async readInto(out: Buffer, lba: number, blocks: number): Promise<void> {
    const reads: Promise<unknown>[] = [];
    this.forEachRun(
      lba,
      blocks,
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
    const newPages = new Set<number>();
    this.forEachRun(
      lba,
      blocks,
      (inBuf, pos, bytes) => writes.push(this.file.write(data, inBuf, bytes, pos)),
      (grain, inBuf, bytes, inGrain) => {
        writes.push(this.allocateAndWrite(grain, data.subarray(inBuf, inBuf + bytes), inGrain));
        newPages.add(Math.floor(grain / this.grainsPerPage));
      },
    );
    if (writes.length === 1) await writes[0];
    else await Promise.all(writes);
    if (opts.fua) await this.file.datasync();
    // The data is in place (durable first when FUA); now the maps that point at it.
    for (const page of newPages) await this.persistPage(page, opts.fua === true);
  }

  /** First write to a grain: take a slot now (so concurrent writers see it), fill it, then let waiters in. */
  private allocateAndWrite(grain: number, part: Buffer, inGrain: number): Promise<void> {
    const reused = this.freeSlots.length > 0;
    const slot = reused ? this.freeSlots.pop()! : this.slotHighWater++;
    this.setSlot(grain, slot);
    this.usedSlots++;
    let body: Promise<unknown>;
    if (reused && part.length < grainBytes) {
      // A reused slot holds an old grain's bytes: write the whole grain, zeros around the data.
      const full = Buffer.alloc(grainBytes);
      part.copy(full, inGrain);
      body = this.file.write(full, 0, grainBytes, slot * grainBytes);
    } else {
      // A fresh slot lies in the file's hole (zeros) or is written whole.
      body = this.file.write(part, 0, part.length, slot * grainBytes + inGrain);
    }
    const done = body.then(() => {
      this.allocating.delete(grain);
    });
    this.allocating.set(grain, done);
    return done;
  }

  async unmap(lba: number, blocks: number, opts: WriteOptions = {}): Promise<void> {
    this.check(lba, blocks);
    await this.lock.runExclusive(async () => {
      const released: number[] = [];
      const pages = new Set<number>();
      const zeroWrites: Promise<unknown>[] = [];
      this.forEachPiece(lba, blocks, (grain, inGrain, _inBuf, bytes) => {
        const slot = this.slotOf(grain);
        if (slot < 0) return;
        if (bytes === grainBytes) {
          this.setSlot(grain, -1);
          released.push(slot);
          pages.add(Math.floor(grain / this.grainsPerPage));
        } else {
          zeroWrites.push(this.file.write(Buffer.alloc(bytes), 0, bytes, slot * grainBytes + inGrain));
        }
      });
      await Promise.all(zeroWrites);
      if (opts.fua && zeroWrites.length > 0) await this.file.datasync();
      // Durable before reuse: see the ordering rules at the top.
      for (const page of pages) await this.persistPage(page, true);
      for (const slot of released) this.freeSlots.push(slot);
      this.usedSlots -= released.length;
    });
  }

  async compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions = {}): Promise<CompareAndWriteResult> {
    if (compare.length !== data.length || data.length % this.blockBytes !== 0) throw new InvalidArgumentError('compare and write buffers differ in size');
    const blocks = data.length / this.blockBytes;
    this.check(lba, blocks);
    return this.lock.runExclusive(async () => {
      for (let p = this.pendingAllocation(lba, blocks); p; p = this.pendingAllocation(lba, blocks)) await p;
      const current = Buffer.allocUnsafe(data.length);
      await this.readInto(current, lba, blocks);
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
    const end = Math.min(this.blockCount, lba + blocksMax);
    const extents: LbaExtent[] = [];
    for (let at = lba; at < end; ) {
      const grain = Math.floor(at / this.grainBlocks);
      const next = Math.min(end, (grain + 1) * this.grainBlocks);
      const mapped = this.slotOf(grain) >= 0;
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

  async close(): Promise<void> {
    if (this.closed) return;
    await this.lock.runExclusive(async () => {
      await this.flush();
      this.closed = true;
      await this.file.close();
    });
  }
}
