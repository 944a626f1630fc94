// The seam between the page store and its disk: the data files and the key-value store the
// page store keeps its maps and records in, and nothing more. A peer runs on `diskMedia(dir)`
// (a directory: data files through DataFile, LevelDB through ClassicLevel in `meta/`); the
// simulator runs on an in-memory media with a power-loss model (test/sim/disk.ts).
//
// What each side may rely on (the store's ordering rules in page-store.ts are built on these):
// - A file write or a KV op that resolved survives a process crash (kill -9): the OS has it.
// - A file's writes resolved before `datasync` was called survive a power loss once it resolves.
// - KV ops are a log: an op with `sync: true` makes itself and every op before it survive a
//   power loss. Ops without it may be lost on power loss, but only a suffix of the log.
// - Reads see the latest state, durable or not.
// Buffers: `write` and `put` borrow the caller's buffer only until the promise settles;
// `read` fills the caller's; values from `get` and iteration belong to the caller.

import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { ClassicLevel } from 'classic-level';
import { DataFile } from './data-file';

/** One file, positional I/O. Errors are the store's typed errors (StoreReadError, StoreWriteError, NoSpaceError). */
export interface MediaFile {
  /** Fills buf[offset, offset+length) from `position`; past the end of the file reads zeros. */
  read(buf: Buffer, offset: number, length: number, position: number): Promise<void>;
  /** Writes all of it. */
  write(buf: Buffer, offset: number, length: number, position: number): Promise<void>;
  /** Every write to this file resolved before the call is durable when it resolves. */
  datasync(): Promise<void>;
  size(): Promise<number>;
  close(): Promise<void>;
}

export type KvOp = { type: 'put'; key: string; value: Buffer } | { type: 'del'; key: string };

/** Keys from `gte` (included) to `lt` (excluded), in key order. */
export interface KvRange {
  gte: string;
  lt: string;
}

export interface KvWriteOptions {
  /** Durable (with every op before it) when the promise resolves. */
  sync: boolean;
}

/** The ordered key-value store (LevelDB's semantics, string keys, Buffer values). */
export interface MediaKv {
  /** undefined when absent. */
  get(key: string): Promise<Buffer | undefined>;
  put(key: string, value: Buffer, opts: KvWriteOptions): Promise<void>;
  del(key: string, opts: KvWriteOptions): Promise<void>;
  /** Atomic: all of `ops` or none survive. */
  batch(ops: readonly KvOp[], opts: KvWriteOptions): Promise<void>;
  /** Delete every key in the range (not synced). */
  clear(range: KvRange): Promise<void>;
  /** Entries in the range, in key order. */
  iterator(range: KvRange): AsyncIterable<[string, Buffer]>;
  /** True when the store holds no key at all. */
  isEmpty(): Promise<boolean>;
  close(): Promise<void>;
}

export interface StoreMedia {
  /** Opens `name`, creating it empty when absent. */
  openFile(name: string): Promise<MediaFile>;
  /** Removes `name`; no error when it is absent. */
  removeFile(name: string): Promise<void>;
  /** Names of the data files (the KV store's own files are not listed). */
  listFiles(): Promise<string[]>;
  /** Opens the key-value store (one per media). */
  openKv(): Promise<MediaKv>;
}

const kvDirName = 'meta';

/** The real disk: `dir` holds the data files and the LevelDB directory `meta/`. */
export function diskMedia(dir: string): StoreMedia {
  return {
    openFile: (name) => DataFile.open(join(dir, name)),
    removeFile: (name) => fsp.rm(join(dir, name), { force: true }),
    listFiles: async () => (await fsp.readdir(dir)).filter((name) => name !== kvDirName),
    openKv: async () => {
      // The KV store is opened first: the directory is made here.
      await fsp.mkdir(dir, { recursive: true });
      const db = new ClassicLevel<string, Buffer>(join(dir, kvDirName), { valueEncoding: 'buffer' });
      await db.open();
      return levelKv(db);
    },
  };
}

function levelKv(db: ClassicLevel<string, Buffer>): MediaKv {
  return {
    get: (key) => db.get(key),
    put: (key, value, opts) => db.put(key, value, opts),
    del: (key, opts) => db.del(key, opts),
    batch: (ops, opts) => db.batch(ops.slice(), opts),
    clear: (range) => db.clear(range),
    iterator: (range) => db.iterator(range),
    isEmpty: async () => (await db.keys({ limit: 1 }).all()).length === 0,
    close: () => db.close(),
  };
}
