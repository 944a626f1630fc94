// Copies leaving a peer and capacity spreading by itself (DESIGN.md 11; src/replication/rebuild.ts,
// spread.ts), with no sockets: the pure decisions with hand-made routes and random ones
// (fast-check), then the keeper's compare-and-swaps on a real catalog (embedded) driven by a
// ManualEnv. Each check names what makes it fail (see the report of the change that added it).

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import t, { type Test } from 'tap';
import { Catalog, type VolumeRecord } from '../src/cluster/catalog';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { fixedMembers, type MemberRecord, type MembersView, type MemberState } from '../src/cluster/members';
import { ManualEnv } from '../src/env/manual';
import { changedCopies } from '../src/replication/placement';
import { CopyKeeper, decideCopies, primaryStep, wantedCopies, type ViewedPeer } from '../src/replication/rebuild';
import { fillText } from '../src/cli/load';
import { balancerDefaults, plan, type PlanPage } from '../src/loadmon/balancer';
import { countCopies, fillsOf, hotPeers, movable, planSpread, portionOf, SpreadDriver, type CopyCount, type SpreadPeer } from '../src/replication/spread';
import { copiesOf, inSyncOf, RouteTable, type Route } from '../src/routing/table';

const log = pino({ level: 'silent' });
const GiB = 1024 ** 3;
const pageBytes = 8192 * 512;
const none = new Set<string>();
const r = (copies: string[], inSync = copies, version = 2): Route => ({ owner: copies[0], version, copies, inSync });
/** A chooser taking the first of `peers` not excluded, as placement would. */
const chooser = (peers: readonly string[]) => (count: number, excluded: readonly string[]) => {
  const p = peers.filter((x) => !excluded.includes(x)).slice(0, count);
  return { peers: p, missing: count - p.length, missingBytes: (count - p.length) * pageBytes };
};

t.test('a leaving copy: a new one is built first, the leaving one goes once enough others are in sync', async (t) => {
  const leaving = new Set(['p2']);
  const first = decideCopies(r(['p1', 'p2']), 2, none, true, chooser(['p2', 'p3', 'p4']), leaving);
  t.match(first, { add: ['p3'], remove: [], why: 'evacuate' }, 'p2 does not count: a copy is added, never on p2, and p2 stays meanwhile');
  const building = r(['p1', 'p2', 'p3'], ['p1', 'p2']);
  t.match(decideCopies(building, 2, none, true, chooser(['p4']), leaving), { add: [], remove: [], why: 'none' }, 'while p3 fills: the stale p3 is not "extra", p2 is not removed');
  t.match(decideCopies(r(['p1', 'p2', 'p3']), 2, none, true, chooser(['p4']), leaving), { add: [], remove: ['p2'], why: 'evacuate' }, 'p3 in sync: p2 leaves');
  t.match(decideCopies(r(['p1', 'p2', 'p3'], ['p1', 'p3']), 2, none, true, chooser(['p4']), leaving), { remove: ['p2'] }, 'a stale leaving copy goes at once (it holds nothing the others lack)');
  t.match(decideCopies(r(['p1', 'p2']), 2, none, false, chooser(['p3']), leaving), { add: [], remove: [] }, 'budget spent: nothing added, nothing removed');
  t.match(decideCopies(r(['p1', 'p2']), 2, none, true, chooser([]), leaving), { add: [], remove: [], missing: 1, missingBytes: pageBytes }, 'no room elsewhere: the copy stays where it is, the shortage is said');
  t.match(decideCopies(r(['p1', 'p2', 'p3']), 2, none, true, chooser([]), none), { remove: ['p3'], why: 'lower' }, 'no longer leaving (undrained): the copy built meanwhile is the extra one');
  t.match(decideCopies(r(['p1', 'p2', 'p3']), 1, none, true, chooser([]), leaving), { remove: ['p3', 'p2'] }, 'fewer replicas asked while leaving: down to the primary');
});

