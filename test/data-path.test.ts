// A volume's data path as buildDataPath (src/server/data-path.ts) builds it, without sockets:
// the MOVED retries go through one loop bounded by routeRetriesMax (a page that keeps moving is
// BUSY to the host, never an endless retry); a re-cut in a later round still returns every
// block; the layers sit in the stated order (the gate holds before routing, the stamp log sees
// forwarded writes, the owner meter counts what this peer serves); ownership is checked by the
// owner's store, and the common path reaches the store in the caller's own step.

import t from 'tap';
import pino from 'pino';
import { realEnv } from '../src/env/real';
import { routeRetriesMax } from '../src/limits';
import { LoadMonitor, type VolumeMeter } from '../src/loadmon/monitor';
import { BlockOp, ReplyStatus, type BlockReply, type BlockRequest } from '../src/routing/frame';
import { PageMovedError } from '../src/routing/moved';
import { PageService } from '../src/routing/page-service';
import { newRoutingCounters, VolumeRouter, type BlockSender } from '../src/routing/router';
import { RouteTable, type Route } from '../src/routing/table';
import { BlockLogicalUnit } from '../src/scsi/device';
import { ScsiStatus, type Nexus, type ScsiResult } from '../src/scsi/types';
import { buildDataPath, type DataPath } from '../src/server/data-path';
import { passThroughGuard, passThroughTracker, type ReplicationWiring } from '../src/replication/replicated';
import { HybridClock } from '../src/snapshot/hlc';
import type { BlockBackend, CompareAndWriteResult, LbaExtent } from '../src/store/types';
import { MemoryBackend } from './helpers/memory-backend';

const log = pino({ level: 'silent' });
/** The replicated layer of a volume of one copy: no catalog record, nothing to drop. */
const oneCopy: ReplicationWiring = { volume: () => undefined, catalog: { casRoute: () => Promise.reject(new Error('no catalog here')) }, tracker: passThroughTracker, guard: passThroughGuard, log };
const pageBlocks = 64;
const bs = 512;
const volumeId = '0123456789abcdef';
const env = realEnv();
const nexus: Nexus = { initiatorPort: 'iqn.test:h,i,0x1', initiatorName: 'iqn.test:h', targetPort: 'iqn.t,t,0x0001', relativeTargetPort: 1 };

/** Past this many calls the old, unbounded recursion is assumed (fails the test instead of hanging it). */
const callsMax = 50;

/** A store whose every request says its page moved, to a route no newer than the table's. */
class AlwaysMoved implements BlockBackend {
  readonly blockBytes = bs;
  readonly blockCount = 4 * pageBlocks;
  readonly grainBlocks = 8;
  calls = 0;
  constructor(private readonly route: Route) {}
  private refuse<T>(lba: number): Promise<T> {
    this.calls++;
    if (this.calls > callsMax) return Promise.reject(new Error(`unbounded: ${this.calls} tries`));
    return Promise.reject(new PageMovedError(Math.floor(lba / pageBlocks), this.route));
  }
  read(lba: number): Promise<Buffer> {
    return this.refuse(lba);
  }
  write(lba: number): Promise<void> {
    return this.refuse(lba);
  }
  unmap(lba: number): Promise<void> {
    return this.refuse(lba);
  }
  compareAndWrite(lba: number): Promise<CompareAndWriteResult> {
    return this.refuse(lba);
  }
  async flush(): Promise<void> {}
  lbaStatus(lba: number): Promise<LbaExtent[]> {
    return this.refuse(lba);
  }
}

function execute(lu: BlockLogicalUnit, cdb: Buffer, dataOut: Buffer | null = null): Promise<ScsiResult> {
  return lu.execute({ cdb, lun: 0, nexus, taskAttr: 1, expectedDataLength: dataOut?.length ?? cdb.readUInt16BE(7) * bs, dataOut });
}

const nowhere: BlockSender = { send: () => Promise.reject(new Error('nothing is forwarded in this test')) };

