// Leases and failover (src/replication/leases.ts, failover.ts) and the router's wait for a new
// primary (src/routing/router.ts), with no sockets: a ManualEnv, an in-memory catalog store
// shared by every peer's Catalog, fake replicated layers (ReplicaPort over a MemoryBackend) and
// a fake message transport that can cut peers off.

import t from 'tap';
import pino from 'pino';
import { Catalog, type VolumeRecord } from '../src/cluster/catalog';
import type { MetaRecord, MetaStore, WatchEvent } from '../src/cluster/metastore';
import { ManualEnv } from '../src/env/manual';
import { ConflictError, PeerUnavailableError } from '../src/errors';
import { failoverWaitMsMax, leaseDriftMarginMs, leaseMs, leasePingMs, leaseTakeoversPerAnswerMax, routeRetriesMax } from '../src/limits';
import { Failover } from '../src/replication/failover';
import type { ReplicaPort } from '../src/replication/hooks';
import { LeaseBook, Leases } from '../src/replication/leases';
import { checkLease, checkLeaseAnswer, checkLed, checkLedAnswer, checkPromote, checkRecent, checkRecentAnswer, type ReplicationHandler } from '../src/replication/messages';
import { learnTakeover } from '../src/replication/failover';
import { BlockOp, ReplyStatus, type BlockReply } from '../src/routing/frame';
import { PageMovedError } from '../src/routing/moved';
import { newRoutingCounters, VolumeRouter, type BlockSender } from '../src/routing/router';
import { inSyncOf, RouteTable, type Route } from '../src/routing/table';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pageBlocks as storePageBlocks } from '../src/limits';
import { PageStore } from '../src/store/page-store';
import { MemoryBackend } from './helpers/memory-backend';
import { fixedMembers } from '../src/cluster/members';

const log = pino({ level: 'silent' });
const pageBlocks = 64;
const bs = 512;
const grainBlocks = 8;
const volumeBlocks = 4 * pageBlocks;

/** The catalog store: one linearizable map with watches, as etcd is to the peers. */
class MemoryMeta implements MetaStore {
  private readonly records = new Map<string, MetaRecord>();
  private readonly watchers = new Set<{ prefix: string; onEvent: (ev: WatchEvent) => void }>();
  /** The next put takes effect but its caller hears a failure, and so does the get after it (an ambiguous outcome, as etcd's). */
  loseNextPutReply = false;
  private failGets = 0;
  async get(key: string): Promise<MetaRecord | undefined> {
    if (this.failGets > 0 && this.failGets--) throw new Error('catalog: no answer');
    return this.records.get(key);
  }
  async list(prefix: string): Promise<MetaRecord[]> {
    return [...this.records.values()].filter((r) => r.key.startsWith(prefix)).sort((a, b) => a.key.localeCompare(b.key));
  }
  async put(key: string, value: Buffer, expectedVersion: number): Promise<MetaRecord> {
    const current = this.records.get(key);
    if ((current?.version ?? 0) !== expectedVersion) throw new ConflictError(`${key} is at version ${current?.version ?? 0}`);
    const record = { key, value, version: expectedVersion + 1 };
    this.records.set(key, record);
    for (const w of this.watchers) if (key.startsWith(w.prefix)) w.onEvent({ type: 'put', record });
    if (this.loseNextPutReply) {
      this.loseNextPutReply = false;
      this.failGets = 1;
      throw new Error('catalog: no answer');
    }
    return record;
  }
  async delete(key: string, expectedVersion: number): Promise<void> {
    if ((this.records.get(key)?.version ?? 0) !== expectedVersion) throw new ConflictError(key);
    this.records.delete(key);
    for (const w of this.watchers) if (key.startsWith(w.prefix)) w.onEvent({ type: 'delete', key });
  }
  async watch(prefix: string, onEvent: (ev: WatchEvent) => void): Promise<() => void> {
    const w = { prefix, onEvent };
    this.watchers.add(w);
    return () => this.watchers.delete(w);
  }
  async close(): Promise<void> {}
}

/** One peer's replicated layer of the volume: its store, its recent grains, and replica sends applied at the copy when the epoch matches. */
class FakePort implements ReplicaPort {
  readonly local = new MemoryBackend(bs, volumeBlocks, grainBlocks);
  readonly recent = new Set<number>();
  /** "peer op lba@epoch" of every change applied at a copy. */
  readonly sent: string[] = [];
  constructor(
    private readonly self: string,
    private readonly group: Group,
  ) {}
  recentGrains(): number[] {
    return [...this.recent];
  }
  exclusive<T>(_page: number, _lba: number, _blocks: number, fn: () => Promise<T>): Promise<T> {
    return fn();
  }
  async send(peer: string, route: Route, op: 'write' | 'unmap', lba: number, blocks: number, data: Buffer | undefined): Promise<number> {
    if (!this.group.reaches(this.self, peer)) throw new PeerUnavailableError(peer, 'cut off', false);
    const copy = this.group.peer(peer);
    const known = copy.catalog.routes(this.group.volume).route(Math.floor(lba / pageBlocks));
    if (known.version > route.version) throw new PageMovedError(0, known);
    if (op === 'write') await copy.port.local.write(lba, data!);
    else await copy.port.local.unmap(lba, blocks);
    this.sent.push(`${peer} ${op} ${lba}@${route.version}`);
    return 1;
  }
}

