// The replicated write path (src/replication/replicated.ts) in an in-process group of three
// peers (test/helpers/group.ts: real gRPC between them, no iSCSI host): a host write through
// any peer is on every copy's store; overlapping writes end the same on every copy; a copy at a
// newer epoch refuses a change from an older one; a copy that is down is dropped from the
// in-sync set before the write is acknowledged; a COMPARE AND WRITE that miscompares writes
// nothing anywhere; a primary whose route is behind its copies' sends again at the new epoch, or
// gives way to the new primary. Each copy's store is read directly, below every layer. Then the
// pure cores: range locks (range-lock.ts) and the recent changes' numbering (recent.ts); and a
// lone primary with a scripted copy: busy refusals are asked again, silence is dropped on time.

import t from 'tap';
import { setTimeout as delay } from 'node:timers/promises';
import type { VolumeRecord } from '../src/cluster/catalog';
import { ErrorKind } from '../src/errors';
import { BlockOp, ReplyStatus, type BlockRequest } from '../src/routing/frame';
import { RangeLock } from '../src/replication/range-lock';
import { RecentChanges } from '../src/replication/recent';
import { PageMovedError } from '../src/routing/moved';
import { copiesOf, inSyncOf, RouteTable, type Route } from '../src/routing/table';
import type { BlockSender } from '../src/routing/router';
import { ReplicatedVolume } from '../src/replication/replicated';
import { passThroughGuard, passThroughTracker } from './helpers/one-copy';
import type { PrimaryGuard } from '../src/replication/hooks';
import { divergedKeepMs, replicaAckMsMax } from '../src/limits';
import { realEnv } from '../src/env/real';
import pino from 'pino';
import type { BlockBackend } from '../src/store/types';
import { startGroup, type NetworkFaults } from './helpers/group';
import { MemoryBackend } from './helpers/memory-backend';

const bs = 512;
const pageBlocks = 8192;
const peers = ['p1', 'p2', 'p3'];

type Group = Awaited<ReturnType<typeof startGroup>>;

/** A group with a volume of `replicas` copies per page, open on every peer. */
async function groupWithVolume(t: Tap, replicas: number, network?: NetworkFaults): Promise<{ g: Group; record: VolumeRecord }> {
  const g = await startGroup(t, 3, network ? { network } : {});
  const record = await g.peer('p1').core.catalog.createVolume({ name: 'rep', size: '64M', replicas });
  // Each peer opens the volume when its catalog watch fires.
  for (let i = 0; i < 200 && !peers.every((p) => g.peer(p).core.targets.hostPathFor('rep')); i++) await delay(10);
  return { g, record };
}

type Tap = Parameters<Parameters<typeof t.test>[1]>[0];

function host(g: Group, peer: string): BlockBackend {
  return g.peer(peer).core.targets.hostPathFor('rep')!;
}

/** The blocks as `peer`'s own store holds them (below the replicated layer, the stamp log and moves). */
function stored(g: Group, peer: string, record: VolumeRecord, lba: number, blocks: number): Promise<Buffer> {
  return g.peer(peer).core.targets.stored(record.id)!.read(lba, blocks);
}

function pattern(blocks: number, seed: number): Buffer {
  const b = Buffer.alloc(blocks * bs);
  for (let i = 0; i < b.length; i++) b[i] = (seed * 31 + i * 7) & 0xff;
  return b;
}

t.test('a host write through any peer is on every copy', async (t) => {
  const { g, record } = await groupWithVolume(t, 3);
  // Page 0: primary p1; the write crosses into page 1 (primary p2), sent by p3's host.
  const lba = pageBlocks - 16;
  const data = pattern(32, 1);
  await host(g, 'p3').write(lba, data);
  for (const p of peers) t.ok((await stored(g, p, record, lba, 32)).equals(data), `on ${p}'s store`);
  await host(g, 'p2').unmap(lba, 8);
  for (const p of peers) t.ok((await stored(g, p, record, lba, 8)).equals(Buffer.alloc(8 * bs)), `unmapped on ${p}'s store`);
  const route = g.peer('p1').core.catalog.routes(record).route(0);
  t.same({ owner: route.owner, version: route.version, inSync: inSyncOf(route) }, { owner: 'p1', version: 1, inSync: peers }, 'every copy acknowledged: the route did not change');
});

