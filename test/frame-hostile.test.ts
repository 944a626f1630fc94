// Issue 15 item 7: a peer frame cannot kill the owner (nor a reply the sender). A peer that
// holds the cluster secret opens a block data stream to an owner the way link.ts does
// and sends what a buggy or hostile peer might: a READ bigger than a frame can answer (on the
// code before the fix the owner read 16 MiB, then the reply batcher asserted inside a promise
// handler and the process died), counts and lengths that do not add up, truncated frames,
// unknown ops, an lba that overflows, a frame over the bound, half a frame and the end of the
// stream. After each, the owner
// is alive and a well-formed request on a fresh stream still reads back what was written.
// The other side: an owner whose replies are malformed fails the sender's requests, never
// the sender.

import t from 'tap';
import { PeerRpcClient } from '../src/cluster/peer-rpc';
import { ErrorKind, InvalidArgumentError, PeerUnavailableError, RemoteFailureError } from '../src/errors';
import { pageBlocks, peerFrameBytesMax, peerPlannedMovesMax, peerReadBytesMax, peerRequestsInFlightMax, peerStreamBytesInFlightMax, peerUnmapBlocksMax } from '../src/limits';
import { BlockOp, decodeReply, decodeRequest, encodeReply, encodeRequest, ReplyStatus, type BlockReply, type BlockRequest } from '../src/routing/frame';
import { realEnv } from '../src/env/real';
import { PeerLink } from '../src/routing/link';
import { newRoutingCounters, VolumeRouter, type BlockSender } from '../src/routing/router';
import { RouteTable } from '../src/routing/table';
import { MemoryBackend } from './helpers/memory-backend';
import { batchOf, fakeOwner as rawOwner, openRawStream } from './helpers/data-stream';
import { startGroup } from './helpers/group';

type Tap = Pick<typeof t, 'ok' | 'equal' | 'not'>;

interface BlockStream {
  /** Send bytes; resolves with the next `n` replies (rejects if the stream closes first or after 30 s: 40 reads of 8 MiB on a loaded machine). */
  ask(batch: Buffer, n?: number): Promise<BlockReply[]>;
  /** Resolves with why the stream closed. */
  closed: Promise<string>;
  /** Write bytes without waiting for an answer. */
  write(bytes: Buffer): void;
  close(): void;
}

/** Open an authenticated data stream as peer `as` (helpers/data-stream.ts: the handshake is there alone). */
function openBlockStream(address: string, secret: string, as: string): BlockStream {
  const raw = openRawStream(address, secret, as);
  let taken = 0;
  return {
    closed: raw.closed,
    write: (bytes) => raw.write(bytes),
    async ask(batch, n = 1) {
      raw.write(batch);
      const deadline = Date.now() + 30_000;
      while (raw.frames.length - taken < n) {
        if (raw.ended) throw new Error(`stream closed (${raw.ended}) with ${raw.frames.length - taken} of ${n} replies`);
        if (Date.now() > deadline) throw new Error(`no reply in 30 s (${raw.frames.length - taken} of ${n})`);
        await raw.next(200);
      }
      const replies = raw.frames.slice(taken, taken + n).map((f) => decodeReply(f)!);
      taken += n;
      return replies;
    },
    close: () => raw.close(),
  };
}