interface TestPeer {
  id: string;
  catalog: Catalog;
  leases: Leases;
  failover: Failover;
  port: FakePort;
  held: number[];
  drops: string[][];
  handlers: Map<string, ReplicationHandler>;
  /** Pages put in the activity log (failover's `logged`), and the put's wait, when the test sets one. */
  logged: string[];
  logWait?: Promise<void>;
}

/** Peers wired as composePeer wires them, over a fake transport that the test can cut. */
class Group {
  readonly env = new ManualEnv();
  readonly meta = new MemoryMeta();
  /** Peers cut off from every other peer (not from the catalog). */
  readonly cut = new Set<string>();
  readonly peers = new Map<string, TestPeer>();
  volume!: VolumeRecord;

  reaches(from: string, to: string): boolean {
    return !this.cut.has(from) && !this.cut.has(to);
  }

  peer(id: string): TestPeer {
    return this.peers.get(id)!;
  }

  /** `held`: pages each peer's store holds data of; `suspect`: pages in each peer's activity log at its start. */
  static async start(ids: string[], replicas: number, held: Record<string, number[]> = {}, suspect: Record<string, number[]> = {}, cut: string[] = []): Promise<Group> {
    const g = new Group();
    for (const id of cut) g.cut.add(id);
    const catalogs = new Map<string, Catalog>();
    for (const id of ids) catalogs.set(id, await Catalog.open(g.meta, { members: fixedMembers(ids), pageBlocks, env: g.env }));
    g.volume = await catalogs.get(ids[0])!.createVolume({ name: 'vol', size: volumeBlocks * bs, replicas });
    for (const id of ids) g.peers.set(id, g.build(id, ids, catalogs.get(id)!, held[id] ?? [], suspect[id] ?? []));
    for (const p of g.peers.values()) await p.failover.start();
    for (const p of g.peers.values()) p.leases.start();
    return g;
  }

  private build(id: string, ids: string[], catalog: Catalog, held: number[], suspect: number[]): TestPeer {
    const call = async (to: string, kind: string, body: Record<string, unknown>): Promise<Record<string, unknown>> => {
      await Promise.resolve();
      if (!this.reaches(id, to)) throw new PeerUnavailableError(to, 'cut off', false);
      const answer = await this.peer(to).handlers.get(kind)!(id, JSON.parse(JSON.stringify(body)) as Record<string, unknown>);
      return JSON.parse(JSON.stringify(answer ?? {})) as Record<string, unknown>;
    };
    const env = this.env;
    const leases = new Leases({ self: id, groupPeers: () => ids, env, log, call, learn: (t) => learnTakeover(catalog, t), refreshRoutes: () => catalog.fetchRoutes() });
    const port = new FakePort(id, this);
    const peer: TestPeer = { id, catalog, leases, port, held, drops: [], handlers: new Map(), logged: [], failover: undefined as unknown as Failover };
    peer.failover = new Failover({
      self: id, env, log, catalog, leases, call, port: () => port, heldPages: () => peer.held, suspect: async () => suspect,
      drop: (volume, page, route, peers) => {
        peer.drops.push([...peers]);
        return catalog.casRoute(volume, page, route, (now) => ({ owner: now.owner, copies: [...(now.copies ?? [])], inSync: inSyncOf(now).filter((p) => !peers.includes(p)) }));
      },
      logged: (volumeId, page) => {
        peer.logged.push(`${volumeId}/${page}`);
        return peer.logWait;
      },
      flushStore: () => port.local.flush(),
    });
    peer.handlers.set('lease', async (from, body) => leases.handle(from, body));
    for (const [kind, h] of peer.failover.handlers()) peer.handlers.set(kind, h);
    return peer;
  }

  route(id: string, page = 0): Route {
    return this.peer(id).catalog.routes(this.volume).route(page);
  }

  close(): void {
    for (const p of this.peers.values()) {
      p.leases.close();
      p.failover.close();
      p.catalog.close();
    }
  }
}

function grainLba(page: number, grain: number): number {
  return page * pageBlocks + grain * grainBlocks;
}

function fill(byte: number): Buffer {
  return Buffer.alloc(grainBlocks * bs, byte);
}

t.test('LeaseBook: a lease runs from the renewal\'s sending for leaseMs; silence is leaseMs + margin with no grant', async (t) => {
  const asker = new LeaseBook(['g'], 0);
  const grantor = new LeaseBook(['p'], 0);
  t.notOk(asker.valid('g', 0), 'no lease before a renewal');
  t.equal(asker.send('g', 100), 0, 'a renewal goes, acknowledging no takeover');
  t.equal(asker.send('g', 150), undefined, 'one renewal in flight at a time');
  const answer = grantor.grant('p', 0, 180);
  asker.answered('g', 100, answer, 200);
  t.ok(answer.granted);
  t.ok(asker.valid('g', 100 + leaseMs - 1), 'valid until sent + leaseMs');
  t.notOk(asker.valid('g', 100 + leaseMs), 'expired at sent + leaseMs, not answered + leaseMs');
  t.notOk(grantor.silent('p', 180 + leaseMs + leaseDriftMarginMs), 'the grantor waits leaseMs + the drift margin');
  t.ok(grantor.silent('p', 180 + leaseMs + leaseDriftMarginMs + 1));
  t.ok(100 + leaseMs < 180 + leaseMs + leaseDriftMarginMs, 'so the asker\'s lease ran out before the grantor takes over');
  t.notOk(new LeaseBook(['p'], 5_000).silent('p', 5_000 + leaseMs), 'a grantor that just started counts as having granted at its start');
});

