// Where a snapshot's layer of each page is read from (src/snapshot/records.ts snapshotHolders):
// the primary at the cut first, then the page's other in-sync copies, which froze the same blocks.

import t from 'tap';
import { routesAtCut, snapshotHolders, type SnapshotRecord } from '../src/snapshot/records';

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
