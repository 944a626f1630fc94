// Copies leaving a draining peer and spreading to a new one, in an in-process group (real gRPC,
// embedded catalog): the copy keeper, resync, role switches and the capacity spread at work, no
// host I/O meanwhile, and the data read back whole afterwards through every peer.

import { randomBytes } from 'node:crypto';
import t from 'tap';
import { topText } from '../src/cli/load';
import { copiesHeldBy } from '../src/replication/spread';
import type { VolumeRouter } from '../src/routing/router';
import { copiesOf, inSyncOf } from '../src/routing/table';
import { freePort } from './helpers/processes';
import { startGroup } from './helpers/group';

const pageBlocks = 8192;
const bs = 512;
type Group = Awaited<ReturnType<typeof startGroup>>;

async function until<T>(what: string, timeoutMs: number, probe: () => T | undefined | false | Promise<T | undefined | false>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await probe();
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The volume's router on `id`, once it has opened the volume (it learns of it by watch). */
function routerOn(g: Group, id: string, volume: string): Promise<VolumeRouter> {
  return until(`volume ${volume} open on ${id}`, 10_000, () => g.peer(id).core.targets.routerFor(volume));
}

/** 64 KiB of random data at a few places of every page; what was written, by lba. */
async function fill(router: VolumeRouter, pages: number): Promise<Map<number, Buffer>> {
  const written = new Map<number, Buffer>();
  for (let page = 0; page < pages; page++) {
    for (const at of [0, 3000, pageBlocks - 128]) {
      const data = randomBytes(128 * bs);
      await router.write(page * pageBlocks + at, data, { fua: false });
      written.set(page * pageBlocks + at, data);
    }
  }
  return written;
}

async function readsBack(t: { equal(a: unknown, b: unknown, msg: string): void }, router: VolumeRouter, written: Map<number, Buffer>, via: string): Promise<void> {
  let bad = 0;
  for (const [lba, data] of written) if (!(await router.read(lba, data.length / bs)).equals(data)) bad++;
  t.equal(bad, 0, `through ${via}: all ${written.size} written extents read back as written`);
}

function routesOf(g: Group, via: string, volume: string) {
  const { catalog } = g.peer(via).core;
  const v = catalog.require(volume);
  return catalog.routes(v).routesIn(0, Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
}

t.test('a draining peer: its copies leave (primaries handed over first, one-copy pages moved whole), data intact, two in-sync copies throughout', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 200 } });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '32M', replicas: 2 });
  await g.peer('p1').admin.createVolume({ name: 'one', size: '24M', replicas: 1 });
  const written = await fill(await routerOn(g, 'p1', 'vol'), 8);
  const writtenOne = await fill(await routerOn(g, 'p1', 'one'), 6);
  const { catalog } = g.peer('p1').core;
  const before = copiesHeldBy(catalog, 'p2');
  t.ok(before > 6, `p2 holds ${before} copies`);
  await g.peer('p1').members.setState('p2', 'draining', 'test');
  let minInSync = Infinity;
  await until('p2 empty', 90_000, () => {
    minInSync = Math.min(minInSync, ...routesOf(g, 'p1', 'vol').map((x) => inSyncOf(x).length));
    return copiesHeldBy(catalog, 'p2') === 0;
  });
  t.pass('p2 holds no copy any more');
  t.equal(minInSync, 2, 'every page kept two in-sync copies all along (as p1 saw the routes)');
  await until('two in-sync copies of every page on p1 and p3', 30_000, () => routesOf(g, 'p1', 'vol').every((x) => inSyncOf(x).length === 2 && copiesOf(x).every((p) => p !== 'p2')));
  for (const id of ['p1', 'p3']) await readsBack(t, await routerOn(g, id, 'vol'), written, id);
  t.ok(routesOf(g, 'p1', 'one').every((x) => x.owner !== 'p2'), 'the one-copy volume\'s pages moved off p2');
  for (const id of ['p1', 'p3']) await readsBack(t, await routerOn(g, id, 'one'), writtenOne, id);
});

t.test('a fourth peer, present but holding nothing, receives copies with no host I/O; data intact', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 200 } });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '64M', replicas: 2 });
  const written = await fill(await routerOn(g, 'p1', 'vol'), 16);
  const { catalog } = g.peer('p1').core;
  g.config.peers.push({ id: 'p4', iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: `${g.dir}/p4` });
  await g.start('p4');
  t.equal(copiesHeldBy(catalog, 'p4'), 0, 'p4 starts empty');
  // 32 copies over four peers of capacity 1: a share of 8; the hysteresis is one copy.
  const held = await until('p4 fills', 90_000, () => {
    const n = copiesHeldBy(catalog, 'p4');
    return n >= 6 && n;
  });
  t.ok(held >= 6, `p4 holds ${held} copies`);
  // p4 may reach 6 while a peer still holds 10 (a fresh-clone CI run stopped at 10 8 8 6 between
  // two rounds): the spread's next round takes it down; it must end within its share + 1.
  const heldNow = (): number[] => ['p1', 'p2', 'p3', 'p4'].map((id) => copiesHeldBy(catalog, id));
  await until('no copy on its way, no peer above its share', 60_000, () => routesOf(g, 'p1', 'vol').every((x) => inSyncOf(x).length === 2 && copiesOf(x).length === 2) && heldNow().every((n) => n <= 9));
  t.ok(heldNow().every((n) => n <= 9), `no peer above its share: ${heldNow().join(' ')}`);
  for (const id of ['p4', 'p1']) await readsBack(t, await routerOn(g, id, 'vol'), written, id);

  // The fill as an operator sees it: status (over the admin RPC), top, the console's state.
  // The spread may still be moving a copy toward p4 (a page briefly holds 3): the share is the
  // copies counted in the same answer, ÷ 4 (32 ÷ 4 when none is on its way).
  const status = await g.peer('p2').admin.status();
  const p4 = status.fills?.find((f) => f.id === 'p4');
  const counted = (status.fills ?? []).reduce((n, f) => n + f.copies, 0);
  t.match(p4, { capacity: 1, shareCopies: counted / 4 }, `status: p4's copies (${p4?.copies}) against its share (${counted} copies ÷ 4)`);
  t.ok(counted === 32 || counted === 33, `32 copies, or one more on its way (${counted})`);
  t.equal(status.fills?.length, 4, 'status: every member\'s fill');
  const top = await g.peer('p3').admin.top(4);
  t.equal(top.fills?.length, 4, 'top: every member\'s fill');
  t.match(topText(top, (rows) => rows.map((r) => r.join(' | ')).join('\n')), /COPIES\/SHARE FILL\n[\s\S]*^p4 \| .* \| \d+\/8 \d+%$/m, 'top shows p4\'s copies of its share of 8');
  t.match(top.spreadRound, /within its share|off (its share|their shares)|waiting/, `top: the spread's last round (${top.spreadRound})`);
  const res = await fetch(`${g.http('p1')}/api/status`, { headers: { authorization: 'Bearer admin-token' } });
  const state = (await res.json()) as { peers: { id: string; fill?: { copies: number; shareCopies: number } }[] };
  const fills = state.peers.map((p) => p.fill?.copies ?? 0).reduce((a, b) => a + b, 0);
  t.match(state.peers.find((p) => p.id === 'p4')?.fill, { shareCopies: fills / 4 }, `the console's peer table gets each peer's fill (share ${fills} ÷ 4)`);
});
