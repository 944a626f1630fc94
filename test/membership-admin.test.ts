// The operator's membership commands with no sockets (src/cluster/membership-admin.ts,
// graceful-leave.ts, src/server/member-effects.ts): the refusals, each one line; the state
// changes by CAS on real member records (embedded catalog); remove --force taking a dead peer's
// copies out of the routes; the roles a leaving peer hands over; what a peer does when a member
// record changes (events, moves cancelled, hosts asked to leave, redirect).

import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import t from 'tap';
import { Catalog } from '../src/cluster/catalog';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { leave, rolesToHandOver } from '../src/cluster/graceful-leave';
import type { PeerStatusView } from '../src/cluster/group-status';
import { checkDrain, checkDrainCopies, checkRemove, copiesOn, drainProgressOf, membershipAdmin, type Holding } from '../src/cluster/membership-admin';
import { fixedMembers, Members, type MemberRecord, type MemberState } from '../src/cluster/members';
import { ManualEnv } from '../src/env/manual';
import { switchedPrimary } from '../src/replication/placement';
import { realEnv } from '../src/env/real';
import type { SessionInfo } from '../src/iscsi/portal';
import type { MoveInfo } from '../src/migration/migrator';
import type { Route } from '../src/routing/table';
import type { ClusterConfig, PeerConfig } from '../src/server/config';
import { EventLog, memberChangeText } from '../src/server/events';
import { askHostsToLeave, drainRedirect, followMembers } from '../src/server/member-effects';
import { joinGroup } from '../src/server/membership';
import { freePort } from './helpers/processes';
import { tempMetaStore } from './helpers/temp-meta';

const log = pino({ level: 'silent' });
const GiB = 1024 ** 3;

function record(id: string, state: MemberState, tag = 1): MemberRecord {
  return { id, iscsi: `10.0.0.${tag}:3260`, rpc: `10.0.0.${tag}:7000`, http: '', state, capacity: 1, tag, joinedAtMs: 0, changedBy: 'admin via p2', changedAtMs: 0, version: 1 };
}

/** The one line a refusal says (and that it is one). */
function refusal(t: Tap.Test, fn: () => void, pattern: RegExp, what: string): void {
  try {
    fn();
    t.fail(`${what}: not refused`);
  } catch (err) {
    const message = (err as Error).message;
    t.equal(message.split('\n').length, 1, `${what}: one line`);
    t.match(message, pattern, what);
  }
}

t.test('drain refusals: unknown, removed, the last placeable peer, not enough space (how much is missing)', async (t) => {
  const ids = ['p1', 'p2', 'p3'];
  refusal(t, () => checkDrain('p9', undefined, ids, ids, undefined), /no peer "p9" in the group \(members: p1, p2, p3\)/, 'unknown');
  refusal(t, () => checkDrain('p1', record('p1', 'removed'), ids, ids, undefined), /peer p1 was removed from the group/, 'removed');
  refusal(t, () => checkDrain('p1', record('p1', 'up'), ['p1', 'p2'], ['p1'], undefined), /p1 is the last placeable peer/, 'the last placeable peer');
  refusal(t, () => checkDrain('p1', record('p1', 'up'), ids, ids, { heldBytes: 10 * GiB, freeBytes: 4 * GiB }), /the other peers \(p2, p3\) lack 6\.0 GiB for the copies on p1/, 'space');
  t.doesNotThrow(() => checkDrain('p1', record('p1', 'up'), ids, ids, { heldBytes: 4 * GiB, freeBytes: 4 * GiB }), 'exactly enough room');
  t.doesNotThrow(() => checkDrain('p1', record('p1', 'draining'), ids, ['p2', 'p3'], undefined), 'draining again is fine');
  refusal(t, () => checkDrainCopies('p3', [{ name: 'two', copies: 2, span: ids }, { name: 'three', copies: 3, span: ids }]), /volume three keeps 3 copies of each page and would have 2 peer\(s\) for them without p3: add a peer first, or lower its copies \(peersan volume set three --replicas 2\)/, 'copies with nowhere to go');
  t.doesNotThrow(() => checkDrainCopies('p3', [{ name: 'two', copies: 2, span: ids }]), 'two copies on the two peers left');
});

