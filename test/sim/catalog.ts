// The simulated catalog (what etcd is in production): one linearizable store of versioned
// records, reached by each peer through its own client over the simulated network.
//
// An operation takes effect at one instant (its arrival at the store), so compare-and-swap is
// linearizable as etcd's is. The request or the reply may be lost (the client fails at its
// deadline: when the reply was lost the change DID happen, the ambiguous outcome a protocol must
// handle by reading back). While a peer is partitioned from the catalog its operations fail at
// their deadline and its watch stops; when the partition heals the watch delivers every change
// it missed, in commit order (etcd's watch resumes from its revision). A crashed peer's client
// dies with it.

import { ConflictError, PeersanError } from '../../src/errors';
import type { MetaRecord, MetaStore, WatchEvent } from '../../src/cluster/metastore';
import type { SeededRandom } from '../../src/env/manual';
import type { Route } from '../../src/routing/table';
import type { RoutePut } from './copies';
import type { PeerTimers, SimWorld } from './world';

/** How long a catalog operation may take before the client gives up (etcd3's call deadline). */
export const catalogCallMsMax = 2_000;

interface Watcher {
  prefix: string;
  onEvent(ev: WatchEvent): void;
}

export class SimCatalog {
  private readonly records = new Map<string, MetaRecord>();
  private readonly clients = new Set<SimCatalogClient>();
  /** Peer → partitions from the catalog in force (a peer's own, its isolation; each heals its own). */
  private readonly cut = new Map<string, number>();
  dropRate = 0;
  readonly counts = { partitions: 0, drops: 0 };
  /** Every route record committed, in commit order: the history copies.ts checks (a route changes only by a put). */
  readonly routePuts: RoutePut[] = [];

  constructor(readonly world: SimWorld, readonly random: SeededRandom) {}

  client(peer: string, timers: PeerTimers): SimCatalogClient {
    const c = new SimCatalogClient(this, peer, timers);
    this.clients.add(c);
    return c;
  }

  /** Cut (or reconnect) a peer from the catalog. */
  partition(peer: string, on: boolean): void {
    const n = (this.cut.get(peer) ?? 0) + (on ? 1 : -1);
    if (on && n === 1) this.counts.partitions++;
    if (n > 0) return void this.cut.set(peer, n);
    this.cut.delete(peer);
    for (const c of this.clients) if (c.peer === peer) c.resume();
  }

  healAll(): void {
    for (const p of [...this.cut.keys()]) {
      this.cut.set(p, 1);
      this.partition(p, false);
    }
  }

  reachable(peer: string): boolean {
    return !this.cut.has(peer);
  }

  delay(): number {
    return 0.1 + this.random.float() * 0.8;
  }

  lost(): boolean {
    if (this.dropRate > 0 && this.random.float() < this.dropRate) {
      this.counts.drops++;
      return true;
    }
    return false;
  }

  /** The store's side, at the operation's linearization point. */
  get(key: string): MetaRecord | undefined {
    const r = this.records.get(key);
    return r && copy(r);
  }

  /** A page's route record, if its route ever changed (else the placement rule gives it). */
  route(volumeId: string, page: number): Route | undefined {
    const r = this.records.get(`${routePrefix}${volumeId}/${String(page).padStart(10, '0')}`);
    return r && (JSON.parse(r.value.toString()) as Route);
  }

  list(prefix: string): MetaRecord[] {
    return [...this.records.keys()].filter((k) => k.startsWith(prefix)).sort().map((k) => copy(this.records.get(k)!));
  }

  put(key: string, value: Buffer, expectedVersion: number): MetaRecord {
    const current = this.records.get(key);
    if ((current?.version ?? 0) !== expectedVersion) throw new ConflictError(`${key} changed (version ${current?.version ?? 0}, expected ${expectedVersion})`);
    const record = { key, value: Buffer.from(value), version: expectedVersion + 1 };
    this.records.set(key, record);
    if (key.startsWith(routePrefix)) this.routePuts.push(routePut(key, value, this.world.now()));
    this.publish({ type: 'put', record: copy(record) }, key);
    return copy(record);
  }

  delete(key: string, expectedVersion: number): void {
    const current = this.records.get(key);
    if (!current || current.version !== expectedVersion) throw new ConflictError(`${key} changed (version ${current?.version ?? 0}, expected ${expectedVersion})`);
    this.records.delete(key);
    this.publish({ type: 'delete', key }, key);
  }

