// Routing without sockets: the route table, the frame codec, and routers of three "peers"
// wired straight to each other's PageService, including stale routes (MOVED + retry),
// pages owned by a peer that is down, and requests that cross page boundaries.

import t from 'tap';
import fc from 'fast-check';
import pino from 'pino';
import { PeerUnavailableError } from '../src/errors';
import { FrameBatcher, splitBatch, zeroCopyMinBytes, type FrameCodec } from '../src/routing/batch';
import { BlockOp, decodeExtents, decodeReply, decodeRequest, encodeExtents, encodeReply, encodeReplyInto, encodeRequest, encodeRequestInto, replyFrameBytes, requestFrameBytes, ReplyStatus, type BlockReply, type BlockRequest } from '../src/routing/frame';
import { peerBatchBytesMax } from '../src/limits';
import { PageService } from '../src/routing/page-service';
import { newRoutingCounters, VolumeRouter, type BlockSender } from '../src/routing/router';
import { realEnv } from '../src/env/real';
import { RouteTable, type Route } from '../src/routing/table';
import { buildDataPath, type DataPath } from '../src/server/data-path';
import type { ReplicationWiring } from '../src/replication/replicated';
import { passThroughGuard, passThroughTracker } from './helpers/one-copy';
import { HybridClock } from '../src/snapshot/hlc';
import { MemoryBackend } from './helpers/memory-backend';

const log = pino({ level: 'silent' });
/** The replicated layer of a volume of one copy: no catalog record, nothing to drop. */
const oneCopy: ReplicationWiring = { volume: () => undefined, catalog: { casRoute: () => Promise.reject(new Error('no catalog here')) }, tracker: passThroughTracker, guard: passThroughGuard, log };
const pageBlocks = 64; // small pages keep the test fast; the logic does not depend on 8192
const volumeId = '0123456789abcdef';

t.test('route table: striped placement, page split, only newer routes are learned', async (t) => {
  const table = new RouteTable(['p1', 'p2', 'p3'], pageBlocks, new Map());
  t.same([0, 1, 2, 3, 4].map((p) => table.route(p).owner), ['p1', 'p2', 'p3', 'p1', 'p2']);
  t.same(table.split(60, 10), [
    { page: 0, lba: 60, blocks: 4, offsetBlocks: 0 },
    { page: 1, lba: 64, blocks: 6, offsetBlocks: 4 },
  ]);
  t.same(table.split(0, 200).map((p) => p.blocks), [64, 64, 64, 8]);
  t.notOk(table.learn(1, { owner: 'p3', version: 1 }), 'same version: ignored');
  t.ok(table.learn(1, { owner: 'p3', version: 2 }));
  t.same(table.route(1), { owner: 'p3', version: 2 });
  t.notOk(table.learn(1, { owner: 'p1', version: 2 }));
  t.same(table.routesIn(0, 3).map((r) => r.owner), ['p1', 'p3', 'p3']);
});

