// Embedded MetaStore: LevelDB (classic-level) in this process. Versions are stored with the
// value; a mutex serialises compare-and-swap so check and write are one step. Every write is
// synced: the catalog is small and its changes are rare.

import { Mutex } from 'async-mutex';
import { ClassicLevel } from 'classic-level';
import { ClosedError, ConflictError } from '../errors';
import type { MetaRecord, MetaStore, WatchEvent } from './metastore';

interface Stored {
  version: number;
  value: string; // base64
}

export class EmbeddedMetaStore implements MetaStore {
  private readonly db: ClassicLevel<string, string>;
  private readonly mutex = new Mutex();
  private readonly watchers = new Set<{ prefix: string; onEvent: (ev: WatchEvent) => void }>();
  private closed = false;

  private constructor(db: ClassicLevel<string, string>) {
    this.db = db;
  }

  static async open(path: string): Promise<EmbeddedMetaStore> {
    const db = new ClassicLevel<string, string>(path, { valueEncoding: 'utf8' });
    await db.open();
    return new EmbeddedMetaStore(db);
  }

  async get(key: string): Promise<MetaRecord | undefined> {
    this.assertOpen();
    const raw = await this.db.get(key);
    return raw === undefined ? undefined : decode(key, raw);
  }

  async list(prefix: string): Promise<MetaRecord[]> {
    this.assertOpen();
    const out: MetaRecord[] = [];
    for await (const [key, raw] of this.db.iterator({ gte: prefix, lt: prefix + '\uffff' })) out.push(decode(key, raw));
    return out;
  }

  put(key: string, value: Buffer, expectedVersion: number): Promise<MetaRecord> {
    return this.mutex.runExclusive(async () => {
      this.assertOpen();
      const current = await this.get(key);
      if ((current?.version ?? 0) !== expectedVersion) {
        throw new ConflictError(`${key} changed (version ${current?.version ?? 0}, expected ${expectedVersion})`);
      }
      const record = { key, value, version: expectedVersion + 1 };
      const stored: Stored = { version: record.version, value: value.toString('base64') };
      await this.db.put(key, JSON.stringify(stored), { sync: true });
      this.emit(key, { type: 'put', record });
      return record;
    });
  }

  delete(key: string, expectedVersion: number): Promise<void> {
    return this.mutex.runExclusive(async () => {
      this.assertOpen();
      const current = await this.get(key);
      if (!current || current.version !== expectedVersion) {
        throw new ConflictError(`${key} changed (version ${current?.version ?? 0}, expected ${expectedVersion})`);
      }
      await this.db.del(key, { sync: true });
      this.emit(key, { type: 'delete', key });
    });
  }

  async watch(prefix: string, onEvent: (ev: WatchEvent) => void): Promise<() => void> {
    this.assertOpen();
    const w = { prefix, onEvent };
    this.watchers.add(w);
    return () => {
      this.watchers.delete(w);
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.watchers.clear();
    await this.mutex.runExclusive(() => this.db.close());
  }

  private emit(key: string, ev: WatchEvent): void {
    for (const w of this.watchers) if (key.startsWith(w.prefix)) w.onEvent(ev);
  }

  private assertOpen(): void {
    if (this.closed) throw new ClosedError('catalog is closed');
  }
}

function decode(key: string, raw: string): MetaRecord {
  const stored = JSON.parse(raw) as Stored;
  return { key, value: Buffer.from(stored.value, 'base64'), version: stored.version };
}
