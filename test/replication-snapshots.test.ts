// Snapshot layers resync and rebuild with their pages (issue 17; src/snapshot/layer-sync.ts): a
// copy that did not hold a snapshot's layer of a page (stale at the cut, or built later) takes it
// from the holders once it is in sync, and joins them in the snapshot's record, so the snapshot
// still reads back once the copies that held it at the cut are lost.
//
// Whole groups in the simulator (test/sim: the production composition on simulated disks,
// catalog and network, no faults but the ones each test makes), deterministic from the seed.
// A snapshot needs every peer of the group (its REACH step), so "the secondary was away at the
// snapshot" is a secondary back but still stale at the cut: its resync asks are refused until
// the snapshot is taken. A lost peer is one kept down past downOutMs (3 s here).

import t from 'tap';
import type { PeerCore } from '../src/server/compose';
import { decodeSnapshot, holdsPage, routesAtCut, snapshotKey, type SnapshotRecord } from '../src/snapshot/records';
import { copiesOf, inSyncOf } from '../src/routing/table';
import { blockBytes, boot, core, destRestartedMidMove, drive, fill, pageBlocks, until, volume, write } from './helpers/sim-group';
import type { SimGroup } from './sim/group';
import type { SimWorld } from './sim/world';

function record(group: SimGroup, name: string): SnapshotRecord | undefined {
  const volumeId = group.up()[0].core()!.catalog.require(volume).id;
  const r = group.catalog.list(snapshotKey(volumeId, name))[0];
  return r && decodeSnapshot(r.value);
}

/** Whether `peer` holds the snapshot's layer of the page, as the snapshot's record says. */
function holds(r: SnapshotRecord, page: number, peer: string): boolean {
  return holdsPage(r, page, peer, routesAtCut(r), new Map(r.moving.map((m) => [m.page, m])));
}

/** Let the catalog's watch bring every peer the newest records (a second of simulated time). */
async function settle(world: SimWorld): Promise<void> {
  await world.run(world.now() + 1_000, Number.MAX_SAFE_INTEGER);
}

/** Whether every page's route (as `via` knows it) has `peer` among its in-sync copies. */
function inSyncEverywhere(group: SimGroup, via: string, peer: string, pages: number): boolean {
  const c = group.core(via);
  if (!c) return false;
  const table = c.catalog.routes(c.catalog.require(volume));
  return Array.from({ length: pages }, (_, page) => inSyncOf(table.route(page)).includes(peer)).every(Boolean);
}

t.test('a copy stale at the snapshot, resynced since, serves the snapshot once the holder is lost', async (t) => {
  const pages = 2;
  const { world, group } = await boot(t, 2, pages, 2);
  // Page 0: p1 primary, p2 secondary; page 1: the other way round.
  await write(world, group, 'p1', 0, fill(64, 0xa1));
  await write(world, group, 'p1', pageBlocks + 100, fill(64, 0xa2));

  // p2 goes away; writes go on through p1 (p1 takes page 1 over); p2 misses them.
  group.peers.get('p2')!.crash();
  await write(world, group, 'p1', 32, fill(64, 0xb1));
  await write(world, group, 'p1', pageBlocks + 132, fill(64, 0xb2));

  // p2 comes back, but p1 refuses to resync it until the snapshot is taken.
  const p1 = core(group, 'p1');
  const handle = p1.handlers.replication;
  let refuseResync = true;
  p1.handlers.replication = async (from, kind, body) => {
    if (kind === 'resync' && refuseResync) throw new Error('resync refused by the test');
    return handle(from, kind, body);
  };
  await drive(world, group.peers.get('p2')!.start());
  t.notOk(inSyncEverywhere(group, 'p2', 'p2', pages), 'p2 is back, stale');
  await drive(world, p1.snapshots.create([volume], { name: 's1' }));
  const atCut = record(group, 's1')!;
  for (let page = 0; page < pages; page++) t.notOk(holds(atCut, page, 'p2'), `p2 was stale at the cut: no holder of page ${page}`);

  // Resync runs; then p2 takes the snapshot's layers and joins the holders.
  refuseResync = false;
  t.ok(await until(world, () => inSyncEverywhere(group, 'p1', 'p2', pages)), 'p2 resynced: in sync again');
  const joined = await until(world, () => [0, 1].every((page) => holds(record(group, 's1')!, page, 'p2')));
  t.ok(joined, 'p2 holds the snapshot\'s layer of every page, as its record says');
  t.ok(core(group, 'p2').layerSync.counters.bytes > 0, `p2 took ${core(group, 'p2').layerSync.counters.bytes} bytes of layers`);

  await settle(world);
  // The holder at the cut is lost for good; the live volume changes again through p2.
  group.peers.get('p1')!.crash();
  await write(world, group, 'p2', 0, fill(128, 0xc1));
  const reader = core(group, 'p2').snapshotTargets.reader(volume, 's1');
  t.ok(reader, 'p2 serves the snapshot');
  const page0 = await drive(world, reader!.read(0, 128));
  t.same(page0, Buffer.concat([fill(32, 0xa1), fill(64, 0xb1), fill(32, 0)]), 'page 0 of the snapshot as it was at the cut');
  const page1 = await drive(world, reader!.read(pageBlocks + 100, 128));
  t.same(page1, Buffer.concat([fill(32, 0xa2), fill(64, 0xb2), fill(32, 0)]), 'page 1 of the snapshot as it was at the cut');
});

