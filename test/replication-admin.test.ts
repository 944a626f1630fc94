// Copies as an operator sees them (src/replication: placement, protection, rebuild, reaper, admin)
// with no sockets: the pure decisions with hand-made routes, and the compare-and-swaps they lead
// to on a real catalog (embedded), driven by a ManualEnv. Each check names the broken input
// that makes it fail (see the report of the change that added it).

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import t, { type Test } from 'tap';
import { Catalog } from '../src/cluster/catalog';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { ManualEnv } from '../src/env/manual';
import { copyBuildPagesInFlightMax } from '../src/limits';
import { balancerDefaults, plan } from '../src/loadmon/balancer';
import { Migrator } from '../src/migration/migrator';
import type { VolumeView } from '../src/cluster/volume-admin';
import { replicationAdmin, VolumeProtection } from '../src/replication/admin';
import { chooseCopyPeers, copiesToRemove, switchedPrimary, zoneSpread, type PeerCandidate } from '../src/replication/placement';
import { protectionOf, protectionText, RebuildProgress, weightedRoutes } from '../src/replication/protection';
import { Reaper, shouldReap } from '../src/replication/reaper';
import { CopyKeeper, decideCopies, lostPeers, type ViewedPeer } from '../src/replication/rebuild';
import { RouteTable, type Route } from '../src/routing/table';
import { parseConfig, renderConfig } from '../src/server/config';
import type { PageStore } from '../src/store/page-store';
import { startGroup } from './helpers/group';
import { fixedMembers, type MemberState } from '../src/cluster/members';

const log = pino({ level: 'silent' });
const groupPeers = ['p1', 'p2', 'p3', 'p4'];
const GiB = 1024 ** 3;
const pageBytes = 8192 * 512;
const r = (copies: string[], inSync = copies, version = 2): Route => ({ owner: copies[0], version, copies, inSync });
const up = new Set(['p1', 'p2', 'p3', 'p4']);
const alive = (p: string): boolean => up.has(p);

