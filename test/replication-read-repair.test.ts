// Read repair (src/replication/read-repair.ts) in an in-process group of three peers (real gRPC
// between them, no iSCSI host), a volume of two copies per page. Faults come from the disk, as a
// test wrapper around each peer's store (LatentErrors: chosen blocks fail to read until they
// are rewritten, and writes may fail), put in place by a replicated-layer variant passed as a
// protocol (the way test/sim/controls pass theirs), never by a switch in src/:
//
//  - a read the primary's disk fails is answered with the other copy's blocks, and only the
//    failing grain is rewritten on the primary; counted (/metrics) and told (an event);
//  - no other in-sync copy can serve (its disk fails too, or it is out of the in-sync set, or
//    asked at another epoch): the host gets the original error;
//  - the rewrite fails too: the host still gets the blocks, and the primary hands the page over;
//  - a copy whose disk fails a replica write answers an error and is dropped from the in-sync
//    set before the write is acknowledged;
//  - blocks whose grain has a change not settled on every copy are not read from a copy (a lone
//    primary with a scripted copy);
//  - a copy stepping out as suspect serves no replica read;
//  - which errors count as media errors; the replica read's frame.

import t from 'tap';
import { setTimeout as delay } from 'node:timers/promises';
import pino from 'pino';
import type { VolumeRecord } from '../src/cluster/catalog';
import { realEnv } from '../src/env/real';
import { ClosedError, ErrorKind, PeerUnavailableError, StoreReadError, StoreWriteError } from '../src/errors';
import { isMediaError, type ReadRepairResult } from '../src/replication/read-repair';
import { RangeLock } from '../src/replication/range-lock';
import { RecentChanges } from '../src/replication/recent';
import { dropFromInSync, ReplicaReceiver, ReplicatedVolume, type ReplicatedVolumeOptions } from '../src/replication/replicated';
import { BlockOp, decodeRequest, encodeRequest, ReplyStatus, type BlockRequest } from '../src/routing/frame';
import { PageMovedError } from '../src/routing/moved';
import type { BlockSender } from '../src/routing/router';
import { copiesOf, inSyncOf, RouteTable, type Route } from '../src/routing/table';
import { BackendDecorator } from '../src/store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../src/store/types';
import { startGroup } from './helpers/group';
import { MemoryBackend } from './helpers/memory-backend';
import { passThroughGuard, passThroughTracker } from './helpers/one-copy';

const bs = 512;

/** One peer's disk: blocks that fail to read until rewritten, and whether writes fail. */
class DiskFaults {
  readonly bad = new Set<number>();
  writesFail = false;

  badIn(lba: number, blocks: number): number | undefined {
    for (let b = lba; b < lba + blocks; b++) if (this.bad.has(b)) return b;
    return undefined;
  }

  /** A write reached the disk: the blocks read again (a latent sector error is cleared by a rewrite). */
  written(lba: number, blocks: number): void {
    for (let b = lba; b < lba + blocks; b++) this.bad.delete(b);
  }
}

/** Faults by peer id; a test sets them after its group started, and the teardown clears them. */
const disks = new Map<string, DiskFaults>();

function disk(peer: string): DiskFaults {
  let d = disks.get(peer);
  if (!d) disks.set(peer, (d = new DiskFaults()));
  return d;
}

/** A store whose disk has `faults`: reads of bad blocks fail (EIO, as data-file.ts types it), writes fail when told. */
class LatentErrors extends BackendDecorator {
  constructor(inner: BlockBackend, private readonly faults: DiskFaults) {
    super(inner);
  }
  read(lba: number, blocks: number): Promise<Buffer> {
    const at = this.faults.badIn(lba, blocks);
    if (at !== undefined) return Promise.reject(new StoreReadError(`read of block ${at}: EIO (test disk)`));
    return this.inner.read(lba, blocks);
  }
  write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    if (this.faults.writesFail) return Promise.reject(new StoreWriteError(`write of block ${lba}: EIO (test disk)`));
    return this.inner.write(lba, data, opts).then(() => this.faults.written(lba, data.length / this.blockBytes));
  }
  unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void> {
    if (this.faults.writesFail) return Promise.reject(new StoreWriteError(`unmap of block ${lba}: EIO (test disk)`));
    return this.inner.unmap(lba, blocks, opts).then(() => this.faults.written(lba, blocks));
  }
  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult> {
    return this.inner.compareAndWrite(lba, compare, data, opts);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.inner.lbaStatus(lba, blocksMax);
  }
}