t.test('remove refusals: holds data, not drained, --force of a live peer, a last in-sync copy, a primary not failed over', async (t) => {
  const ids = ['p1', 'p2', 'p3'];
  const none: Holding = { copies: 0, primaries: 0, lastInSync: 0, volumes: [] };
  const held: Holding = { copies: 2, primaries: 1, lastInSync: 0, volumes: ['a'], firstPrimary: { volume: 'a', page: 0 } };
  refusal(t, () => checkRemove('p1', record('p1', 'draining'), ids, held, false, true), /p1 still holds copies of 2 page\(s\) \(1 as primary\): drain it first/, 'holds data');
  refusal(t, () => checkRemove('p1', record('p1', 'up'), ids, none, false, true), /peer p1 is up: drain it first/, 'up, not drained');
  t.doesNotThrow(() => checkRemove('p1', record('p1', 'draining'), ids, none, false, true), 'a drained peer');
  refusal(t, () => checkRemove('p1', record('p1', 'up'), ids, none, true, true), /peer p1 answers: --force is only for a peer that is dead for good/, '--force of a live peer');
  const last: Holding = { copies: 4, primaries: 2, lastInSync: 2, volumes: ['a', 'b', 'c'], firstPrimary: { volume: 'a', page: 0 }, firstLost: { volume: 'b', page: 7 } };
  refusal(t, () => checkRemove('p1', record('p1', 'up'), ids, last, true, false), /would lose the last in-sync copy of page 7 of volume b \(and 1 more page\(s\)\)/, 'a last in-sync copy');
  refusal(t, () => checkRemove('p1', record('p1', 'up'), ids, held, true, false), /page 0 of volume a still has its primary on p1: failover has not promoted/, 'primary not failed over');
  t.doesNotThrow(() => checkRemove('p1', record('p1', 'up'), ids, { copies: 1, primaries: 0, lastInSync: 0, volumes: ['a'] }, true, false), 'a dead peer holding secondaries only');
  refusal(t, () => checkRemove('p1', record('p1', 'removed'), ids, none, false, false), /was removed/, 'removed twice');
});

t.test('drain progress: done when no copy is left and only pinned sessions remain', async (t) => {
  const s = (tsih: number): SessionInfo => ({ tsih, initiatorName: `iqn.h${tsih}`, isid: '01', targetName: 'iqn.t', sessionType: 'Normal', remoteAddress: '', commandsInFlight: 0 });
  const status = (sessions: SessionInfo[]): PeerStatusView => ({ id: 'p1', iscsi: '', rpc: '', http: '', up: true, uptimeMs: 0, allocatedBytes: 0, freeBytes: 0, totalBytes: 0, volumes: 0, sessions, version: '' });
  const copy: Holding = { copies: 1, primaries: 1, lastInSync: 0, volumes: ['a'], firstPrimary: { volume: 'a', page: 1 } };
  const none: Holding = { copies: 0, primaries: 0, lastInSync: 0, volumes: [] };
  const pinned = (x: SessionInfo): boolean => x.tsih === 2;
  t.match(drainProgressOf(record('p1', 'draining'), copy, status([]), pinned), { copies: 1, primaries: 1, sessions: 0, done: false });
  t.match(drainProgressOf(record('p1', 'draining'), none, status([s(1), s(2)]), pinned), { sessions: 2, done: false }, 'an unpinned session left');
  const d = drainProgressOf(record('p1', 'draining'), none, status([s(2)]), pinned);
  t.equal(d.done, true, 'a pinned session is left for the operator');
  t.same(d.pinned, [{ tsih: 2, initiatorName: 'iqn.h2', targetName: 'iqn.t' }]);
});

