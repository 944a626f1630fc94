// A page move of a replicated page, with the faults that make neither of its copies whole
// (src/migration/move-machine.ts, "D confirms"; src/server/compose.ts handOff). Whole groups in
// the simulator (test/helpers/sim-group.ts), deterministic.

import t from 'tap';
import { inSyncOf } from '../src/routing/table';
import { core, destRestartedMidMove, drive, fill, until, volume, write } from './helpers/sim-group';

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
