// Reused receive buffers (src/routing/read-buffers.ts): a large reply's buffer is reused only
// after it was handed to one host read (the router's forwarded read) AND that read's data has
// left for the socket (the session's readDataSent); anything else is never reused. Then the
// three places that apply the rule, each with what it must not do: the link receives large
// replies into the pool (a real data stream), the router hands over only a forwarded read,
// the session tells only once the last Data-In PDU is flushed.

import t from 'tap';
import { BlockOp, decodeRequest, encodeReply, ReplyStatus } from '../src/routing/frame';
import { realEnv } from '../src/env/real';
import { PeerLink } from '../src/routing/link';
import { pooledMinBytes, ReadBuffers } from '../src/routing/read-buffers';
import { newRoutingCounters, VolumeRouter, type BlockSender } from '../src/routing/router';
import { RouteTable } from '../src/routing/table';
import { Op, type DataInPdu } from '../src/iscsi/types';
import { ScsiStatus } from '../src/scsi/types';
import { MemoryBackend } from './helpers/memory-backend';
import { batchOf, fakeOwner } from './helpers/data-stream';
import { cmd, setup, tick } from './helpers/session-fixture';

const big = 128 * 1024 + 40;

t.test('the pool: reused only once handed over and given back, once; small frames and strangers never', async (t) => {
  const pool = new ReadBuffers(1024 * 1024);
  const small = pool.take(4096);
  pool.handOver(small);
  pool.giveBack(small);
  t.equal(pool.counts.taken, 0, 'a small frame is not pooled');

  const a = pool.take(big);
  t.equal(a.length, big);
  pool.giveBack(a);
  const b = pool.take(big);
  t.not(b.buffer, a.buffer, 'given back without being handed over: not reused');
  pool.handOver(b);
  const data = b.subarray(40); // what a reply's payload is: a view after the frame's header
  pool.giveBack(data);
  pool.giveBack(data);
  const c = pool.take(big - 8);
  t.equal(c.buffer, b.buffer, 'handed over, then given back: the next frame of about its size reuses it');
  t.equal(c.length, big - 8);
  const d = pool.take(big);
  t.not(d.buffer, b.buffer, 'given back twice: reused once');
  t.not(pool.take(256 * 1024).buffer, b.buffer, 'a frame of another size class gets another buffer');

  const stranger = Buffer.allocUnsafeSlow(big);
  pool.handOver(stranger);
  pool.giveBack(stranger);
  t.not(pool.take(big).buffer, stranger.buffer, 'a buffer the pool did not make is never taken in');

  const capped = new ReadBuffers(pooledMinBytes * 3);
  const held = [capped.take(pooledMinBytes * 2), capped.take(pooledMinBytes * 2)];
  for (const h of held) {
    capped.handOver(h);
    capped.giveBack(h);
  }
  const again = [capped.take(pooledMinBytes * 2), capped.take(pooledMinBytes * 2)];
  t.same(again.map((x) => held.some((h) => h.buffer === x.buffer)), [true, false], 'the free lists hold at most freeBytesMax: the rest went to the GC');
  t.same(capped.counts, { taken: 4, reused: 1, givenBack: 2 });
});

t.test('the link receives a large reply into the pool, a small one not', async (t) => {
  const o = await fakeOwner((f, socket) => {
    const req = decodeRequest(f)!;
    socket.write(batchOf([encodeReply({ id: req.id, status: ReplyStatus.ok, owner: 'p1', version: 0, detail: 0, payload: Buffer.alloc(req.blocks * 512, req.lba + 1) })]));
  });
  t.teardown(() => o.stop());
  const pool = new ReadBuffers(1024 * 1024);
  const link = new PeerLink({ peerId: 'p1', env: realEnv(), address: o.address, hello: () => ({ peerId: 'p2', stamp: '0', nonce: '', mac: '' }), readBuffers: pool });
  t.teardown(() => link.close());
  const read = (lba: number, blocks: number) => link.send({ op: BlockOp.read, fua: false, volumeId: '0123456789abcdef', lba, blocks, routeVersion: 0, compareBytes: 0 });
  const small = await read(0, 8);
  t.equal(pool.counts.taken, 0, 'a 4 KiB reply: not from the pool');
  const large = await read(0, 256);
  t.equal(large.payload?.length, 128 * 1024);
  t.ok(large.payload!.every((x) => x === 1), 'the 128 KiB reply arrived whole');
  t.equal(pool.counts.taken, 1, 'a 128 KiB reply: received into a buffer from the pool');
  pool.handOver(large.payload!);
  pool.giveBack(large.payload!);
  const next = await read(6, 256);
  t.equal(next.payload!.buffer, large.payload!.buffer, 'given back, its buffer received the next large reply');
  t.ok(next.payload!.every((x) => x === 7), 'with the new reply\'s bytes');
  t.equal(small.payload?.length, 4096);
});

t.test('the router hands over the data of a read forwarded to one owner, never of a local one', async (t) => {
  const pageBlocks = 512;
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map());
  const pool = new ReadBuffers(1024 * 1024);
  const link = (): BlockSender => ({
    send: async (req) => {
      const frame = pool.take(40 + req.blocks * 512);
      return { id: req.id, status: ReplyStatus.ok, owner: 'p2', version: 0, detail: 0, payload: frame.subarray(40) };
    },
  });
  const router = new VolumeRouter({ self: 'p1', volumeId: '0123456789abcdef', table, local: new MemoryBackend(512, 2 * pageBlocks, 8), link, refresh: async (p) => table.route(p), counters: newRoutingCounters(), env: realEnv(), readBuffers: pool });
  const forwarded = await router.read(pageBlocks, 256);
  pool.giveBack(forwarded);
  t.equal(pool.counts.givenBack, 1, 'page 1 (p2): handed over, so given back');
  const local = await router.read(0, 256);
  pool.giveBack(local);
  t.equal(pool.counts.givenBack, 1, 'page 0 (p1, local): not handed over');
});

t.test('the session tells a read\'s data sent only once its last Data-In PDU is flushed', async (t) => {
  const told: Buffer[] = [];
  const { s, lu, out, flushes } = setup({ maxXmitDataSegmentLength: 8192 }, { holdFlushes: true, readDataSent: (d) => told.push(d) });
  const data = Buffer.alloc(24576, 3);
  lu.auto = () => ({ status: ScsiStatus.good, dataIn: data });
  s.onPdu(cmd(1, 1, { read: true, edtl: 24576 }), 0);
  await tick();
  t.equal(out.filter((p): p is DataInPdu => p.opcode === Op.dataIn).length, 3, 'three Data-In PDUs sent');
  t.equal(told.length, 0, 'not told while the socket has not taken them');
  t.equal(flushes.length, 1, 'one flush callback, on the last PDU');
  flushes[0]();
  t.same(told, [data], 'told once, of the read\'s data');
  lu.auto = () => ({ status: ScsiStatus.good });
  s.onPdu(cmd(2, 2, { read: true, edtl: 0 }), 0);
  await tick();
  flushes.slice(1).forEach((f) => f());
  t.equal(told.length, 1, 'a command without data: nothing told');
});