t.test('LeaseBook: a takeover fences the old primary until it learned the new route', async (t) => {
  const grantor = new LeaseBook(['p'], 0);
  grantor.fence('p', 'v', 3);
  t.same(grantor.grant('p', 0, 10), { granted: false, takeovers: [] }, 'no grant while the CAS is in flight');
  const route: Route = { owner: 'g', version: 2, copies: ['g', 'p'], inSync: ['g'] };
  grantor.fenced('p', 'v', 3, route);
  const answer = grantor.grant('p', 0, 20);
  t.same(answer, { granted: true, takeovers: [{ seq: 1, volumeId: 'v', page: 3, route }] }, 'granted with the route to learn first');
  t.same(grantor.grant('p', 1, 30).takeovers, [], 'acknowledged: forgotten');
  const asker = new LeaseBook(['g'], 0);
  asker.send('g', 15);
  asker.answered('g', 15, answer, 25);
  t.equal(asker.send('g', 40), 1, 'the next renewal acknowledges it');
});

t.test('promotion only after leaseMs + margin of silence, never while the primary renews', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2, { p2: [0] });
  t.teardown(() => g.close());
  t.same(g.route('p2'), { owner: 'p1', version: 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  await g.env.run(5_000);
  t.equal(g.route('p2').owner, 'p1', 'a primary that renews keeps its pages');
  const led = async (): Promise<unknown> => (await g.peer('p2').handlers.get('led')!('p3', { volumeId: g.volume.id, primary: 'p1' })) as unknown;
  t.same(await led(), { pages: 1 }, 'led: p2 holds one page p1 leads (what a flush p1 did not answer waits for)');
  const cutAt = g.env.clock.monotonicMs();
  g.cut.add('p1');
  // p1 is cut off from the catalog's watch too: it can learn the takeover only from p2's lease answers.
  const resumeWatch = g.peer('p1').catalog.holdRouteEvents();
  t.teardown(resumeWatch);
  await g.env.run(leaseMs + leaseDriftMarginMs - leasePingMs);
  t.equal(g.route('p2').version, 1, 'not before its lease could have run out, plus the margin');
  await g.env.run(2 * leasePingMs + 10);
  t.same(g.route('p2'), { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] }, 'then the next in-sync copy takes over');
  t.ok(g.env.clock.monotonicMs() - cutAt <= leaseMs + leaseDriftMarginMs + 2 * leasePingMs + 10, 'within the failover pause');
  t.equal(g.route('p3').owner, 'p2', 'every peer learns it');
  t.same(await led(), { pages: 0 }, 'led: none once p2 took it over');

  // The old primary comes back: the first lease it gets from p2 carries the takeover, so it never reads the page as primary again.
  g.cut.delete('p1');
  await g.env.run(2 * leasePingMs);
  t.ok(g.peer('p1').leases.valid('p2'), 'p1 holds a lease from p2 again');
  t.equal(g.route('p1').owner, 'p2', 'and learned the route from it before it counted');
  await t.rejects(g.peer('p1').failover.run(g.volume.id, 0, { owner: 'p1', version: 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] }, true, async () => 'stale'), PageMovedError);
});

t.test('a read during which the page was taken over and handed back is read again, not answered (seed 37724)', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2, { p2: [0] });
  t.teardown(() => g.close());
  await g.env.run(1_000);
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  let runs = 0;
  // The first read takes its data before the cut, and answers only after it (a slow disk).
  const read = g.peer('p1').failover.run(g.volume.id, 0, g.route('p1'), true, async () => (++runs === 1 ? (await held, 'stale') : 'fresh'));
  await g.env.run(0);
  t.equal(runs, 1, 'the read runs under its leases');
  g.cut.add('p1');
  const resumeWatch = g.peer('p1').catalog.holdRouteEvents();
  t.teardown(resumeWatch);
  await g.env.run(leaseMs + leaseDriftMarginMs + 2 * leasePingMs);
  t.equal(g.route('p2').owner, 'p2', 'p2 took the page over (and may have written it)');
  g.cut.delete('p1');
  await g.env.run(2 * leasePingMs);
  t.ok(g.peer('p1').leases.valid('p2'), 'p1 holds a lease from p2 again');
  // p2 hands the page back to p1 (what a handover's CAS does); p1 hears it from the catalog.
  const c2 = g.peer('p2').catalog;
  await c2.casRoute(g.volume, 0, c2.routes(g.volume).route(0), () => ({ owner: 'p1', copies: ['p1', 'p2'], inSync: ['p1', 'p2'] }));
  resumeWatch();
  await g.env.run(0);
  t.same(g.route('p1'), { owner: 'p1', version: 3, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] }, 'p1 is the primary again, at a newer route');
  t.ok(g.peer('p1').leases.valid('p2'), 'with its lease');
  release();
  t.equal(await read, 'fresh', "the data taken before the takeover is not answered: the page is read again");
  t.equal(runs, 2, 'twice');
});