/** The replicated layer over a faulty disk: what the primary reads and repairs, and what it applies as a copy. */
class OverFaultyDisk extends ReplicatedVolume {
  constructor(opts: ReplicatedVolumeOptions) {
    const faults = disk(opts.self);
    super({ ...opts, local: new LatentErrors(opts.local, faults), copy: new LatentErrors(opts.copy, faults) });
  }
}

type Tap = Parameters<Parameters<typeof t.test>[1]>[0];
type Group = Awaited<ReturnType<typeof startGroup>>;

interface Setup {
  g: Group;
  record: VolumeRecord;
  /** Page 0's primary, its other copy, and the peer holding none. */
  primary: string;
  secondary: string;
  other: string;
  route: Route;
}

/** Three peers over faulty disks, a volume of two copies per page open on each, `data` written at `lba`. */
async function withVolume(t: Tap, lba: number, data: Buffer): Promise<Setup> {
  t.teardown(() => disks.clear());
  const g = await startGroup(t, 3, { protocols: { replicated: OverFaultyDisk } });
  const record = await g.peer('p1').core.catalog.createVolume({ name: 'rep', size: '64M', replicas: 2 });
  for (let i = 0; i < 200 && !['p1', 'p2', 'p3'].every((p) => g.peer(p).core.targets.hostPathFor('rep')); i++) await delay(10);
  const route = g.peer('p1').core.catalog.routes(record).route(0);
  const [primary, secondary] = copiesOf(route);
  const other = ['p1', 'p2', 'p3'].find((p) => !copiesOf(route).includes(p))!;
  await host(g, other).write(lba, data);
  return { g, record, primary, secondary, other, route };
}

function host(g: Group, peer: string): BlockBackend {
  return g.peer(peer).core.targets.hostPathFor('rep')!;
}

function pattern(blocks: number, seed: number): Buffer {
  const b = Buffer.alloc(blocks * bs);
  for (let i = 0; i < b.length; i++) b[i] = (seed * 31 + i * 7) & 0xff;
  return b;
}

function repairs(g: Group, peer: string): Record<string, number> {
  return { ...g.peer(peer).core.replication.counters.readRepairs };
}

function replicaRead(record: VolumeRecord, lba: number, blocks: number, epoch: number): BlockRequest {
  return { id: 1, op: BlockOp.read, fua: false, replica: true, volumeId: record.id, lba, blocks, routeVersion: epoch, compareBytes: 0 };
}

const lba = 200;
const blocks = 64;

t.test("a read the primary's disk fails is served from the other copy, and the failing grain rewritten on the primary", async (t) => {
  const data = pattern(blocks, 1);
  const { g, record, primary, other, route } = await withVolume(t, lba, data);
  disk(primary).bad.add(lba + 10).add(lba + 11);
  // The read is widened to whole grains; only the grain holding the bad blocks is rewritten.
  const grainBlocks = host(g, primary).grainBlocks;
  const widened = Math.ceil((lba + blocks) / grainBlocks) * grainBlocks - Math.floor(lba / grainBlocks) * grainBlocks;
  for (const via of [other, primary]) {
    t.ok((await host(g, via).read(lba, blocks)).equals(data), `the host reading through ${via} gets the blocks`);
    if (via === other) t.equal(disk(primary).bad.size, 0, "the primary's bad blocks were rewritten (a rewrite clears them)");
  }
  t.same(repairs(g, primary), { repaired: 1, unrepaired: 0, unserved: 0 }, 'one repair counted; the second read found the blocks readable');
  const [event] = g.peer(primary).events.since().filter((e) => e.kind === 'replication' && /read error/.test(e.message));
  t.match(event?.message, new RegExp(`read error on page 0 \\(${widened} blocks: .*EIO.*\\): served from ${route.copies![1]}; ${grainBlocks} blocks rewritten here`), 'an event says what happened: only the failing grain rewritten');
  t.match(await g.peer(primary).metrics.text(), /peersan_read_repairs_total\{[^}]*result="repaired"[^}]*\} 1/, '/metrics counts it');
  const now = g.peer(primary).core.catalog.routes(record).route(0);
  t.same({ owner: now.owner, version: now.version, inSync: inSyncOf(now) }, { owner: route.owner, version: route.version, inSync: inSyncOf(route) }, 'the route did not change');
});