t.test('frames round-trip and malformed frames are refused, never thrown on', async (t) => {
  const req: BlockRequest = { id: 7, op: BlockOp.compareAndWrite, fua: true, staging: true, replica: false, layer: 0, volumeId, lba: 2 ** 40 + 5, blocks: 1, routeVersion: 3, compareBytes: 512, stamp: 1_795_441_445_432_123, seq: 0, ackedThrough: 0, data: Buffer.alloc(1024, 9) };
  const back = decodeRequest(encodeRequest(req))!;
  t.same({ ...back, data: back.data?.toString('hex') }, { ...req, data: req.data!.toString('hex') });
  // A replica change: numbered, with the primary's mark (u64 fields).
  const change: BlockRequest = { ...req, op: BlockOp.write, staging: false, replica: true, compareBytes: 0, seq: 2 ** 40 + 3, ackedThrough: 2 ** 40 + 1, data: Buffer.alloc(512, 4) };
  const changeBack = decodeRequest(encodeRequest(change))!;
  t.same({ ...changeBack, data: changeBack.data?.toString('hex') }, { ...change, data: change.data!.toString('hex') });
  const refusedReplica: [string, BlockRequest][] = [
    ['a mark not below its number', { ...change, ackedThrough: change.seq! }],
    ['a mark without a number', { ...change, seq: 0 }],
    ['a number on a frame that is not a replica change', { ...change, replica: false }],
    ['a numbered replica read', { ...change, op: BlockOp.read, data: undefined }],
    ['a replica compare-and-write', { ...req, staging: false, replica: true }],
    ['a replica frame that is staging too', { ...change, staging: true }],
  ];
  for (const [what, r] of refusedReplica) t.equal(decodeRequest(encodeRequest(r)), undefined, what);
  const hugeSeq = encodeRequest(change);
  hugeSeq.fill(0xff, 52, 60); // 2^64 - 1 is not a safe integer
  t.equal(decodeRequest(hugeSeq), undefined, 'a number past 2^53');
  const reply = { id: 9, status: ReplyStatus.moved, owner: 'p3', version: 4, detail: 17, payload: Buffer.from('x') };
  t.same(decodeReply(encodeReply(reply)), reply);
  const extents = [{ lba: 0, blocks: 10, mapped: true }, { lba: 10, blocks: 5, mapped: false }];
  t.same(decodeExtents(encodeExtents(extents)), extents);
  const truncated = encodeRequest(req).subarray(0, 50);
  t.equal(decodeRequest(truncated), undefined);
  const lying = encodeRequest(req);
  lying.writeUInt32BE(2048, 32); // compare longer than the data
  t.equal(decodeRequest(lying), undefined);
  const badStamp = encodeRequest(req);
  badStamp.writeDoubleBE(-1, 44); // a stamp is a whole, non-negative number
  t.equal(decodeRequest(badStamp), undefined);
  fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
    const b = Buffer.from(bytes);
    decodeRequest(b);
    decodeReply(b);
    decodeExtents(b);
  }));
});

const requestCodec: FrameCodec<BlockRequest> = { frameBytes: requestFrameBytes, data: (r) => r.data, encodeInto: (r, b, at, withData) => encodeRequestInto(r, r.id, b, at, withData) };