t.test('a local page that keeps answering PageMovedError: routeRetriesMax retries, then BUSY to the host', async (t) => {
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
  const local = new AlwaysMoved({ owner: 'p1', version: 1 });
  let refreshes = 0;
  const counters = newRoutingCounters();
  const router = new VolumeRouter({ self: 'p1', volumeId, table, local, link: () => nowhere, refresh: async (p) => (refreshes++, table.route(p)), counters, env });
  const ops: [string, () => Promise<unknown>][] = [
    ['read', () => router.read(0, 8)],
    ['write', () => router.write(0, Buffer.alloc(8 * bs))],
    ['unmap', () => router.unmap(0, 8)],
    ['compare and write', () => router.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs))],
    ['LBA status', () => router.lbaStatus(0, 8)],
  ];
  for (const [what, op] of ops) {
    local.calls = 0;
    refreshes = 0;
    const retriesBefore = counters.movedRetries;
    const err = await op().then(() => undefined, (e: unknown) => e);
    t.ok(err instanceof PageMovedError, `${what}: the PageMovedError goes up (${String(err)})`);
    t.equal(local.calls, routeRetriesMax + 1, `${what}: one try and routeRetriesMax retries`);
    t.equal(counters.movedRetries - retriesBefore, routeRetriesMax, `${what}: each retry counted`);
    t.equal(refreshes, routeRetriesMax, `${what}: a route no newer than ours makes the router re-read the catalog`);
  }
  const lu = new BlockLogicalUnit({ lun: 0, backend: router, identity: { volumeId, volumeName: 'v', vendor: 'PEERSAN', product: 'p', revision: '0', readOnly: false } });
  // WRITE (10) and READ (10) of 8 blocks at LBA 0.
  for (const [what, cdb, data] of [['write', Buffer.from('2a000000000000000800', 'hex'), Buffer.alloc(8 * bs)], ['read', Buffer.from('28000000000000000800', 'hex'), null]] as const) {
    local.calls = 0;
    const r = await execute(lu, cdb, data);
    t.equal(r.status, ScsiStatus.busy, `${what}: the host hears BUSY`);
    t.equal(local.calls, routeRetriesMax + 1, `${what}: after the bounded tries`);
  }
});

t.test('an owner that keeps answering MOVED: the same bound', async (t) => {
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
  let version = 1;
  let sent = 0;
  // A route in flux for good: every answer is a newer route, to the same owner.
  const flux: BlockSender = {
    send: async (req) => {
      sent++;
      if (sent > callsMax) throw new Error('unbounded');
      return { id: 0, status: ReplyStatus.moved, owner: 'p2', version: ++version, detail: Math.floor(req.lba / pageBlocks) };
    },
  };
  const router = new VolumeRouter({ self: 'p1', volumeId, table, local: new MemoryBackend(bs, 4 * pageBlocks, 8), link: () => flux, refresh: async (p) => table.route(p), counters: newRoutingCounters(), env });
  const ops: [string, () => Promise<unknown>][] = [['read', () => router.read(pageBlocks, 8)], ['write', () => router.write(pageBlocks, Buffer.alloc(8 * bs))], ['compare and write', () => router.compareAndWrite(pageBlocks, Buffer.alloc(bs), Buffer.alloc(bs))]];
  for (const [what, op] of ops) {
    sent = 0;
    await t.rejects(op(), PageMovedError, what);
    t.equal(sent, routeRetriesMax + 1, `${what}: one send and routeRetriesMax retries`);
  }
});

t.test('a run cut in two by a later MOVED still reads every block', async (t) => {
  // Pages 0 and 1 are p2's in our table: one run. p2 first answers MOVED with a route we
  // already know (the run stays whole), then names page 1 as moved to p3 (the run splits).
  const table = new RouteTable(['p2'], pageBlocks, new Map());
  const stores = new Map([['p2', new MemoryBackend(bs, 2 * pageBlocks, 8)], ['p3', new MemoryBackend(bs, 2 * pageBlocks, 8)]]);
  stores.get('p2')!.data.fill(2);
  stores.get('p3')!.data.fill(3);
  const answers: Partial<BlockReply>[] = [
    { status: ReplyStatus.moved, owner: 'p2', version: 1, detail: 0 },
    { status: ReplyStatus.moved, owner: 'p3', version: 2, detail: 1 },
  ];
  const link = (peer: string): BlockSender => ({
    send: async (req) => {
      const next = peer === 'p2' ? answers.shift() : undefined;
      if (next) return { id: 0, status: ReplyStatus.ok, owner: peer, version: 0, detail: 0, ...next };
      return { id: 0, status: ReplyStatus.ok, owner: peer, version: 0, detail: 0, payload: await stores.get(peer)!.read(req.lba, req.blocks) };
    },
  });
  const router = new VolumeRouter({ self: 'p1', volumeId, table, local: new MemoryBackend(bs, 2 * pageBlocks, 8), link, refresh: async (p) => table.route(p), counters: newRoutingCounters(), env });
  const data = await router.read(pageBlocks - 8, 16);
  t.equal(data.length, 16 * bs, 'all 16 blocks');
  t.ok(data.subarray(0, 8 * bs).every((b) => b === 2) && data.subarray(8 * bs).every((b) => b === 3), 'page 0 from p2, page 1 from p3, each in its place');
});

