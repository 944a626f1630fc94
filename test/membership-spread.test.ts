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
import { copiesOf, inSyncOf, type Route } from '../src/routing/table';

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

t.test('copies wanted: members away for a moment keep their place; leaving ones do not', async (t) => {
  const away = (p: string): boolean => p === 'p3';
  t.equal(wantedCopies(3, ['p1', 'p2'], r(['p1', 'p2', 'p3']), away), 3, 'p3 restarting (leaving): its copy is not extra');
  t.equal(wantedCopies(3, ['p1', 'p2'], r(['p1', 'p2', 'p4']), away), 2, 'p4 left the span for good (draining): two peers, two copies');
  t.equal(wantedCopies(2, ['p1', 'p2', 'p3', 'p4'], r(['p1', 'p2']), away), 2, 'never more than asked');
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

async function openCatalog(t: Test, env: ManualEnv, peers: string[]): Promise<Catalog> {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-membership-spread-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const catalog = await Catalog.open(meta, { groupPeers: peers, pageBlocks: 8192, env });
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

function keeperOn(catalog: Catalog, env: ManualEnv, self: string, view: MembersView, handed: Handed[]): CopyKeeper {
  return new CopyKeeper({
    self, env, log, catalog, downOutMs: 600_000, zoneOf: () => undefined, reserveFreeBytes: 0, peers: () => viewed(catalog.options.groupPeers), movingAway: () => false, event: () => undefined,
    members: view, span: (v: VolumeRecord) => v.peers.filter((p) => view.placeable().includes(p)),
    movePrimary: async (_v, page, to) => void handed.push({ page, to }),
  });
}

/** What resync does: every stale copy of the volume brought into the in-sync set. */
async function resyncAll(catalog: Catalog, name: string): Promise<void> {
  const v = catalog.require(name);
  for (const [page, x] of catalog.routes(v).owners(v.sizeBytes / v.blockBytes).entries()) {
    if (x.copies && inSyncOf(x).length < x.copies.length) await catalog.casRoute(v, page, x, (now) => ({ owner: now.owner, copies: now.copies, inSync: now.copies }));
  }
}

t.test('a draining peer: every copy of it leaves, primaries handed over first, never fewer in-sync copies', async (t) => {
  const env = new ManualEnv();
  const ids = ['p1', 'p2', 'p3', 'p4'];
  const catalog = await openCatalog(t, env, ids);
  const v = await catalog.createVolume({ name: 'vol', size: 12 * pageBytes, replicas: 2, peers: ['p1', 'p2', 'p3'] });
  const states: Record<string, MemberState> = { p2: 'draining' };
  const view = members(ids, states);
  const handed: Handed[] = [];
  const keepers = ids.map((id) => keeperOn(catalog, env, id, view, handed));
  const routes = () => catalog.routes(catalog.require('vol')).owners(v.sizeBytes / v.blockBytes);
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
  t.ok(routes().every((x) => !copiesOf(x).includes('p4')), 'never outside the volume\'s peers (p4 is not one of them)');
});

t.test('a one-copy page on a draining peer moves whole; a capacity hint moves one copy to the peer it names', async (t) => {
  const env = new ManualEnv();
  const ids = ['p1', 'p2', 'p3', 'p4'];
  const catalog = await openCatalog(t, env, ids);
  await catalog.createVolume({ name: 'one', size: 4 * pageBytes, replicas: 1, peers: ['p1', 'p2'] });
  const handed: Handed[] = [];
  const p2 = keeperOn(catalog, env, 'p2', members(ids, { p2: 'draining' }), handed);
  await p2.run();
  t.same(handed, [{ page: 1, to: 'p1' }, { page: 3, to: 'p1' }], 'p2\'s pages move to p1, the volume\'s other peer');

  const v = await catalog.createVolume({ name: 'two', size: 4 * pageBytes, replicas: 2, peers: ['p1', 'p2', 'p3', 'p4'] });
  const p1 = keeperOn(catalog, env, 'p1', members(ids, {}), []);
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