t.test('a grantor that forgot its takeovers (restarted): the old primary re-reads the routes after its lease lapsed', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2, { p2: [0] });
  t.teardown(() => g.close());
  await g.env.run(1_000);
  g.cut.add('p1');
  const resumeWatch = g.peer('p1').catalog.holdRouteEvents();
  t.teardown(resumeWatch);
  await g.env.run(leaseMs + leaseDriftMarginMs + 2 * leasePingMs);
  t.equal(g.route('p2').owner, 'p2');
  // As if p2 had restarted: it holds no takeover to tell p1 of.
  g.peer('p2').leases.book.grant('p1', Number.MAX_SAFE_INTEGER, g.env.clock.monotonicMs());
  g.cut.delete('p1');
  await g.env.run(2 * leasePingMs);
  t.ok(g.peer('p1').leases.valid('p2'), 'p1 holds a lease from p2 again');
  t.equal(g.route('p1').owner, 'p2', 'learned from the catalog, read after the lapse');
});

t.test('a copy cut off from the other peers (not from the catalog) takes nothing over', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2, { p2: [0] });
  t.teardown(() => g.close());
  await g.env.run(1_000);
  g.cut.add('p2');
  await g.env.run(10_000);
  t.same(g.route('p2'), { owner: 'p1', version: 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] }, 'p2 hears from no majority: p1 stays primary');
});

t.test('a promote message waits out the primary\'s lease, and is refused when the primary renews', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2);
  t.teardown(() => g.close());
  await g.env.run(2_000);
  const ask = (): Promise<unknown> => g.peer('p2').handlers.get('promote')!('p3', { volumeId: g.volume.id, page: 0, version: 1 });
  const refused = ask();
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  t.same(await refused, { route: g.route('p2') }, 'p1 renews with p2: the route stays');
  t.equal(g.route('p2').owner, 'p1');
  g.cut.add('p1');
  const granted = ask();
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  t.match(await granted, { route: { owner: 'p2', version: 2 } }, 'silent: p2 takes over (this page holds no data there: only on demand)');
});

t.test('of two secondaries racing to take over, exactly one wins', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3);
  t.teardown(() => g.close());
  await g.env.run(1_000);
  g.cut.add('p1');
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  const from = g.route('p2');
  const [a, b] = await Promise.all([g.peer('p2').failover.promote(g.volume, 0, from, false), g.peer('p3').failover.promote(g.volume, 0, from, false)]);
  t.equal(a.version, 2);
  t.same(a, b, 'both end with the one route the catalog holds');
  t.same(a, g.route('p1'));
  t.equal(a.owner, 'p2', 'the first CAS won');
  t.same(inSyncOf(a), ['p2', 'p3'], 'the loser stays an in-sync secondary');
});

t.test('the new primary reconciles: the union of recent grains, its content, on every other in-sync copy, before run() serves', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3);
  t.teardown(() => g.close());
  const [p2, p3] = [g.peer('p2'), g.peer('p3')];
  // Writes p1 sent before it died, not known acknowledged: grain 1 reached p2 only, 3 both (p3 first, then p2 at p2's turn), 5 p3 only (p2's grain 5 is a hole).
  await p2.port.local.write(grainLba(0, 1), fill(0xa1));
  await p2.port.local.write(grainLba(0, 3), fill(0xa3));
  await p3.port.local.write(grainLba(0, 3), fill(0xb3));
  await p3.port.local.write(grainLba(0, 5), fill(0xb5));
  p2.port.recent.add(1);
  p3.port.recent.add(3).add(5);
  await g.env.run(1_000);
  g.cut.add('p1');
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  const route = await p2.failover.promote(g.volume, 0, g.route('p2'), false);
  t.equal(route.owner, 'p2');
  const seen = await p2.failover.run(g.volume.id, 0, route, false, async () => Promise.all([1, 3, 5].map((grain) => p3.port.local.read(grainLba(0, grain), grainBlocks))));
  t.same(seen, [fill(0xa1), fill(0xa3), Buffer.alloc(grainBlocks * bs)], 'p3 holds p2\'s content of every grain either changed, before the first request runs');
  t.same(p2.port.sent, ['p3 write 8@2', 'p3 write 24@2', 'p3 unmap 40@2'], 'at the new epoch, to p3 only (p1 is out of the in-sync set)');
  t.notOk(p3.port.local.mapped[grainLba(0, 5)], 'a hole here is a hole there');
});

/** p2 starts taking page 0 over from p1, cut off past its lease: the route before, and the takeover under way for 100 ms. */
async function p2TakesOver(g: Group): Promise<{ before: Route; promoting: Promise<Route> }> {
  await g.env.run(1_000);
  g.cut.add('p1');
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  const before = g.route('p2');
  const promoting = g.peer('p2').failover.promote(g.volume, 0, before, false);
  await g.env.run(100);
  return { before, promoting };
}

