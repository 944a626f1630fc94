// Live page migration in an in-process group of three peers: verifying writers keep writing
// (through every peer's router: locally, forwarded, across page and piece boundaries, with
// FUA, UNMAP and COMPARE AND WRITE) while a page moves back and forth; afterwards every
// block holds its last acknowledged write when read through every peer. Cancel rolls back;
// a stop of the source or the destination mid-move resumes from the checkpoint. Pages have one
// copy unless said (with two, a stopped source hands its primary role to the other copy and the
// move is abandoned: test/replication-*.test.ts and the simulator cover that).

import t from 'tap';
import type { PeerServer } from '../src/server/peer';
import type { VolumeRouter } from '../src/routing/router';
import { copiesOf, inSyncOf } from '../src/routing/table';
import { startGroup } from './helpers/group';

const pageBlocks = 8192;
const slotBlocks = 24; // 12 KiB: slots straddle 256 KiB piece boundaries now and then
const bs = 512;

/** What a slot holds after writer `w`'s write number `seq` (0 = zeros: unmapped or never written). */
function content(w: number, slot: number, seq: number): Buffer {
  const b = Buffer.alloc(slotBlocks * bs);
  if (seq === 0) return b;
  for (let at = 0; at < b.length; at += 16) {
    b.writeUInt32BE(w, at);
    b.writeUInt32BE(slot, at + 4);
    b.writeUInt32BE(seq, at + 8);
    b.writeUInt32BE(0xfeedf00d, at + 12);
  }
  return b;
}

interface Writers {
  stop(): Promise<{ errors: string[]; ops: number }>;
  /** Expected content of every slot: [lba, buffer]. */
  expected(): [number, Buffer][];
}

/**
 * One writer per router, each owning every third slot of [firstLba, firstLba + slots·24);
 * one operation in flight per writer, so "last acknowledged" is well defined per slot.
 */
function startWriters(routers: VolumeRouter[], firstLba: number, slots: number, deadlineMs: number): Writers {
  const last = new Map<number, { w: number; seq: number }>();
  const errors: string[] = [];
  let ops = 0;
  let stopping = false;
  const loops = routers.map(async (router, w) => {
    let seq = 0;
    const mine = Array.from({ length: slots }, (_, s) => s).filter((s) => s % routers.length === w);
    const until = Date.now() + deadlineMs;
    while (!stopping && Date.now() < until && ops < 200_000) {
      const slot = mine[Math.floor(Math.random() * mine.length)];
      const lba = firstLba + slot * slotBlocks;
      const roll = Math.random();
      try {
        const prev = last.get(slot);
        const prevData = prev ? content(prev.w, slot, prev.seq) : content(0, slot, 0);
        if (roll < 0.05) {
          await router.unmap(lba, slotBlocks);
          last.set(slot, { w: 0, seq: 0 });
        } else if (roll < 0.12) {
          seq++;
          const r = await router.compareAndWrite(lba, prevData, content(w + 1, slot, seq));
          if (!r.ok) errors.push(`CAW miscompare at slot ${slot} (offset ${r.miscompareOffsetBytes})`);
          else last.set(slot, { w: w + 1, seq });
        } else if (roll < 0.3) {
          const got = await router.read(lba, slotBlocks);
          if (!got.equals(prevData)) errors.push(`stale read at slot ${slot}: ${got.readUInt32BE(8)} instead of ${prev?.seq ?? 0}`);
        } else {
          seq++;
          await router.write(lba, content(w + 1, slot, seq), { fua: roll > 0.9 });
          last.set(slot, { w: w + 1, seq });
        }
        ops++;
      } catch (err) {
        errors.push(`writer ${w}: ${(err as Error).message}`);
        // An unacknowledged write may or may not have landed: this slot's value is unknown now.
        last.delete(slot);
        mine.splice(mine.indexOf(slot), 1);
        if (mine.length === 0) return;
      }
    }
  });
  return {
    async stop() {
      stopping = true;
      await Promise.all(loops);
      return { errors, ops };
    },
    expected() {
      return [...last.entries()].map(([slot, v]) => [firstLba + slot * slotBlocks, content(v.w, slot, v.seq)]);
    },
  };
}