t.test('no other in-sync copy can serve: the host gets the original error', async (t) => {
  const data = pattern(blocks, 2);
  const { g, record, primary, secondary, other, route } = await withVolume(t, lba, data);
  // The other copy's disk fails the same block: its refusal is no answer.
  disk(primary).bad.add(lba);
  disk(secondary).bad.add(lba);
  await t.rejects(host(g, other).read(lba, blocks), { kind: ErrorKind.storeRead }, 'MEDIUM ERROR for the host (its kind)');
  t.same(repairs(g, primary), { repaired: 0, unrepaired: 0, unserved: 1 }, 'counted unserved');
  t.ok(disk(primary).bad.has(lba), 'nothing was rewritten');

  // A copy asked at another epoch, or out of the in-sync set, refuses.
  disk(secondary).bad.clear();
  const pages = g.peer(secondary).core.pages;
  const older = await pages.handle(replicaRead(record, lba, blocks, route.version - 1));
  t.same({ status: older.status, version: older.version }, { status: ReplyStatus.moved, version: route.version }, 'an older epoch: MOVED');
  const served = await pages.handle(replicaRead(record, lba, blocks, route.version));
  t.ok(served.status === ReplyStatus.ok && served.payload?.equals(data), 'at its epoch, in sync: served');
  const dropped = await dropFromInSync(g.peer(primary).core.catalog, record, 0, route, [secondary]);
  await g.peer(secondary).core.catalog.fetchRoute(record, 0);
  await t.rejects(pages.handle(replicaRead(record, lba, blocks, dropped.version)), { code: 'PEERSAN_ERR_CONFLICT' }, 'out of the in-sync set: refused (answered failed)');
  await t.rejects(g.peer(primary).core.pages.handle(replicaRead(record, lba, blocks, dropped.version)), { kind: ErrorKind.invalid }, 'the primary is no copy to read from (answered failed)');
  await t.rejects(host(g, other).read(lba, blocks), { kind: ErrorKind.storeRead }, 'so the primary has no copy to read from: the original error');
  t.same(repairs(g, primary), { repaired: 0, unrepaired: 0, unserved: 2 }, 'counted unserved');
});

t.test('the rewrite fails too: the host still gets the blocks, and the primary hands the page over', async (t) => {
  const data = pattern(blocks, 3);
  const { g, record, primary, secondary, other } = await withVolume(t, lba, data);
  disk(primary).bad.add(lba + 1);
  disk(primary).writesFail = true;
  t.ok((await host(g, other).read(lba, blocks)).equals(data), 'the host gets the blocks');
  t.same(repairs(g, primary), { repaired: 0, unrepaired: 1, unserved: 0 }, 'counted unrepaired');
  let route = g.peer(other).core.catalog.routes(record).route(0);
  for (let i = 0; i < 100 && route.owner === primary; i++) {
    await delay(50);
    route = await g.peer(other).core.catalog.fetchRoute(record, 0);
  }
  t.same({ owner: route.owner, inSync: inSyncOf(route) }, { owner: secondary, inSync: [secondary] }, 'the other copy took the page over; the bad copy is out of the in-sync set');
  t.ok((await host(g, other).read(lba, blocks)).equals(data), 'reads go to the new primary');
});

t.test('a copy whose disk fails a replica write answers an error and is dropped before the write is acknowledged', async (t) => {
  const { g, record, primary, secondary, other, route } = await withVolume(t, lba, pattern(blocks, 4));
  disk(secondary).writesFail = true;
  const data = pattern(8, 5);
  let atAck: Route | undefined;
  await host(g, other).write(lba, data).then(() => (atAck = g.peer(primary).core.catalog.routes(record).route(0)));
  t.same({ version: atAck!.version, inSync: inSyncOf(atAck!), copies: atAck!.copies }, { version: route.version + 1, inSync: [primary], copies: route.copies }, 'dropped (epoch + 1) before the acknowledgement; still a copy (it resyncs)');
  t.ok((await host(g, other).read(lba, 8)).equals(data), 'the write is there');
});