// Seed 36720: p2 took page 0 over and crashed 80 ms later, its reconcile unfinished (p3 held a
// write p1 had in flight, p2 did not); page 0 was not in p2's activity log, so p2 restarted as its
// primary, trusted, and the copies stayed apart. The page is logged before the takeover's CAS.
t.test('a takeover puts the page in the activity log, durably, before its CAS', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3);
  t.teardown(() => g.close());
  const p2 = g.peer('p2');
  let logDone!: () => void;
  p2.logWait = new Promise<void>((r) => (logDone = r));
  const { before, promoting } = await p2TakesOver(g);
  t.same(p2.logged, [`${g.volume.id}/0`], 'the page is logged');
  t.equal((await p2.catalog.fetchRoute(g.volume, 0)).version, before.version, 'no CAS while the log\'s put is not durable');
  logDone();
  const route = await promoting;
  t.equal(route.owner, 'p2', 'then the takeover');
});

t.test('a takeover makes this peer\'s store durable before its CAS: it may be left the only copy (seed 128201)', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3);
  t.teardown(() => g.close());
  const p2 = g.peer('p2');
  const local = p2.port.local;
  const flushed = local.flush.bind(local);
  let flushes = 0;
  let flushDone!: () => void;
  const flushWait = new Promise<void>((r) => (flushDone = r));
  local.flush = async () => {
    flushes++;
    await flushWait;
    return flushed();
  };
  const { before, promoting } = await p2TakesOver(g);
  t.equal(flushes, 1, 'the store is flushed');
  t.equal((await p2.catalog.fetchRoute(g.volume, 0)).version, before.version, 'no CAS while the flush is not done');
  flushDone();
  const route = await promoting;
  t.equal(route.owner, 'p2', 'then the takeover');
});

t.test('a takeover whose CAS outcome is unknown keeps the page held until the catalog tells, then reconciles', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3);
  t.teardown(() => g.close());
  const [p2, p3] = [g.peer('p2'), g.peer('p3')];
  await p2.port.local.write(grainLba(0, 2), fill(0xa2));
  await p3.port.local.write(grainLba(0, 2), fill(0xb2));
  p3.port.recent.add(2);
  await g.env.run(1_000);
  g.cut.add('p1');
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  g.meta.loseNextPutReply = true;
  await t.rejects(p2.failover.promote(g.volume, 0, g.route('p2'), false), { message: 'catalog: no answer' });
  t.equal(g.route('p2').owner, 'p2', 'the CAS did take effect');
  const seen = p2.failover.run(g.volume.id, 0, g.route('p2'), false, async () => p3.port.local.read(grainLba(0, 2), grainBlocks));
  await g.env.run(2 * leasePingMs);
  t.same(await seen, fill(0xa2), 'served only after the reconcile');
});

t.test('a copy that does not answer the reconcile is dropped from the in-sync set', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3);
  t.teardown(() => g.close());
  await g.env.run(1_000);
  g.cut.add('p1');
  await g.env.run(leaseMs + leaseDriftMarginMs + 10);
  g.cut.add('p3');
  const route = await g.peer('p2').failover.promote(g.volume, 0, g.route('p2'), false);
  const after = await g.peer('p2').failover.run(g.volume.id, 0, route, false, async () => g.route('p2'));
  t.same(g.peer('p2').drops, [['p3']]);
  t.same(inSyncOf(after), ['p2'], 'served once p3 is out');
});

t.test('reads: a missing lease is waited for, then the silent copy is dropped; a read that outlived its lease runs again', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2);
  t.teardown(() => g.close());
  const p1 = g.peer('p1');
  await g.env.run(1_000);
  let runs = 0;
  t.equal(await p1.failover.run(g.volume.id, 0, g.route('p1'), true, async () => ++runs), 1, 'leases held: served at once');

  // The lease runs out during the read (p2 cut off meanwhile, and for leaseMs more): p2 is dropped, the read runs again.
  let release!: () => void;
  const first = new Promise<void>((resolve) => (release = resolve));
  runs = 0;
  const read = p1.failover.run(g.volume.id, 0, g.route('p1'), true, async () => {
    if (++runs === 1) await first;
    return runs;
  });
  await g.env.run(10);
  g.cut.add('p2');
  await g.env.run(leaseMs + 10);
  release();
  await g.env.run(leaseMs + 10);
  t.equal(await read, 2, 'the read that outlived its lease ran again');
  t.same(p1.drops, [['p2']], 'after waiting leaseMs for a renewal that did not come');
  t.same(inSyncOf(g.route('p1')), ['p1']);

  // A lease that comes back within leaseMs: no drop.
  const g2 = await Group.start(['p1', 'p2', 'p3'], 2);
  t.teardown(() => g2.close());
  await g2.env.run(1_000);
  g2.cut.add('p2');
  await g2.env.run(leaseMs + 10);
  const waited = g2.peer('p1').failover.run(g2.volume.id, 0, g2.route('p1'), true, async () => 'data');
  await g2.env.run(leaseMs / 2);
  g2.cut.delete('p2');
  await g2.env.run(leaseMs);
  t.equal(await waited, 'data');
  t.same(g2.peer('p1').drops, [], 'the copy renewed in time: still in sync');
});