/** Two peers, p1 and p2, each with the data path a peer builds, linked through their page services. */
function pair() {
  const env = realEnv();
  const counters = newRoutingCounters();
  const peers = new Map<string, { store: MemoryBackend; table: RouteTable; path: DataPath; service: PageService; meter: VolumeMeter; refreshes: number }>();
  const catalog = new Map<number, Route>();
  const link = (to: string): BlockSender => ({ send: (req) => peers.get(to)!.service.handle({ ...req, id: 1 }) });
  for (const self of ['p1', 'p2']) {
    const store = new MemoryBackend(bs, 4 * pageBlocks, 8);
    const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
    const refresh = async (page: number): Promise<Route> => {
      peers.get(self)!.refreshes++;
      const r = catalog.get(page);
      if (r) table.learn(page, r);
      return table.route(page);
    };
    const meter = new LoadMonitor({ self, clock: env.clock }).volume(volumeId, 'v', pageBlocks);
    const path = buildDataPath({
      self, volumeId, table, stored: store, refresh, receiving: () => false, snapshot: () => undefined, link, counters, env,
      clock: new HybridClock(env.clock), stampLogBytesMax: 1 << 20, ownerMeter: meter, replication: oneCopy,
    });
    const service = new PageService({ self, volume: (id) => (id === volumeId ? path.served : undefined), log });
    peers.set(self, { store, table, path, service, meter, refreshes: 0 });
  }
  return { peers, catalog, counters };
}

function request(lba: number, blocks: number, routeVersion: number, data?: Buffer): BlockRequest {
  return { id: 1, op: data ? BlockOp.write : BlockOp.read, fua: false, volumeId, lba, blocks, routeVersion, compareBytes: 0, data };
}

t.test('ownership is checked by the owner store; the page service only catches its table up', async (t) => {
  const g = pair();
  const p2 = g.peers.get('p2')!;
  // Page 0 is p1's: p2 refuses it from its store's check, with the route it knows.
  const moved = await p2.service.handle(request(0, 8, 1));
  t.same({ status: moved.status, owner: moved.owner, version: moved.version, detail: moved.detail }, { status: ReplyStatus.moved, owner: 'p1', version: 1, detail: 0 }, 'MOVED with our route');
  t.equal(p2.refreshes, 0, 'a sender no newer than us: no catalog read');
  // Page 0 moved to p2 in the catalog; p2's watch has not told it yet, the sender knows.
  g.catalog.set(0, { owner: 'p2', version: 2 });
  const served = await p2.service.handle(request(0, 8, 2, Buffer.alloc(8 * bs, 7)));
  t.equal(served.status, ReplyStatus.ok, 'served once the catalog says so');
  t.equal(p2.refreshes, 1, 'the sender knew newer: one catalog read');
  t.equal(p2.store.data[0], 7, 'written to p2');
});

t.test('the common path reaches the store in the caller own step (no await on the way)', async (t) => {
  const g = pair();
  const p1 = g.peers.get('p1')!;
  const p2 = g.peers.get('p2')!;
  for (const [what, start, store] of [
    ['host write, local page', () => p1.path.host.write(0, Buffer.alloc(bs, 1)), p1.store],
    ['host write, forwarded page', () => p1.path.host.write(pageBlocks, Buffer.alloc(bs, 1)), p2.store],
    ['served write', () => p2.service.handle(request(pageBlocks, 1, 1, Buffer.alloc(bs, 1))), p2.store],
  ] as const) {
    let reached = false;
    const write = store.write.bind(store);
    store.write = (lba, data, opts) => ((reached = true), write(lba, data, opts));
    const done = start();
    t.ok(reached, `${what}: the store is reached before the call returns`);
    await done;
    store.write = write;
  }
});

t.test('the layers sit in the stated order', async (t) => {
  const g = pair();
  const p1 = g.peers.get('p1')!;
  const p2 = g.peers.get('p2')!;
  // The gate holds a host request before the router sends it anywhere.
  await p1.path.gate.close('snap', 1_000, 5_000);
  const held = p1.path.host.write(pageBlocks, Buffer.alloc(bs, 5));
  await new Promise((r) => setImmediate(r));
  t.equal(p2.store.data[pageBlocks * bs], 0, 'held at the gate: nothing forwarded');
  p1.path.gate.release('snap');
  await held;
  t.equal(p2.store.data[pageBlocks * bs], 5, 'released: forwarded to the owner');
  // The owner's stamp log, right above its store, records a forwarded write with the stamp
  // the gate of the peer the host chose gave it.
  p2.path.stampLog.begin('s');
  await p1.path.host.write(pageBlocks + 1, Buffer.alloc(bs, 6));
  const changes = p2.path.stampLog.end('s', Number.MAX_SAFE_INTEGER);
  t.equal(changes.length, 1, 'the forwarded write is recorded at the owner');
  t.ok(changes[0].stamp > 0 && changes[0].lba === pageBlocks + 1, 'with its host stamp');
  // Owner load: below the router, so p2 counts the requests it serves for p1's host, p1 none of them.
  await p1.path.host.read(pageBlocks, 4);
  t.ok(p2.meter.pages.has(1), "the owner metered page 1, for p1's host");
  t.notOk(p1.meter.pages.has(1), 'the forwarding peer did not (host load is metered above the gate)');
});