t.test('a leaving primary: its role goes first to an in-sync copy that stays; a one-copy page moves whole', async (t) => {
  const leaving = new Set(['p1']);
  t.same(primaryStep(r(['p1', 'p2', 'p3'], ['p1', 'p3']), 2, none, leaving), { kind: 'switch', to: 'p3' }, 'to an in-sync copy, never a stale one');
  t.same(primaryStep(r(['p1', 'p2', 'p3']), 2, none, new Set(['p1', 'p2'])), { kind: 'switch', to: 'p3' }, 'never to another leaving peer');
  t.same(primaryStep(r(['p1', 'p2', 'p3']), 2, new Set(['p2']), leaving), { kind: 'switch', to: 'p3' }, 'never to a lost peer');
  t.same(primaryStep(r(['p1', 'p2'], ['p1']), 2, none, leaving), { kind: 'stay' }, 'no in-sync copy elsewhere: wait for one');
  t.match(decideCopies(r(['p1', 'p2'], ['p1']), 2, none, true, chooser(['p3']), leaving), { add: ['p3'] }, '… which the keeper builds (the primary does not count)');
  t.same(primaryStep({ owner: 'p1', version: 1 }, 1, none, leaving), { kind: 'move' }, 'one copy: a page move');
  t.same(primaryStep(r(['p1', 'p2'], ['p1']), 1, none, leaving), { kind: 'stay' }, 'one copy asked, a stale one left over: removed first (below), then the move');
  t.match(decideCopies(r(['p1', 'p2'], ['p1']), 1, none, true, chooser(['p3']), leaving), { add: [], remove: ['p2'] });
  t.match(decideCopies({ owner: 'p1', version: 1 }, 1, none, true, chooser(['p3']), leaving), { add: [], remove: [] }, 'a one-copy page is not given a copy to leave by');
  t.same(primaryStep(r(['p1', 'p2']), 2, none, new Set(['p2'])), { kind: 'stay' }, 'a primary that stays: nothing to hand over');
});

t.test('copies wanted: they do not drop while a peer is away or draining', async (t) => {
  t.equal(wantedCopies({ replicas: 3, peers: ['p1', 'p2', 'p3'] }, ['p1', 'p2']), 3, 'p3 restarting or draining: three copies still wanted');
  t.equal(wantedCopies({ replicas: 3, peers: ['p1', 'p2'] }, ['p1', 'p2']), 2, 'one copy per peer at most');
  t.equal(wantedCopies({ replicas: 2, peers: ['p1', 'p2', 'p3'] }, ['p1', 'p2', 'p3', 'p4']), 2, 'never more than asked');
});

/** Random routes on five peers: primary first, in-sync ⊆ copies with the primary. */
const peers5 = ['p1', 'p2', 'p3', 'p4', 'p5'];
const arbCase = fc
  .record({
    order: fc.shuffledSubarray(peers5, { minLength: 1, maxLength: 4 }),
    staleMask: fc.array(fc.boolean(), { minLength: 4, maxLength: 4 }),
    wanted: fc.integer({ min: 1, max: 3 }),
    leaving: fc.subarray(peers5),
    lost: fc.subarray(peers5),
    mayAdd: fc.boolean(),
    room: fc.shuffledSubarray(peers5),
  })
  .map(({ order, staleMask, wanted, leaving, lost, mayAdd, room }) => {
    const inSync = order.filter((p, i) => i === 0 || !staleMask[i]);
    return { route: r(order, inSync), wanted, leaving: new Set(leaving), lost: new Set(lost.filter((p) => p !== order[0])), mayAdd, room };
  });

t.test('random pages: never fewer in-sync copies than wanted (or than before), never a copy on a leaving or lost peer, a copy being built is never extra', async (t) => {
  fc.assert(
    fc.property(arbCase, ({ route, wanted, leaving, lost, mayAdd, room }) => {
      const d = decideCopies(route, wanted, lost, mayAdd, chooser(room.filter((p) => !copiesOf(route).includes(p))), leaving);
      const after = changedCopies(route, d.add, d.remove);
      const syncedBefore = inSyncOf(route).filter((p) => !lost.has(p)).length;
      if (after.inSync!.length < Math.min(syncedBefore, Math.max(1, wanted))) return false;
      if (d.add.some((p) => leaving.has(p) || lost.has(p) || copiesOf(route).includes(p))) return false;
      // A stale copy that stays is removed only when the copies that stay are more than wanted.
      const staying = copiesOf(route).filter((p) => !lost.has(p) && !(leaving.has(p) && (p !== route.owner || wanted > 1)));
      const staleStaying = staying.filter((p) => !inSyncOf(route).includes(p));
      return !staleStaying.some((p) => d.remove.includes(p)) || staying.length > Math.max(1, wanted);
    }),
    { numRuns: 2000 },
  );
  t.pass('2000 random pages');
});

