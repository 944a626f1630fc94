// Membership commands in an in-process group (one embedded catalog, real gRPC and iSCSI on
// loopback): a drain is seen by every peer (state, events), cancels the moves aimed at the
// draining peer, makes it redirect every login; remove is refused while it holds data; undrain
// brings it back; a graceful stop hands the peer's primary roles to in-sync copies before it is
// gone.

import t from 'tap';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { stopGroup } from '../src/server/peer';
import { startGroup } from './helpers/group';
import { hasTool } from './helpers/processes';

/** Resolves when `ok()` holds, polling; fails the test with `what` after `timeoutMs`. */
async function until(what: string, ok: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

t.test('drain, undrain and a graceful stop in a group of three', async (t) => {
  // Page moves crawl (64 KiB/s): one started toward p3 is still copying when p3 drains.
  const g = await startGroup(t, 3, { migration: { rateMBps: 0.064, pieceKiB: 64 } });
  const p = g.peer;
  await p('p1').admin.createVolume({ name: 'one', size: '64M', replicas: 1 });
  await p('p1').admin.createVolume({ name: 'two', size: '64M', replicas: 2 });
  const routes = (peer: string, volume: string) => {
    const c = p(peer).core.catalog;
    const v = c.volume(volume)!;
    return c.routes(v).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
  };
  await until('every peer knows both volumes', () => ['p1', 'p2', 'p3'].every((id) => p(id).core.catalog.listVolumes().length === 2));

  // A move from p1 to p3 in flight (page 0 of "one" is on p1 by placement).
  t.equal(routes('p1', 'one')[0].owner, 'p1');
  const move = await p('p1').admin.movePage('one', 0, 'p3');
  t.equal(move.state === 'switched', false, 'a copying move, not a role switch');
  t.equal(p('p1').core.migrator.list().length, 1);

  const drained = await p('p2').admin.drainPeer('p3');
  t.match(drained, { peer: 'p3', state: 'draining', changedBy: 'admin via p2' });
  t.ok(drained.copies > 0, 'p3 holds copies');
  await until('every peer sees p3 draining', () => ['p1', 'p2', 'p3'].every((id) => p(id).members.get('p3')?.state === 'draining'));
  t.same(p('p1').members.placeable(), ['p1', 'p2'], 'nothing new is placed on p3');
  await until('the move aimed at p3 is cancelled by its source', () => p('p1').core.migrator.list().length === 0);
  await until('the page stays on p1', () => routes('p1', 'one')[0].owner === 'p1');
  for (const id of ['p1', 'p2', 'p3']) {
    t.ok(p(id).events.since(0).some((e) => e.kind === 'member' && e.peer === 'p3' && /draining.*\(admin via p2\)/.test(e.message)), `${id} announces the drain, with who asked`);
  }

  await t.rejects(p('p1').admin.removePeer('p3', false), /peer p3 still holds copies of \d+ page\(s\)/, 'remove refused while it holds data');
  await t.rejects(p('p1').admin.removePeer('p3', true), /peer p3 answers: --force is only for a peer that is dead/, '--force refused for a live peer');

  if (hasTool('iscsi-inq')) {
    // Asynchronously: the peers serve in this process.
    await promisify(execFile)('iscsi-inq', ['-i', 'iqn.2026-11.io.peersan.test:drain', g.url('p3', 'one')], { timeout: 30_000 });
    t.pass("a login through p3's portal works (redirected)");
    t.ok(p('p3').events.since(0).some((e) => e.kind === 'redirect' && /redirected to 127\.0\.0\.1:\d+,[12] \(p3 is draining\)/.test(e.message)), 'p3 redirected it to an up peer');
  }

  const undrained = await p('p1').admin.undrainPeer('p3');
  t.equal(undrained.state, 'up');
  await until('every peer sees p3 up', () => ['p1', 'p2', 'p3'].every((id) => p(id).members.get('p3')?.state === 'up'));
  t.ok(p('p2').events.since(0).some((e) => e.kind === 'member' && /peer p3 undrained/.test(e.message)));

  // A graceful stop of p1: the pages of "two" it is primary of change primary before it is gone.
  const primaries = () => routes('p2', 'two').filter((r) => r.owner === 'p1').length;
  t.ok(primaries() > 0, 'p1 is primary of pages of "two"');
  await p('p1').stop('p1 (test)');
  t.equal(primaries(), 0, `every one handed to an in-sync copy before p1 stopped (${JSON.stringify(routes('p2', 'two').filter((r) => r.owner === 'p1'))})`);
  t.equal(p('p2').members.get('p1')?.state, 'leaving');
  t.ok(p('p2').events.since(0).some((e) => e.kind === 'member' && /peer p1 leaving.*\(p1 \(test\)\)/.test(e.message)), 'announced');
});

t.test('remove --force of a stopped peer: refused while a page would lose its last in-sync copy, then its copies leave the routes', async (t) => {
  const g = await startGroup(t, 3);
  const p = g.peer;
  await p('p1').admin.createVolume({ name: 'two', size: '64M', replicas: 2 });
  await p('p1').admin.createVolume({ name: 'one', size: '64M', replicas: 1 });
  await until('every peer knows both volumes', () => ['p1', 'p2', 'p3'].every((id) => p(id).core.catalog.listVolumes().length === 2));
  // p3 stops for good (gracefully: its primaries of "two" go to the other copies first).
  await p('p3').stop('p3 (test)');
  await t.rejects(p('p1').admin.removePeer('p3', true), /removing p3 would lose the last in-sync copy of page \d+ of volume one/, 'a single-copy volume holds pages only on p3');
  await p('p1').admin.deleteVolume('one', true);
  const removed = await p('p1').admin.removePeer('p3', true);
  t.match(removed, { id: 'p3', state: 'removed', changedBy: 'admin via p1' });
  const c = p('p1').core.catalog;
  const v = c.volume('two')!;
  const copies = c.routes(v).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks)).flatMap((r) => r.copies ?? [r.owner]);
  t.notOk(copies.includes('p3'), 'no route names p3: the primaries rebuild those copies elsewhere');
  t.same((await p('p2').admin.status()).peers.map((x) => x.id), ['p1', 'p2'], 'status no longer lists p3');
  t.ok(p('p2').events.since(0).some((e) => e.kind === 'member' && /peer p3 removed from the group \(admin via p1\)/.test(e.message)), 'announced');
});

t.test('a whole group stopping at once (the demo\'s Ctrl-C) hands no role around', async (t) => {
  const g = await startGroup(t, 3);
  const p = g.peer;
  await p('p1').admin.createVolume({ name: 'two', size: '64M', replicas: 2 });
  await until('every peer knows the volume', () => ['p1', 'p2', 'p3'].every((id) => p(id).core.catalog.listVolumes().length === 1));
  await stopGroup([...g.servers.values()], 'test (SIGINT)');
  const switched = [...g.servers.values()].flatMap((s) => s.events.since(0).filter((e) => /primary role switched/.test(e.message)));
  t.same(switched.map((e) => e.message), [], 'every peer was leaving before any handed a role over');
  t.same(['p1', 'p2', 'p3'].map((id) => p(id).members.get(id)?.state), ['leaving', 'leaving', 'leaving'], 'each marked itself leaving');
});