// ---- the router's wait for a new primary ---------------------------------------------------

function ok(payload?: Buffer): BlockReply {
  return { id: 1, status: ReplyStatus.ok, owner: '', version: 0, detail: 0, ...(payload ? { payload } : {}) };
}

function routerOf(env: ManualEnv, table: RouteTable, links: Record<string, BlockSender>, promote?: (peer: string, page: number, route: Route) => Promise<Route>): VolumeRouter {
  return new VolumeRouter({
    self: 'p3', volumeId: '0123456789abcdef', table, local: new MemoryBackend(bs, volumeBlocks, grainBlocks), link: (p) => links[p],
    refresh: async (p) => table.route(p), counters: newRoutingCounters(), env, ...(promote ? { promote } : {}),
  });
}

const down: BlockSender = { send: () => Promise.reject(new PeerUnavailableError('p1', 'connection refused', false)) };
const data = Buffer.alloc(8 * bs, 7);
const p2Link: BlockSender = { send: async (req) => ok(req.op === BlockOp.read ? data : undefined) };

t.test('router: an unreachable primary with another in-sync copy: promote, wait for the new route, retry there', async (t) => {
  const env = new ManualEnv();
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2);
  const asked: string[] = [];
  const router = routerOf(env, table, { p1: down, p2: p2Link }, (peer, page, route) => {
    asked.push(`${peer} ${page} v${route.version}`);
    return new Promise((resolve) => env.timers.setTimeout(() => resolve({ owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] }), 1_500));
  });
  const read = router.read(0, 8);
  await env.run(1_000);
  t.same(asked, ['p2 0 v1'], 'the first other in-sync copy is asked');
  await env.run(1_000);
  t.same(await read, data, 'the host\'s read is served by the new primary');
  t.equal(table.route(0).owner, 'p2');
});

t.test('router: an in-sync copy that cannot be reached either: the next one is asked', async (t) => {
  const env = new ManualEnv();
  const table = new RouteTable(['p1', 'p2', 'p4'], pageBlocks, new Map(), 3);
  const asked: string[] = [];
  const router = routerOf(env, table, { p1: down, p4: p2Link }, async (peer) => {
    asked.push(peer);
    if (peer === 'p2') throw new PeerUnavailableError('p2', 'connection refused', false);
    return { owner: 'p4', version: 2, copies: ['p4', 'p2', 'p1'], inSync: ['p4', 'p2'] };
  });
  const read = router.read(0, 8);
  await env.run(10);
  t.same(await read, data);
  t.same(asked, ['p2', 'p4'], 'in the route\'s order');
});

t.test('router: no in-sync copy reachable either (this peer is the one cut off): the error at once', async (t) => {
  const env = new ManualEnv();
  const table = new RouteTable(['p1', 'p2', 'p4'], pageBlocks, new Map(), 3);
  const router = routerOf(env, table, { p1: down }, async (peer) => {
    throw new PeerUnavailableError(peer, 'connection refused', false);
  });
  let outcome = 'waiting';
  router.read(0, 8).then(() => (outcome = 'served'), (err: PeerUnavailableError) => (outcome = err.peer));
  await env.run(10);
  t.equal(outcome, 'p1', 'the primary\'s error at once, as without replicas: no wait for a failover nobody can make');
});

t.test('router: the new route may come from the catalog watch instead of the answer', async (t) => {
  const env = new ManualEnv();
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2);
  const router = routerOf(env, table, { p1: down, p2: p2Link }, () => new Promise(() => undefined));
  const write = router.write(0, data);
  await env.run(500);
  table.learn(0, { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] });
  await env.run(1);
  await write;
  t.ok(env.clock.monotonicMs() < failoverWaitMsMax, 'retried as soon as the route was learned, not at the bound');
});

t.test('router: a new primary learned while the request to the old one waited: run again there at once, nobody asked', async (t) => {
  const env = new ManualEnv();
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2);
  // The catalog watch brings p2's takeover while the forward to p1 waits for its answer, which never comes.
  const late: BlockSender = {
    send: async () => {
      table.learn(0, { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] });
      throw new PeerUnavailableError('p1', 'no answer in 5000 ms', true);
    },
  };
  let asked = 0;
  const router = routerOf(env, table, { p1: late, p2: p2Link }, () => (asked++, new Promise(() => undefined)));
  await router.write(0, data);
  t.equal(asked, 0, 'no takeover asked for: the table knows the new primary');
});

t.test('router: single-copy pages fail at once as before; a failover that never comes fails after the bounded retries', async (t) => {
  const env = new ManualEnv();
  let asked = 0;
  const promote = (): Promise<Route> => (asked++, new Promise(() => undefined));
  const single = routerOf(env, new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 1), { p1: down, p2: p2Link }, promote);
  await t.rejects(single.read(0, 8), PeerUnavailableError);
  t.equal(asked, 0, 'no copy to ask');
  const stuck = routerOf(env, new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2), { p1: down, p2: p2Link }, promote);
  const read = stuck.read(0, 8);
  const failed = t.rejects(read, PeerUnavailableError);
  await env.run((routeRetriesMax + 1) * failoverWaitMsMax);
  await failed;
  t.equal(asked, routeRetriesMax, 'each try waited for a new primary, within the MOVED loop\'s bound');
});