t.test('a copy built after the snapshot (more replicas) serves it once the holder is lost', async (t) => {
  const pages = 3;
  const { world, group } = await boot(t, 3, pages, 1);
  // Page 0 on p1 alone.
  await write(world, group, 'p1', 0, fill(64, 0xa1));
  await write(world, group, 'p1', 4096, fill(16, 0xa3));
  await drive(world, core(group, 'p1').snapshots.create([volume], { name: 's1' }));
  await write(world, group, 'p1', 0, fill(64, 0xb1));

  await drive(world, core(group, 'p1').catalog.setReplicas(volume, 2));
  const route = (): ReturnType<PeerCore['catalog']['routes']> => core(group, 'p1').catalog.routes(core(group, 'p1').catalog.require(volume));
  t.ok(await until(world, () => copiesOf(route().route(0)).length === 2 && inSyncOf(route().route(0)).length === 2), 'page 0 has a second copy, in sync');
  const added = copiesOf(route().route(0)).find((p) => p !== 'p1')!;
  t.ok(await until(world, () => holds(record(group, 's1')!, 0, added)), `the new copy on ${added} holds the snapshot's layer of page 0`);

  await settle(world);
  group.peers.get('p1')!.crash();
  const reader = core(group, added).snapshotTargets.reader(volume, 's1');
  t.same(await drive(world, reader!.read(0, 64)), fill(64, 0xa1), 'the snapshot as it was at the cut, from the new copy');
  t.same(await drive(world, reader!.read(4096, 32)), Buffer.concat([fill(16, 0xa3), fill(16, 0)]), 'every grain of the page');
  t.same(await drive(world, reader!.read(64, 64)), fill(64, 0), 'unwritten blocks read as zeros');
});

t.test('a lost peer\'s copy rebuilt elsewhere after the snapshot serves it once every holder at the cut is lost', async (t) => {
  const pages = 3;
  const { world, group } = await boot(t, 3, pages, 2, { downOutMs: 3_000, zones: {} });
  // Page 0: p1 primary, p2 secondary.
  await write(world, group, 'p1', 0, fill(64, 0xa1));
  await drive(world, core(group, 'p1').snapshots.create([volume], { name: 's1' }));
  await write(world, group, 'p1', 0, fill(64, 0xb1));
  t.ok(holds(record(group, 's1')!, 0, 'p1') && holds(record(group, 's1')!, 0, 'p2') && !holds(record(group, 's1')!, 0, 'p3'), 'p1 and p2 hold page 0 of the snapshot, p3 does not');

  // p2 is lost for good: after downOutMs its copy of page 0 is rebuilt on p3.
  group.peers.get('p2')!.crash();
  const route = (): ReturnType<PeerCore['catalog']['routes']> => core(group, 'p1').catalog.routes(core(group, 'p1').catalog.require(volume));
  t.ok(await until(world, () => inSyncOf(route().route(0)).includes('p3')), 'page 0 rebuilt on p3, in sync');
  t.ok(await until(world, () => holds(record(group, 's1')!, 0, 'p3')), 'p3 holds the snapshot\'s layer of page 0');
  await settle(world);

  group.peers.get('p1')!.crash();
  const reader = core(group, 'p3').snapshotTargets.reader(volume, 's1');
  t.same(await drive(world, reader!.read(0, 128)), Buffer.concat([fill(64, 0xa1), fill(64, 0)]), 'the snapshot as it was at the cut, from the rebuilt copy');
});