t.test('roles handed over by a leaving peer: only to in-sync copies on up peers, spread', async (t) => {
  const r = (owner: string, copies: string[], inSync = copies): Route => ({ owner, version: 2, copies, inSync });
  const routes = [r('p1', ['p1', 'p2']), r('p1', ['p1', 'p3']), r('p2', ['p2', 'p1']), r('p1', ['p1', 'p2', 'p3']), r('p1', ['p1', 'p2'], ['p1']), r('p1', ['p1'])];
  t.same([...rolesToHandOver('p1', [{ name: 'v', routes: routes.entries() }], ['p1', 'p2', 'p3'])], [
    { volume: 'v', page: 0, to: 'p2' }, { volume: 'v', page: 1, to: 'p3' }, { volume: 'v', page: 3, to: 'p2' },
  ], 'pages 2 (not primary), 4 (stale copy) and 5 (one copy) stay');
  t.same([...rolesToHandOver('p1', [{ name: 'v', routes: routes.entries() }], ['p1', 'p3'])].map((h) => `${h.page}→${h.to}`), ['1→p3', '3→p3'], 'never to a peer that is not up');
  t.same([...rolesToHandOver('p1', [{ name: 'v', routes: routes.entries() }], [])], [], 'the whole group stopping: nothing handed around');
});