t.test('the batcher encodes the frames of a turn into one batch that splits back into the same frames', async (t) => {
  const batches: Buffer[] = [];
  const batcher = new FrameBatcher<BlockRequest>(requestCodec, (chunks) => batches.push(Buffer.concat(chunks)));
  const reqs: BlockRequest[] = [0, 1, 2].map((i) => ({ id: i + 1, op: i === 1 ? BlockOp.read : BlockOp.write, fua: i === 2, volumeId, lba: i * 8, blocks: 1, routeVersion: i, compareBytes: 0, data: i === 1 ? undefined : Buffer.alloc(512, i + 1) }));
  for (const r of reqs) batcher.push(r);
  t.equal(batches.length, 0, 'nothing is written before the turn ends');
  await new Promise((r) => setImmediate(r));
  t.equal(batches.length, 1, 'one batch per turn');
  const frames = splitBatch(batches[0])!;
  t.same(frames.map((f) => f.toString('hex')), reqs.map((r) => encodeRequest(r).toString('hex')), 'the same bytes as encoding each frame alone');
  t.equal(splitBatch(batches[0].subarray(0, batches[0].length - 1)), undefined, 'a cut batch is malformed');

  // A frame that would overflow the batch flushes what is queued first.
  const big: BlockRequest = { ...reqs[0], data: Buffer.alloc(peerBatchBytesMax / 2, 7) };
  batcher.push(big);
  batcher.push({ ...big, id: 99 });
  t.equal(batches.length, 2, 'the full batch went out at once');
  await new Promise((r) => setImmediate(r));
  t.equal(batches.length, 3);
  t.same(splitBatch(batches[2])!.map((f) => decodeRequest(f)!.id), [99]);
  batcher.push(reqs[0]);
  batcher.clear();
  await new Promise((r) => setImmediate(r));
  t.equal(batches.length, 3, 'cleared frames are never written');

  // 'task': the frames pushed by one task are one batch, written when the task's microtasks
  // are done (not a turn later); flushAfterTask() does the same for a 'turn' batcher.
  const taskBatches: Buffer[] = [];
  const perTask = new FrameBatcher<BlockRequest>(requestCodec, (chunks) => taskBatches.push(Buffer.concat(chunks)), 'task');
  for (const r of reqs) perTask.push(r);
  t.equal(taskBatches.length, 0, 'nothing is written while the task runs');
  await new Promise<void>((r) => queueMicrotask(r));
  t.equal(taskBatches.length, 1, 'one batch when the task ends');
  t.same(splitBatch(taskBatches[0])!.map((f) => decodeRequest(f)!.id), [1, 2, 3]);
  let turnEnded = false;
  setImmediate(() => (turnEnded = true));
  batcher.push(reqs[1]);
  batcher.flushAfterTask();
  await new Promise<void>((r) => queueMicrotask(r));
  t.equal(batches.length, 4, 'flushAfterTask writes before the turn ends');
  t.notOk(turnEnded);
  t.same(splitBatch(batches[3])!.map((f) => decodeRequest(f)!.id), [2]);
  await new Promise((r) => setImmediate(r));
  t.equal(batches.length, 4, 'the flush the turn had scheduled finds nothing left');

  // Large data is its own chunk, the caller's buffer itself (not copied); small data is copied
  // in with the headers. The chunks joined are the frames encoded alone.
  const chunked: Buffer[][] = [];
  const zeroCopy = new FrameBatcher<BlockRequest>(requestCodec, (chunks) => chunked.push(chunks), 'task');
  const large = Buffer.alloc(zeroCopyMinBytes, 9);
  const mixed: BlockRequest[] = [reqs[0], { ...reqs[0], id: 7, data: large }, reqs[1], { ...reqs[0], id: 8, data: Buffer.alloc(zeroCopyMinBytes * 2, 3) }];
  for (const r of mixed) zeroCopy.push(r);
  await new Promise<void>((r) => queueMicrotask(r));
  t.equal(chunked.length, 1);
  t.equal(chunked[0].length, 4, 'headers, data, headers, data');
  t.equal(chunked[0][1], large, 'the large data is the caller\'s buffer');
  t.same(splitBatch(Buffer.concat(chunked[0]))!.map((f) => f.toString('hex')), mixed.map((r) => encodeRequest(r).toString('hex')));
  const replies: Buffer[][] = [];
  const replyBatcher = new FrameBatcher<BlockReply>({ frameBytes: replyFrameBytes, data: (r) => r.payload, encodeInto: encodeReplyInto }, (chunks) => replies.push(chunks), 'task');
  const bigReply: BlockReply = { id: 9, status: ReplyStatus.ok, owner: 'p1', version: 1, detail: 0, payload: large };
  replyBatcher.push(bigReply);
  await new Promise<void>((r) => queueMicrotask(r));
  t.equal(replies[0].length, 2, 'a lone large reply: its header, then its payload');
  t.equal(replies[0][1], large, 'the payload is the caller\'s buffer');
  t.same(splitBatch(Buffer.concat(replies[0]))!.map((f) => f.toString('hex')), [encodeReply(bigReply).toString('hex')]);

  // Replies encode at any offset of a shared buffer.
  const reply: BlockReply = { id: 5, status: ReplyStatus.ok, owner: 'p2', version: 3, detail: 0, payload: Buffer.from('data') };
  const shared = Buffer.alloc(replyFrameBytes(reply) + 10, 0xee);
  encodeReplyInto(reply, shared, 7);
  t.same(shared.subarray(7, 7 + replyFrameBytes(reply)), encodeReply(reply));
  t.equal(shared[6], 0xee, 'nothing written before the offset');
  t.equal(shared[7 + replyFrameBytes(reply)], 0xee, 'nothing written after the frame');
});