  private publish(ev: WatchEvent, key: string): void {
    for (const c of this.clients) c.enqueue(ev, key);
  }

  forget(client: SimCatalogClient): void {
    this.clients.delete(client);
  }

}

/** Where the catalog keeps page routes (src/cluster/catalog.ts): routes/<volume id>/<page, 10 digits>. */
const routePrefix = 'routes/';

function routePut(key: string, value: Buffer, atMs: number): RoutePut {
  const [volumeId, page] = key.slice(routePrefix.length).split('/');
  return { volumeId, page: Number(page), route: JSON.parse(value.toString()) as Route, atMs };
}

function copy(r: MetaRecord): MetaRecord {
  return { key: r.key, value: Buffer.from(r.value), version: r.version };
}

/** One peer incarnation's connection to the catalog. */
export class SimCatalogClient implements MetaStore {
  private readonly watchers = new Set<Watcher>();
  /** Watch events not yet delivered, in commit order. */
  private readonly queue: { ev: WatchEvent; key: string }[] = [];
  private pumping = false;
  private dead = false;

  constructor(private readonly cat: SimCatalog, readonly peer: string, private readonly timers: PeerTimers) {}

  /** The peer crashed: nothing more comes back. */
  kill(): void {
    this.dead = true;
    this.watchers.clear();
    this.queue.length = 0;
    this.cat.forget(this);
  }

  private op<T>(apply: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let settled = false;
      const settle = (fn: () => void): void => {
        if (settled || this.dead) return;
        settled = true;
        this.timers.clearTimeout(deadline);
        fn();
      };
      const deadline = this.timers.setTimeout(() => settle(() => reject(new PeersanError(`catalog: no answer within ${catalogCallMsMax} ms`))), catalogCallMsMax);
      if (!this.cat.reachable(this.peer) || this.cat.lost()) return;
      this.cat.world.after(this.cat.delay(), () => {
        if (this.dead || !this.cat.reachable(this.peer)) return;
        let outcome: () => void;
        try {
          const value = apply();
          outcome = () => resolve(value);
        } catch (err) {
          outcome = () => reject(err);
        }
        if (this.cat.lost()) return;
        this.cat.world.after(this.cat.delay(), () => this.cat.reachable(this.peer) && settle(outcome));
      });
    });
  }

  get(key: string): Promise<MetaRecord | undefined> {
    return this.op(() => this.cat.get(key));
  }

  list(prefix: string): Promise<MetaRecord[]> {
    return this.op(() => this.cat.list(prefix));
  }

  put(key: string, value: Buffer, expectedVersion: number): Promise<MetaRecord> {
    const v = Buffer.from(value);
    return this.op(() => this.cat.put(key, v, expectedVersion));
  }

  delete(key: string, expectedVersion: number): Promise<void> {
    return this.op(() => this.cat.delete(key, expectedVersion));
  }

  async watch(prefix: string, onEvent: (ev: WatchEvent) => void): Promise<() => void> {
    // Registered at once (as etcd's watch is before its promise resolves): no change is missed.
    const w = { prefix, onEvent };
    this.watchers.add(w);
    return () => void this.watchers.delete(w);
  }

  async close(): Promise<void> {
    this.kill();
  }

  enqueue(ev: WatchEvent, key: string): void {
    if (this.dead) return;
    this.queue.push({ ev, key });
    this.pump();
  }

  resume(): void {
    this.pump();
  }

  /** Deliver queued events one at a time, in order, each after a network delay. */
  private pump(): void {
    if (this.pumping || this.dead || this.queue.length === 0 || !this.cat.reachable(this.peer)) return;
    this.pumping = true;
    this.cat.world.after(this.cat.delay(), () => {
      this.pumping = false;
      if (this.dead) return;
      if (!this.cat.reachable(this.peer)) return;
      const next = this.queue.shift();
      if (next) for (const w of [...this.watchers]) if (next.key.startsWith(w.prefix)) w.onEvent(structuredCloneEvent(next.ev));
      this.pump();
    });
  }
}

function structuredCloneEvent(ev: WatchEvent): WatchEvent {
  return ev.type === 'put' ? { type: 'put', record: copy(ev.record) } : { type: 'delete', key: ev.key };
}