// ---- the keeper on a real catalog ----------------------------------------------------------

async function openCatalog(t: Test, env: ManualEnv, members: MembersView): Promise<Catalog> {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-membership-spread-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const catalog = await Catalog.open(meta, { members, pageBlocks: 8192, env });
  t.teardown(async () => {
    catalog.close();
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return catalog;
}

/** Members of a fixed group whose states the test sets. */
function members(ids: string[], states: Record<string, MemberState>): MembersView {
  const fixed = fixedMembers(ids);
  return {
    ids: () => ids.filter((id) => states[id] !== 'removed'),
    placeable: () => ids.filter((id) => (states[id] ?? 'up') === 'up'),
    get: (id) => {
      const m = fixed.get(id);
      return m && ({ ...m, state: states[id] ?? 'up' } satisfies MemberRecord);
    },
  };
}

const viewed = (ids: string[]): ViewedPeer[] => ids.map((id) => ({ id, stale: false, ageMs: 500, freeBytes: 100 * GiB, load: 0 }));

interface Handed {
  page: number;
  to: string;
}

function keeperOn(catalog: Catalog, env: ManualEnv, self: string, handed: Handed[]): CopyKeeper {
  return new CopyKeeper({
    self, env, log, catalog, downOutMs: 600_000, zoneOf: () => undefined, reserveFreeBytes: 0, peers: () => viewed([...catalog.options.members.ids()]), movingAway: () => false, event: () => undefined,
    movePrimary: async (_v, page, to) => void handed.push({ page, to }),
  });
}

/** What resync does: every stale copy of the volume brought into the in-sync set. */
async function resyncAll(catalog: Catalog, name: string): Promise<void> {
  const v = catalog.require(name);
  for (const [page, x] of catalog.routes(v).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks)).entries()) {
    if (x.copies && inSyncOf(x).length < x.copies.length) await catalog.casRoute(v, page, x, (now) => ({ owner: now.owner, copies: now.copies, inSync: now.copies }));
  }
}

t.test('a draining peer: every copy of it leaves, primaries handed over first, never fewer in-sync copies', async (t) => {
  const env = new ManualEnv();
  const ids = ['p1', 'p2', 'p3', 'p4'];
  const states: Record<string, MemberState> = {};
  const catalog = await openCatalog(t, env, members(ids, states));
  const v = await catalog.createVolume({ name: 'vol', size: 12 * pageBytes, replicas: 2, peers: ['p1', 'p2', 'p3'] });
  states.p2 = 'draining';
  const handed: Handed[] = [];
  const keepers = ids.map((id) => keeperOn(catalog, env, id, handed));
  const routes = () => catalog.routes(catalog.require('vol')).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
  const holdsP2 = () => routes().filter((x) => copiesOf(x).includes('p2')).length;
  t.equal(holdsP2(), 8, 'placed: p2 holds a copy of 8 of the 12 pages');
  let minInSync = Infinity;
  for (let round = 0; round < 6 && holdsP2() > 0; round++) {
    for (const k of keepers) await k.run();
    minInSync = Math.min(minInSync, ...routes().map((x) => inSyncOf(x).length));
    // The role switches the keeper asked for, as the migrator makes them.
    for (const h of handed.splice(0)) {
      const vol = catalog.require('vol');
      await catalog.casRoute(vol, h.page, routes()[h.page], (now) => ({ owner: h.to, copies: [h.to, ...copiesOf(now).filter((p) => p !== h.to)], inSync: [h.to, ...inSyncOf(now).filter((p) => p !== h.to)] }));
    }
    await resyncAll(catalog, 'vol');
  }
  t.equal(holdsP2(), 0, 'p2 holds no copy any more');
  t.equal(minInSync, 2, 'no page ever had fewer than two in-sync copies');
  t.ok(routes().every((x) => copiesOf(x).length === 2 && inSyncOf(x).length === 2), 'every page has its two copies, in sync');
  t.ok(routes().every((x) => !copiesOf(x).includes('p4')), 'never outside the volume\'s span (made with --peers p1,p2,p3)');
});