/**
 * Three peers in memory: each has a store, a route table of its own, the volume's data path
 * over them as a peer builds it (src/server/data-path.ts) and a PageService.
 */
function group(opts: { down?: Set<string>; replicas?: number } = {}) {
  const catalog = new Map<number, Route>(); // the "catalog": the truth about moved pages
  const peers = ['p1', 'p2', 'p3'];
  const blockCount = 6 * pageBlocks;
  const nodes = new Map<string, { store: MemoryBackend; table: RouteTable; service: PageService; path: DataPath }>();
  const refresh = (table: RouteTable) => async (page: number): Promise<Route> => {
    const r = catalog.get(page);
    if (r) table.learn(page, r);
    return table.route(page);
  };
  const counters = newRoutingCounters();
  const sent: string[] = [];
  let nextId = 1;
  const env = realEnv();
  for (const id of peers) {
    const store = new MemoryBackend(512, blockCount, 8);
    const table = new RouteTable(peers, pageBlocks, new Map(), opts.replicas);
    const path = buildDataPath({
      self: id, volumeId, table, stored: store, refresh: refresh(table), receiving: () => false, snapshot: () => undefined,
      link: (to) => link(to), counters, env, clock: new HybridClock(env.clock), stampLogBytesMax: 1 << 20, replication: oneCopy,
    });
    const service = new PageService({ self: id, volume: (v) => (v === volumeId ? path.served : undefined), log });
    nodes.set(id, { store, table, service, path });
  }
  const link = (to: string): BlockSender => ({
    send: async (req) => {
      sent.push(to);
      if (opts.down?.has(to)) throw new PeerUnavailableError(to, 'connection refused', false);
      // Through the codec both ways, as on the wire.
      const decoded = decodeRequest(encodeRequest({ ...req, id: nextId++ }))!;
      return decodeReply(encodeReply(await nodes.get(to)!.service.handle(decoded)))!;
    },
  });
  const router = (id: string): VolumeRouter => nodes.get(id)!.path.router;
  /** Move a page in the "catalog" and tell only the peers listed (the others keep a stale route). */
  const move = (page: number, owner: string, tell: string[]): void => {
    const r = { owner, version: (catalog.get(page)?.version ?? 1) + 1 };
    catalog.set(page, r);
    for (const id of tell) nodes.get(id)!.table.learn(page, r);
  };
  return { nodes, router, counters, sent, move, blockCount };
}

t.test('a write that spans pages lands on each page owner; reads through any peer agree', async (t) => {
  const g = group();
  const data = Buffer.alloc(3 * pageBlocks * 512);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  await g.router('p1').write(32, data); // pages 0..3, owners p1 p2 p3 p1
  t.equal(g.nodes.get('p2')!.store.data.subarray(pageBlocks * 512, 2 * pageBlocks * 512).equals(data.subarray(32 * 512, (32 + pageBlocks) * 512)), true, 'page 1 is on p2');
  t.equal(g.nodes.get('p1')!.store.mapped[pageBlocks + 1], 0, 'p1 holds nothing of page 1');
  for (const via of ['p1', 'p2', 'p3']) t.ok((await g.router(via).read(32, 3 * pageBlocks)).equals(data), `read through ${via}`);
  t.ok(g.counters.forwardedRuns > 0 && g.counters.localRuns > 0);
});