t.test('overlapping writes sent at once end the same on every copy', async (t) => {
  // Forwarded and replica frames each wait a random 0-3 ms: without the primary's order, copies would apply them in any order.
  const { g, record } = await groupWithVolume(t, 3, { forwardDelayMs: 3, prepareJitterMs: 0 });
  const span = 64;
  for (let round = 0; round < 30; round++) {
    const base = round % 2 === 0 ? 100 : pageBlocks - 32; // within page 0, or across pages 0 and 1
    const writes = Array.from({ length: 6 }, (_, i) => {
      const lba = base + Math.floor(Math.random() * (span - 16));
      const blocks = 1 + Math.floor(Math.random() * 16);
      return host(g, peers[Math.floor(Math.random() * 3)]).write(lba, pattern(blocks, round * 10 + i));
    });
    await Promise.all(writes);
    const [first, ...rest] = await Promise.all(peers.map((p) => stored(g, p, record, base, span)));
    for (const [i, other] of rest.entries()) {
      if (!other.equals(first)) {
        t.fail(`round ${round}: ${peers[i + 1]} differs from p1`);
        return;
      }
    }
  }
  t.pass('30 rounds of 6 overlapping writes: every copy identical');
});

t.test('a copy at a newer epoch refuses a change from an older one', async (t) => {
  const { g, record } = await groupWithVolume(t, 2);
  // Page 0: copies [p1, p2] at epoch 1. A CAS (what a failover or a drop does) makes it epoch 2.
  const old = g.peer('p1').core.catalog.routes(record).route(0);
  const next = await g.peer('p1').core.catalog.casRoute(record, 0, old, (now) => ({ owner: now.owner, copies: now.copies, inSync: now.inSync }));
  t.equal(next.version, 2);
  const change = (epoch: number, fill: number): BlockRequest => ({
    id: 1, op: BlockOp.write, fua: false, replica: true, volumeId: record.id, lba: 8, blocks: 8, routeVersion: epoch, compareBytes: 0, seq: 5, ackedThrough: 4, data: Buffer.alloc(8 * bs, fill),
  });
  const stale = await g.peer('p2').core.pages.handle(change(1, 0xaa));
  t.same({ status: stale.status, owner: stale.owner, version: stale.version, detail: stale.detail }, { status: ReplyStatus.moved, owner: 'p1', version: 2, detail: 0 }, 'MOVED with the route the copy knows');
  t.ok((await stored(g, 'p2', record, 8, 8)).equals(Buffer.alloc(8 * bs)), 'nothing applied');
  const current = await g.peer('p2').core.pages.handle(change(2, 0xbb));
  t.equal(current.status, ReplyStatus.ok, 'the current epoch is applied');
  t.ok((await stored(g, 'p2', record, 8, 8)).equals(Buffer.alloc(8 * bs, 0xbb)), 'applied to the copy');
  const copy = g.peer('p2').core.targets.replicated(record.id)!;
  t.same(copy.recentGrains(0), [Math.floor(8 / copy.grainBlocks)], 'its grain is recent on the copy (seq 5 above the mark 4)');
  const pruned = await g.peer('p2').core.pages.handle({ ...change(2, 0xbc), lba: 3 * copy.grainBlocks, seq: 6, ackedThrough: 5 });
  t.equal(pruned.status, ReplyStatus.ok);
  t.same(copy.recentGrains(0), [3], 'the next change\'s mark passes seq 5: only the new grain is recent');
  // The primary's port says the same as an error.
  const port = g.peer('p1').core.targets.replicated(record.id)!;
  await t.rejects(port.send('p2', old, 'write', 8, 8, Buffer.alloc(8 * bs, 0xcc), false), PageMovedError, 'ReplicaPort.send at the old epoch: PageMovedError');
  // The primary itself is not a copy that takes replica changes.
  await t.rejects(g.peer('p1').core.pages.handle(change(2, 0xdd)), { kind: ErrorKind.invalid }, 'the primary refuses a replica change of its own page (answered failed, invalid)');
  t.ok((await stored(g, 'p1', record, 8, 8)).equals(Buffer.alloc(8 * bs)), 'nothing applied on the primary');
});

