// Cost grows with data, not with provisioned size (issue 19): the route table's whole-volume
// answers (classes, routesIn, pagesWith) against the page-by-page answer, the page map's summary
// and paging, and a 64 TiB volume in an in-process group whose page map, status, write at the
// last LBA and flush answer in a moment (the real figures are bench/scale.js's).

import t from 'tap';
import fc from 'fast-check';
import type { VolumeRecord } from '../src/cluster/catalog';
import { pageMapOf } from '../src/cluster/volume-admin';
import { pageMapText } from '../src/cli/main';
import { pageMapChangedMax, pageMapPagesMax } from '../src/limits';
import { scanCandidates, scanPages } from '../src/replication/rebuild';
import { copiesOf, RouteTable, type Route } from '../src/routing/table';
import { startGroup } from './helpers/group';

const pageBlocks = 16;
const peerIds = ['p1', 'p2', 'p3', 'p4'];

/** A table of `peers` peers and `replicas` copies with the given route changes learned. */
function tableOf(peers: number, replicas: number, changes: { page: number; owner: number; extra: number; stale: boolean }[]): RouteTable {
  const table = new RouteTable(peerIds.slice(0, peers), pageBlocks, new Map(), replicas);
  for (const c of changes) {
    const owner = peerIds[c.owner % peers];
    const other = peerIds[(c.owner + 1 + c.extra) % peers];
    const copies = other === owner ? [owner] : [owner, other];
    const route: Route = { owner, version: table.route(c.page).version + 1, copies, inSync: c.stale ? [owner] : copies };
    table.learn(c.page, route);
  }
  return table;
}

const arbTable = fc.record({
  peers: fc.integer({ min: 1, max: 4 }),
  replicas: fc.integer({ min: 1, max: 3 }),
  pages: fc.integer({ min: 0, max: 40 }),
  changes: fc.array(fc.record({ page: fc.integer({ min: 0, max: 45 }), owner: fc.nat(3), extra: fc.nat(3), stale: fc.boolean() }), { maxLength: 12 }),
});

const key = (r: Route): string => JSON.stringify([r.owner, r.version, copiesOf(r), r.inSync ?? null]);

t.test('RouteTable.classes, routesIn and pagesWith give the page-by-page answer', async (t) => {
  fc.assert(fc.property(arbTable, ({ peers, replicas, pages, changes }) => {
    const table = tableOf(peers, replicas, changes);
    const brute = Array.from({ length: pages }, (_, page) => table.route(page));
    // routesIn: the same routes in order.
    t.same(table.routesIn(0, pages), brute);
    // classes: every page counted once, each class's pages all have its route, its first is the lowest.
    const classes = table.classes(pages);
    t.equal(classes.reduce((n, c) => n + c.pages, 0), pages, 'every page counted once');
    const byRoute = new Map<string, number[]>();
    brute.forEach((r, page) => byRoute.set(key(r), [...(byRoute.get(key(r)) ?? []), page]));
    const fromClasses = new Map<string, { pages: number; first: number }>();
    for (const c of classes) {
      const k = key(c.route);
      const had = fromClasses.get(k);
      fromClasses.set(k, { pages: (had?.pages ?? 0) + c.pages, first: Math.min(had?.first ?? Infinity, c.first) });
      t.same(brute[c.first], c.route, 'a class\'s first page has its route');
    }
    t.same(new Map([...byRoute].map(([k, ps]) => [k, { pages: ps.length, first: ps[0] }])), fromClasses, 'the same routes with the same counts');
    // pagesWith: exactly the pages that have a copy on the peer, in order.
    for (const peer of [...peerIds.slice(0, peers), 'p9']) {
      t.same([...table.pagesWith(peer, pages)], brute.flatMap((r, page) => (copiesOf(r).includes(peer) ? [[page, r]] : [])), `pages with a copy on ${peer}`);
    }
  }), { numRuns: 200 });
});