t.test('a stale route is corrected by MOVED and the retry is counted', async (t) => {
  const g = group();
  g.move(1, 'p3', ['p2', 'p3']); // p1 is not told
  const before = g.counters.movedRetries;
  const data = Buffer.alloc(pageBlocks * 512, 0x5a);
  await g.router('p1').write(pageBlocks, data);
  t.equal(g.counters.movedRetries, before + 1, 'one MOVED followed');
  t.same(g.sent.slice(-2), ['p2', 'p3'], 'asked the old owner, then the new one');
  t.same(g.nodes.get('p1')!.table.route(1), { owner: 'p3', version: 2 }, 'p1 learned the route');
  t.ok(g.nodes.get('p3')!.store.data.subarray(pageBlocks * 512, 2 * pageBlocks * 512).equals(data), 'data is at the new owner');
  t.equal(g.nodes.get('p2')!.store.mapped[pageBlocks], 0, 'nothing written at the old owner');
  // Only the old owner knows (a move's source commits it): the new owner learns it from the
  // catalog when a sender shows it a newer version than its own table has.
  g.move(2, 'p1', ['p3']);
  await g.router('p2').write(2 * pageBlocks, Buffer.alloc(512, 0x77));
  t.same(g.nodes.get('p2')!.table.route(2), { owner: 'p1', version: 2 });
  t.same(g.nodes.get('p1')!.table.route(2), { owner: 'p1', version: 2 }, 'the new owner read the catalog');
  t.ok(g.nodes.get('p1')!.store.data.subarray(2 * pageBlocks * 512, 2 * pageBlocks * 512 + 512).equals(Buffer.alloc(512, 0x77)));
});

t.test('pages of a peer that is down fail; the rest of the volume keeps working', async (t) => {
  const g = group({ down: new Set(['p3']) });
  await t.rejects(g.router('p1').read(2 * pageBlocks, 8), PeerUnavailableError);
  await t.rejects(g.router('p1').read(0, 3 * pageBlocks), PeerUnavailableError, 'a request touching the page fails whole');
  t.equal((await g.router('p1').read(0, 2 * pageBlocks)).length, 2 * pageBlocks * 512, 'pages 0 and 1 still served');
});

t.test('COMPARE AND WRITE runs atomically at the owner and reports the miscompare offset', async (t) => {
  const g = group();
  const r = g.router('p1');
  const lba = pageBlocks + 3; // owned by p2
  const v1 = Buffer.alloc(512, 1);
  await r.write(lba, v1);
  t.same(await r.compareAndWrite(lba, v1, Buffer.alloc(512, 2)), { ok: true });
  const res = await r.compareAndWrite(lba, v1, Buffer.alloc(512, 3));
  t.same(res, { ok: false, miscompareOffsetBytes: 0 });
  t.ok((await g.router('p3').read(lba, 1)).equals(Buffer.alloc(512, 2)));
  // Across a page boundary between two owners: compare-then-write.
  const edge = pageBlocks - 1;
  const both = Buffer.alloc(1024, 4);
  await r.write(edge, both);
  t.same(await r.compareAndWrite(edge, both, Buffer.alloc(1024, 5)), { ok: true });
  t.ok((await g.router('p2').read(edge, 2)).equals(Buffer.alloc(1024, 5)));
});

t.test('unmap, LBA status and flush are routed too', async (t) => {
  const g = group();
  const r = g.router('p2');
  await r.write(0, Buffer.alloc(3 * pageBlocks * 512, 1));
  await r.unmap(pageBlocks, 16);
  const extents = await r.lbaStatus(0, 3 * pageBlocks);
  t.same(extents.slice(0, 3), [
    { lba: 0, blocks: pageBlocks, mapped: true },
    { lba: pageBlocks, blocks: 16, mapped: false },
    { lba: pageBlocks + 16, blocks: 2 * pageBlocks - 16, mapped: true },
  ]);
  await r.flush();
  t.same(['p1', 'p2', 'p3'].map((p) => g.nodes.get(p)!.store.flushes), [1, 1, 1], 'every peer of the volume flushed');
});