t.test('a secondary that is down is dropped from the in-sync set before the write is acknowledged', async (t) => {
  const { g, record } = await groupWithVolume(t, 2);
  // Page 0: copies [p1, p2]. p2 stops; a write through p3 reaches p1, which cannot reach p2.
  await g.peer('p2').stop();
  const data = pattern(16, 9);
  let routeAtAck: Route | undefined;
  await host(g, 'p3').write(64, data).then(() => {
    routeAtAck = g.peer('p1').core.catalog.routes(record).route(0);
  });
  t.same({ owner: routeAtAck!.owner, version: routeAtAck!.version, copies: routeAtAck!.copies, inSync: inSyncOf(routeAtAck!) }, { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p1'] }, 'p2 was CASed out (epoch 2) before the write was acknowledged; it stays a copy');
  t.ok((await stored(g, 'p1', record, 64, 16)).equals(data), 'the write is on the primary');
  // The next write finds p2 out of the in-sync set: acknowledged at once, the route unchanged.
  await host(g, 'p1').write(64, pattern(16, 10));
  t.equal(g.peer('p1').core.catalog.routes(record).route(0).version, 2, 'no second drop');
});

t.test('a COMPARE AND WRITE that miscompares writes nothing anywhere; one that matches writes every copy', async (t) => {
  const { g, record } = await groupWithVolume(t, 3);
  const lba = 2 * pageBlocks + 40; // page 2: primary p3
  const a = pattern(2, 1);
  await host(g, 'p1').write(lba, a);
  const wrong = pattern(2, 2);
  const miss = await host(g, 'p2').compareAndWrite(lba, wrong, pattern(2, 3));
  t.equal(miss.ok, false, 'miscompare');
  t.equal(miss.ok === false && miss.miscompareOffsetBytes, a.findIndex((b, i) => b !== wrong[i]), 'at the first differing byte');
  for (const p of peers) t.ok((await stored(g, p, record, lba, 2)).equals(a), `${p} unchanged`);
  const c = pattern(2, 4);
  const hit = await host(g, 'p2').compareAndWrite(lba, a, c);
  t.equal(hit.ok, true, 'match');
  for (const p of peers) t.ok((await stored(g, p, record, lba, 2)).equals(c), `${p} written`);
});

t.test('a forwarded change routed by an older route of the page is answered MOVED, unapplied (its sender may have run it elsewhere); a current one is applied', async (t) => {
  const { g, record } = await groupWithVolume(t, 2);
  const catalog = g.peer('p1').core.catalog;
  // Page 0: primary p1. A new epoch with the same primary (as after a copy left and came back).
  const v1 = catalog.routes(record).route(0);
  const v2 = await catalog.casRoute(record, 0, v1, (now) => ({ owner: now.owner, copies: [...copiesOf(now)], inSync: [...inSyncOf(now)] }));
  t.equal(v2.version, v1.version + 1);
  const primary = g.peer('p1').core.targets.replicated(record.id)!;
  const before = await stored(g, 'p1', record, 64, 8);
  await t.rejects(primary.write(64, pattern(8, 7), { routeVersion: v1.version }), PageMovedError, 'routed by the older route: MOVED');
  await t.rejects(primary.compareAndWrite(64, before, pattern(8, 7), { routeVersion: v1.version }), PageMovedError, 'a COMPARE AND WRITE too, before it compares');
  for (const p of ['p1', 'p2']) t.ok((await stored(g, p, record, 64, 8)).equals(before), `nothing applied on ${p}`);
  await primary.write(64, pattern(8, 8), { routeVersion: v2.version });
  t.ok((await stored(g, 'p2', record, 64, 8)).equals(pattern(8, 8)), 'routed by the current route: applied on every copy');
  await primary.write(64, pattern(8, 9));
  t.ok((await stored(g, 'p2', record, 64, 8)).equals(pattern(8, 9)), 'this peer\'s own host write (no route version): applied');
});

t.test('a copy that knows a newer epoch: the primary re-reads the route and sends again, or follows a new primary', async (t) => {
  const { g, record } = await groupWithVolume(t, 3);
  // p1 (primary of page 0) stops hearing route changes; a CAS elsewhere makes the epoch 2, the same copies.
  const release = g.peer('p1').core.catalog.holdRouteEvents();
  t.teardown(release);
  const p2catalog = g.peer('p2').core.catalog;
  await p2catalog.casRoute(record, 0, p2catalog.routes(record).route(0), (now) => ({ owner: now.owner, copies: now.copies, inSync: now.inSync }));
  t.equal(g.peer('p1').core.catalog.routes(record).route(0).version, 1, 'p1 still routes by epoch 1');
  const data = pattern(8, 21);
  await host(g, 'p1').write(16, data);
  for (const p of peers) t.ok((await stored(g, p, record, 16, 8)).equals(data), `on ${p}'s store`);
  const route = g.peer('p1').core.catalog.routes(record).route(0);
  t.same({ version: route.version, inSync: inSyncOf(route) }, { version: 2, inSync: peers }, 'sent again at epoch 2: no copy dropped');
  // Now p2 becomes the primary (as a failover's CAS would); p1 still does not hear it.
  await p2catalog.casRoute(record, 0, p2catalog.routes(record).route(0), () => ({ owner: 'p2', copies: ['p2', 'p3', 'p1'], inSync: ['p2', 'p3', 'p1'] }));
  const next = pattern(8, 22);
  await host(g, 'p1').write(16, next);
  for (const p of peers) t.ok((await stored(g, p, record, 16, 8)).equals(next), `through the new primary: on ${p}'s store`);
  t.equal(g.peer('p1').core.catalog.routes(record).route(0).owner, 'p2', 'p1 learned the new primary');
});

t.test('range locks: overlapping ranges of a page in arrival order, disjoint ones at once', async (t) => {
  const locks = new RangeLock();
  const order: string[] = [];
  const gates = new Map<string, () => void>();
  const hold = (name: string) => () => new Promise<void>((r) => gates.set(name, () => (order.push(name), r())));
  const a = locks.run(0, 0, 16, hold('a'));
  const b = locks.run(0, 8, 16, hold('b')); // overlaps a
  const c = locks.run(0, 32, 8, hold('c')); // disjoint: runs at once
  const d = locks.run(1, 0, 16, hold('d')); // another page: at once
  const e = locks.run(0, 20, 1, hold('e')); // overlaps b only, behind it
  await new Promise((r) => setImmediate(r));
  t.same([...gates.keys()].sort(), ['a', 'c', 'd'], 'a, c and d hold their ranges; b waits for a, e for b');
  gates.get('c')!();
  gates.get('a')!();
  await new Promise((r) => setImmediate(r));
  t.ok(gates.has('b') && !gates.has('e'), 'b runs once a released; e still waits for b');
  gates.get('b')!();
  await new Promise((r) => setImmediate(r));
  gates.get('e')!();
  gates.get('d')!();
  await Promise.all([a, b, c, d, e]);
  t.same(order, ['c', 'a', 'b', 'e', 'd']);
  t.equal(locks.queued(0) + locks.queued(1), 0, 'nothing left queued');
});

t.test('recent changes: numbered per page, kept above the acknowledged mark', async (t) => {
  const primary = new RecentChanges();
  const first = primary.begin(0, 1, 2);
  const second = primary.begin(0, 5, 5);
  t.same([first, second], [{ seq: 1, ackedThrough: 0 }, { seq: 2, ackedThrough: 0 }], 'the mark stays below the changes in flight');
  primary.end(0, 2, true);
  t.same(primary.grains(0), [1, 2, 5], 'change 1 still in flight: nothing is past the mark');
  primary.end(0, 1, true);
  t.same(primary.grains(0), [], 'both acknowledged: no recent grain left');
  const failed = primary.begin(0, 7, 7);
  primary.end(0, failed.seq, false);
  const after = primary.begin(0, 9, 9);
  primary.end(0, after.seq, true);
  t.same({ ackedThrough: after.ackedThrough, grains: primary.grains(0) }, { ackedThrough: 2, grains: [7, 9] }, 'a failed change pins the mark below it');
  primary.release(0);
  t.equal(primary.begin(0, 0, 0).ackedThrough, 4, 'released (not the primary any more): the mark moves on');
  const copy = new RecentChanges();
  copy.received(3, 0, 0, 10, 9);
  copy.received(3, 4, 4, 11, 9);
  t.same(copy.grains(3), [0, 4]);
  copy.received(3, 6, 6, 12, 10);
  t.same(copy.grains(3), [4, 6], 'entries up to the mark are forgotten');
  // A new primary that saw fewer changes numbers from below this copy's mark: its changes are kept.
  copy.received(3, 8, 8, 7, 6);
  t.same(copy.grains(3), [4, 6, 8], 'a change numbered below the old mark is still recent');
});

t.test('a copy asked for its recent grains at a new epoch refuses the old primary from then on', async (t) => {
  const { g, record } = await groupWithVolume(t, 3);
  // p3 stops hearing route changes: only what it is told (or reads itself) moves its epoch.
  const release = g.peer('p3').core.catalog.holdRouteEvents();
  t.teardown(release);
  const change = (epoch: number, lba: number, seq: number): BlockRequest => ({
    id: 1, op: BlockOp.write, fua: false, replica: true, volumeId: record.id, lba, blocks: 1, routeVersion: epoch, compareBytes: 0, seq, ackedThrough: seq - 1, data: Buffer.alloc(bs, seq),
  });
  const grainBlocks = g.peer('p3').core.targets.replicated(record.id)!.grainBlocks;
  t.equal((await g.peer('p3').core.pages.handle(change(1, 2 * grainBlocks, 7))).status, ReplyStatus.ok, "the old primary's change at epoch 1 is applied");
  // p2 takes over page 0 (what a failover's CAS does) and reconciles: it asks p3 first.
  const c2 = g.peer('p2').core.catalog;
  await c2.casRoute(record, 0, c2.routes(record).route(0), () => ({ owner: 'p2', copies: ['p2', 'p3', 'p1'], inSync: ['p2', 'p3'] }));
  const answer = JSON.parse(await g.peer('p3').core.handlers.replication('p2', 'recent', JSON.stringify({ volumeId: record.id, page: 0, version: 2 }))) as unknown;
  t.same(answer, { grains: [2] }, 'its recent grain, once it caught up to the new epoch');
  const late = await g.peer('p3').core.pages.handle(change(1, 5 * grainBlocks, 8));
  t.same({ status: late.status, owner: late.owner, version: late.version }, { status: ReplyStatus.moved, owner: 'p2', version: 2 }, "the old primary's next change is refused");
  t.ok((await stored(g, 'p3', record, 5 * grainBlocks, 1)).equals(Buffer.alloc(bs)), 'and not applied');
  await t.rejects(g.peer('p3').core.handlers.replication('p2', 'recent', JSON.stringify({ volumeId: record.id, page: -1, version: 2 })), { kind: ErrorKind.invalid }, 'a body out of shape is refused');
});

/** A primary p1 of a 2-copy volume alone (pages of 64 blocks), its link to p2 given by the test; the "catalog" its own table. */
function lonePrimary(link: BlockSender, guard: PrimaryGuard = passThroughGuard, env = realEnv()) {
  const table = new RouteTable(['p1', 'p2'], 64, new Map(), 2);
  const local = new MemoryBackend(bs, 128, 8);
  const record = { id: '0123456789abcdef', name: 'v', replicas: 2 } as VolumeRecord;
  const cas: Route[] = [];
  const changed: string[][] = [];
  const catalog = {
    casRoute: async (_v: VolumeRecord, page: number, from: Route, change: (now: Route) => Omit<Route, 'version'>): Promise<Route> => {
      const next = { ...change(table.route(page)), version: from.version + 1 };
      table.learn(page, next);
      cas.push(next);
      return next;
    },
  };
  const tracker = { ...passThroughTracker, changed: (_v: string, _p: number, _r: Route, _l: number, _b: number, missed: readonly string[]) => void changed.push([...missed]) };
  const volume = new ReplicatedVolume({
    self: 'p1', volumeId: record.id, table, local, copy: local, link: () => link, refresh: async (p) => table.route(p), env,
    volume: () => record, catalog, tracker, guard, log: pino({ level: 'silent' }),
  });
  return { volume, local, cas, changed, table };
}

t.test('a change goes to a copy being resynced as FUA, to an in-sync one as the host sent it (seed 141356)', async (t) => {
  const sent: { fua: boolean; replica: boolean }[] = [];
  const recording: BlockSender = { send: async (req) => (sent.push({ fua: req.fua, replica: req.replica === true }), { id: 0, status: ReplyStatus.ok, owner: 'p2', version: 0, detail: 0 }) };
  const { volume, table } = lonePrimary(recording);
  await volume.write(0, Buffer.alloc(bs, 1));
  t.same(sent, [{ fua: false, replica: true }], 'p2 in sync: the change as the host sent it');
  // p2 stale and resyncing from p1 now: its grain stays clean once it applied the change (resync.ts changed).
  table.learn(0, { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p1'] });
  const resyncing = new ReplicatedVolume({
    self: 'p1', volumeId: '0123456789abcdef', table, local: new MemoryBackend(bs, 128, 8), copy: new MemoryBackend(bs, 128, 8), link: () => recording, refresh: async (p) => table.route(p), env: realEnv(),
    volume: () => ({ id: '0123456789abcdef', name: 'v', replicas: 2 }) as VolumeRecord, catalog: { casRoute: () => Promise.reject(new Error('no CAS expected')) },
    tracker: { ...passThroughTracker, resyncing: () => ['p2'] }, guard: passThroughGuard, log: pino({ level: 'silent' }),
  });
  sent.length = 0;
  await resyncing.write(0, Buffer.alloc(bs, 2));
  t.same(sent, [{ fua: true, replica: true }], 'p2 resyncing: the change applied durably (a crash of p2 must not lose a change its clean grain says it has)');
});

t.test('a copy that refuses for a while as busy is asked again, not dropped', async (t) => {
  let asked = 0;
  const busyTwice: BlockSender = {
    send: async (req) => (++asked <= 2 ? { id: 0, status: ReplyStatus.failed, owner: 'p2', version: 0, detail: ErrorKind.busy } : { id: 0, status: ReplyStatus.ok, owner: 'p2', version: 0, detail: 0 }),
  };
  const { volume, local, cas } = lonePrimary(busyTwice);
  await volume.write(0, Buffer.alloc(bs, 3));
  t.equal(asked, 3, 'asked three times');
  t.same(cas, [], 'no drop');
  t.equal(local.data[0], 3, 'written here');
});

/** The copy p2, which took page 0 over (epoch 2, as a failover's CAS): it answers MOVED, and `table()` learns the route naming it. */
function takenOverBy2(table: () => RouteTable): BlockSender {
  return {
    send: async () => {
      table().learn(0, { owner: 'p2', version: 2, copies: ['p2', 'p1'], inSync: ['p2'] });
      return { id: 0, status: ReplyStatus.moved, owner: 'p2', version: 2, detail: 0 };
    },
  };
}

t.test('a COMPARE AND WRITE whose page is taken over while its write replicates answers an error, not MOVED (it may have applied: never run again)', async (t) => {
  let table!: RouteTable;
  const takenOver = takenOverBy2(() => table);
  const lone = lonePrimary(takenOver);
  table = lone.table;
  const caw = lone.volume.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 5));
  await t.rejects(caw, { code: 'PEERSAN_ERR_IN_DOUBT', kind: ErrorKind.unavailable }, 'an error the router does not follow');
  t.equal(lone.local.data[0], 5, 'its write was applied here before the page was lost');
  // A plain write is idempotent: MOVED, and the router sends it to the new primary.
  const other = lonePrimary(takenOver);
  table = other.table;
  await t.rejects(other.volume.write(0, Buffer.alloc(bs, 6)), PageMovedError);
});

// Seed 98534 of the simulator: a compare-and-write reached one secondary and not the other, which
// took the page over after it had answered a timestamp snapshot's TAKE(T). The old primary's
// TAKE(T) waited for the change, which ended MOVED; the copies it reached froze it in their
// layers, the new primary did not, and both were named holders.
t.test('a change cut short by a takeover names every copy but the new primary to snapshots, for divergedKeepMs (seed 98534)', async (t) => {
  let table!: RouteTable;
  const takenOver = takenOverBy2(() => table);
  let nowMs = 1_000;
  const real = realEnv();
  const env = { ...real, clock: { ...real.clock, monotonicMs: () => nowMs } };
  const lone = lonePrimary(takenOver, passThroughGuard, env);
  table = lone.table;
  t.same(lone.volume.divergedCopies(), [], 'none before');
  await t.rejects(lone.volume.write(0, Buffer.alloc(bs, 6)), PageMovedError);
  t.same(lone.volume.divergedCopies(), [{ page: 0, peer: 'p1' }], 'this peer, which applied the write; not p2, the new primary whose content the reconcile keeps');
  nowMs += divergedKeepMs - 1;
  t.same(lone.volume.divergedCopies(), [{ page: 0, peer: 'p1' }], 'still named just before divergedKeepMs');
  nowMs += 1;
  t.same(lone.volume.divergedCopies(), [], 'not after');
  await t.rejects(lone.volume.write(8, Buffer.alloc(bs, 7)), PageMovedError, 'the page is p2\'s now: the next write is refused before it is sent');
  t.same(lone.volume.divergedCopies(), [], 'and names nobody');
});

t.test('a COMPARE AND WRITE confirms a MISCOMPARE as a read, under the leases: a primary that lost its lease answers none (seed 1683)', async (t) => {
  // The guard as for a primary cut off since a copy took the page over: changes may start (the copies fence them), reads may not.
  const calls: boolean[] = [];
  const lostLease: PrimaryGuard = {
    run: (_volumeId, page, _route, read, op) => (calls.push(read), read ? Promise.reject(new PageMovedError(page, { owner: 'p2', version: 2 })) : op()),
  };
  let sent = 0;
  const counting: BlockSender = { send: async () => (sent++, { id: 0, status: ReplyStatus.ok, owner: 'p2', version: 0, detail: 0 }) };
  const { volume, local } = lonePrimary(counting, lostLease);
  local.data.fill(7, 0, bs);
  await t.rejects(volume.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 5)), PageMovedError, 'no MISCOMPARE from blocks a new primary may have changed: MOVED, the router asks the new one');
  t.same(calls, [false, true], 'the miscompare was confirmed as a read under the guard, after the compare');
  t.equal(sent, 0, 'nothing replicated');
  t.equal(local.data[0], 7, 'nothing written here');
  // A match is fenced by its write (the copies refuse an old epoch): no lease asked for.
  calls.length = 0;
  t.same(await volume.compareAndWrite(0, Buffer.alloc(bs, 7), Buffer.alloc(bs, 5)), { ok: true }, 'a match writes');
  t.same(calls, [false], 'with no read under the guard');
  t.equal(sent, 1, 'sent to the copy');
  // With its leases, a MISCOMPARE is answered as before.
  const leased = lonePrimary(counting);
  leased.local.data.fill(7, 0, bs);
  t.same(await leased.volume.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 5)), { ok: false, miscompareOffsetBytes: 0 }, 'MISCOMPARE');
});

