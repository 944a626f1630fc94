// A replicated page's move whose destination D restarts mid-move (its disk lost staging writes it
// had acknowledged without FUA: a power loss). The page's source S forwards host I/O of the
// pieces already moved to D; D's copy of them may now lack acknowledged writes, which the page's
// other in-sync copy holds. D refuses the move's staging from its restart on (migrator.ts
// stagingRefused), so no host read is served stale from it; S's next chunk fails, its PREPARE
// again hears of the restart, and S hands the page to the other in-sync copy at once (not at the
// commit, pieces later). Found by the simulator (seed 32298, through a snapshot's layer).

import t from 'tap';
import { copiesOf, inSyncOf } from '../src/routing/table';
import { core, destRestartedMidMove, drive, fill, until, volume } from './helpers/sim-group';

t.test("a move's destination restarted mid-move: no host read of a moved piece is stale, and the page goes to the other in-sync copy", async (t) => {
  const { world, group, volumeId } = await destRestartedMidMove(t);

  // A host reads the block through p1, as an initiator does: a busy answer is retried.
  const answers: string[] = [];
  for (let i = 0; i < 50; i++) {
    const got = await drive(world, group.hostPath('p1', volume)!.read(0, 64)).catch((err: Error) => err);
    if (got instanceof Error) {
      answers.push(`error: ${got.message}`);
      await world.run(world.now() + 100, Number.MAX_SAFE_INTEGER);
      continue;
    }
    answers.push(got.equals(fill(64, 0xa1)) ? 'the write' : got.equals(fill(64, 0)) ? 'STALE zeros' : 'other data');
    if (answers.at(-1) === 'the write') break;
  }
  t.notOk(answers.includes('STALE zeros') || answers.includes('other data'), `no stale read (${[...new Set(answers)].join('; ')})`);
  t.equal(answers.at(-1), 'the write', 'the host reads the write it was acknowledged');

  t.ok(await until(world, () => core(group, 'p1').migrator.cursors(volumeId).length === 0), 'the move ended');
  const route = core(group, 'p2').catalog.routes(core(group, 'p2').catalog.require(volume)).route(0);
  t.equal(route.owner, 'p2', 'the page went to the other in-sync copy');
  t.notOk(inSyncOf(route).includes('p3'), `p3 is not an in-sync copy (copies ${copiesOf(route).join(', ')})`);
  t.same(await drive(world, group.hostPath('p3', volume)!.read(0, 64)), fill(64, 0xa1), 'read through any peer: the write');
});