t.test('hostile block frames against an owner', async (t) => {
  // In a peer process an unhandled rejection exits it; under tap it is only reported: count them.
  const unhandled: unknown[] = [];
  const onUnhandled = (err: unknown): number => unhandled.push(err);
  process.on('unhandledRejection', onUnhandled);
  t.teardown(() => void process.off('unhandledRejection', onUnhandled));
  const g = await startGroup(t, 1);
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '1G' });
  const record = g.peer('p1').core.catalog.require('vol');
  const volumeId = record.id;
  const blockCount = record.sizeBytes / record.blockBytes;
  const address = g.config.peers[0].rpc;
  const open = (): BlockStream => {
    const s = openBlockStream(address, g.config.secret, 'p1');
    t.teardown(() => s.close());
    return s;
  };
  const req = (r: Partial<BlockRequest>): BlockRequest => ({ id: 1, op: BlockOp.read, fua: false, volumeId, lba: 0, blocks: 8, routeVersion: 0, compareBytes: 0, ...r });
  const pattern = Buffer.alloc(8 * 512, 0xa5);

  // Something to read back: written once, checked after every hostile case.
  const setup = open();
  const [wrote] = await setup.ask(batchOf([encodeRequest(req({ id: 7, op: BlockOp.write, lba: 64, data: pattern }))]));
  t.equal(wrote.status, ReplyStatus.ok, 'a well-formed write is served');

  /** The owner is alive: a fresh stream reads back the pattern. */
  const stillServes = async (t: Tap, what: string): Promise<void> => {
    const s = open();
    const [r] = await s.ask(batchOf([encodeRequest(req({ id: 99, lba: 64 }))]));
    t.ok(r.status === ReplyStatus.ok && r.payload?.equals(pattern), `after ${what}: the owner is alive and serves a well-formed read`);
    s.close();
  };

  /** A request that must be answered with a failed reply of `kind`, the stream staying open. */
  const refused = async (t: Tap, what: string, r: BlockRequest, kind: ErrorKind): Promise<void> => {
    const s = open();
    const [reply] = await s.ask(batchOf([encodeRequest(r)]));
    t.equal(reply.status, ReplyStatus.failed, `${what}: answered failed`);
    t.equal(reply.detail, kind, `${what}: with kind ${kind} (${reply.payload?.toString() ?? ''})`);
    t.equal(reply.id, r.id, `${what}: to that request`);
    const [next] = await s.ask(batchOf([encodeRequest(req({ id: 5, lba: 64 }))]));
    t.ok(next.status === ReplyStatus.ok && next.payload?.equals(pattern), `${what}: the stream still serves`);
    s.close();
  };

  /** A frame or batch that must close the stream (a malformed one says nothing trustworthy about its id). */
  const closesStream = async (t: Tap, what: string, batch: Buffer): Promise<void> => {
    const s = open();
    const status = await Promise.race([s.ask(batch).then((r) => `answered ${JSON.stringify(r.map((x) => x.status))}`, () => 'closed'), s.closed.then(() => 'closed')]);
    t.equal(status, 'closed', `${what}: the stream is closed`);
    t.not(await s.closed, 'closed', `${what}: by the owner`);
    s.close();
    await stillServes(t, what);
  };

  await t.test('a READ of 16 MiB within the volume is refused, not served (the owner died here)', async (t) => {
    await refused(t, '16 MiB read', req({ id: 2, blocks: (16 * 1024 * 1024) / 512 }), ErrorKind.invalid);
    await stillServes(t, 'a 16 MiB read');
  });

  await t.test('a READ of exactly the bound is served', async (t) => {
    const s = open();
    const [r] = await s.ask(batchOf([encodeRequest(req({ id: 3, blocks: peerReadBytesMax / 512 }))]));
    t.equal(r.status, ReplyStatus.ok);
    t.equal(r.payload?.length, peerReadBytesMax);
    s.close();
  });

  await t.test('counts and ranges a peer cannot have meant', async (t) => {
    await refused(t, 'blocks 2^32-1', req({ id: 4, blocks: 0xffff_ffff }), ErrorKind.invalid);
    await refused(t, 'lba + blocks past the end', req({ id: 4, lba: blockCount - 4, blocks: 8 }), ErrorKind.invalid);
    await refused(t, 'lba 2^53-1 (lba + blocks overflows a double)', req({ id: 4, lba: Number.MAX_SAFE_INTEGER, blocks: 8 }), ErrorKind.invalid);
    await refused(t, 'zero blocks', req({ id: 4, blocks: 0 }), ErrorKind.invalid);
    await refused(t, 'write data shorter than its blocks', req({ id: 4, op: BlockOp.write, blocks: 8, data: Buffer.alloc(100) }), ErrorKind.invalid);
    await refused(t, 'unmap over the bound', req({ id: 4, op: BlockOp.unmap, blocks: peerUnmapBlocksMax + 1 }), ErrorKind.invalid);
    await refused(t, 'LBA status of the whole volume', req({ id: 4, op: BlockOp.lbaStatus, blocks: blockCount }), ErrorKind.invalid);
    await refused(t, 'compare and write with halves not its blocks', req({ id: 4, op: BlockOp.compareAndWrite, blocks: 8, compareBytes: 512, data: Buffer.alloc(1024) }), ErrorKind.invalid);
    // A replica change (src/replication) for a page this peer is the only copy and the primary of.
    await refused(t, 'a replica change of our own page', req({ id: 4, op: BlockOp.write, replica: true, routeVersion: 1, seq: 2, ackedThrough: 1, data: pattern }), ErrorKind.invalid);
    await refused(t, 'a replica change across a page boundary', req({ id: 4, op: BlockOp.unmap, replica: true, lba: record.pageBlocks - 4, blocks: 8, routeVersion: 1 }), ErrorKind.invalid);
    // A replica read (a primary whose store failed a read, src/replication/read-repair.ts): this peer is no secondary copy.
    await refused(t, 'a replica read of our own page', req({ id: 4, replica: true, routeVersion: 1 }), ErrorKind.invalid);
    await refused(t, 'a replica read across a page boundary', req({ id: 4, replica: true, lba: record.pageBlocks - 4, blocks: 8, routeVersion: 1 }), ErrorKind.invalid);
  });

  await t.test('malformed frames and batches close the stream', async (t) => {
    const good = encodeRequest(req({ id: 6 }));
    await closesStream(t, 'a truncated frame', batchOf([good.subarray(0, 30)]));
    const lying = Buffer.from(encodeRequest(req({ id: 6, op: BlockOp.write, data: pattern })));
    lying.writeUInt32BE(pattern.length + 1, 36);
    await closesStream(t, 'a data length that is not the frame length', batchOf([lying]));
    const unknownOp = Buffer.from(good);
    unknownOp[1] = 99;
    await closesStream(t, 'an unknown op', batchOf([unknownOp]));
    const overflow = Buffer.from(good);
    overflow.fill(0xff, 16, 24);
    await closesStream(t, 'an lba of 2^64-1', batchOf([overflow]));
    const nanStamp = Buffer.from(good);
    nanStamp.writeDoubleBE(Number.NaN, 44);
    await closesStream(t, 'a NaN stamp', batchOf([nanStamp]));
    const flags = Buffer.from(good);
    flags[2] = 0x80;
    await closesStream(t, 'unknown flags', batchOf([flags]));
    await closesStream(t, 'a read that carries data', batchOf([encodeRequest(req({ id: 6, data: pattern }))]));
    await closesStream(t, 'a numbered replica read', batchOf([encodeRequest(req({ id: 6, replica: true, seq: 3, ackedThrough: 1 }))]));
    await closesStream(t, 'a change number on a frame that is not a replica change', batchOf([encodeRequest(req({ id: 6, op: BlockOp.write, data: pattern, seq: 3, ackedThrough: 1 }))]));
    const hugeMark = Buffer.from(encodeRequest(req({ id: 6, op: BlockOp.write, data: pattern, replica: true, seq: 3, ackedThrough: 1 })));
    hugeMark.fill(0xff, 60, 68);
    await closesStream(t, 'a replica mark of 2^64-1', batchOf([hugeMark]));
    const head = Buffer.alloc(4);
    head.writeUInt32BE(0xffff_fff0, 0);
    await closesStream(t, 'a batch whose length prefix runs past it', Buffer.concat([head, good]));
    const overBound = Buffer.alloc(4);
    overBound.writeUInt32BE(peerFrameBytesMax + 1, 0);
    await closesStream(t, 'a frame over the bound', Buffer.concat([batchOf([encodeRequest(req({ id: 6, op: BlockOp.write, blocks: 8, data: pattern }))]), overBound]));
    const zero = Buffer.alloc(4);
    await closesStream(t, 'a frame of length 0', zero);
    const cut = openBlockStream(address, g.config.secret, 'p1');
    const whole = batchOf([encodeRequest(req({ id: 7, lba: 64 }))]);
    cut.write(whole.subarray(0, 30));
    await new Promise((r) => setTimeout(r, 50));
    cut.close();
    const [after] = await open().ask(batchOf([encodeRequest(req({ id: 8, lba: 64 }))]));
    t.ok(after.status === ReplyStatus.ok && after.payload?.equals(pattern), 'half a frame then the end of the stream: the owner serves the next stream');
    t.ok(decodeRequest(good), 'the unmutated frame was well-formed');
  });

  await t.test('what one stream can make the owner hold is bounded', async (t) => {
    // More requests than a window in one write: the owner stops reading at the window and
    // resumes as it answers; every one is answered.
    const window = Array.from({ length: 4 * peerRequestsInFlightMax }, (_, i) => encodeRequest(req({ id: 1000 + i, lba: 64 })));
    const many = await open().ask(batchOf(window), window.length);
    t.ok(many.every((r) => r.status === ReplyStatus.ok), `${window.length} requests in one write (4 windows): all answered`);
    // Reads of 8 MiB, all in one batch: they start before any ends, so the byte budget decides.
    const readBytes = peerReadBytesMax;
    const reads = Array.from({ length: 40 }, (_, i) => encodeRequest(req({ id: 2000 + i, lba: 0, blocks: readBytes / 512 })));
    const s = open();
    const replies = await s.ask(batchOf(reads), reads.length);
    const served = replies.filter((r) => r.status === ReplyStatus.ok).length;
    const busy = replies.filter((r) => r.status === ReplyStatus.failed && r.detail === ErrorKind.busy).length;
    t.equal(served + busy, reads.length, `every read answered, served or BUSY (${served} served, ${busy} BUSY)`);
    t.ok(busy > 0, 'the reads past the budget are answered BUSY');
    t.ok(served >= 1 && served * readBytes <= peerStreamBytesInFlightMax, `at most the budget was read at once (${served} x 8 MiB)`);
    const [after] = await s.ask(batchOf([encodeRequest(req({ id: 3000, lba: 64 }))]));
    t.ok(after.status === ReplyStatus.ok && after.payload?.equals(pattern), 'the stream serves again once they are answered');
    s.close();
  });

  await t.test('PeerService requests are checked field by field before use', async (t) => {
    const rpc = new PeerRpcClient('p1', address, { secret: g.config.secret, self: 'p1' });
    t.teardown(() => rpc.close());
    const refusedWith = async (what: string, call: Promise<unknown>, field: RegExp): Promise<void> => {
      const err = await call.then(() => undefined, (e: unknown) => e);
      t.ok(err instanceof InvalidArgumentError && field.test(err.message), `${what}: refused as invalid (${String(err)})`);
    };
    await refusedWith('a volume id that is not 16 hex digits', rpc.movePrepare({ volumeId: 'x'.repeat(100_000), page: 1, from: 'p1', fresh: true }, 5_000), /volumeId/);
    await refusedWith('a peer id that cannot be one', rpc.movePrepare({ volumeId, page: 1, from: '../../etc', fresh: true }, 5_000), /from/);
    await refusedWith('a timestamp cut that is not a clock stamp', rpc.snapshotTake({ snapshotId: 's1', layers: [], cut: 1.5 }, 5_000), /cut/);
    const move = { volumeId, volumeName: 'vol', page: 0, from: 'p1', to: 'p2', load: 1 };
    await refusedWith('more moves than a request may carry', rpc.startMoves(Array.from({ length: peerPlannedMovesMax + 1 }, () => move), 5_000), /moves/);
    await refusedWith('a load that is not a number', rpc.startMoves([{ ...move, load: Number.NaN }], 5_000), /load/);
    await refusedWith('a host move plan kept for ever', rpc.planHostMove({ initiatorName: 'iqn.x', targetName: 'iqn.y', to: 'p1', ttlMs: 0xffff_ffff }, 5_000), /ttlMs/);
    await refusedWith('a snapshot id longer than the store allows', rpc.snapshotRelease('s'.repeat(10_000), true, 5_000), /snapshotId/);
    t.ok((await rpc.status(5_000)).id === 'p1', 'the peer still answers');
  });

  t.same(unhandled.map(String), [], 'no request made the owner reject a promise nobody handles (the process would exit)');
});