t.test('a MISCOMPARE stands only at the route it compared under: a page taken over and handed back meanwhile is compared again (seed 37724)', async (t) => {
  let table!: RouteTable;
  let local!: MemoryBackend;
  let reads = 0;
  // The first confirmation finds the leases valid again after the page went to p2 and came back
  // (epoch 1 -> 3), with p2's write now in this copy (the resync that put it back in sync).
  const handedBack: PrimaryGuard = {
    run: async (_volumeId, _page, _route, read, op) => {
      if (read && ++reads === 1) {
        table.learn(0, { owner: 'p1', version: 3, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
        local.data.fill(9, 0, bs);
      }
      return op();
    },
  };
  const ok: BlockSender = { send: async () => ({ id: 0, status: ReplyStatus.ok, owner: 'p2', version: 0, detail: 0 }) };
  const lone = lonePrimary(ok, handedBack);
  ({ table, local } = lone);
  local.data.fill(7, 0, bs);
  t.same(await lone.volume.compareAndWrite(0, Buffer.alloc(bs, 9), Buffer.alloc(bs, 5)), { ok: true }, "compared again against p2's write: a match");
  t.equal(reads, 1, 'one confirmation (the first compare); the match needs none');
  t.equal(local.data[0], 5, 'and written');
  // A page whose route keeps changing under every compare: BUSY for the host to retry, no MISCOMPARE.
  const churn = lonePrimary(ok, {
    run: async (_volumeId, page, _route, read, op) => {
      if (read) churn.table.learn(page, { ...churn.table.route(page), version: churn.table.route(page).version + 1 });
      return op();
    },
  });
  churn.local.data.fill(7, 0, bs);
  await t.rejects(churn.volume.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 5)), { kind: ErrorKind.busy }, 'a transient error');
  t.equal(churn.local.data[0], 7, 'nothing written');
});