t.test('router: a COMPARE AND WRITE to an unreachable primary is not sent again at a new primary (it may have applied): the error, the takeover asked for anyway', async (t) => {
  const env = new ManualEnv();
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2);
  const asked: string[] = [];
  let atP2 = 0;
  const counting: BlockSender = { send: async (req) => (atP2++, p2Link.send(req)) };
  const router = routerOf(env, table, { p1: down, p2: counting }, async (peer) => {
    asked.push(peer);
    return { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] };
  });
  await t.rejects(router.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 1)), PeerUnavailableError);
  await env.run(10);
  t.equal(atP2, 0, 'never sent to the new primary');
  t.same(asked, ['p2'], 'the takeover is still asked for');
  t.equal(table.route(0).owner, 'p2', 'the next command goes to the new primary');
  // One that never reached the primary (refused) waits for the new primary as any command.
  const refused: BlockSender = { send: () => Promise.reject(new PeerUnavailableError('p1', 'connection refused', false, { unsent: true })) };
  const table2 = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2);
  const router2 = routerOf(env, table2, { p1: refused, p2: counting }, async () => ({ owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] }));
  t.same(await router2.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 1)), { ok: true }, 'served by the new primary');
  t.equal(atP2, 1, 'sent there once');
});

t.test('Leases: a renewal counts only once the takeovers it carries are learned', async (t) => {
  const env = new ManualEnv();
  const route: Route = { owner: 'g', version: 2, copies: ['g', 'p'], inSync: ['g'] };
  let learned!: () => void;
  const learning = new Promise<void>((resolve) => (learned = resolve));
  const leases = new Leases({
    self: 'p', groupPeers: () => ['p', 'g'], env, log,
    call: async () => ({ granted: true, takeovers: [{ seq: 1, volumeId: '0123456789abcdef', page: 0, route }] }),
    learn: () => learning,
    refreshRoutes: async () => undefined,
  });
  t.teardown(() => leases.close());
  leases.start();
  await env.run(10);
  t.notOk(leases.valid('g'), 'answered, but the takeover is not learned yet');
  learned();
  await env.run(10);
  t.ok(leases.valid('g'), 'learned: the lease counts');
});

t.test('a handover answered with a newer route that still names this peer is asked again at it, not taken for done (seed 42545)', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 3, { p2: [0], p3: [0] });
  t.teardown(() => g.close());
  await g.env.run(1_000);
  const asked = g.route('p1');
  t.same(asked, { owner: 'p1', version: 1, copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p2', 'p3'] });
  // The in-sync set changes meanwhile (p3 dropped, as a failed write does), p1 still the primary.
  const c2 = g.peer('p2').catalog;
  await c2.casRoute(g.volume, 0, asked, (now) => ({ owner: 'p1', copies: [...(now.copies ?? [])], inSync: ['p1', 'p2'] }));
  const handing = g.peer('p1').failover.handOver(g.volume, 0, asked, 'a test');
  await g.env.run(leaseMs);
  const after = await handing;
  t.equal(after?.owner, 'p2', 'p2 took the page over, asked again at the newer route');
  t.same(g.route('p1'), after, 'and p1 learned it');
  t.equal(g.route('p2').owner, 'p2', 'in the catalog');
});