t.test('a snapshot deleted before its layers were taken does not come back', async (t) => {
  const pages = 1;
  const { world, group } = await boot(t, 3, pages, 1);
  await write(world, group, 'p1', 0, fill(8, 0xa1));
  await drive(world, core(group, 'p1').snapshots.create([volume], { name: 's1' }));
  const seq = record(group, 's1')!.seq;
  await drive(world, core(group, 'p1').snapshots.delete(volume, 's1'));
  await drive(world, core(group, 'p1').catalog.setReplicas(volume, 2));
  const table = (): ReturnType<PeerCore['catalog']['routes']> => core(group, 'p1').catalog.routes(core(group, 'p1').catalog.require(volume));
  t.ok(await until(world, () => inSyncOf(table().route(0)).length === 2), 'page 0 has a second copy, in sync');
  await world.run(world.now() + 5_000, Number.MAX_SAFE_INTEGER);
  t.equal(record(group, 's1'), undefined, 'no record');
  for (const p of group.up()) t.notOk(p.core()!.targets.stored(core(group, 'p1').catalog.require(volume).id)?.hasSnapshot(String(seq)), `no layer on ${p.id}`);
});

// Seeds 8 and 92 of the simulator: a primary restarted without a write it had acknowledged (not
// flushed: its disk lost it; its secondary kept it), and a snapshot came before it could hand
// the page over (the catalog out of reach there; the secondary refusing here). Its copy was
// still the page's primary and in sync at the cut, so it was a holder, and its layer differed
// from the secondary's. A copy suspect where it froze is no holder; it takes the layer later.
for (const mode of ['barrier', 'timestamp'] as const) {
  t.test(`${mode}: a copy suspect after a restart holds no layer of the snapshot; it takes the holders' later`, async (t) => {
    const { world, group } = await boot(t, 2, 1, 2);
    // Page 0: p1 primary, p2 secondary. The write is acknowledged by both, flushed by neither.
    await write(world, group, 'p1', 0, fill(64, 0xa1));
    const volumeId = core(group, 'p1').catalog.require(volume).id;

    // p2 refuses to take page 0 over until the snapshot is taken: p1 stays its suspect primary.
    const p2 = core(group, 'p2');
    const handle = p2.handlers.replication;
    let refusePromote = true;
    p2.handlers.replication = async (from, kind, body) => {
      if (kind === 'promote' && refusePromote) throw new Error('promote refused by the test');
      return handle(from, kind, body);
    };
    group.peers.get('p1')!.crash();
    await drive(world, group.peers.get('p1')!.start());
    const p1 = core(group, 'p1');
    t.same(await drive(world, p1.targets.stored(volumeId)!.read(0, 64)), fill(64, 0), 'p1\'s disk lost the write');
    t.ok(p1.resync.activity.isSuspect(volumeId, 0), 'page 0 is suspect on p1');
    t.equal(p1.catalog.routes(p1.catalog.require(volume)).route(0).owner, 'p1', 'p1 is still page 0\'s primary');

    await drive(world, p2.snapshots.create([volume], { name: 's1', mode }));
    t.notOk(holds(record(group, 's1')!, 0, 'p1'), 'p1 was suspect at the cut: no holder of page 0');
    t.ok(holds(record(group, 's1')!, 0, 'p2'), 'p2 holds page 0 of the snapshot');

    // p2 takes the page over, p1 resyncs whole, then takes the snapshot's layer from p2.
    refusePromote = false;
    t.ok(await until(world, () => !p1.resync.activity.isSuspect(volumeId, 0) && inSyncEverywhere(group, 'p1', 'p1', 1)), 'p1 resynced: in sync again');
    t.ok(await until(world, () => holds(record(group, 's1')!, 0, 'p1')), 'p1 joined the holders of page 0');
    await settle(world);
    const r = record(group, 's1')!;
    for (const peer of ['p1', 'p2']) {
      const layer = core(group, peer).snapshotTargets.layer(volumeId, r.seq);
      t.same(await drive(world, layer!.read(0, 128)), Buffer.concat([fill(64, 0xa1), fill(64, 0)]), `${peer}'s layer holds the write acknowledged before the snapshot`);
    }
    const reader = core(group, 'p1').snapshotTargets.reader(volume, 's1');
    t.same(await drive(world, reader!.read(0, 64)), fill(64, 0xa1), 'the snapshot reads the write');
  });
}