async function verify(t: { equal(a: unknown, b: unknown, msg: string): void }, routers: Map<string, VolumeRouter>, expected: [number, Buffer][]): Promise<void> {
  for (const [id, router] of routers) {
    let bad = 0;
    for (const [lba, want] of expected) if (!(await router.read(lba, slotBlocks)).equals(want)) bad++;
    t.equal(bad, 0, `through ${id}: all ${expected.length} slots hold their last acknowledged write`);
  }
}

/** The volume's router on each peer, once every peer has opened the volume (they learn of it by watch). */
async function routersOf(g: Awaited<ReturnType<typeof startGroup>>, volume: string): Promise<Map<string, VolumeRouter>> {
  for (let i = 0; i < 100; i++) {
    const routers = ['p1', 'p2', 'p3'].map((id) => [id, g.peer(id).core.targets.routerFor(volume)] as const);
    if (routers.every(([, r]) => r)) return new Map(routers as [string, VolumeRouter][]);
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`volume ${volume} not open on every peer within 2 s`);
}

async function ownerOf(s: PeerServer, volume: string, page: number): Promise<string> {
  return (await s.admin.pageMap(volume)).pages[page].owner;
}

/** Move the page to `to` (asking any peer) and wait for the commit. */
async function moveAndWait(g: Awaited<ReturnType<typeof startGroup>>, volume: string, page: number, to: string): Promise<void> {
  const info = await g.peer('p1').admin.movePage(volume, page, to);
  await g.peer(info.from).core.migrator.wait(info.volumeId, page);
}

// One copy, and two (the default): then the copy on p2 moves and p3's copy of page 1 stays.
for (const replicas of [1, 2]) t.test(`a page with ${replicas} ${replicas > 1 ? 'copies' : 'copy'} moves back and forth 20 times under verifying writers on every peer`, async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 100 } });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas });
  const page = 1; // striped: page 1 starts on p2 (its second copy on p3)
  t.equal(await ownerOf(g.peer('p1'), 'vol', page), 'p2');
  const routers = await routersOf(g, 'vol');
  // Slots from 2 slots before page 1 to 2 slots after it: page-boundary writes too.
  const firstLba = page * pageBlocks - 2 * slotBlocks;
  const slots = Math.floor((pageBlocks + 4 * slotBlocks) / slotBlocks);
  const writers = startWriters([...routers.values()], firstLba, slots, 120_000);
  let owner = 'p2';
  const t0 = Date.now();
  for (let i = 0; i < 20; i++) {
    const to = owner === 'p2' ? 'p1' : 'p2';
    await moveAndWait(g, 'vol', page, to);
    owner = to;
    t.equal(await ownerOf(g.peer('p3'), 'vol', page), to, `move ${i + 1}: page on ${to}`);
  }
  const seconds = (Date.now() - t0) / 1000;
  const { errors, ops } = await writers.stop();
  t.same(errors.slice(0, 10), [], `no I/O errors in ${ops} operations during 20 moves (${seconds.toFixed(1)} s)`);
  t.ok(ops > 200, `the writers were busy during the moves (${ops} operations)`);
  await verify(t, routers, writers.expected());
  t.same((await g.peer('p2').admin.migrations()).moves, [], 'no moves left in flight');
  const metrics = await g.peer('p2').metrics.text();
  t.match(metrics, /peersan_page_moves_total\{result="committed",peer="p2"\} 10\b/, '/metrics: p2 ran 10 of the moves');
  t.match(metrics, /peersan_migration_bytes_total\{peer="p2"\} [1-9]/, '/metrics: bytes copied');
  if (replicas === 1) {
    const p3alloc = g.peer('p3').core.targets.allocatedBytes('vol');
    t.ok(p3alloc < 200 * 1024, `p3 (never the page's owner) holds only the boundary slots of page 2 (${p3alloc} bytes)`);
  } else {
    const route = await g.peer('p3').core.catalog.fetchRoute(g.peer('p3').core.catalog.require('vol'), page);
    t.same([route.copies, route.inSync], [[owner, 'p3'], [owner, 'p3']], "p3's copy stayed, in sync, next to the moved one");
  }
});