t.test('a one-copy page on a draining peer moves whole; a capacity hint moves one copy to the peer it names', async (t) => {
  const env = new ManualEnv();
  const ids = ['p1', 'p2', 'p3', 'p4'];
  const states: Record<string, MemberState> = {};
  const catalog = await openCatalog(t, env, members(ids, states));
  await catalog.createVolume({ name: 'one', size: 4 * pageBytes, replicas: 1, peers: ['p1', 'p2'] });
  states.p2 = 'draining';
  const handed: Handed[] = [];
  const p2 = keeperOn(catalog, env, 'p2', handed);
  await p2.run();
  t.same(handed, [{ page: 1, to: 'p1' }, { page: 3, to: 'p1' }], 'p2\'s pages move to p1, the volume\'s other peer');

  delete states.p2;
  const v = await catalog.createVolume({ name: 'two', size: 4 * pageBytes, replicas: 2, peers: ['p1', 'p2', 'p3', 'p4'] });
  const p1 = keeperOn(catalog, env, 'p1', []);
  t.notOk(p1.relocate(v.id, 0, 'p1', 'p3'), 'the primary\'s own copy is not the keeper\'s to move');
  t.notOk(p1.relocate(v.id, 1, 'p2', 'p3'), 'page 1 is p2\'s');
  t.ok(p1.relocate(v.id, 0, 'p2', 'p4'), 'page 0: p2\'s copy leaves for p4');
  await p1.run();
  t.same(catalog.routes(v).route(0), { owner: 'p1', version: 2, copies: ['p1', 'p2', 'p4'], inSync: ['p1', 'p2'] }, 'p4 added, stale; p2 stays while p4 fills (p3, emptier by id order, is not chosen)');
  await resyncAll(catalog, 'two');
  await p1.run();
  t.same(catalog.routes(v).route(0), { owner: 'p1', version: 4, copies: ['p1', 'p4'], inSync: ['p1', 'p4'] }, 'p4 in sync: p2 removed');
  t.equal(p1.relocationsPending(), 0, 'the hint is done');
});

t.test('a drain and a capacity hint on one page: the drain goes first, and ends (simulator, seed 24728)', async (t) => {
  // Page 0 of a 3-copy volume on p1..p4: p1 (primary), p2, p3. p2 drains while a hint asks p3's
  // copy to leave for p4. Counted as leaving together, p2 and p3 left one staying copy besides
  // the new one on p4, too few for either to go: each waited for the other, for good.
  const env = new ManualEnv();
  const ids = ['p1', 'p2', 'p3', 'p4'];
  const states: Record<string, MemberState> = {};
  const catalog = await openCatalog(t, env, members(ids, states));
  const v = await catalog.createVolume({ name: 'vol', size: 4 * pageBytes, replicas: 3, peers: ids });
  t.same(copiesOf(catalog.routes(v).route(0)), ['p1', 'p2', 'p3'], 'placed: page 0 on p1, p2, p3');
  const p1 = keeperOn(catalog, env, 'p1', []);
  t.ok(p1.relocate(v.id, 0, 'p3', 'p4'), "a hint: p3's copy of page 0 leaves for p4");
  states.p2 = 'draining';
  for (let round = 0; round < 4 && copiesOf(catalog.routes(v).route(0)).includes('p2'); round++) {
    await p1.run();
    t.ok(inSyncOf(catalog.routes(v).route(0)).length >= 3, `round ${round}: never fewer than three in-sync copies`);
    await resyncAll(catalog, 'vol');
  }
  const route = catalog.routes(v).route(0);
  t.notOk(copiesOf(route).includes('p2'), `the drain ended: p2 holds no copy of page 0 (copies ${copiesOf(route).join(', ')})`);
  t.ok(copiesOf(route).includes('p4'), 'the new copy went to the peer the hint names');
});

// ---- capacity spreading ----------------------------------------------------------------------