t.test('protection from routes: the worst page decides, every count is given', async (t) => {
  const at = (routes: Route[], replicas = 2, live = alive) => protectionOf({ routes: routes.map((x) => [x, 1] as const), replicas, groupPeers: 4, alive: live });
  t.equal(at([r(['p1', 'p2']), r(['p2', 'p3'])]).state, 'healthy');
  t.equal(at([{ owner: 'p1', version: 1 }], 1).state, 'healthy', 'an unreplicated page asked once is healthy');
  t.equal(at([{ owner: 'p1', version: 1 }], 2).state, 'degraded', 'one copy where two are asked');
  const rebuilding = at([r(['p1', 'p2']), r(['p2', 'p3'], ['p2'])]);
  t.match(rebuilding, { state: 'rebuilding', rebuildingPages: 1, degradedPages: 0 }, 'a stale copy on a live peer is being filled');
  const deadStale = at([r(['p1', 'p2'], ['p1'])], 2, (p) => p !== 'p2');
  t.match(deadStale, { state: 'degraded', degradedPages: 1 }, 'a stale copy on a dead peer fills nothing');
  const deadInSync = at([r(['p1', 'p2'])], 2, (p) => p !== 'p2');
  t.equal(deadInSync.state, 'degraded', 'an in-sync copy on a dead peer does not count');
  const mixed = at([r(['p1', 'p2']), r(['p2', 'p3'], ['p2']), r(['p3', 'p4']), { owner: 'p4', version: 1 }], 2, (p) => p !== 'p3' && p !== 'p4');
  t.match(mixed, { state: 'unavailable', unavailablePages: 2, rebuildingPages: 0, degradedPages: 1 }, 'no live in-sync copy beats everything');
  t.match(protectionText(mixed), /^unavailable \(2 pages with no live in-sync copy/);
  t.equal(at([r(['p1', 'p2'])], 3, alive).wanted, 3);
  t.equal(protectionOf({ routes: [[r(['p1', 'p2']), 1]], replicas: 3, groupPeers: 2, alive }).state, 'healthy', 'never more copies wanted than the volume has peers');
});

t.test('protection counts placed pages by class, not one by one, with the same result', async (t) => {
  const moved = new Map<number, Route>([[4, r(['p2', 'p3'], ['p2'], 2)], [5, r(['p3'], ['p3'], 3)], [12, r(['p1', 'p2'], ['p1'], 2)]]);
  const table = new RouteTable(['p1', 'p2', 'p3'], 8192, moved, 2);
  const weighted = weightedRoutes(table, 10);
  t.equal(weighted.reduce((a, [, n]) => a + n, 0), 10, 'every page counted once (a record past the end is not)');
  const live = (p: string): boolean => p !== 'p1';
  const one = protectionOf({ routes: table.routesIn(0, 10).map((x) => [x, 1] as const), replicas: 2, groupPeers: 3, alive: live });
  t.same(protectionOf({ routes: weighted, replicas: 2, groupPeers: 3, alive: live }), one);
  t.match(one, { unavailablePages: 0, degradedPages: 7, rebuildingPages: 1, pages: 10 }, 'p1 down: pages 0, 2, 3, 6, 8, 9 (a copy on p1) and 5 (one copy) degraded, 4 rebuilding, 1 and 7 (p2, p3) healthy');
});

t.test('rebuild progress and ETA from how fast the rebuilding pages fall', async (t) => {
  const progress = new RebuildProgress();
  const p = (rebuildingPages: number) => ({ ...protectionOf({ routes: [], replicas: 2, groupPeers: 3, alive }), state: 'rebuilding' as const, rebuildingPages });
  t.match(progress.observe('v', p(10), 0), { progressPercent: 0, etaSeconds: -1 }, 'nothing done yet: no ETA');
  t.match(progress.observe('v', p(6), 4_000), { progressPercent: 40, etaSeconds: 6 }, '4 pages in 4 s, 6 left: 6 s');
  t.match(protectionText(progress.observe('v', p(5), 5_000)), /^rebuilding \(5 pages rebuilding, 50% done, ETA 5 s\)$/);
  progress.observe('v', p(0), 6_000);
  t.match(progress.observe('v', p(4), 7_000), { progressPercent: 0 }, 'a new rebuild starts over');
});

t.test('placement: distinct peers, distinct zones, room, then free space and load', async (t) => {
  const peer = (id: string, zone: string | undefined, freeGiB: number, load = 0, live = true): PeerCandidate => ({ id, zone, alive: live, freeBytes: freeGiB * GiB, load });
  const pick = (route: Route, count: number, candidates: PeerCandidate[], excluded: string[] = []) =>
    chooseCopyPeers({ route, count, candidates, excluded, pageBytes, reserveFreeBytes: GiB / 2, promised: new Map() });
  const zoned = [peer('p1', 'a', 10), peer('p2', 'a', 50), peer('p3', 'b', 5), peer('p4', 'b', 20, 9)];
  t.same(pick({ owner: 'p1', version: 1 }, 1, zoned).peers, ['p4'], 'another zone beats more free space; then the freest of it');
  t.same(pick({ owner: 'p1', version: 1 }, 2, zoned).peers, ['p4', 'p2'], 'the second copy goes back to the first zone once every zone has one');
  t.same(pick({ owner: 'p1', version: 1 }, 1, zoned, ['p4']).peers, ['p3'], 'an excluded (lost) peer is never chosen');
  const flat = [peer('p1', undefined, 10), peer('p2', undefined, 20, 5), peer('p3', undefined, 20, 1), peer('p4', undefined, 30, 0, false)];
  t.same(pick(r(['p1', 'p2']), 1, flat).peers, ['p3'], 'no copy on a peer holding one, none on a dead peer; least load breaks a tie');
  const full = pick({ owner: 'p1', version: 1 }, 2, [peer('p1', undefined, 10), peer('p2', undefined, 0.5), peer('p3', undefined, 0.25)]);
  t.match(full, { peers: [], missing: 2, missingBytes: 2 * pageBytes }, 'no room: the missing bytes are said');
  const nobody = pick(r(['p1', 'p2']), 1, [peer('p1', undefined, 10), peer('p2', undefined, 10)]);
  t.match(nobody, { missing: 1, missingBytes: 0 }, 'no peer at all is not a lack of room');
  const promised = new Map<string, number>();
  const tight = [peer('p1', undefined, 10), peer('p2', undefined, 0.5 + (1.5 * pageBytes) / GiB)];
  const first = chooseCopyPeers({ route: { owner: 'p1', version: 1 }, count: 1, candidates: tight, pageBytes, reserveFreeBytes: GiB / 2, promised });
  const second = chooseCopyPeers({ route: { owner: 'p1', version: 1 }, count: 1, candidates: tight, pageBytes, reserveFreeBytes: GiB / 2, promised });
  t.same([first.peers, second.peers], [['p2'], []], 'room promised to one page is not promised again');
});

t.test('zone spread: every window of copies consecutive peers spans distinct zones', async (t) => {
  const zones: Record<string, string> = { a1: 'a', a2: 'a', b1: 'b', b2: 'b', c1: 'c', c2: 'c' };
  const windows = (order: string[], k: number): string[][] => order.map((_, i) => Array.from({ length: k }, (_, j) => zones[order[(i + j) % order.length]]));
  const distinct = (w: string[]): boolean => new Set(w).size === w.length;
  const six = zoneSpread(['a1', 'a2', 'b1', 'b2', 'c1', 'c2'], (p) => zones[p], 3);
  t.ok(windows(six, 3).every(distinct), `three zones of two, copies 3: ${six.join(',')}`);
  const four = zoneSpread(['a1', 'a2', 'b1', 'c1'], (p) => zones[p], 2);
  t.ok(windows(four, 2).every(distinct), `a zone of two and two of one, copies 2: ${four.join(',')}`);
  t.same(zoneSpread(['p1', 'p2', 'p3'], () => undefined, 2), ['p1', 'p2', 'p3'], 'no zones: the order stays');
});

t.test('removing copies: never the primary, stale ones first, then the newest in sync', async (t) => {
  t.same(copiesToRemove(r(['p1', 'p2', 'p3', 'p4'], ['p1', 'p2', 'p4']), 2), ['p3', 'p4']);
  t.same(copiesToRemove(r(['p1', 'p2', 'p3']), 1), ['p3', 'p2']);
  t.same(copiesToRemove(r(['p1', 'p2']), 2), []);
  t.same(switchedPrimary(r(['p1', 'p2', 'p3'], ['p1', 'p3']), 'p3', true), { owner: 'p3', copies: ['p3', 'p1', 'p2'], inSync: ['p3', 'p1'] });
  t.same(switchedPrimary(r(['p1', 'p2', 'p3'], ['p1', 'p3']), 'p3', false).inSync, ['p3'], 'unquiesced: the old primary leaves the in-sync set');
  t.throws(() => switchedPrimary(r(['p1', 'p2'], ['p1']), 'p2', true), /not an in-sync secondary/, 'a stale copy never takes the primary role');
});

t.test('what a page needs: raise, lower, rebuild, and pacing', async (t) => {
  const none = new Set<string>();
  const chooser = (peers: string[]) => (count: number, excluded: readonly string[]) => {
    const p = peers.filter((x) => !excluded.includes(x)).slice(0, count);
    return { peers: p, missing: count - p.length, missingBytes: (count - p.length) * pageBytes };
  };
  t.match(decideCopies({ owner: 'p1', version: 1 }, 2, none, true, chooser(['p3'])), { add: ['p3'], remove: [], why: 'raise' });
  t.match(decideCopies(r(['p1', 'p2', 'p3'], ['p1', 'p3']), 2, none, true, chooser([])), { add: [], remove: ['p2'], why: 'lower' });
  t.match(decideCopies(r(['p1', 'p2']), 2, new Set(['p2']), true, chooser(['p2', 'p4'])), { add: ['p4'], remove: ['p2'], why: 'rebuild' }, 'the lost copy is replaced, never by a lost peer');
  t.match(decideCopies(r(['p1', 'p2']), 2, new Set(['p2']), true, chooser([])), { add: [], remove: ['p2'], missing: 1, missingBytes: pageBytes }, 'no room: the lost copy goes, the shortage is said');
  t.match(decideCopies({ owner: 'p1', version: 1 }, 2, none, false, chooser(['p3'])), { add: [], remove: [], why: 'none', missingBytes: 0 }, 'budget spent: nothing added, no shortage either');
  t.match(decideCopies(r(['p1', 'p2']), 2, none, true, chooser(['p3'])), { why: 'none' });
  t.same([...lostPeers([{ id: 'p1', ageMs: -1 }, { id: 'p2', ageMs: 9_000 }, { id: 'p3', ageMs: 11_000 }, { id: 'p4', ageMs: -1 }], 'p1', 10_500, 10_000)], ['p3', 'p4'], 'silent past downOutMs, or never heard since this peer is up that long');
});

/** A catalog on an embedded store, closed at teardown. */
async function openCatalog(t: Test, env: ManualEnv, peers = groupPeers): Promise<Catalog> {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-replication-admin-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const catalog = await Catalog.open(meta, { members: fixedMembers(peers), pageBlocks: 8192, env });
  t.teardown(async () => {
    catalog.close();
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return catalog;
}

function keeperOn(catalog: Catalog, env: ManualEnv, self: string, view: () => ViewedPeer[], downOutMs = 60_000): CopyKeeper {
  return new CopyKeeper({
    self, env, log, catalog, downOutMs, zoneOf: () => undefined, reserveFreeBytes: 0, peers: view, movingAway: () => false, event: () => undefined,
    movePrimary: () => Promise.reject(new Error('no primary leaves here')),
  });
}

const viewed = (ids: string[], ageMs = (_id: string) => 500): ViewedPeer[] => ids.map((id) => ({ id, stale: ageMs(id) >= 3_000, ageMs: ageMs(id), freeBytes: 100 * GiB, load: 0 }));

t.test('replicas raised and lowered by compare-and-swap, paced, by each page\'s primary only', async (t) => {
  const env = new ManualEnv();
  const catalog = await openCatalog(t, env, ['p1', 'p2', 'p3']);
  const v = await catalog.createVolume({ name: 'vol', size: 120 * pageBytes, replicas: 1 });
  const p1 = keeperOn(catalog, env, 'p1', () => viewed(['p1', 'p2', 'p3']));
  const routes = () => catalog.routes(catalog.require('vol')).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
  const ofP1 = () => routes().filter((x) => x.owner === 'p1');
  await p1.run();
  t.equal(routes().filter((x) => x.version > 1).length, 0, 'at the asked count: nothing changes');

  await catalog.setReplicas('vol', 2);
  await p1.run();
  const raised = ofP1().filter((x) => (x.copies ?? []).length === 2);
  t.equal(raised.length, copyBuildPagesInFlightMax, `paced: ${copyBuildPagesInFlightMax} of p1's 40 pages get a new copy while none is in sync`);
  t.ok(raised.every((x) => x.inSync!.length === 1 && x.copies![1] !== 'p1' && x.version === 2), 'each new copy is stale, on another peer, one epoch on');
  t.ok(routes().filter((x) => x.owner !== 'p1').every((x) => x.version === 1), 'pages of other primaries are theirs to change');

  // Resync (another part) brings the new copies in: the keeper goes on with the next pages.
  for (const [page, x] of routes().entries()) if (x.copies && x.inSync!.length < x.copies.length) await catalog.casRoute(catalog.require('vol'), page, x, (now) => ({ owner: now.owner, copies: now.copies, inSync: now.copies }));
  await p1.run();
  t.equal(ofP1().filter((x) => (x.copies ?? []).length === 2).length, 2 * copyBuildPagesInFlightMax, 'the next batch once the first is in sync');

  await catalog.setReplicas('vol', 1);
  await p1.run();
  t.ok(ofP1().every((x) => (x.copies ?? ['p1']).length === 1), 'lowered: every extra copy of p1\'s pages removed (removal is not paced)');
  t.ok(ofP1().every((x) => x.copies === undefined || x.copies[0] === 'p1'), 'the primary stays');
});

t.test('a lost peer\'s copies are rebuilt elsewhere; a conflict leaves the page to the next run', async (t) => {
  const env = new ManualEnv();
  const catalog = await openCatalog(t, env);
  const v = await catalog.createVolume({ name: 'vol', size: 8 * pageBytes, replicas: 2, peers: ['p1', 'p2', 'p3', 'p4'] });
  let p3SilentMs = 500;
  const keeper = keeperOn(catalog, env, 'p1', () => viewed(groupPeers, (id) => (id === 'p3' ? p3SilentMs : 500)), 60_000);
  const routes = () => catalog.routes(catalog.require('vol')).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
  t.same(routes().filter((x) => x.owner === 'p1').map((x) => x.copies), [['p1', 'p2'], ['p1', 'p2']], 'placed: p1 primary of pages 0 and 4, copies on p2');
  t.same(routes()[2].copies, ['p3', 'p4']);
  t.same(routes()[3].copies, ['p4', 'p1']);
  p3SilentMs = 59_000;
  await keeper.run();
  t.ok(routes().every((x) => x.version === 1), 'down, not lost yet: nothing moves (its stale copy would resync quickly)');

  // Lost now. Page 1 is p2's (its copy on p3 is p2's to rebuild); page 0 gets a copy on p3 first.
  p3SilentMs = 61_000;
  const vol = catalog.require('vol');
  await catalog.casRoute(vol, 1, routes()[1], (now) => ({ owner: now.owner, copies: ['p2', 'p3', 'p1'], inSync: ['p2', 'p3', 'p1'] }));
  await catalog.casRoute(vol, 0, routes()[0], (now) => ({ owner: now.owner, copies: ['p1', 'p3'], inSync: ['p1', 'p3'] }));
  await keeper.run();
  t.match(routes()[0], { owner: 'p1', version: 3 }, 'page 0 (copy on lost p3) rebuilt');
  t.notOk(routes()[0].copies!.includes('p3'), 'the lost copy is gone from copies');
  t.equal(routes()[0].inSync!.length, 1, '… and the new one is stale until resync fills it');
  t.ok(['p2', 'p4'].includes(routes()[0].copies![1]));
  t.equal(routes()[1].version, 2, 'p2\'s page is p2\'s to rebuild');
});

t.test('the keeper decides on the catalog\'s record, not on a route heard without its copies', async (t) => {
  const env = new ManualEnv();
  const dir = mkdtempSync(join(tmpdir(), 'peersan-replication-admin-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const [mine, other] = [await Catalog.open(meta, { members: fixedMembers(groupPeers), pageBlocks: 8192, env }), await Catalog.open(meta, { members: fixedMembers(groupPeers), pageBlocks: 8192, env })];
  t.teardown(async () => {
    mine.close();
    other.close();
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const v = await mine.createVolume({ name: 'vol', size: 4 * pageBytes, replicas: 2 });
  const release = mine.holdRouteEvents();
  await other.casRoute(v, 0, other.routes(v).route(0), () => ({ owner: 'p1', copies: ['p1', 'p3'], inSync: ['p1', 'p3'] }));
  mine.routes(v).learn(0, { owner: 'p1', version: 2 });
  await keeperOn(mine, env, 'p1', () => viewed(groupPeers)).run();
  release();
  t.same(await other.fetchRoute(v, 0), { owner: 'p1', version: 2, copies: ['p1', 'p3'], inSync: ['p1', 'p3'] }, 'two copies already: no third one');
});

t.test('a page move to an in-sync copy switches the role; to a stale copy it is refused', async (t) => {
  const env = new ManualEnv();
  const catalog = await openCatalog(t, env, ['p1', 'p2', 'p3']);
  const v = await catalog.createVolume({ name: 'vol', size: 3 * pageBytes, replicas: 3 });
  const quieted: number[] = [];
  // What happened, in order: the quiet, the new primary's flush (with the route it saw), the CAS after.
  const steps: string[] = [];
  const migrator = (quiet: boolean) => new Migrator({
    self: 'p1', env, members: fixedMembers(['p1', 'p2', 'p3']), store: {} as PageStore, catalog, movable: () => undefined, log,
    rpc: { prepare: () => Promise.reject(new Error('no data move expected')), finish: () => Promise.reject(new Error('no data move expected')) },
    settings: { rateBytesPerSec: 0, pieceBytes: 256 * 1024 },
    flushCopy: async (peer, volumeId) => void steps.push(`flush ${peer} ${volumeId === v.id} owner ${catalog.routes(v).route(0).owner}`),
    ...(quiet ? { quiet: <T>(_id: string, page: number, fn: () => Promise<T>) => (quieted.push(page), steps.push('quiet'), fn()) } : {}),
  });
  const m = await migrator(true).start('vol', 0, 'p3');
  t.match(m, { state: 'switched', from: 'p1', to: 'p3', pieces: 0 });
  t.same(catalog.routes(v).route(0), { owner: 'p3', version: 2, copies: ['p3', 'p1', 'p2'], inSync: ['p3', 'p1', 'p2'] }, 'quiesced: the old primary stays in sync');
  t.same(quieted, [0], 'the CAS ran with the page quiet');
  t.same(steps, ['quiet', 'flush p3 true owner p1'], 'the new primary flushed its store under the quiet, before the CAS (seed 128201\'s kin)');

  // p1 primary of page 1 again, with p2's copy stale.
  await catalog.casRoute(v, 1, catalog.routes(v).route(1), () => ({ owner: 'p1', copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p3'] }));
  await t.rejects(migrator(false).start('vol', 1, 'p2'), { name: 'ConflictError', message: /^p2's copy of page 1 of vol is resyncing/ });
  await migrator(false).start('vol', 1, 'p3');
  t.same(catalog.routes(v).route(1), { owner: 'p3', version: 3, copies: ['p3', 'p1', 'p2'], inSync: ['p3'] }, 'not quiesced: the old primary leaves the in-sync set, resync brings it back');

  // The new primary begins to leave while the page quiets (a graceful stop): no CAS.
  const states = new Map<string, MemberState>([['p1', 'up'], ['p2', 'up'], ['p3', 'up']]);
  const fixed = fixedMembers(['p1', 'p2', 'p3']);
  const members = { ...fixed, get: (id: string) => ({ ...fixed.get(id)!, state: states.get(id)! }) };
  const leaving = new Migrator({
    self: 'p3', env, members, store: {} as PageStore, catalog, movable: () => undefined, log,
    rpc: { prepare: () => Promise.reject(new Error('no data move expected')), finish: () => Promise.reject(new Error('no data move expected')) },
    settings: { rateBytesPerSec: 0, pieceBytes: 256 * 1024 },
    quiet: <T>(_id: string, _page: number, fn: () => Promise<T>) => (states.set('p2', 'leaving'), fn()),
  });
  const before = catalog.routes(v).route(2);
  await t.rejects(leaving.start('vol', 2, 'p2'), { name: 'ConflictError', message: /^peer p2 is leaving: it takes no primary role/ }, 'refused at the CAS');
  t.same(catalog.routes(v).route(2), before, 'the route unchanged');
});

t.test('the reaper frees a page only when the newest route says it holds no copy', async (t) => {
  const base = { self: 'p2', movingAway: false, receiving: false };
  t.ok(shouldReap({ ...base, route: r(['p1', 'p3']) }), 'not in copies: freed');
  t.notOk(shouldReap({ ...base, route: r(['p1', 'p2'], ['p1']) }), 'a stale copy is kept (resync fills it)');
  t.notOk(shouldReap({ ...base, route: { owner: 'p1', version: 5 } }), 'copies unknown (a MOVED answer, an unreplicated page): kept');
  t.notOk(shouldReap({ ...base, route: r(['p1', 'p3']), receiving: true }), 'receiving it by a move: kept');
  t.notOk(shouldReap({ ...base, route: r(['p1', 'p3']), movingAway: true }), 'moving it away: kept');

  const env = new ManualEnv();
  const catalog = await openCatalog(t, env, ['p1', 'p2', 'p3']);
  const v = await catalog.createVolume({ name: 'vol', size: 3 * pageBytes, replicas: 2 });
  const held = new Set([0, 1, 2]);
  const dropped: number[] = [];
  const reaper = new Reaper({
    self: 'p2', catalog, log, movingAway: () => false, receiving: (_id, page) => page === 2,
    store: () => ({ heldPages: () => [...held], holdsPage: (p) => held.has(p), dropPage: async (p) => void (dropped.push(p), held.delete(p)) }),
  });
  reaper.start();
  t.teardown(() => reaper.stop());
  t.same(dropped, [], 'at start: pages 0 (p1,p2) and 1 (p2,p3) list p2; page 2 (p3,p1) does not, but p2 receives it by a move');
  await catalog.casRoute(v, 0, catalog.routes(v).route(0), () => ({ owner: 'p1', copies: ['p1', 'p3'], inSync: ['p1'] }));
  await catalog.casRoute(v, 2, catalog.routes(v).route(2), (now) => ({ owner: 'p3', copies: now.copies, inSync: now.inSync }));
  t.same(dropped, [0], 'p2 replaced on page 0: freed; page 2 still received: kept');

  // A peer back after its copies were rebuilt elsewhere frees them at start.
  const back = new Reaper({
    self: 'p2', catalog, log, movingAway: () => false, receiving: () => false,
    store: () => ({ heldPages: () => [1, 2], holdsPage: () => true, dropPage: async (p) => void dropped.push(p) }),
  });
  back.start();
  back.stop();
  t.same(dropped, [0, 2], 'at start: page 2 (p3, p1) is not p2\'s, page 1 (p2, p3) is');
});

t.test('a new volume\'s peers are ordered so that each page\'s copies span zones', async (t) => {
  const env = new ManualEnv();
  const catalog = await openCatalog(t, env);
  const zones: Record<string, string> = { p1: 'a', p2: 'a', p3: 'b', p4: 'b' };
  const volumes = { createVolume: async (input: Parameters<Catalog['createVolume']>[0]) => ({ peers: (await catalog.createVolume(input)).peers }) as VolumeView, getVolume: async () => ({}) as VolumeView };
  const zoned = replicationAdmin({ catalog, zoneOf: (p) => zones[p], volumes, log });
  const v = await zoned.createVolume({ name: 'vol', size: 4 * pageBytes, replicas: 2 });
  const routes = catalog.routes(catalog.require('vol')).routesIn(0, 4);
  t.ok(routes.every((x) => zones[x.copies![0]] !== zones[x.copies![1]]), `peers ${v.peers.join(',')}: every page on both zones`);
  const flat = replicationAdmin({ catalog, zoneOf: () => undefined, volumes, log });
  t.same((await flat.createVolume({ name: 'vol2', size: pageBytes, replicas: 2 })).peers, groupPeers, 'no zones: the group\'s order');
});

t.test('the balancer never targets a stale copy and prefers a role switch to a data move', async (t) => {
  const config = { ...balancerDefaults, minMeanLoad: 1 };
  const peers = [{ id: 'p1', load: 100, freeBytes: 0 }, { id: 'p2', load: 0, freeBytes: 0 }, { id: 'p3', load: 0, freeBytes: 100 * GiB }];
  const page = { volumeId: 'v', volumeName: 'vol', page: 0, owner: 'p1', load: 30, bytesMax: pageBytes };
  t.same(plan({ nowMs: 0, peers, pages: [page] }, config).moves.map((m) => m.to), ['p3'], 'unreplicated: moved where there is room');
  const switchable = { ...page, holders: { inSync: ['p2'], stale: [] } };
  t.same(plan({ nowMs: 0, peers, pages: [switchable] }, config).moves.map((m) => m.to), ['p2'], 'an in-sync copy takes the role, no room needed');
  const staleOnly = { ...page, holders: { inSync: [], stale: ['p3'] } };
  t.same(plan({ nowMs: 0, peers, pages: [staleOnly] }, config).moves, [], 'a stale holder is never a destination');
  const both = [{ id: 'p1', load: 100, freeBytes: 100 * GiB }, { id: 'p2', load: 0, freeBytes: 100 * GiB }, { id: 'p3', load: 0, freeBytes: 100 * GiB }];
  t.same(plan({ nowMs: 0, peers: both, pages: [switchable] }, config).moves.map((m) => m.to), ['p2'], 'with room everywhere, the role switch still wins');
  // p3 would even the load a little better, but a data move costs more than a role switch.
  const uneven = [{ id: 'p1', load: 100, freeBytes: 100 * GiB }, { id: 'p2', load: 9, freeBytes: 100 * GiB }, { id: 'p3', load: 0, freeBytes: 100 * GiB }];
  const pricey = { ...config, wChange: 0.2 };
  t.same(plan({ nowMs: 0, peers: uneven, pages: [page] }, pricey).moves.map((m) => m.to), ['p3'], 'unreplicated: to the idlest');
  t.same(plan({ nowMs: 0, peers: uneven, pages: [switchable] }, pricey).moves.map((m) => m.to), ['p2'], 'replicated: the cheaper role switch');
});

t.test('volume protection on a peer: routes, liveness and the keeper\'s shortage', async (t) => {
  const env = new ManualEnv();
  const catalog = await openCatalog(t, env, ['p1', 'p2', 'p3']);
  const v = await catalog.createVolume({ name: 'vol', size: 3 * pageBytes, replicas: 2 });
  let p2Up = true;
  const protection = new VolumeProtection({ self: 'p1', catalog, clock: env.clock, livePeers: () => new Set(['p3', ...(p2Up ? ['p2'] : [])]), shortage: () => ({ pages: 1, bytes: 3 * 1024 ** 2 }) });
  t.equal(protection.of(v).state, 'healthy');
  p2Up = false;
  t.match(protection.of(v), { state: 'degraded', degradedPages: 2, missingBytes: 3 * 1024 ** 2 }, 'pages 0 (p1,p2) and 1 (p2,p3): one live in-sync copy each');
  t.match(protectionText(protection.of(v)), /^degraded \(2 pages with fewer copies than asked; 3\.0 MiB missing for lack of room\)$/);
  t.same(protection.summary(), { healthy: 0, degraded: 1, rebuilding: 0, unavailable: 0 });
});

t.test('in a running group: more replicas become stale copies on other peers, filled by the resync, seen by volume show and /metrics', async (t) => {
  const g = await startGroup(t, 3);
  const admin = g.peer('p1').admin;
  await admin.createVolume({ name: 'vol', size: '48M', replicas: 1 });
  // Data in every page, so the new copies have something to fill.
  const router = g.peer('p1').core.targets.routerFor('vol')!;
  const mib = 1024 * 1024;
  for (let at = 0; at < 48 * mib; at += 4 * mib) await router.write(at / 512, Buffer.alloc(mib, 1 + at / (4 * mib)));
  const v = await admin.setReplicas('vol', 2);
  t.equal(v.replicas, 2);
  // Each primary adds a stale copy once gossip says the other peers are up (a second or two);
  // the resync fills it and admits it. Watched through another peer until healthy.
  const seen = new Set<string>();
  const deadline = Date.now() + 60_000;
  for (let state = ''; state !== 'healthy' && Date.now() < deadline; ) {
    const shown = await g.peer('p2').admin.getVolume('vol');
    state = shown.protection ?? '';
    seen.add(state);
    if (state === 'rebuilding' && !seen.has('counted')) {
      t.ok(shown.protectionDetail!.rebuildingPages > 0, `rebuilding: ${shown.protectionDetail!.rebuildingPages} pages being filled`);
      seen.add('counted');
    }
    if (state !== 'healthy') await new Promise((r) => setTimeout(r, 100));
  }
  t.ok(seen.has('rebuilding'), `seen rebuilding on the way (${[...seen].filter((x) => x !== 'counted').join(' → ')})`);
  t.ok(seen.has('healthy'), 'then healthy');
  const map = await admin.pageMap('vol');
  t.ok(map.pages.every((p) => p.copies.length === 2 && p.copies[0] === p.owner && p.copies[1] !== p.owner), 'every page has a second copy on another peer');
  t.ok(map.pages.every((p) => p.inSync.length === 2 && p.version >= 3), '… in sync: one CAS added it stale, one admitted it');
  const rebuilt = await Promise.all(['p1', 'p2', 'p3'].map(async (id) => Number(/peersan_rebuild_bytes_total\{peer="p\d"\} (\d+)/.exec(await g.peer(id).metrics.registry.metrics())?.[1] ?? NaN)));
  t.ok(rebuilt.reduce((a, b) => a + b, 0) >= 12 * mib, `the new copies' fill (1 MiB written in each of 12 pages) counted as rebuild bytes (${rebuilt.join(' + ')})`);
  t.match((await admin.status()).protection, { healthy: 1 });
  for (const id of ['p1', 'p2', 'p3']) t.ok((await g.peer(id).core.targets.routerFor('vol')!.read(5 * 8192, 8)).equals(Buffer.alloc(4096, 6)), `data intact through ${id}`);
});

t.test('cluster.yaml: zone per peer and downOutMs', async (t) => {
  const yaml = (cluster: string, zone: string): string => [
    'cluster:', '  name: c', '  adminToken: a', '  secret: s', ...(cluster ? [`  ${cluster}`] : []),
    'peers:', `  - { id: p1, iscsi: "127.0.0.1:3260", rpc: "127.0.0.1:7001", http: "127.0.0.1:8001", data: ./p1${zone} }`,
    '  - { id: p2, iscsi: "127.0.0.1:3261", rpc: "127.0.0.1:7002", http: "127.0.0.1:8002", data: ./p2 }', '',
  ].join('\n');
  const c = parseConfig(yaml('downOutMs: 30000', ', zone: rack-a'));
  t.equal(c.downOutMs, 30_000);
  t.same(c.peers.map((p) => p.zone), ['rack-a', undefined]);
  t.equal(parseConfig(yaml('', '')).downOutMs, undefined, 'absent: the default applies');
  t.throws(() => parseConfig(yaml('downOutMs: 10', '')), /cluster.downOutMs must be a whole number of milliseconds, at least 1000/);
  t.throws(() => parseConfig(yaml('', ', zone: 7')), /zone/);
  t.match(renderConfig(c), /zone: rack-a/, 'written back by init');
});