// Seed 32298 of the simulator: page 3 was moving from its primary p4 to p2 (pieces [0, 8) on p2:
// host writes to them went to p2 and the secondary p5, not to p4), when p2 crashed and its disk
// lost two of those writes, acknowledged without FUA. p2 restarted still receiving the page (its
// move does not commit: move-machine.ts), and a snapshot came: its record named p2 the holder of
// the moved pieces, whose layer lacked the writes that p5's had. A destination that restarted
// while receiving a replicated page reports it suspect where it froze: the moved pieces are read
// from the other in-sync copies.
for (const mode of ['timestamp', 'barrier'] as const) {
  t.test(`${mode}: a move's destination that restarted while receiving holds no layer of the pieces it had`, async (t) => {
    const { world, group } = await destRestartedMidMove(t);

    await drive(world, core(group, 'p2').snapshots.create([volume], { name: 's1', mode }));
    const r = record(group, 's1')!;
    const moving = r.moving.find((m) => m.page === 0);
    t.ok(moving && moving.from === 'p1' && moving.to === 'p3' && moving.done >= 1, 'the record has the move at the cut');
    t.equal(moving?.toSuspect, true, 'p3 reported itself suspect where it froze');
    t.notOk(holdsPage(r, 0, 'p3', routesAtCut(r), new Map(r.moving.map((m) => [m.page, m]))), 'p3 holds no layer of piece 0');
    await settle(world);
    for (const via of ['p1', 'p3']) {
      const reader = core(group, via).snapshotTargets.reader(volume, 's1');
      t.same(await drive(world, reader!.read(0, 64)), fill(64, 0xa1), `the snapshot read through ${via} has the write acknowledged before it`);
    }
  });
}

// Seed 128 of the simulator: a host write reached its primary through another peer, which then
// died; the primary applied it and waited for its secondary, out of reach. A timestamp snapshot
// came meanwhile: no gate waited for the write (its host peer was gone), so the secondary froze
// and finished without it while the primary's layer had it. The primary's TAKE(T) now waits for
// its replicated changes stamped before T (barrier mode: its PREPARE, for those in flight): the
// secondary is dropped first, and is no holder.
for (const mode of ['timestamp', 'barrier'] as const) {
  t.test(`${mode}: a replicated change in flight at the cut, its host peer gone, is on every holder or the copy is none`, async (t) => {
    const { world, group } = await boot(t, 3, 1, 2);
    const volumeId = core(group, 'p1').catalog.require(volume).id;
    // Page 0: p1 primary, p2 secondary. The write enters at p3; p1 cannot reach p2 while it replicates it.
    group.network.partition('p1', 'p2', true);
    void group.hostPath('p3', volume)!.write(0, fill(64, 0xa1)).catch(() => undefined);
    await world.run(world.now() + 50, Number.MAX_SAFE_INTEGER);
    group.peers.get('p3')!.crash();
    group.network.partition('p1', 'p2', false);
    t.same(await drive(world, core(group, 'p1').targets.stored(volumeId)!.read(0, 64)), fill(64, 0xa1), 'p1 applied the write');
    t.same(await drive(world, core(group, 'p2').targets.stored(volumeId)!.read(0, 64)), fill(64, 0), 'p2 does not have it');
    await drive(world, group.peers.get('p3')!.start());

    await drive(world, core(group, 'p2').snapshots.create([volume], { name: 's1', mode }));
    await settle(world);
    const r = record(group, 's1')!;
    const reader = core(group, 'p2').snapshotTargets.reader(volume, 's1');
    const snapshot = await drive(world, reader!.read(0, 64));
    for (const peer of ['p1', 'p2']) {
      if (!holds(r, 0, peer)) continue;
      const layer = core(group, peer).snapshotTargets.layer(volumeId, r.seq);
      t.same(await drive(world, layer!.read(0, 64)), snapshot, `${peer} holds page 0 of the snapshot as it reads`);
    }
    t.ok(holds(r, 0, 'p1'), 'p1 holds page 0');
  });
}