const count = (copies: number, leaving = 0, arriving = 0): CopyCount => ({ copies, leaving, arriving });
const peer = (id: string, copies: number, capacity = 1, placeable = true): SpreadPeer => ({ id, capacity, placeable, count: count(copies) });

t.test('a fourth peer holding nothing: each full peer sends it its excess, no more than its share', async (t) => {
  const plan = planSpread([peer('p1', 86), peer('p2', 85), peer('p3', 85), peer('p4', 0)]);
  t.same(plan.flows, [{ from: 'p1', to: 'p4', copies: 22 }, { from: 'p2', to: 'p4', copies: 21 }, { from: 'p3', to: 'p4', copies: 21 }]);
  t.match(plan.fills.find((f) => f.id === 'p4'), { copies: 0, shareCopies: 64, fill: 0 });
  t.same(planSpread([peer('p1', 70), peer('p2', 66), peer('p3', 60)]).flows, [], 'within the hysteresis (10% of 65.3): nothing moves');
  t.same(planSpread([peer('p1', 40), peer('p2', 80, 2)]).flows, [], 'capacity 2 holds twice as much: balanced');
  t.same(planSpread([peer('p1', 80), peer('p2', 40, 2)]).flows, [{ from: 'p1', to: 'p2', copies: 40 }], 'capacity 2 holding as much as capacity 1: it takes more');
  t.same(planSpread([peer('p1', 66), peer('p2', 68), peer('p3', 68), peer('p4', 54)]).flows.reduce((a, f) => a + f.copies, 0), 10, 'a peer far below its share: the others give their small excesses');
  t.same(planSpread([peer('p1', 100), peer('p2', 0, 1, false)]).flows, [], 'a peer that is not up (joining, draining, leaving) is never a destination');
  t.same(planSpread([peer('p1', 0), peer('p2', 100, 1, false)]).flows, [], '… nor a source (a draining peer empties by the keeper)');
  const inFlight = planSpread([{ id: 'p1', capacity: 1, placeable: true, count: count(100, 40) }, { id: 'p2', capacity: 1, placeable: true, count: count(20, 0, 30) }]);
  t.same(inFlight.flows, [], 'copies already on their way count: p1 (low 60) and p2 (high 50) need nothing more');
});

const arbPeers = fc.array(
  fc.record({ capacity: fc.integer({ min: 1, max: 4 }), placeable: fc.boolean(), copies: fc.integer({ min: 0, max: 300 }), leaving: fc.integer({ min: 0, max: 10 }), arriving: fc.integer({ min: 0, max: 10 }) }),
  { minLength: 1, maxLength: 6 },
).map((ps) => ps.map((p, i): SpreadPeer => ({ id: `p${i + 1}`, capacity: p.capacity, placeable: p.placeable, count: count(p.copies, Math.min(p.leaving, p.copies), p.arriving) })));

t.test('random groups: flows between up peers only, never past a share, no peer both giving and taking', async (t) => {
  fc.assert(
    fc.property(arbPeers, (peers) => {
      const plan = planSpread(peers);
      const share = new Map(plan.fills.map((f) => [f.id, f.shareCopies]));
      const byId = new Map(peers.map((p) => [p.id, p]));
      const out = new Map<string, number>();
      const into = new Map<string, number>();
      for (const f of plan.flows) {
        if (f.from === f.to || f.copies <= 0 || !byId.get(f.from)!.placeable || !byId.get(f.to)!.placeable) return false;
        out.set(f.from, (out.get(f.from) ?? 0) + f.copies);
        into.set(f.to, (into.get(f.to) ?? 0) + f.copies);
      }
      for (const [id, n] of out) if (into.has(id) || byId.get(id)!.count.copies - byId.get(id)!.count.leaving - n < share.get(id)!) return false;
      for (const [id, n] of into) if (byId.get(id)!.count.copies + byId.get(id)!.count.arriving + n > share.get(id)!) return false;
      return true;
    }),
    { numRuns: 3000 },
  );
  t.pass('3000 random groups');
});

