// The replicated write path (src/replication/replicated.ts) in an in-process group of three
// peers (test/helpers/group.ts: real gRPC between them, no iSCSI host): a host write through
// any peer is on every copy's store; overlapping writes end the same on every copy; a copy at a
// newer epoch refuses a change from an older one; a copy that is down is dropped from the
// in-sync set before the write is acknowledged; a COMPARE AND WRITE that miscompares writes
// nothing anywhere. Each copy's store is read directly, below every layer.

import t from 'tap';
import { setTimeout as delay } from 'node:timers/promises';
import type { VolumeRecord } from '../src/cluster/catalog';
import { ErrorKind } from '../src/errors';
import { BlockOp, ReplyStatus, type BlockRequest } from '../src/routing/frame';
import { PageMovedError } from '../src/routing/moved';
import { inSyncOf, type Route } from '../src/routing/table';
import type { BlockBackend } from '../src/store/types';
import { startGroup, type NetworkFaults } from './helpers/group';

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
