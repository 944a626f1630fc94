// A page move of a replicated page, with the faults that make neither of its copies whole
// (src/migration/move-machine.ts, "D confirms"; src/server/compose.ts handOff). Whole groups in
// the simulator (test/helpers/sim-group.ts), deterministic.

import t from 'tap';
import { inSyncOf } from '../src/routing/table';
import { boot, core, destRestartedMidMove, drive, fill, until, volume, write } from './helpers/sim-group';

// Seed 86323 of the simulator: a move's destination restarted, losing a write it had acknowledged
// without FUA, and the move was cancelled. Copying back made the source's copy the destination's,
// without the write; the page's other copy, which had it, was out of the in-sync set by then (a
// later write it missed), so no copy could take the role over, and its resync brought back only
// the grains it had missed by the write path. The two copies then differed for good on the lost
// write's blocks. Now such a roll-back makes every stale copy resync the whole page.
t.test('a roll-back from a destination that restarted, no other copy in sync: the stale copy resyncs all of the page', async (t) => {
  const { world, group, volumeId } = await destRestartedMidMove(t);
  const inSync = (): string[] => {
    const c = core(group, 'p1');
    return inSyncOf(c.catalog.routes(c.catalog.require(volume)).route(0));
  };
  // A write p2 gets tells it the change before it (block 0's) is settled, so p2 asks for that
  // grain in no resync; then p2 misses a write (pieces not moved yet) and leaves the in-sync set.
  await write(world, group, 'p1', 2048, fill(8, 0xc3));
  group.network.partition('p1', 'p2', true);
  await write(world, group, 'p1', 4096, fill(8, 0xb2));
  t.same(inSync(), ['p1'], 'p2 left the in-sync set');
  t.same(await drive(world, core(group, 'p2').targets.stored(volumeId)!.read(0, 64)), fill(64, 0xa1), 'p2 holds the write p3 lost');
  group.network.partition('p1', 'p2', false);

  core(group, 'p1').migrator.cancel(volumeId, 0);
  const ended = await drive(world, core(group, 'p1').migrator.wait(volumeId, 0), 120_000).then(() => 'committed', (err: Error) => err.message);
  t.match(ended, /was cancelled/, 'the move was cancelled and rolled back');
  t.same(await drive(world, core(group, 'p1').targets.stored(volumeId)!.read(0, 64)), fill(64, 0), "p1's copy is p3's: without the write p3 lost");
  t.ok(await until(world, () => inSync().includes('p2'), 120_000), 'p2 is back in sync');
  const stored = async (peer: string): Promise<Buffer> => drive(world, core(group, peer).targets.stored(volumeId)!.read(0, 8192));
  t.ok((await stored('p1')).equals(await stored('p2')), 'p1 and p2 hold the same page');
  t.same((await stored('p2')).subarray(4096 * 512, 4104 * 512), fill(8, 0xb2), 'with the write p2 missed');
});

// A page's primary crashes in the middle of moving it, its disk losing a write its secondary
// kept (acknowledged without FUA, to a piece not moved yet). At the restart its copy is suspect:
// the move must not commit it; the secondary takes the page over and the move is abandoned.
// Seed 110567 of the simulator found a move that committed anyway: it resumed and reached its
// commit while the restarted peer was still in the migrator's recover(), before the failover
// that holds suspect pages existed; the commit now asks the activity log too (compose.ts
// beforeHandoff). This test's move reaches its commit later, when the failover holds the page,
// so it passes without that check too; the seed, in test/sim.test.ts, replays the race.
t.test('a move resumed by a source that restarted suspect does not commit its copy; the in-sync copy takes the page over', async (t) => {
  const { world, group } = await boot(t, 3, 1, 2);
  const volumeId = core(group, 'p1').catalog.require(volume).id;
  const route = (): { owner: string; inSync: string[] } => {
    const c = core(group, 'p2');
    const r = c.catalog.routes(c.catalog.require(volume)).route(0);
    return { owner: r.owner, inSync: inSyncOf(r) };
  };
  t.same(route(), { owner: 'p1', inSync: ['p1', 'p2'] }, 'page 0: p1 primary, p2 in sync');
  const cursor = (): number => core(group, 'p1').migrator.cursors(volumeId)[0]?.done ?? -1;
  await drive(world, core(group, 'p1').migrator.start(volume, 0, 'p3'));
  // The move stalls (p3 out of reach), so the write goes to p1's store and to p2 only; once p1
  // restarts, the move runs to its commit at once (no pacing).
  group.network.partition('p1', 'p3', true);
  await write(world, group, 'p1', 8184, fill(8, 0xd4));
  t.ok(cursor() < 15, 'the move has not reached the last piece');
  group.peers.get('p1')!.crash();
  group.network.partition('p1', 'p3', false);
  await drive(world, group.peers.get('p1')!.start());
  t.same(await drive(world, core(group, 'p1').targets.stored(volumeId)!.read(8184, 8)), fill(8, 0), "p1's disk lost the write");
  t.ok(await until(world, () => !core(group, 'p1').migrator.cursors(volumeId).length && route().owner !== 'p1', 120_000), 'the move ended and p1 is no longer the primary');
  t.equal(route().owner, 'p2', 'p2, which holds the write, took the page over; p3 did not get it');
  t.same(await drive(world, group.hostPath('p3', volume)!.read(8184, 8)), fill(8, 0xd4), 'a host reads the write');
  t.ok(await until(world, () => route().inSync.length === 2, 120_000), 'a second copy is in sync again');
  const stored = async (peer: string): Promise<Buffer> => drive(world, core(group, peer).targets.stored(volumeId)!.read(0, 8192));
  const [a, b] = route().inSync;
  t.ok((await stored(a)).equals(await stored(b)), `the in-sync copies ${a} and ${b} hold the same page`);
});
