// MetaStore on etcd (DESIGN.md 3): peers on different machines share the catalog through
// etcd's linearizable transactions and watches; no home-made consensus. A record's version is
// etcd's per-key version (1 at creation, +1 per put, gone with the key), so compare-and-swap
// is a transaction on `Version ==`.

import { Etcd3, type Namespace } from 'etcd3';
import { ClosedError, ConflictError } from '../errors';
import type { MetaRecord, MetaStore, WatchEvent } from './metastore';

export interface EtcdOptions {
  endpoints: string[];
  /** Every key lives under this prefix (one etcd may serve several groups). */
  namespace: string;
  dialTimeoutMs?: number;
}

export class EtcdMetaStore implements MetaStore {
  private readonly client: Etcd3;
  private readonly ns: Namespace;
  private readonly unwatchers = new Set<() => Promise<void>>();
  private closed = false;

  constructor(opts: EtcdOptions) {
    this.client = new Etcd3({ hosts: opts.endpoints, dialTimeout: opts.dialTimeoutMs ?? 5000 });
    this.ns = this.client.namespace(opts.namespace);
  }

  async get(key: string): Promise<MetaRecord | undefined> {
    this.assertOpen();
    const res = await this.ns.get(key).exec();
    const kv = res.kvs[0];
    return kv ? { key, value: kv.value, version: Number(kv.version) } : undefined;
  }

  async list(prefix: string): Promise<MetaRecord[]> {
    this.assertOpen();
    const res = await this.ns.getAll().prefix(prefix).sort('Key', 'Ascend').exec();
    return res.kvs.map((kv) => ({ key: kv.key.toString(), value: kv.value, version: Number(kv.version) }));
  }

  async put(key: string, value: Buffer, expectedVersion: number): Promise<MetaRecord> {
    this.assertOpen();
    const res = await this.ns.if(key, 'Version', '==', expectedVersion).then(this.ns.put(key).value(value)).commit();
    if (!res.succeeded) throw new ConflictError(`${key} changed (expected version ${expectedVersion})`);
    return { key, value, version: expectedVersion + 1 };
  }

  async delete(key: string, expectedVersion: number): Promise<void> {
    this.assertOpen();
    if (expectedVersion === 0) throw new ConflictError(`${key}: nothing to delete at version 0`);
    const res = await this.ns.if(key, 'Version', '==', expectedVersion).then(this.ns.delete().key(key)).commit();
    if (!res.succeeded) throw new ConflictError(`${key} changed (expected version ${expectedVersion})`);
  }

  async watch(prefix: string, onEvent: (ev: WatchEvent) => void): Promise<() => void> {
    this.assertOpen();
    const watcher = await this.ns.watch().prefix(prefix).create();
    watcher.on('put', (kv) => onEvent({ type: 'put', record: { key: kv.key.toString(), value: kv.value, version: Number(kv.version) } }));
    watcher.on('delete', (kv) => onEvent({ type: 'delete', key: kv.key.toString() }));
    const cancel = (): Promise<void> => watcher.cancel();
    this.unwatchers.add(cancel);
    return () => {
      this.unwatchers.delete(cancel);
      void cancel();
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.unwatchers].map((c) => c().catch(() => undefined)));
    this.client.close();
  }

  private assertOpen(): void {
    if (this.closed) throw new ClosedError('catalog is closed');
  }
}