function record(sizeBytes: number, peers = ['p1', 'p2', 'p3']): VolumeRecord {
  return { name: 'big', id: '0123456789abcdef', sizeBytes, blockBytes: 512, pageBlocks: 8192, peers } as unknown as VolumeRecord;
}

t.test('page map: the summary counts by the rule and the changed pages, the detail is one bounded range', async (t) => {
  const v = record(64 * 1024 ** 4);
  const table = new RouteTable(v.peers, 8192, new Map(), 2);
  const total = 16_777_216;
  const changed = Array.from({ length: pageMapChangedMax + 5 }, (_, i) => total - 1 - i * 1000);
  for (const page of changed) table.learn(page, { owner: 'p3', version: 2, copies: ['p3', 'p1'], inSync: ['p3'] });
  const started = performance.now();
  const m = pageMapOf(v, table);
  t.ok(performance.now() - started < 1000, 'a 64 TiB volume\'s map is no work per page');
  t.match(m, { totalPages: total, replicas: 2, from: 0, count: pageMapPagesMax, next: pageMapPagesMax, changedPages: changed.length });
  t.equal(m.pages.length, pageMapPagesMax, 'the detail is bounded');
  t.equal(m.changed.length, pageMapChangedMax, 'the changed pages listed are bounded');
  t.same(m.changed.map((p) => p.page), [...changed].sort((a, b) => a - b).slice(0, pageMapChangedMax), 'the lowest changed pages');
  // Counts from the rule and the changes against a count of the detail's own pages, scaled: the rule stripes evenly.
  const perPeer = Object.fromEntries(m.perPeer.map((p) => [p.peer, p]));
  const moved = { p1: changed.filter((p) => p % 3 === 0).length, p2: changed.filter((p) => p % 3 === 1).length, p3: changed.filter((p) => p % 3 === 2).length };
  t.equal(perPeer.p1.primaries, 5_592_406 - moved.p1, 'p1: pages 0, 3, … less the changed ones');
  t.equal(perPeer.p3.primaries, 5_592_405 - moved.p3 + changed.length, 'p3: its placed pages and the changed ones');
  t.equal(m.perPeer.reduce((n, p) => n + p.primaries, 0), total, 'every page has one primary');
  t.equal(m.perPeer.reduce((n, p) => n + p.copies, 0), 2 * total, 'two copies of every page');
  t.ok(JSON.stringify(m).length < 1024 * 1024, 'the answer stays far below the gRPC limit');

  const last = pageMapOf(v, table, { from: total - 10, count: pageMapPagesMax });
  t.match(last, { from: total - 10, count: 10 });
  t.notOk('next' in last, 'the last range has no next');
  t.same(last.pages.map((p) => p.page), Array.from({ length: 10 }, (_, i) => total - 10 + i));
  t.same(last.pages[9], { page: total - 1, owner: 'p3', version: 2, copies: ['p3', 'p1'], inSync: ['p3'] }, 'a changed page in the detail');
  t.throws(() => pageMapOf(v, table, { count: pageMapPagesMax + 1 }), /--count must be 1 to 4096/);
  t.throws(() => pageMapOf(v, table, { from: total }), /--from must be a page of the volume, 0 to 16777215/);

  const text = pageMapText(m);
  t.ok(text.split('\n').length < 10, `the summary is a few lines:\n${text}`);
  t.match(text, /^volume big: 16777216 pages of 8192 blocks, striped over p1, p2, p3 in turn \(page 0's primary on p1, page 1's on p2, …\), 2 copies per page$/m);
  t.match(text, new RegExp(`^changed since placement: ${changed.length} pages: ${Math.min(...changed)}→p3,p1\\(stale\\) v2, .*, and 5 more \\(use --from/--count\\)$`, 'm'));
  t.match(text, /^detail of pages: peersan page map big --from N --count M/m);
  const ranged = pageMapText(last, true);
  t.match(ranged, /^pages 16777206-16777215:$/m);
  t.match(ranged, /^16777215\s+p3\s+p3,p1\(stale\)\s+v2$/m, 'the detail of the range, run by run');
});