t.test('a cancelled move copies the moved pieces back and the destination frees its copy', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 2 } }); // 4 MiB page: about 2 s
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas: 1 });
  const page = 0; // on p1
  const routers = await routersOf(g, 'vol');
  const writers = startWriters([...routers.values()], 0, Math.floor(pageBlocks / slotBlocks), 60_000);
  const info = await g.peer('p2').admin.movePage('vol', page, 'p3');
  t.equal(info.from, 'p1');
  const src = g.peer('p1');
  for (let i = 0; i < 200 && (src.core.migrator.list()[0]?.done ?? 0) < 4; i++) await new Promise((r) => setTimeout(r, 50));
  t.ok(src.core.migrator.list()[0].done >= 4, 'some pieces were moved before the cancel');
  await g.peer('p3').admin.cancelMove('vol', page);
  await t.rejects(src.core.migrator.wait(info.volumeId, page), /cancelled/, 'the move ends as cancelled');
  const { errors, ops } = await writers.stop();
  t.same(errors.slice(0, 10), [], `no I/O errors in ${ops} operations`);
  t.equal(await ownerOf(g.peer('p3'), 'vol', page), 'p1', 'the page stays on p1');
  await verify(t, routers, writers.expected());
  t.equal(g.peer('p3').core.targets.allocatedBytes('vol'), 0, "p3 freed its partial copy");
  t.equal(await g.peer('p1').core.catalog.moveIntent(info.volumeId, page), undefined, 'the intent is gone from the catalog');
});

for (const who of ['source', 'destination'] as const) {
  t.test(`a stop of the ${who} in mid-move resumes from the checkpoint`, async (t) => {
    const g = await startGroup(t, 3, { migration: { rateMBps: 2 } });
    await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas: 1 });
    const page = 0;
    const router = (await routersOf(g, 'vol')).get('p2')!;
    const data = Buffer.alloc(pageBlocks * bs);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32BE(i ^ 0x5a5a5a5a, i);
    await router.write(0, data);
    const info = await g.peer('p1').admin.movePage('vol', page, 'p3');
    for (let i = 0; i < 200 && (g.peer('p1').core.migrator.list()[0]?.done ?? 0) < 4; i++) await new Promise((r) => setTimeout(r, 50));
    const stopped = who === 'source' ? 'p1' : 'p3';
    await g.peer(stopped).stop();
    // While the destination is down, the moved pieces cannot be read; the rest can.
    await g.start(stopped);
    await g.peer('p1').core.migrator.wait(info.volumeId, page);
    t.equal(await ownerOf(g.peer('p2'), 'vol', page), 'p3', 'the move completed after the restart');
    for (const id of ['p1', 'p2', 'p3']) t.ok((await g.peer(id).core.targets.routerFor('vol')!.read(0, pageBlocks)).equals(data), `page intact through ${id}`);
    t.equal(g.peer('p1').core.targets.allocatedBytes('vol'), 0, 'the source freed the page');
  });
}