/** A fake owner that answers every request with `reply(req)` (raw bytes). */
async function fakeOwner(reply: (req: BlockRequest) => Buffer): Promise<{ address: string; stop(): void }> {
  return rawOwner((f, socket) => socket.write(reply(decodeRequest(f)!)));
}

t.test('malformed replies fail the sender\'s requests, never the sender', async (t) => {
  const ok = (r: BlockRequest): Buffer => encodeReply({ id: r.id, status: ReplyStatus.ok, owner: 'p1', version: 0, detail: 0, payload: Buffer.from('fine') });
  const mutations: [string, (r: BlockRequest) => Buffer][] = [
    ['an unknown status', (r) => Object.assign(Buffer.from(ok(r)), { 1: 77 })],
    ['a truncated reply', (r) => ok(r).subarray(0, 10)],
    ['an owner length past the frame', (r) => Object.assign(Buffer.from(ok(r)), { 2: 255 })],
    ['a payload length past the frame', (r) => { const b = Buffer.from(ok(r)); b.writeUInt32BE(0xffff_ffff, 16); return b; }],
    ['a request frame instead of a reply', (r) => encodeRequest(r)],
  ];
  for (const [what, mutate] of mutations) {
    let answered = 0;
    const o = await fakeOwner((r) => (answered++ === 0 ? batchOf([mutate(r)]) : batchOf([ok(r)])));
    const link = new PeerLink({ peerId: 'p1', env: realEnv(), address: o.address, hello: () => ({ peerId: 'p2', stamp: '0', nonce: '', mac: '' }), requestMsMax: 2_000 });
    const err = await link.send({ op: BlockOp.read, fua: false, volumeId: '0123456789abcdef', lba: 0, blocks: 1, routeVersion: 0, compareBytes: 0 }).then(() => undefined, (e: unknown) => e);
    t.ok(err instanceof PeerUnavailableError && err.kind === ErrorKind.busy, `${what}: the request fails as transient (${String(err)})`);
    const next = await link.send({ op: BlockOp.read, fua: false, volumeId: '0123456789abcdef', lba: 0, blocks: 1, routeVersion: 0, compareBytes: 0 });
    t.equal(next.payload?.toString(), 'fine', `${what}: the link reconnects and the next request is answered`);
    link.close();
    o.stop();
  }
});