t.test('a 64 TiB volume in a group: page map, status, a write at its last LBA and flush answer in a moment', async (t) => {
  const g = await startGroup(t, 3);
  const admin = g.peer('p1').admin;
  await admin.createVolume({ name: 'big', size: '64T' });
  const timed = async <T>(what: string, f: () => Promise<T>): Promise<T> => {
    const started = performance.now();
    const r = await f();
    const ms = performance.now() - started;
    t.ok(ms < 5000, `${what}: ${Math.round(ms)} ms`);
    return r;
  };
  const m = await timed('page map', () => admin.pageMap('big'));
  t.match(m, { totalPages: 16_777_216, count: pageMapPagesMax, next: pageMapPagesMax });
  const tail = await timed('page map of the last pages', () => admin.pageMap('big', { from: 16_777_216 - 5, count: 100 }));
  t.same(tail.pages.map((p) => p.owner), tail.pages.map((p) => ['p1', 'p2', 'p3'][p.page % 3]), 'striped to the end');
  await timed('status', () => admin.status());
  await timed('volume list', () => admin.listVolumes());
  const shown = await timed('volume show', () => admin.getVolume('big'));
  t.ok(shown.protection, `protection computed: ${shown.protection}`);
  const router = g.peer('p1').core.targets.routerFor('big')!;
  const lastLba = router.blockCount - 128;
  await timed('a 64 KiB write at the last LBA', () => router.write(lastLba, Buffer.alloc(128 * 512, 7), {}));
  await timed('flush', () => router.flush());
  t.same(await router.read(lastLba, 128), Buffer.alloc(128 * 512, 7), 'the write reads back');
});

t.test('the copy keeper\'s scan of the candidates only visits, wraps and stops where the scan of every page does', async (t) => {
  const arb = fc.record({
    pages: fc.oneof(fc.integer({ min: 1, max: 50 }), fc.integer({ min: 65_000, max: 70_000 })),
    cursor: fc.nat(),
    changesMax: fc.integer({ min: 1, max: 4 }),
    picks: fc.array(fc.record({ at: fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), changes: fc.boolean() }), { maxLength: 10 }),
  });
  await fc.assert(fc.asyncProperty(arb, async ({ pages, cursor, changesMax, picks }) => {
    const volume = { id: 'v', sizeBytes: pages * 512, blockBytes: 512, pageBlocks: 1 } as unknown as VolumeRecord;
    const changing = new Map(picks.map((p) => [Math.floor(p.at * pages), p.changes]));
    const candidates = [...changing.keys()].sort((a, b) => a - b);
    // The reference: every page visited; only a candidate's visit can change anything.
    const all: string[] = [];
    const c1 = new Map([['v', cursor]]);
    const n1 = await scanPages(c1, volume, changesMax, async (page) => {
      if (page === 0) all.push('wrap');
      if (!changing.has(page)) return false;
      all.push(String(page));
      return changing.get(page)!;
    });
    const some: string[] = [];
    const c2 = new Map([['v', cursor]]);
    const n2 = await scanCandidates(c2, volume, changesMax, candidates, async (page) => {
      some.push(String(page));
      return changing.get(page)!;
    }, () => some.push('wrap'));
    t.same(some, all, 'the same visits and pass ends, in the same order');
    t.equal(n2, n1, 'the same changes');
    t.equal(c2.get('v'), c1.get('v'), 'the same cursor');
  }), { numRuns: 60 });
});

t.test('RouteTable.sharedPagesWith: the pages with a copy on the peer and another copy, walking no placed one-copy page', async (t) => {
  fc.assert(fc.property(arbTable, ({ peers, replicas, pages, changes }) => {
    const table = tableOf(peers, replicas, changes);
    for (const peer of peerIds.slice(0, peers)) {
      const brute = [...table.pagesWith(peer, pages)].filter(([, r]) => copiesOf(r).length > 1);
      t.same([...table.sharedPagesWith(peer, pages)], brute, `shared pages on ${peer}`);
    }
  }), { numRuns: 200 });
});