t.test('an owner that has not opened a new volume yet is asked again, briefly', async (t) => {
  const store = new MemoryBackend(512, 2 * pageBlocks, 8);
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
  const owner = new PageService({ self: 'p2', volume: () => ({ table, store, raw: store, replica: { receive: () => Promise.reject(new Error('no copies here')), read: () => Promise.reject(new Error('no copies here')) }, receiving: (p) => table.route(p).owner === 'p2', snapshot: () => undefined, refresh: async (p) => table.route(p) }), log });
  let refusals = 2;
  let calls = 0;
  const link = (): BlockSender => ({
    send: async (req) => {
      calls++;
      if (refusals-- > 0) return { id: 0, status: ReplyStatus.noVolume, owner: 'p2', version: 0, detail: 0 };
      return owner.handle({ ...req, id: 1 });
    },
  });
  const router = new VolumeRouter({ self: 'p1', volumeId, table, local: new MemoryBackend(512, 2 * pageBlocks, 8), link, refresh: async (p) => table.route(p), counters: newRoutingCounters(), env: realEnv() });
  await router.write(pageBlocks, Buffer.alloc(512, 9));
  t.equal(calls, 3, 'refused twice, then served');
  t.equal(store.data[pageBlocks * 512], 9);
  refusals = 1_000;
  const started = Date.now();
  await t.rejects(router.read(pageBlocks, 1), /does not hold volume/, 'a peer that never opens it: an error, after about a second');
  t.ok(Date.now() - started < 3_000);
});

t.test("a peer's ok answers to staging and replica requests carry its start token; host requests' do not", async (t) => {
  const store = new MemoryBackend(512, 2 * pageBlocks, 8);
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
  const replica = { receive: () => Promise.resolve(), read: () => Promise.resolve(Buffer.alloc(512)) };
  const owner = new PageService({ self: 'p2', volume: () => ({ table, store, raw: store, replica, receiving: () => true, snapshot: () => undefined, refresh: async (p) => table.route(p) }), log, startToken: 7 });
  const req = { id: 1, op: BlockOp.write, fua: false, volumeId, lba: pageBlocks, blocks: 1, routeVersion: 0, compareBytes: 0, data: Buffer.alloc(512, 3) };
  t.equal((await owner.handle({ ...req, staging: true })).version, 7, 'a staging write');
  t.equal((await owner.handle({ ...req, op: BlockOp.read, data: undefined, staging: true })).version, 7, 'a staging read');
  t.equal((await owner.handle({ ...req, replica: true })).version, 7, 'a replica write');
  t.equal((await owner.handle({ ...req, op: BlockOp.read, data: undefined, replica: true })).version, 7, 'a replica read');
  t.equal((await owner.handle(req)).version, 0, 'a host write');
});

t.test('a peer out of reach: LBA status answers up to its first page; flush fails only when a page has no other in-sync copy', async (t) => {
  const one = group({ down: new Set(['p3']) });
  await one.router('p1').write(0, Buffer.alloc(2 * pageBlocks * 512, 1));
  t.same(await one.router('p1').lbaStatus(0, 3 * pageBlocks), [{ lba: 0, blocks: 2 * pageBlocks, mapped: true }], 'pages 0 and 1 answered, page 2 (p3) not');
  await t.rejects(one.router('p1').lbaStatus(2 * pageBlocks, pageBlocks), PeerUnavailableError, 'nothing to answer: the error');
  await t.rejects(one.router('p1').flush(), PeerUnavailableError, 'one copy: p3 holds pages nobody else has');
  // Two copies (the routes only: the flush reads them): every page p3 holds in sync has another
  // in-sync copy. p3 is the primary of pages 2 and 5: the flush waits for their new primary.
  const two = group({ down: new Set(['p3']), replicas: 2 });
  let answered = false;
  const flushed = two.router('p1').flush().then(() => (answered = true));
  await new Promise((r) => setTimeout(r, 20));
  t.notOk(answered, 'not answered while p3, which did not flush, is primary of pages 2 and 5');
  for (const page of [2, 5]) two.nodes.get('p1')!.table.learn(page, { owner: 'p1', version: 2, copies: ['p1', 'p3'], inSync: ['p1'] });
  await flushed;
  t.same(['p1', 'p2', 'p3'].map((p) => two.nodes.get(p)!.store.flushes), [1, 1, 0], 'the two peers in reach flushed; p3 is covered by them once it is no primary');
  const both = group({ down: new Set(['p2', 'p3']), replicas: 2 });
  await t.rejects(both.router('p1').flush(), PeerUnavailableError, 'page 1 (copies p2, p3) has no in-sync copy that flushed');
});