t.test('random groups, round after round: it settles, and a copy that moved never moves back (no ping-pong)', async (t) => {
  fc.assert(
    fc.property(arbPeers, (start) => {
      let peers = start.map((p) => ({ ...p, count: count(p.count.copies) }));
      const gave = new Set<string>();
      const took = new Set<string>();
      for (let round = 0; round < 20; round++) {
        const { flows } = planSpread(peers);
        if (flows.length === 0) return true;
        for (const f of flows) {
          gave.add(f.from);
          took.add(f.to);
        }
        if ([...gave].some((id) => took.has(id))) return false;
        peers = peers.map((p) => ({ ...p, count: count(p.count.copies - flows.filter((f) => f.from === p.id).reduce((a, f) => a + f.copies, 0) + flows.filter((f) => f.to === p.id).reduce((a, f) => a + f.copies, 0)) }));
      }
      return false;
    }),
    { numRuns: 2000 },
  );
  t.pass('2000 random groups settle');
});

t.test('a flow is split over the up peers but its destination: together exactly the flow', async (t) => {
  const executors = ['p1', 'p2', 'p3', 'p4'];
  for (let copies = 0; copies <= 13; copies++) {
    const flow = { from: 'p1', to: 'p4', copies };
    const portions = executors.map((p) => portionOf(flow, p, executors));
    t.equal(portions.reduce((a, b) => a + b, 0), copies, `${copies}: ${portions.join(' ')}`);
    t.equal(portions[3], 0, 'the destination carries out nothing');
  }
  t.equal(portionOf({ from: 'p1', to: 'p4', copies: 5 }, 'p5', executors), 0, 'a peer that is not up carries out nothing');
  // A remainder moves with the round: one copy from p1 (a one-copy page only p1 can move) reaches p1 within 3 rounds.
  const one = { from: 'p1', to: 'p4', copies: 1 };
  for (let turn = 0; turn < 3; turn++) t.equal(executors.reduce((a, p) => a + portionOf(one, p, executors, turn), 0), 1, `round ${turn}: one peer carries it`);
  t.same([0, 1, 2].map((turn) => portionOf(one, 'p1', executors, turn)).sort(), [0, 0, 1], 'p1 carries it in one of 3 rounds');
});

t.test('which copy can go: not while the copy set changes, never a second copy on a peer, no zone lost', async (t) => {
  const noZone = (): undefined => undefined;
  t.ok(movable(r(['p1', 'p2']), 2, 'p2', 'p4', noZone));
  t.ok(movable(r(['p1', 'p2']), 2, 'p1', 'p4', noZone), 'the primary\'s copy too (by a page move)');
  t.notOk(movable(r(['p1', 'p2', 'p3'], ['p1', 'p2']), 3, 'p2', 'p4', noZone), 'a copy being built');
  t.notOk(movable(r(['p1', 'p2', 'p3']), 2, 'p2', 'p4', noZone), 'one copy more than asked: one is leaving already');
  t.notOk(movable(r(['p1', 'p2']), 2, 'p2', 'p1', noZone), 'to a holder');
  t.notOk(movable(r(['p1', 'p2']), 2, 'p3', 'p4', noZone), 'from a peer without a copy');
  const zones: Record<string, string> = { p1: 'a', p2: 'b', p3: 'a', p4: 'b' };
  t.notOk(movable(r(['p1', 'p2']), 2, 'p2', 'p3', (p) => zones[p]), 'zone b would be lost');
  t.ok(movable(r(['p1', 'p2']), 2, 'p2', 'p4', (p) => zones[p]), 'from b to b');
});

t.test('copies counted by the placement rule\'s arithmetic and the changed routes agree with counting page by page', async (t) => {
  fc.assert(
    fc.property(
      fc.shuffledSubarray(peers5, { minLength: 1 }), fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 40 }),
      fc.array(fc.record({ page: fc.nat(45), copies: fc.shuffledSubarray(peers5, { minLength: 1, maxLength: 3 }), stale: fc.boolean() }), { maxLength: 10 }),
      (peers, replicas, pages, changes) => {
        const moved = new Map<number, Route>(changes.map((c) => [c.page, r(c.copies, c.stale && c.copies.length > 1 ? c.copies.slice(0, -1) : c.copies, 5)]));
        const table = new RouteTable(peers, 8192, moved, replicas);
        const volume = { id: 'v', sizeBytes: pages * pageBytes, blockBytes: 512, pageBlocks: 8192, replicas } as VolumeRecord;
        const counted = countCopies([{ volume, table }]);
        const byPage = new Map<string, number>();
        for (const x of table.routesIn(0, pages)) for (const p of copiesOf(x)) byPage.set(p, (byPage.get(p) ?? 0) + 1);
        return peers5.every((p) => (counted.get(p)?.copies ?? 0) === (byPage.get(p) ?? 0));
      },
    ),
    { numRuns: 1000 },
  );
  t.pass('1000 random volumes');
});