/** A catalog with a volume of 4 pages on p1-p3, 2 copies, in an embedded store; and Members over the same store. */
async function fixture(t: Tap.Test) {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-membership-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const env = new ManualEnv();
  const members = await Members.open(meta, realEnv());
  await members.group(['p1', 'p2', 'p3'].map((id, i) => ({ id, iscsi: `10.0.0.${i + 1}:3260`, rpc: `10.0.0.${i + 1}:7000`, http: '' })), 'p1');
  const catalog = await Catalog.open(meta, { members, pageBlocks: 8192, env });
  t.teardown(async () => {
    members.close();
    catalog.close();
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  await catalog.createVolume({ name: 'v', size: 4 * 8192 * 512, peers: ['p1', 'p2', 'p3'], replicas: 2 });
  return { catalog, members };
}

function groupOf(up: Record<string, boolean>, bytes = { allocated: 0, free: 100 * GiB }) {
  return {
    status: async () => ({
      cluster: 'test',
      peers: Object.entries(up).map(([id, isUp]): PeerStatusView => ({ id, iscsi: '', rpc: '', http: '', up: isUp, uptimeMs: 0, allocatedBytes: isUp ? bytes.allocated : 0, freeBytes: isUp ? bytes.free : 0, totalBytes: 0, volumes: 0, sessions: [], version: '' })),
    }),
  };
}

t.test('drain, undrain, remove and stop on real member records', async (t) => {
  const { catalog, members } = await fixture(t);
  let stops = 0;
  const admin = membershipAdmin({ self: 'p2', members, catalog, group: groupOf({ p1: true, p2: true, p3: true }), pinned: () => false, requestStop: () => stops++ });
  t.match(copiesOn(catalog, 'p1'), { copies: 3, primaries: 2, lastInSync: 0, volumes: ['v'], firstPrimary: { volume: 'v', page: 0 } }, 'placement: page i on p(i%3+1) and the next: pages 0 (primary), 2 and 3 (primary)');

  const d = await admin.drainPeer('p1');
  t.match(d, { peer: 'p1', state: 'draining', changedBy: 'admin via p2', copies: 3, primaries: 2, done: false });
  t.equal(members.get('p1')!.state, 'draining', 'the record says so (CAS)');
  t.same(members.placeable(), ['p2', 'p3']);
  await t.rejects(admin.removePeer('p1', false), /p1 still holds copies of 3 page\(s\) \(2 as primary\)/, 'remove refused while it holds data');
  t.equal((await admin.undrainPeer('p1')).state, 'up');
  await t.rejects(admin.undrainPeer('p9'), /no peer "p9"/);

  await admin.drainPeer('p1');
  await t.rejects(admin.drainPeer('p2'), /volume v keeps 2 copies of each page and would have 1 peer\(s\) for them without p2/, 'two copies need two peers left');
  await catalog.setReplicas('v', 1);
  await admin.drainPeer('p2');
  await t.rejects(admin.drainPeer('p3'), /p3 is the last placeable peer/, 'the last placeable peer stays');
  await admin.undrainPeer('p2');
  await admin.undrainPeer('p1');
  await catalog.setReplicas('v', 2);

  await t.rejects(admin.stopPeer('p1'), /peer stop goes to the peer itself: this is p2, not p1/);
  t.equal((await admin.stopPeer('p2')).state, 'leaving');
  t.equal(stops, 1, 'the peer is asked to stop after it marked itself leaving');

  const tight = membershipAdmin({ self: 'p2', members, catalog, group: groupOf({ p1: true, p2: true, p3: true }, { allocated: 3 * GiB, free: 1 * GiB }), pinned: () => false, requestStop: () => undefined });
  await t.rejects(tight.drainPeer('p1'), /the other peers \(p3\) lack 2\.0 GiB/, 'space: only the placeable peers that answer count (p2 is leaving)');
});

t.test('remove --force of a dead peer: its copies leave the routes (CAS), then it is removed; refused while a page would lose its last in-sync copy', async (t) => {
  const { catalog, members } = await fixture(t);
  const v = catalog.volume('v')!;
  const admin = (up: boolean) => membershipAdmin({ self: 'p2', members, catalog, group: groupOf({ p1: up, p2: true, p3: true }), pinned: () => false, requestStop: () => undefined });
  await t.rejects(admin(true).removePeer('p1', true), /p1 answers/, 'a peer that answers is drained, not forced out');
  await t.rejects(admin(false).removePeer('p1', true), /page 0 of volume v still has its primary on p1/, 'its primaries fail over first');
  // Failover promoted p2 on page 0; page 3's other copy (p1 primary) is stale.
  await catalog.casRoute(v, 0, catalog.routes(v).route(0), () => ({ owner: 'p2', copies: ['p2', 'p1'], inSync: ['p2', 'p1'] }));
  await catalog.casRoute(v, 3, catalog.routes(v).route(3), () => ({ owner: 'p1', copies: ['p1', 'p2'], inSync: ['p1'] }));
  await t.rejects(admin(false).removePeer('p1', true), /would lose the last in-sync copy of page 3 of volume v/, 'names the page');
  t.equal(members.get('p1')!.state, 'up', 'nothing changed on a refusal');
  // The copy came in sync and failover promoted it.
  await catalog.casRoute(v, 3, catalog.routes(v).route(3), () => ({ owner: 'p2', copies: ['p2', 'p1'], inSync: ['p2', 'p1'] }));
  const removed = await admin(false).removePeer('p1', true);
  t.equal(removed.state, 'removed');
  t.match(copiesOn(catalog, 'p1'), { copies: 0, primaries: 0, volumes: [] }, 'no route names p1 any more');
  t.same(catalog.routes(v).route(0).copies, ['p2'], 'its copy is out (the keeper rebuilds it elsewhere)');
  t.same(members.ids(), ['p2', 'p3']);
});

/** A migrator whose start is a role switch by CAS on the real catalog (Migrator.switchRole's effect), noted in `started`. */
function switchingMigrator(catalog: Catalog, started: string[]): Parameters<typeof leave>[0]['migrator'] {
  return {
    start: async (name, page, to) => {
      started.push(`${name}/${page}→${to}`);
      const volume = catalog.volume(name)!;
      await catalog.casRoute(volume, page, catalog.routes(volume).route(page), (now) => switchedPrimary(now, to, true));
      return {} as MoveInfo;
    },
    list: () => [], cancel: () => undefined, wait: async () => undefined,
  };
}

t.test('a graceful leave marks the peer leaving and switches roles to in-sync copies on up peers, bounded', async (t) => {
  const { catalog, members } = await fixture(t);
  const started: string[] = [];
  const env = realEnv();
  const r = await leave({ self: 'p1', members, catalog, env, log, why: 'p1 (SIGTERM)', migrator: switchingMigrator(catalog, started) });
  t.equal(members.get('p1')!.state, 'leaving');
  t.equal(members.get('p1')!.changedBy, 'p1 (SIGTERM)');
  t.same(started.sort(), ['v/0→p2', 'v/3→p2'], 'its primaries, to their in-sync copies');
  t.same(r, { handed: 2, kept: 0 });
  // A whole group stopping: every peer is leaving already, so nobody receives a role.
  await members.setState('p2', 'leaving', 'test');
  await members.setState('p3', 'leaving', 'test');
  started.length = 0;
  await leave({ self: 'p1', members, catalog, env, log, why: 'x', migrator: { start: async () => (started.push('x'), {} as MoveInfo), list: () => [], cancel: () => undefined, wait: async () => undefined } });
  t.same(started, [], 'no role handed to a peer that stops too');
});

t.test('a role another peer switched to the leaving one meanwhile (its CAS before the step out) is handed over too', async (t) => {
  const { catalog, members } = await fixture(t);
  const v = catalog.volume('v')!;
  const started: string[] = [];
  // Page 2: p3 primary, p1 in sync. p3, not having heard of the leave, switches the role to p1
  // just before p1's step out of the page's in-sync set, whose CAS then fails.
  let raced = false;
  const racing: Parameters<typeof leave>[0]['catalog'] = {
    listVolumes: () => catalog.listVolumes(),
    routes: (volume) => catalog.routes(volume),
    casRoute: async (volume, page, from, change) => {
      if (page === 2 && !raced) {
        raced = true;
        await catalog.casRoute(volume, page, from, (now) => switchedPrimary(now, 'p1', true));
      }
      return catalog.casRoute(volume, page, from, change);
    },
  };
  t.equal(catalog.routes(v).route(2).owner, 'p3');
  const r = await leave({ self: 'p1', members, catalog: racing, env: realEnv(), log, why: 'p1 (SIGTERM)', migrator: switchingMigrator(catalog, started) });
  t.ok(raced, 'the switch came during the step out');
  t.same(started.sort(), ['v/0→p2', 'v/2→p3', 'v/3→p2'], 'the late role too, once its walk was over');
  t.same(r, { handed: 3, kept: 0 });
  t.same([0, 1, 2, 3].map((page) => catalog.routes(v).route(page).owner), ['p2', 'p2', 'p3', 'p2'], 'p1 is primary of nothing');
});

t.test('the events of member changes, with who asked', async (t) => {
  const c = (state: MemberState, by = 'admin via p2'): MemberRecord => ({ ...record('p4', state), changedBy: by });
  t.equal(memberChangeText(c('joining', 'p4'), undefined), 'peer p4 joins the group (p4)');
  t.equal(memberChangeText(c('up', 'p4'), c('joining', 'p4')), 'peer p4 joined: up (p4)');
  t.match(memberChangeText(c('draining'), c('up')), /^peer p4 draining: .* \(admin via p2\)$/);
  t.match(memberChangeText(c('up'), c('draining')), /^peer p4 undrained: up again \(admin via p2\)$/);
  t.match(memberChangeText(c('leaving', 'p4 (SIGTERM)'), c('up')), /^peer p4 leaving: .* \(p4 \(SIGTERM\)\)$/);
  t.equal(memberChangeText(c('up', 'p4 (restart)'), c('leaving')), 'peer p4 is back (p4 (restart))');
  t.equal(memberChangeText(c('removed'), c('draining')), 'peer p4 removed from the group (admin via p2)');
  t.equal(memberChangeText(c('up'), c('up')), undefined, 'new addresses only: no event');
});

t.test('a draining or leaving peer redirects every login to an up peer', async (t) => {
  const view = (self: MemberState) => {
    const recs = new Map([['p1', record('p1', self, 1)], ['p2', record('p2', 'up', 2)], ['p3', record('p3', 'up', 3)]]);
    return { ids: () => ['p1', 'p2', 'p3'], placeable: () => [...recs.values()].filter((r) => r.state === 'up').map((r) => r.id), get: (id: string) => recs.get(id) };
  };
  t.equal(drainRedirect('p1', view('up'), 'iqn.h'), undefined, 'an up peer serves its logins');
  const targets = new Set(['a', 'b', 'c', 'd', 'e', 'f'].map((h) => drainRedirect('p1', view('draining'), `iqn.${h}`)));
  t.same([...targets].sort(), ['10.0.0.2:3260,2', '10.0.0.3:3260,3'], 'to the up peers, with their portal group tags, spread');
  t.equal(drainRedirect('p1', view('leaving'), 'iqn.a'), drainRedirect('p1', view('leaving'), 'iqn.a'), 'the same peer for an initiator each time');
  t.equal(drainRedirect('p1', fixedMembers(['p1']), 'iqn.a'), undefined);
});

t.test('a peer follows the member records: events everywhere, moves to a draining peer cancelled, its own hosts asked to leave', async (t) => {
  const listeners: ((id: string, now: MemberRecord | undefined, before: MemberRecord | undefined) => void)[] = [];
  const events = new EventLog(100);
  const cancelled: string[] = [];
  const asked: number[] = [];
  let removed = 0;
  const move = (page: number, to: string): MoveInfo => ({ volume: 'v', volumeId: 'id', page, from: 'p1', to, pieces: 1, done: 0, state: 'copying', startedAtMs: 0, bytesCopied: 0, lastError: '' });
  const s = (tsih: number): SessionInfo => ({ tsih, initiatorName: `iqn.h${tsih}`, isid: '01', targetName: 'iqn.t', sessionType: 'Normal', remoteAddress: '', commandsInFlight: 0 });
  const portal = { sessions: () => [s(1), s(2), { ...s(3), sessionType: 'Discovery' as const }], requestLogoutOf: (tsih: number) => (asked.push(tsih), true) };
  const unfollow = followMembers({
    self: 'p1', members: { onChange: (fn) => (listeners.push(fn), () => undefined) },
    migrator: { list: () => [move(1, 'p3'), move(2, 'p2'), move(3, 'p3')], cancel: (_id, page) => void cancelled.push(page === 3 ? (() => { throw new Error('committing'); })() : `${page}`) },
    portal: () => portal, pinned: (x) => x.tsih === 2, logoutSeconds: 5, event: (kind, message, fields) => void events.add(kind, message, fields), removed: () => removed++, log,
  });
  t.type(unfollow, 'function');
  const change = (id: string, state: MemberState, before: MemberState) => listeners[0](id, { ...record(id, state), changedBy: 'admin via p2' }, record(id, before));
  change('p3', 'leaving', 'up');
  t.same(cancelled, [], 'a leaving peer (a planned restart): its moves wait for it and resume');
  change('p3', 'draining', 'up');
  t.same(cancelled, ['1'], 'moves aimed at p3 cancelled (one committing already is left to end)');
  t.same(asked, [], 'another peer draining: no host of ours asked');
  t.match(events.since(0).map((e) => `${e.kind} ${e.peer} ${e.message}`), [/^member p3 peer p3 leaving/, /^member p3 peer p3 draining: .* \(admin via p2\)$/]);
  change('p1', 'draining', 'up');
  t.same(asked, [1], 'our own drain: the hosts asked to log out, but the pinned one and discovery sessions');
  change('p1', 'removed', 'draining');
  t.equal(removed, 1, 'removed: the peer stops');
  t.equal(events.since(0).length, 4);
  t.same(askHostsToLeave(portal, () => false, 5).map((x) => x.tsih), [1, 2]);
});

t.test('a restart whose record names an address where nothing listens joins at once, without waiting out the twin check', async (t) => {
  const { dir, meta } = await tempMetaStore(t, 'peersan-join-');
  const peer: PeerConfig = { id: 'p1', iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: join(dir, 'p1') };
  mkdirSync(peer.data);
  const config = { name: 'join-test', secret: 's', adminToken: 'a', pageBlocks: 8192, catalog: { backend: 'embedded' }, peers: [peer] } as unknown as ClusterConfig;
  const first = await joinGroup({ meta, env: realEnv(), config, peer, tls: undefined, log });
  first.members.close();
  // The record exists now: this start asks its address whether a process holds the id.
  const t0 = Date.now();
  const again = await joinGroup({ meta, env: realEnv(), config, peer, tls: undefined, log });
  const ms = Date.now() - t0;
  again.members.close();
  t.not(again.incarnation, first.incarnation, 'a new incarnation');
  // The check's deadline is 2 s; a refused connection answers in milliseconds.
  t.ok(ms < 1_500, `joined in ${ms} ms`);
});