// Seed 138 of the simulator: a change of the primary failed on its secondary (out of reach),
// and the drop of the secondary could not be made (the primary cut from the catalog): the
// change counted as settled for the snapshot's wait, the secondary stayed in the in-sync set,
// was counted as a holder, and froze without the change the primary's layer had. The primary
// now names the copies whose drop is pending (at its freeze, and at TAKE(T)): they hold no layer.
for (const mode of ['timestamp', 'barrier'] as const) {
  t.test(`${mode}: a copy whose drop waits for the catalog holds no layer of the snapshot`, async (t) => {
    const { world, group } = await boot(t, 3, 1, 2);
    const volumeId = core(group, 'p1').catalog.require(volume).id;
    // Page 0: p1 primary, p2 secondary. p1 can reach neither p2 nor the catalog while it writes.
    group.network.partition('p1', 'p2', true);
    group.catalog.partition('p1', true);
    const failed = drive(world, group.hostPath('p1', volume)!.write(0, fill(64, 0xa1))).then(() => false, () => true);
    t.ok(await failed, 'the write fails: its copy can be neither reached nor dropped');
    group.network.partition('p1', 'p2', false);
    t.same(await drive(world, core(group, 'p1').targets.stored(volumeId)!.read(0, 64)), fill(64, 0xa1), 'p1 applied the write');
    t.same(await drive(world, core(group, 'p2').targets.stored(volumeId)!.read(0, 64)), fill(64, 0), 'p2 does not have it');
    t.same(core(group, 'p1').targets.replicated(volumeId)!.undroppedCopies(), [{ page: 0, peer: 'p2' }], 'p2\'s drop is pending on p1');
    t.ok(inSyncEverywhere(group, 'p3', 'p2', 1), 'p2 is still in sync in the catalog');

    await drive(world, core(group, 'p3').snapshots.create([volume], { name: 's1', mode }));
    const r = record(group, 's1')!;
    t.notOk(holds(r, 0, 'p2'), 'p2 may lack a change before the cut: no holder of page 0');
    t.ok(holds(r, 0, 'p1'), 'p1 holds page 0');
    group.catalog.partition('p1', false);
    await settle(world);
    const reader = core(group, 'p3').snapshotTargets.reader(volume, 's1');
    t.same(await drive(world, reader!.read(0, 64)), fill(64, 0xa1), 'the snapshot reads the primary\'s write');
  });
}

// Seed 138 itself: the change is still in flight when the timestamp snapshot freezes; it fails
// while TAKE(T) waits for it, and the drop waits for the catalog. TAKE(T)'s answer names the copy.
t.test('timestamp: a change before T that fails while TAKE(T) waits, its drop pending, leaves its copy out of the holders', async (t) => {
  const { world, group } = await boot(t, 3, 1, 2);
  const volumeId = core(group, 'p1').catalog.require(volume).id;
  group.network.partition('p1', 'p2', true);
  group.catalog.partition('p1', true);
  const failed = group.hostPath('p1', volume)!.write(0, fill(64, 0xa1)).then(() => false, () => true);
  await world.run(world.now() + 20, Number.MAX_SAFE_INTEGER);
  t.same(core(group, 'p1').targets.replicated(volumeId)!.undroppedCopies(), [], 'the change is in flight: no drop pending yet');
  const snapshot = core(group, 'p3').snapshots.create([volume], { name: 's1', mode: 'timestamp' });
  await drive(world, snapshot);
  t.ok(await failed, 'the write failed meanwhile');
  const r = record(group, 's1')!;
  t.notOk(holds(r, 0, 'p2'), 'p2 may lack a change before the cut: no holder of page 0');
  t.ok(holds(r, 0, 'p1'), 'p1 holds page 0');
  t.same(await drive(world, core(group, 'p1').targets.stored(volumeId)!.read(0, 64)), fill(64, 0xa1), 'p1 applied the write');
  group.network.partition('p1', 'p2', false);
  group.catalog.partition('p1', false);
  await settle(world);
});