t.test('a fourth peer holding nothing receives copies from every primary, through the keepers, and the group settles', async (t) => {
  const env = new ManualEnv();
  const ids = ['p1', 'p2', 'p3', 'p4'];
  const catalog = await openCatalog(t, env, fixedMembers(ids));
  const v = await catalog.createVolume({ name: 'vol', size: 128 * pageBytes, replicas: 2 });
  // The volume was made on three peers; p4 joined since (it spans the group: p4 too).
  const vol = catalog.require('vol');
  const table = catalog.routes(vol);
  for (let page = 0; page < 128; page++) {
    const x = table.route(page);
    if (!copiesOf(x).includes('p4')) continue;
    const three = ['p1', 'p2', 'p3'];
    const copies = [three[page % 3], three[(page + 1) % 3]];
    await catalog.casRoute(vol, page, x, () => ({ owner: copies[0], copies, inSync: copies }));
  }
  const handed: Handed[] = [];
  const keepers = new Map(ids.map((id) => [id, keeperOn(catalog, env, id, handed)]));
  const moved: { page: number; from: string; to: string }[] = [];
  const drivers = ids.map((id) => new SpreadDriver({
    self: id, env, log, catalog, zoneOf: () => undefined, enabled: () => true,
    relocate: (volumeId, page, from, to) => keepers.get(id)!.relocate(volumeId, page, from, to), relocationsPending: () => keepers.get(id)!.relocationsPending(),
    movePage: async (_v, page, to) => void moved.push({ page, from: id, to }), movingAway: () => false,
  }));
  const held = () => countCopies([{ volume: v, table: catalog.routes(v) }]);
  t.equal(held().get('p4')?.copies ?? 0, 0, 'p4 holds nothing');
  let minInSync = Infinity;
  for (let round = 0; round < 30; round++) {
    for (const d of drivers) await d.round();
    for (const k of keepers.values()) await k.run();
    // The page moves the drivers asked for, as the migrator commits them.
    for (const m of moved.splice(0)) {
      const x = catalog.routes(v).route(m.page);
      await catalog.casRoute(v, m.page, x, (now) => ({ owner: m.to, copies: copiesOf(now).map((p) => (p === m.from ? m.to : p)), inSync: inSyncOf(now).map((p) => (p === m.from ? m.to : p)) }));
    }
    minInSync = Math.min(minInSync, ...catalog.routes(v).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks)).map((x) => inSyncOf(x).length));
    await resyncAll(catalog, 'vol');
  }
  const after = held();
  t.ok(after.get('p4')!.copies >= 64 - 7, `p4 holds ${after.get('p4')!.copies} copies, within the hysteresis (6.4) of its share of 64`);
  t.ok(ids.every((id) => Math.abs(after.get(id)!.copies - 64) <= 7), `every peer near its share: ${ids.map((id) => after.get(id)!.copies).join(' ')}`);
  t.equal(minInSync, 2, 'no page ever had fewer than two in-sync copies');
  const routes = catalog.routes(v).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
  t.ok(routes.every((x) => copiesOf(x).length === 2 && new Set(copiesOf(x)).size === 2), 'every page still two copies on two peers');
  t.equal(await drivers[0].round(), 0, 'settled: a new round moves nothing');
});