t.test('while a snapshot holds the volume no move step runs; the move goes on when it lets go', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 2 } }); // 4 MiB page: about 2 s
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas: 1 });
  const src = g.peer('p1');
  const info = await src.admin.movePage('vol', 0, 'p3');
  for (let i = 0; i < 200 && (src.core.migrator.list()[0]?.done ?? 0) < 2; i++) await new Promise((r) => setTimeout(r, 50));
  // A barrier PREPARE on the source: its gate closes, the volume is held, and it answers once
  // the move's running step has ended (the migrator's idle()).
  await src.core.snapshots.prepare({ snapshotId: 'held', volumeIds: [info.volumeId] });
  t.ok(src.core.snapshots.hold(info.volumeId), 'the volume is held');
  const at = src.core.migrator.list()[0];
  await new Promise((r) => setTimeout(r, 600));
  const later = src.core.migrator.list()[0];
  t.same([later.done, later.bytesCopied], [at.done, at.bytesCopied], `no piece or chunk copied in 600 ms of hold (${at.done} pieces, ${at.bytesCopied} bytes)`);
  await src.core.migrator.idle(info.volumeId);
  t.pass('idle() resolves while held: no step is running');
  await src.core.snapshots.release('held');
  t.equal(src.core.snapshots.hold(info.volumeId), undefined, 'let go');
  // Woken by the release, not by a poll: the move commits within its remaining copy time.
  const committed = await Promise.race([src.core.migrator.wait(info.volumeId, 0).then(() => 'committed'), new Promise((r) => setTimeout(() => r('still held'), 10_000))]);
  t.equal(committed, 'committed', 'the move went on and committed');
  t.equal(await ownerOf(g.peer('p2'), 'vol', 0), 'p3');
});

// A destination that restarts may have lost staging writes it acknowledged without FUA; with two
// copies the other copy holds them, so the destination must not become the page's primary: the
// source hands the role to the in-sync copy and the move is abandoned (move-machine.ts, confirm).
t.test('with two copies, a restart of the destination in mid-move abandons the move; the other copy takes the primary role', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 2 } });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas: 2 });
  const page = 0; // on p1, its second copy on p2: p3 holds none
  const routers = await routersOf(g, 'vol');
  const data = Buffer.alloc(pageBlocks * bs);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32BE(i ^ 0x3c3c3c3c, i);
  await routers.get('p2')!.write(0, data);
  const volume = g.peer('p1').core.catalog.require('vol');
  t.same(copiesOf(await g.peer('p1').core.catalog.fetchRoute(volume, page)), ['p1', 'p2']);
  const info = await g.peer('p1').admin.movePage('vol', page, 'p3');
  for (let i = 0; i < 200 && (g.peer('p1').core.migrator.list()[0]?.done ?? 0) < 4; i++) await new Promise((r) => setTimeout(r, 50));
  // Written after some pieces moved: the moved ones go to p3 (staging) and p2, not to p1.
  const late = Buffer.alloc(8 * bs, 0xa7);
  await routers.get('p2')!.write(8, late);
  late.copy(data, 8 * bs);
  await g.peer('p3').stop();
  await g.start('p3');
  await t.rejects(g.peer('p1').core.migrator.wait(info.volumeId, page), /cancelled/, 'the move does not commit');
  const route = await g.peer('p1').core.catalog.fetchRoute(volume, page);
  t.equal(route.owner, 'p2', 'the in-sync copy took the primary role');
  t.notOk(copiesOf(route).includes('p3'), 'p3 holds no copy');
  t.notOk(inSyncOf(route).includes('p1'), "p1's copy, missing what went to p3, is out of the in-sync set (it resyncs)");
  for (const id of ['p1', 'p2', 'p3']) t.ok((await g.peer(id).core.targets.routerFor('vol')!.read(0, pageBlocks)).equals(data), `page intact through ${id}`);
  t.equal(await g.peer('p1').core.catalog.moveIntent(info.volumeId, page), undefined, 'the intent is gone from the catalog');
});