t.test('a MOVED answer naming a page outside the request is refused, not learned', async (t) => {
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
  let sent = 0;
  // A broken or hostile owner p2: every answer is MOVED for a page far from the one asked for.
  const liar: BlockSender = {
    send: async () => {
      sent++;
      return { id: 0, status: ReplyStatus.moved, owner: 'p1', version: 99, detail: 123_456 };
    },
  };
  const router = new VolumeRouter({ self: 'p1', volumeId: '0123456789abcdef', table, local: new MemoryBackend(512, 4 * pageBlocks, 8), link: () => liar, refresh: async (p) => table.route(p), counters: newRoutingCounters(), env: realEnv() });
  for (const [what, op] of [['read', () => router.read(pageBlocks, 8)], ['write', () => router.write(pageBlocks, Buffer.alloc(4096))], ['unmap', () => router.unmap(pageBlocks, 8)]] as const) {
    const err = await op().then(() => undefined, (e: unknown) => e);
    t.ok(err instanceof RemoteFailureError && /MOVED names page 123456/.test(err.message), `${what}: fails (${String(err)})`);
  }
  t.same(table.route(123_456), { owner: 'p1', version: 1 }, 'the route table did not learn the page');
  t.equal(sent, 3, 'one request each, no retries on a lie');
});
