// Where a snapshot's layer of each page is read from (src/snapshot/records.ts snapshotHolders):
// the primary at the cut first, then the page's other in-sync copies, which froze the same blocks.

import t from 'tap';
import {
  createSnapshotRecord, decodeSnapshot, deleteSnapshotRecord, holdsPage, joinHolders, narrowInSync, routesAtCut, snapshotHolders, snapshotKey, withJoined, withoutSuspects, type SnapshotRecord,
} from '../src/snapshot/records';
import { tempMetaStore } from './helpers/temp-meta';

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

t.test('a moving page whose destination was suspect where it froze: its pieces from the other in-sync copies (sim seed 32298)', async (t) => {
  const r = record({ placedCopies: 2 });
  const moving = new Map([[0, { volumeId: r.volumeId, page: 0, from: 'p1', to: 'p3', done: 2, pieceBlocks: 1024, toSuspect: true }]]);
  t.same(snapshotHolders(r, 0, 100, routesAtCut(r), moving), { holders: ['p2'], blocks: 2048 - 100 });
  t.same(snapshotHolders(r, 0, 4096, routesAtCut(r), moving), { holders: ['p1', 'p2'], blocks: pageBlocks - 4096 }, 'the pieces still on the source: unchanged');
  // No other in-sync copy: the destination's copy is the best there is (its move would commit it too).
  const lone = record({ placedCopies: 2, moved: [[0, { owner: 'p1', version: 3, copies: ['p1', 'p2'], inSync: ['p1'] }]] });
  t.same(snapshotHolders(lone, 0, 100, routesAtCut(lone), moving).holders, ['p3']);
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

t.test("a replicated volume's stale or suspect mover never serves its snapshot (sim seeds 1046, 631)", async (t) => {
  const stale = new Map([[0, { volumeId: 'v', page: 0, from: 'p1', to: 'p3', done: 0, pieceBlocks: 1024 }]]);
  // Seed 1046: p2 took the page over and p1's copy was dropped; one copy left, p1 still reports its move.
  const lone = record({ placedCopies: 2, moved: [[0, { owner: 'p2', version: 3, copies: ['p2'], inSync: ['p2'] }]] });
  t.same(snapshotHolders(lone, 0, 100, routesAtCut(lone), stale).holders, ['p2']);
  // Seed 631: p1 is still the primary but suspect at the cut (left out of the in-sync copies).
  const suspect = record({ placedCopies: 3, moved: [[0, { owner: 'p1', version: 4, copies: ['p1', 'p3', 'p2'], inSync: ['p2'] }]] });
  t.same(snapshotHolders(suspect, 0, 100, routesAtCut(suspect), stale).holders, ['p2']);
});

t.test('narrowInSync: only copies in sync at both moments, never none', async (t) => {
  const cut = { owner: 'p1', version: 5, copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p2', 'p3'] };
  t.same(narrowInSync(cut, { owner: 'p1', version: 4, copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p3'] }).inSync, ['p1', 'p3'], 'p2 resynced in after it froze');
  t.equal(narrowInSync(cut, { ...cut, version: 6 }), cut, 'unchanged');
  t.same(narrowInSync(cut, { owner: 'p4', version: 6, copies: ['p4', 'p1', 'p2', 'p3'], inSync: ['p4'] }).inSync, ['p1'], 'none in sync at both: the first one alone');
  t.equal(narrowInSync({ owner: 'p1', version: 2 }, { owner: 'p2', version: 3 }).owner, 'p1', 'one copy that moved: kept as is');
});

t.test('withoutSuspects: a copy suspect where it froze is no holder, unless none would be left', async (t) => {
  const cut = { owner: 'p1', version: 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] };
  const narrowed = withoutSuspects(cut, ['p1']);
  t.same(narrowed, { ...cut, inSync: ['p2'] }, 'the primary at the cut, suspect: its secondary alone holds the page');
  const r = record({ placedCopies: 2, moved: [[0, narrowed]] });
  t.same(snapshotHolders(r, 0, 0, routesAtCut(r), new Map()).holders, ['p2']);
  t.notOk(holdsPage(r, 0, 'p1', routesAtCut(r), new Map()), 'p1 takes the layer from p2 once in sync (layer-sync.ts)');
  t.equal(withoutSuspects(cut, ['p3']), cut, 'not an in-sync copy: unchanged');
  const only = { ...cut, inSync: ['p1'] };
  t.equal(withoutSuspects(only, ['p1']), only, 'the only in-sync copy stays (its layer is all there is)');
  // Seed 3662: the primary at the cut dropped by a takeover after it, its secondary named for a change it never got.
  t.same(withoutSuspects(cut, ['p1', 'p2']), { ...cut, inSync: ['p1'] }, 'every copy suspect: the first one alone holds the page (their layers may differ)');
});

t.test('copies that joined after the cut follow the holders at the cut, for every piece of a moving page', async (t) => {
  const r = record({ placedCopies: 2, joined: [[0, ['p3']], [4, ['p1', 'p2']]] });
  t.same(snapshotHolders(r, 4, 4 * pageBlocks, routesAtCut(r), new Map()).holders, ['p2', 'p3', 'p1'], 'a joined holder already at the cut is named once');
  t.same(snapshotHolders(r, 1, pageBlocks, routesAtCut(r), new Map()).holders, ['p2', 'p3'], 'a page nobody joined: as at the cut');
  const moving = new Map([[0, { volumeId: r.volumeId, page: 0, from: 'p1', to: 'p3', done: 2, pieceBlocks: 1024 }]]);
  const late = record({ joined: [[0, ['p2']]] });
  t.same(snapshotHolders(late, 0, 100, routesAtCut(late), moving), { holders: ['p3', 'p2'], blocks: 2048 - 100 });
  t.same(snapshotHolders(late, 0, 4096, routesAtCut(late), moving), { holders: ['p1', 'p2'], blocks: pageBlocks - 4096 });
  t.ok(holdsPage(late, 0, 'p2', routesAtCut(late), moving), 'a joined copy holds every piece');
  t.notOk(holdsPage(late, 0, 'p3', routesAtCut(late), moving), 'a move\'s destination at the cut holds only the pieces it had');
  t.notOk(holdsPage(r, 1, 'p1', routesAtCut(r), new Map()));
  t.ok(holdsPage(r, 1, 'p3', routesAtCut(r), new Map()));
});

t.test('withJoined: each page once, each peer once per page, pages in order', async (t) => {
  t.same(withJoined(undefined, [3, 1], 'p2'), [[1, ['p2']], [3, ['p2']]]);
  t.same(withJoined([[1, ['p2']]], [1, 2], 'p3'), [[1, ['p2', 'p3']], [2, ['p3']]]);
  t.same(withJoined([[1, ['p2']]], [1], 'p2'), [[1, ['p2']]]);
});

t.test('joinHolders: recorded by compare-and-swap; a deleted snapshot, or a newer one of the same name, is not joined', async (t) => {
  const { meta } = await tempMetaStore(t, 'peersan-joined-');
  const r = record({ state: 'taking' });
  await createSnapshotRecord(meta, r);
  t.equal(await joinHolders(meta, r, [0], 'p3'), false, 'a snapshot still being taken is not joined');
  const current = await meta.get(snapshotKey(r.volumeId, r.name));
  await meta.put(current!.key, Buffer.from(JSON.stringify({ ...r, state: 'ready' })), current!.version);
  // Two copies joining at once: both recorded (one of them compares against a newer version and tries again).
  t.same(await Promise.all([joinHolders(meta, r, [0, 2], 'p3'), joinHolders(meta, r, [2], 'p1')]), [true, true]);
  const joined = decodeSnapshot((await meta.get(snapshotKey(r.volumeId, r.name)))!.value).joined!;
  t.same(new Map(joined.map(([page, peers]) => [page, [...peers].sort()])), new Map([[0, ['p3']], [2, ['p1', 'p3']]]));
  t.equal(await joinHolders(meta, { ...r, seq: r.seq + 1 }, [1], 'p3'), false, 'another snapshot of that name');
  await deleteSnapshotRecord(meta, r.volumeId, r.name);
  t.equal(await joinHolders(meta, r, [1], 'p3'), false, 'deleted');
  t.equal(await meta.get(snapshotKey(r.volumeId, r.name)), undefined, 'and it stays deleted');
});