t.test('a primary whose page has host load is not moved by the spread (it is the load balancer\'s); its idle pages are', async (t) => {
  const env = new ManualEnv();
  const catalog = await openCatalog(t, env, fixedMembers(['p1', 'p2', 'p3']));
  const v = await catalog.createVolume({ name: 'one', size: 24 * pageBytes, replicas: 1 });
  // p1 lost six of its eight pages to the load balancer (to p2 and p3): it is far below its share.
  const table = catalog.routes(v);
  const gone = [0, 3, 6, 9, 12, 15];
  for (const [i, page] of gone.entries()) {
    const to = i % 2 ? 'p3' : 'p2';
    await catalog.casRoute(v, page, table.route(page), () => ({ owner: to, copies: [to], inSync: [to] }));
  }
  // The pages those moves made hot are on p2 and p3 now; p2's placed pages are idle.
  const busy = new Set(gone);
  const moved: { page: number; from: string; to: string }[] = [];
  const driver = (id: string, pageLoad?: (volumeId: string, page: number) => number): SpreadDriver => new SpreadDriver({
    self: id, env, log, catalog, zoneOf: () => undefined, enabled: () => true, relocate: () => false, relocationsPending: () => 0,
    movePage: async (_v, page, to) => void moved.push({ page, from: id, to }), movingAway: () => false, ...(pageLoad ? { pageLoad } : {}),
  });
  const load = (_volumeId: string, page: number): number => (busy.has(page) ? 400 : page === 1 ? 0.5 : 0);
  for (const id of ['p2', 'p3']) await driver(id, load).round();
  t.ok(moved.length > 0, `moved: ${moved.map((m) => `${m.page} ${m.from}>${m.to}`).join(', ')}`);
  t.ok(moved.every((m) => m.to === 'p1' && !busy.has(m.page)), 'only idle pages (or nearly idle: page 1) go to p1');
  moved.length = 0;
  for (const id of ['p2', 'p3']) await driver(id).round();
  t.ok(moved.some((m) => busy.has(m.page)), 'without loads, any page may go (the control)');
});

t.test('fill as status, top and the console print it', async (t) => {
  const fills = fillsOf([peer('p1', 86), peer('p2', 42), peer('p3', 10, 1, false)]);
  t.same(fills.map((f) => fillText(f)), ['86/69 125%', '42/69 61%', '10 (no share)'], 'copies of its share (138 copies over two up peers), a draining peer has none');
  t.equal(fillText(undefined), '-');
  t.same(fillsOf([peer('p1', 30), peer('p2', 30, 2)]).map((f) => Math.round(f.shareCopies)), [20, 40], 'shares follow capacity');
});

t.test('the load balancer never sends a page, nor a primary role, to a peer that is not up', async (t) => {
  const page = (n: number, holders?: { inSync: string[]; stale: string[] }): PlanPage => ({ volumeId: 'v', volumeName: 'vol', page: n, owner: 'p1', load: 100, bytesMax: pageBytes, ...(holders ? { holders } : {}) });
  const peers = (p3: boolean) => [{ id: 'p1', load: 400, freeBytes: 100 * GiB }, { id: 'p2', load: 300, freeBytes: 100 * GiB }, { id: 'p3', load: 0, freeBytes: 100 * GiB, placeable: p3 }];
  const input = (p3: boolean) => ({ nowMs: 0, peers: peers(p3), pages: [page(0, { inSync: ['p3'], stale: [] }), page(1), page(2), page(3)] });
  const up = plan(input(true), balancerDefaults);
  t.ok(up.moves.some((m) => m.to === 'p3'), `p3 up: the idle p3 takes pages (${up.moves.map((m) => `${m.page}→${m.to}`).join(' ')})`);
  const draining = plan(input(false), balancerDefaults);
  t.notOk(draining.moves.some((m) => m.to === 'p3'), 'p3 draining: never a destination, not even of a role switch to its in-sync copy');
});

t.test('hot peers: a peer whose host load stands out is no destination of the spread; no load, none is hot', (t) => {
  const loads = [{ id: 'p1', load: 500 }, { id: 'p2', load: 300 }, { id: 'p3', load: 200 }];
  t.same([...hotPeers(loads, 0.25, 20)], ['p1'], 'p1 above the mean (333) by more than 25 %');
  t.same([...hotPeers(loads, 0.6, 20)], [], 'within a wider threshold');
  t.same([...hotPeers([{ id: 'p1', load: 10 }, { id: 'p2', load: 0 }], 0.25, 20)], [], 'below the load worth balancing');
  t.end();
});
