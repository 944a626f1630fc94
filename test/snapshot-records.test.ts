// Where a snapshot's layer of each page is read from (src/snapshot/records.ts snapshotHolders):
// the primary at the cut first, then the page's other in-sync copies, which froze the same blocks.

import t from 'tap';
import { narrowInSync, routesAtCut, snapshotHolders, type SnapshotRecord } from '../src/snapshot/records';

const pageBlocks = 8192;

function record(over: Partial<SnapshotRecord>): SnapshotRecord {
  return {
    volumeId: '00000000000000aa', volume: 'v', name: 's', seq: 1, mode: 'barrier', group: 'g', state: 'ready', createdAtMs: 0, heldMs: 0, tookMs: 0,
    sizeBytes: 8 * pageBlocks * 512, blockBytes: 512, peers: ['p1', 'p2', 'p3'], pageBlocks, moved: [], moving: [], ...over,
  };
}

t.test('one copy: the owner at the cut only (records from before replicas read the same)', async (t) => {
  const r = record({});
  t.same(snapshotHolders(r, 4, 4 * pageBlocks, routesAtCut(r), new Map()), { holders: ['p2'], blocks: pageBlocks });
});

t.test('two copies by placement: the primary, then the next peer', async (t) => {
  const r = record({ placedCopies: 2 });
  t.same(snapshotHolders(r, 2, 2 * pageBlocks + 10, routesAtCut(r), new Map()).holders, ['p3', 'p1']);
});

t.test('a page whose route changed: its in-sync copies at the cut, never a stale one', async (t) => {
  const r = record({ placedCopies: 2, moved: [[1, { owner: 'p3', version: 4, copies: ['p3', 'p2', 'p1'], inSync: ['p3', 'p1'] }]] });
  t.same(snapshotHolders(r, 1, pageBlocks, routesAtCut(r), new Map()).holders, ['p3', 'p1']);
});

t.test('a page moving at the cut: source or destination by piece, then the other in-sync copies', async (t) => {
  const r = record({ placedCopies: 2 });
  const moving = new Map([[0, { volumeId: r.volumeId, page: 0, from: 'p1', to: 'p3', done: 2, pieceBlocks: 1024 }]]);
  t.same(snapshotHolders(r, 0, 100, routesAtCut(r), moving), { holders: ['p3', 'p2'], blocks: 2048 - 100 });
  t.same(snapshotHolders(r, 0, 4096, routesAtCut(r), moving), { holders: ['p1', 'p2'], blocks: pageBlocks - 4096 });
});

t.test("a replicated page's move counts only when its source is the primary at the cut (sim seed 56)", async (t) => {
  // p2 took page 0 over from p1 while p1 was down; p1 still winds up its old move to p3.
  const r = record({ placedCopies: 2, moved: [[0, { owner: 'p2', version: 3, copies: ['p2', 'p1'], inSync: ['p2', 'p1'] }]] });
  const stale = new Map([[0, { volumeId: r.volumeId, page: 0, from: 'p1', to: 'p3', done: 2, pieceBlocks: 1024 }]]);
  t.same(snapshotHolders(r, 0, 100, routesAtCut(r), stale), { holders: ['p2', 'p1'], blocks: pageBlocks - 100 });
  // One copy: the mover's report stands (the coordinator's route may not know the commit yet).
  const single = record({ moved: [[0, { owner: 'p2', version: 3 }]] });
  t.same(snapshotHolders(single, 0, 100, routesAtCut(single), stale).holders[0], 'p3');
});

t.test('narrowInSync: only copies in sync at both moments, never none', async (t) => {
  const cut = { owner: 'p1', version: 5, copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p2', 'p3'] };
  t.same(narrowInSync(cut, { owner: 'p1', version: 4, copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p3'] }).inSync, ['p1', 'p3'], 'p2 resynced in after it froze');
  t.equal(narrowInSync(cut, { ...cut, version: 6 }), cut, 'unchanged');
  t.equal(narrowInSync({ owner: 'p1', version: 2 }, { owner: 'p2', version: 3 }).owner, 'p1', 'one copy that moved: kept as is');
});