t.test('a copy that does not answer within replicaAckMsMax is dropped, then the write is acknowledged', async (t) => {
  const silent: BlockSender = { send: () => new Promise(() => undefined) };
  const { volume, cas, changed } = lonePrimary(silent);
  const t0 = Date.now();
  await volume.write(0, Buffer.alloc(bs, 4));
  const waitedMs = Date.now() - t0;
  t.ok(waitedMs >= replicaAckMsMax - 50 && waitedMs < replicaAckMsMax + 1_000, `waited about replicaAckMsMax (${waitedMs} ms)`);
  t.same(cas.map((r) => ({ version: r.version, inSync: r.inSync })), [{ version: 2, inSync: ['p1'] }], 'p2 CASed out of the in-sync set');
  t.same(changed, [['p2']], 'its miss is told to the tracker (its grains become dirty for it)');
});

t.test('a primary whose route of a page lacks its copies (heard in a MOVED answer) reads them before it replicates', async (t) => {
  const { g, record } = await groupWithVolume(t, 3);
  const release = g.peer('p1').core.catalog.holdRouteEvents();
  t.teardown(release);
  const c2 = g.peer('p2').core.catalog;
  await c2.casRoute(record, 0, c2.routes(record).route(0), (now) => ({ owner: now.owner, copies: now.copies, inSync: now.inSync }));
  const table = g.peer('p1').core.catalog.routes(record);
  table.learn(0, { owner: 'p1', version: 2 });
  t.equal(table.route(0).copies, undefined, 'p1 knows epoch 2 without its copies');
  const data = pattern(4, 33);
  await host(g, 'p1').write(24, data);
  for (const p of peers) t.ok((await stored(g, p, record, 24, 4)).equals(data), `on ${p}'s store`);
  t.same(table.route(0).copies, peers, "the catalog's record filled them in");
});