t.test("a destination ignores the FINISH of an older move from another source while it receives the page from a newer one (sim seed 7558)", async (t) => {
  // Seed 7558: p2's move of page 1 to p1 was abandoned (p3 took the page over); p3 then moved the
  // page to p1 itself. p2 restarted and sent its old move's FINISH (cancel) again: p1 freed the
  // pieces of p3's move and dropped its receiving record, and p3's roll-back never ended.
  const g = await startGroup(t, 3);
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas: 2 });
  const page = 0; // primary p1, its second copy on p2; p3 holds none
  const catalog = g.peer('p1').core.catalog;
  const volume = catalog.require('vol');
  const route = await catalog.fetchRoute(volume, page);
  await catalog.createMoveIntent(volume, page, { from: 'p1', to: 'p3', routeVersion: route.version, startedAtMs: Date.now(), id: 'p1-p3' });
  const p3 = g.peer('p3').core;
  await p3.migrator.prepare({ volumeId: volume.id, page, from: 'p1', fresh: true });
  t.ok(p3.migrator.receiving(volume.id, page), 'p3 receives page 0 from p1');
  const piece = Buffer.alloc(64 * bs, 0x5a);
  await p3.targets.stored(volume.id)!.write(0, piece); // as a copied piece
  await p3.migrator.finish({ volumeId: volume.id, page, committed: false, version: 0, from: 'p2' });
  t.ok(p3.migrator.receiving(volume.id, page), "an old move's FINISH from p2: still receiving from p1");
  t.ok((await p3.targets.stored(volume.id)!.read(0, 64)).equals(piece), 'the piece copied here is kept');
  await p3.migrator.finish({ volumeId: volume.id, page, committed: false, version: 0, from: 'p1' });
  t.notOk(p3.migrator.receiving(volume.id, page), "the move's own FINISH (cancel) ends it");
  t.ok((await p3.targets.stored(volume.id)!.read(0, 64)).equals(Buffer.alloc(64 * bs)), 'and frees its pieces');
});

t.test('a fresh PREPARE is refused, and clears nothing, when the catalog says the source is not the primary or the destination holds a copy', async (t) => {
  // Simulator, seed 23891: a source's start read the route, then waited; meanwhile the page got
  // another primary and moved to the destination, whose fresh PREPARE then cleared the page it
  // served as primary.
  const g = await startGroup(t, 3);
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M', replicas: 2 });
  const page = 0; // primary p1, its second copy on p2; p3 holds none
  const routers = await routersOf(g, 'vol');
  const data = Buffer.alloc(pageBlocks * bs);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32BE(i ^ 0x5a5a5a5a, i);
  await routers.get('p1')!.write(0, data);
  const catalog = g.peer('p1').core.catalog;
  const volume = catalog.require('vol');
  const route = await catalog.fetchRoute(volume, page);
  t.same([route.owner, ...copiesOf(route)], ['p1', 'p1', 'p2'], 'page 0: primary p1, copies p1 and p2');
  const intent = (from: string, to: string) => ({ from, to, routeVersion: route.version, startedAtMs: Date.now(), id: `${from}-${to}` });
  const refusedAt = async (from: string, to: string, why: string): Promise<void> => {
    await catalog.createMoveIntent(volume, page, intent(from, to));
    await t.rejects(g.peer(to).core.migrator.prepare({ volumeId: volume.id, page, from, fresh: true }), /is stale/, why);
    t.notOk(g.peer(to).core.migrator.receiving(volume.id, page), `${to} is not receiving the page`);
    await catalog.deleteMoveIntent(volume.id, page, intent(from, to));
  };
  await refusedAt('p3', 'p1', 'from p3, which is not the primary, to p1, the primary');
  await refusedAt('p1', 'p2', 'from the primary to p2, which holds a copy');
  for (const id of ['p1', 'p2', 'p3']) t.ok((await g.peer(id).core.targets.routerFor('vol')!.read(0, pageBlocks)).equals(data), `page intact through ${id}`);
  // The copies themselves, not only what the primary serves.
  t.ok((await g.peer('p2').core.targets.stored(volume.id)!.read(0, pageBlocks)).equals(data), "p2's copy intact");
  t.ok((await g.peer('p1').core.targets.stored(volume.id)!.read(0, pageBlocks)).equals(data), "p1's copy intact");
});