t.test('blocks whose grain has a change not settled on every copy are not read from a copy', async (t) => {
  // A primary p1 alone (pages of 64 blocks, grains of 8). Its copy p2 serves reads, and fails the
  // one change sent to it; the catalog is out of reach until told, so p2 cannot be dropped: the
  // change fails to the host and stays unsettled (p2 may lack it while p1 has it).
  const table = new RouteTable(['p1', 'p2'], 64, new Map(), 2);
  const faults = new DiskFaults();
  const local = new LatentErrors(new MemoryBackend(bs, 128, 8), faults);
  const onCopy = pattern(128, 6);
  const link: BlockSender = {
    send: async (req) =>
      req.op === BlockOp.read
        ? { id: 0, status: ReplyStatus.ok, owner: 'p2', version: 0, detail: 0, payload: onCopy.subarray(req.lba * bs, (req.lba + req.blocks) * bs) }
        : { id: 0, status: ReplyStatus.failed, owner: 'p2', version: 0, detail: ErrorKind.storeWrite, payload: Buffer.from('EIO') },
  };
  let catalogUp = false;
  const catalog = {
    casRoute: async (_v: VolumeRecord, page: number, from: Route, change: (now: Route) => Omit<Route, 'version'>): Promise<Route> => {
      if (!catalogUp) throw new Error('catalog out of reach');
      const next = { ...change(table.route(page)), version: from.version + 1 };
      table.learn(page, next);
      return next;
    },
  };
  const results: ReadRepairResult[] = [];
  const record = { id: '0123456789abcdef', name: 'v', replicas: 2 } as VolumeRecord;
  const volume = new ReplicatedVolume({
    self: 'p1', volumeId: record.id, table, local, copy: local, link: () => link, refresh: async (p) => table.route(p), env: realEnv(),
    volume: () => record, catalog, tracker: passThroughTracker, guard: passThroughGuard, log: pino({ level: 'silent' }),
    readRepair: { done: (_v, _p, result) => void results.push(result), stepDown: async () => undefined, untrusted: () => false },
  });
  await t.rejects(volume.write(8, Buffer.alloc(bs, 1)), PeerUnavailableError, 'the change fails: p2 failed it and could not be dropped');
  faults.bad.add(10).add(20);
  await t.rejects(volume.read(10, 1), { code: 'PEERSAN_ERR_STORE_READ' }, 'grain 1 has the unsettled change: the original error');
  t.ok((await volume.read(20, 1)).equals(onCopy.subarray(20 * bs, 21 * bs)), 'grain 2 has none: served from the copy');
  t.same(results, ['unserved', 'repaired']);
  t.same([...faults.bad], [10], 'grain 2 rewritten here, grain 1 not');
  // The catalog back: the drop is made (p2 resyncs), and p1 alone is in sync.
  catalogUp = true;
  for (let i = 0; i < 200 && inSyncOf(table.route(0)).length > 1; i++) await delay(50);
  t.same(inSyncOf(table.route(0)), ['p1'], 'p2 dropped once the catalog answers');
});

t.test('a copy that may lack writes it acknowledged (suspect after a restart) serves no replica read', async (t) => {
  const table = new RouteTable(['p1', 'p2'], 64, new Map(), 2);
  const copy = new MemoryBackend(bs, 128, 8);
  await copy.write(0, pattern(8, 7));
  let suspect = true;
  const receiver = new ReplicaReceiver({
    self: 'p2', volumeId: '0123456789abcdef', table, refresh: async (p) => table.route(p), copy, tracker: passThroughTracker, locks: new RangeLock(), recent: new RecentChanges(),
    readRepair: { untrusted: () => suspect },
  });
  const route = table.route(0);
  t.same({ owner: route.owner, inSync: inSyncOf(route) }, { owner: 'p1', inSync: ['p1', 'p2'] }, 'p2 is an in-sync secondary of page 0');
  const req = replicaRead({ id: '0123456789abcdef' } as VolumeRecord, 0, 8, route.version);
  await t.rejects(receiver.read(req), { code: 'PEERSAN_ERR_CONFLICT' }, 'suspect: refused');
  suspect = false;
  t.ok((await receiver.read(req)).equals(pattern(8, 7)), 'trusted: served from its store');
  await t.rejects(receiver.read({ ...req, lba: 60 }), { kind: ErrorKind.invalid }, 'across a page boundary: refused');
});

t.test('media errors: what the store failed to read, nothing else', async (t) => {
  t.ok(isMediaError(new StoreReadError('EIO')), 'a read error of the store');
  t.ok(isMediaError(Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' })), 'an EIO from a file read');
  t.notOk(isMediaError(new StoreWriteError('EIO')), 'not a write error');
  t.notOk(isMediaError(new PageMovedError(0, { owner: 'p2', version: 3 })), 'not a fence or ownership error');
  t.notOk(isMediaError(new PeerUnavailableError('p2', 'no answer', true)), 'not a timeout of the request');
  t.notOk(isMediaError(new ClosedError()), 'not a volume closing');
});

t.test('a replica read on the wire: never numbered, never staging', async (t) => {
  const req = { ...replicaRead({ id: '00112233aabbccdd' } as VolumeRecord, 8, 4, 7), data: undefined };
  t.same(decodeRequest(encodeRequest(req)), { ...req, staging: false, layer: 0, stamp: 0, seq: 0, ackedThrough: 0, data: undefined }, 'round trip');
  t.equal(decodeRequest(encodeRequest({ ...req, seq: 2, ackedThrough: 1 })), undefined, 'a numbered replica read is refused');
  t.equal(decodeRequest(encodeRequest({ ...req, staging: true })), undefined, 'a staging replica read is refused');
});
