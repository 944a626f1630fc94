// MetaStore on etcd (DESIGN.md 3): peers on different machines share the catalog through
// etcd's linearizable transactions and watches; no home-made consensus. A record's version is
// etcd's per-key version (1 at creation, +1 per put, gone with the key), so compare-and-swap
// is a transaction on `Version ==`.

import { Etcd3, type Namespace } from 'etcd3';
import { ClosedError, ConflictError } from '../errors';
import type { CatalogConfig } from '../server/config';
import type { MetaRecord, MetaStore, WatchEvent } from './metastore';
import { readPem } from './peer-tls';

export interface EtcdOptions {
  endpoints: string[];
  /** Every key lives under this prefix (one etcd may serve several groups). */
  namespace: string;
  dialTimeoutMs?: number;
  /** TLS to etcd (PEM): its CA, and this client's certificate when etcd asks for one. */
  tls?: { ca: Buffer; cert?: Buffer; key?: Buffer };
  /** etcd RBAC user. */
  auth?: { user: string; password: string };
}

export class EtcdMetaStore implements MetaStore {
  private readonly client: Etcd3;
  private readonly ns: Namespace;
  private readonly unwatchers = new Set<() => Promise<void>>();
  private closed = false;

  constructor(opts: EtcdOptions) {
    this.client = new Etcd3({
      hosts: opts.endpoints,
      dialTimeout: opts.dialTimeoutMs ?? 5000,
      ...(opts.tls ? { credentials: { rootCertificate: opts.tls.ca, privateKey: opts.tls.key, certChain: opts.tls.cert } } : {}),
      ...(opts.auth ? { auth: { username: opts.auth.user, password: opts.auth.password } } : {}),
    });
    this.ns = this.client.namespace(opts.namespace);
  }

  /** From `cluster.catalog` (backend etcd): reads the TLS files it names. */
  static fromConfig(c: Extract<CatalogConfig, { backend: 'etcd' }>, defaultNamespace: string): EtcdMetaStore {
    const read = (path: string, what: string): Buffer => readPem(path, `cluster.catalog.tls.${what}`);
    return new EtcdMetaStore({
      endpoints: c.endpoints,
      namespace: c.namespace ?? defaultNamespace,
      ...(c.tls ? { tls: { ca: read(c.tls.ca, 'ca'), cert: c.tls.cert ? read(c.tls.cert, 'cert') : undefined, key: c.tls.key ? read(c.tls.key, 'key') : undefined } } : {}),
      ...(c.user !== undefined && c.password !== undefined ? { auth: { user: c.user, password: c.password } } : {}),
    });
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