t.test('restart: a suspect page\'s copy leaves the in-sync set (a secondary by CAS, the primary by handover), unless it is the only one', async (t) => {
  const g = await Group.start(['p1', 'p2', 'p3'], 2, {}, { p1: [0], p2: [1], p3: [2] }, ['p2']);
  t.teardown(() => g.close());
  const p1 = g.peer('p1');
  // Page 0: p1 primary, p2 secondary, cut off at first. p1 holds the page meanwhile: a request waits, then learns the page moved.
  let outcome = 'waiting';
  const request = p1.failover.run(g.volume.id, 0, g.route('p1', 0), false, async () => 'served by a suspect primary');
  request.then((v) => (outcome = v), (err: Error) => (outcome = err.name));
  await g.env.run(3_000);
  t.equal(outcome, 'waiting', 'held while the handover cannot be made');
  t.equal(g.route('p1', 0).version, 1);
  g.cut.delete('p2');
  await g.env.run(failoverWaitMsMax - 3_000 - 10);
  t.equal(outcome, 'PageMovedError', 'the request waited for the handover, then went to the new primary');
  t.same(g.route('p1', 0), { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] }, 'handed over to the next in-sync copy');
  // Page 1: p2 primary, p3 secondary; p2 is suspect as the primary too. Page 2: p3 primary, p1 secondary; p3 suspect as primary.
  t.same(g.route('p1', 1), { owner: 'p3', version: 2, copies: ['p3', 'p2'], inSync: ['p3'] });
  t.same(g.route('p1', 2), { owner: 'p1', version: 2, copies: ['p1', 'p3'], inSync: ['p1'] });

  const h = await Group.start(['p1', 'p2', 'p3'], 2, {}, { p2: [0] });
  t.teardown(() => h.close());
  await h.env.run(100);
  t.same(h.peer('p2').drops, [['p2']], 'a suspect secondary drops itself');
  t.same(h.route('p1', 0), { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p1'] });

  const single = await Group.start(['p1', 'p2', 'p3'], 1, {}, { p1: [0] });
  t.teardown(() => single.close());
  await single.env.run(100);
  t.same(single.route('p1', 0), { owner: 'p1', version: 1 }, 'the only in-sync copy stays (nobody has more than it)');
  let served = 'waiting';
  void single.peer('p1').failover.run(single.volume.id, 0, single.route('p1', 0), false, async () => (served = 'served'));
  await single.env.run(10);
  t.equal(served, 'served', 'and serves the page at once');
});

t.test('messages from other peers: each checker takes only what it validates', async (t) => {
  const volumeId = '0123456789abcdef';
  const bad = (what: string, fn: () => unknown): void => void t.throws(fn, { code: 'PEERSAN_ERR_INVALID_ARGUMENT' }, what);
  t.same(checkPromote({ volumeId, page: 3, version: 2, handover: true }), { volumeId, page: 3, version: 2, handover: true });
  t.same(checkRecent({ volumeId, page: 0, version: 1, extra: 'ignored' }), { volumeId, page: 0, version: 1 });
  bad('a volume id that is not 16 hex digits', () => checkPromote({ volumeId: '../etc', page: 0, version: 1 }));
  bad('a negative page', () => checkRecent({ volumeId, page: -1, version: 1 }));
  bad('a page past the largest volume', () => checkRecent({ volumeId, page: 2 ** 40, version: 1 }));
  bad('a version that is not a number', () => checkPromote({ volumeId, page: 0, version: '1' }));
  bad('a handover flag that is not a boolean', () => checkPromote({ volumeId, page: 0, version: 1, handover: 'yes' }));
  bad('a negative ack', () => checkLease({ ack: -1 }));
  const route = { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] };
  t.same(checkLeaseAnswer({ granted: true, takeovers: [{ seq: 1, volumeId, page: 0, route }] }).takeovers[0].route, route);
  bad('more takeovers than one answer carries', () => checkLeaseAnswer({ granted: true, takeovers: Array.from({ length: leaseTakeoversPerAnswerMax + 1 }, (_, i) => ({ seq: i + 1, volumeId, page: 0 })) }));
  bad('a route with four copies', () => checkLeaseAnswer({ granted: false, takeovers: [{ seq: 1, volumeId, page: 0, route: { ...route, copies: ['a', 'b', 'c', 'd'] } }] }));
  bad('a route owner that is not a peer id', () => checkLeaseAnswer({ granted: false, takeovers: [{ seq: 1, volumeId, page: 0, route: { ...route, owner: 7 } }] }));
  bad('a grain outside the page', () => checkRecentAnswer({ grains: [1, 4096] }));
  t.same(checkLed({ volumeId, primary: 'p2', extra: 1 }), { volumeId, primary: 'p2' });
  bad('led: a primary that is not a peer id', () => checkLed({ volumeId, primary: '' }));
  bad('led: a page count that is not a whole number', () => checkLedAnswer({ pages: 1.5 }));
  const leases = new Leases({ self: 'p1', groupPeers: () => ['p1', 'p2'], env: new ManualEnv(), log, call: async () => ({}), learn: async () => undefined, refreshRoutes: async () => undefined });
  bad('a lease from a peer outside the group', () => leases.handle('p9', {}));
});

t.test('Leases: renewals that lapse together share one route refresh, one that starts after their answers', async (t) => {
  const env = new ManualEnv();
  const refreshes: (() => void)[] = [];
  const leases = new Leases({
    self: 'p', groupPeers: () => ['p', 'a', 'b', 'c'], env, log,
    call: async () => ({ granted: true, takeovers: [] }),
    learn: async () => undefined,
    refreshRoutes: () => new Promise<void>((resolve) => refreshes.push(resolve)),
  });
  t.teardown(() => leases.close());
  leases.start();
  await env.run(1);
  t.equal(refreshes.length, 1, 'the first lapsed answer starts a refresh');
  t.notOk(leases.valid('a'), 'no lease before it ends');
  refreshes[0]();
  await env.run(1);
  t.ok(leases.valid('a'));
  t.notOk(leases.valid('b'), 'answers that came while it ran wait for the next one: it may have read the catalog before them');
  t.equal(refreshes.length, 2, 'one next refresh for both');
  refreshes[1]();
  await env.run(1);
  t.ok(leases.valid('b') && leases.valid('c'));
  t.equal(refreshes.length, 2);
});

t.test('the store tells which pages it holds data of (what a peer takes over eagerly)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-held-'));
  const store = await PageStore.open(dir);
  t.teardown(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const volume = await store.openVolume('0123456789abcdef', { blockBytes: bs, blockCount: 4 * storePageBlocks });
  t.same([...volume.heldPages()], [], 'nothing written: nothing held');
  await volume.write(2 * storePageBlocks + 5, Buffer.alloc(bs, 1));
  await volume.write(0, Buffer.alloc(bs, 1));
  t.same([...volume.heldPages()].sort(), [0, 2]);
});
