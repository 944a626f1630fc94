// Snapshots of a volume spread over three peers (in-process group): the causal-cut checker
// (issue 5, acceptance 1, barrier mode), the snapshot as a read-only target through two
// portals (acceptance 4, without clone/restore), and a snapshot taken in the middle of a page
// move (acceptance 5).
//
// The checker: chains of writes, each write issued only after the previous one of its chain
// was acknowledged (so each happens-before the next), through the routers of different peers
// onto pages owned by different peers, with random delays in forwarding. A consistent cut
// holds, for each chain, a prefix: if it contains write n, it contains every earlier write of
// the chain (each slot holds its newest write numbered <= the largest found). And every write
// acknowledged before the snapshot command began must be in it. The slow network comes from
// the group's NetworkFaults. The same checker run against the negative controls of
// test/sim/controls/snapshots.ts (NoBarrierSnapshots: peers freeze one after another, nothing
// held; NoFinishSnapshots: timestamp layers without FINISH) must find violations, which shows
// it can.

import t from 'tap';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BlockBackend } from '../src/store/types';
import { startGroup } from './helpers/group';
import { hasTool, qemuImg, qemuIo } from './helpers/processes';
import { NoBarrierSnapshots, NoFinishSnapshots } from './sim/controls/snapshots';

const pageBlocks = 8192;
const slotBlocks = 8; // 4 KiB
const slotsPerPage = 16;
const bs = 512;
type Group = Awaited<ReturnType<typeof startGroup>>;

function slotLba(page: number, slot: number): number {
  return page * pageBlocks + slot * slotBlocks;
}

function stamp(chain: number, seq: number): Buffer {
  const b = Buffer.alloc(slotBlocks * bs);
  for (let at = 0; at < b.length; at += 8) {
    b.writeUInt32BE(chain, at);
    b.writeUInt32BE(seq, at + 4);
  }
  return b;
}

/** Where a chain writes: one page of one volume, through one peer's router. */
interface Lane {
  volume: string;
  page: number;
  router: BlockBackend;
}

interface Write {
  seq: number;
  lane: number;
  slot: number;
}

/** One chain: writes numbered 1, 2, …, each after the previous one's acknowledgement, lane after lane. */
class Chain {
  readonly writes: Write[] = [];
  acked = 0;
  private stopping = false;
  private loop: Promise<void> | undefined;

  constructor(readonly id: number, readonly lanes: Lane[]) {}

  start(): void {
    this.loop = (async () => {
      for (let seq = 1; !this.stopping && seq < 1_000_000; seq++) {
        const w = { seq, lane: seq % this.lanes.length, slot: Math.floor(Math.random() * slotsPerPage) };
        this.writes.push(w);
        const lane = this.lanes[w.lane];
        await lane.router.write(slotLba(lane.page, w.slot), stamp(this.id, seq));
        this.acked = seq;
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.loop;
  }

  /** What a consistent cut holding writes 1..n of this chain has in each slot ("lane/slot" → seq). */
  expectedUpTo(n: number): Map<string, number> {
    const m = new Map<string, number>();
    for (const w of this.writes) if (w.seq <= n) m.set(`${w.lane}/${w.slot}`, w.seq);
    return m;
  }
}

type Reader = (volume: string, lba: number, blocks: number) => Promise<Buffer>;

/** Read the chain's slots from a snapshot (of each of its volumes) and judge the cut: undefined if consistent, else why. */
async function judge(read: Reader, chain: Chain, ackedBefore: number): Promise<string | undefined> {
  const found = new Map<string, number>();
  for (const [k, lane] of chain.lanes.entries()) {
    const data = await read(lane.volume, slotLba(lane.page, 0), slotsPerPage * slotBlocks);
    for (let slot = 0; slot < slotsPerPage; slot++) {
      const at = slot * slotBlocks * bs;
      const c = data.readUInt32BE(at);
      const seq = data.readUInt32BE(at + 4);
      if (seq !== 0 && c !== chain.id) return `slot ${lane.volume}:${lane.page}/${slot} holds chain ${c}'s data`;
      if (seq !== 0) found.set(`${k}/${slot}`, seq);
    }
  }
  const newest = Math.max(0, ...found.values());
  if (newest < ackedBefore) return `write ${ackedBefore} was acknowledged before the snapshot began, but the newest write in it is ${newest}`;
  for (const [slot, seq] of chain.expectedUpTo(newest)) {
    if ((found.get(slot) ?? 0) !== seq) return `holds write ${newest} of chain ${chain.id} but slot ${slot} has write ${found.get(slot) ?? 0}, not ${seq}`;
  }
  return undefined;
}

/** The path host commands take on each peer (the snapshot gate over the router), as an initiator's would. */
async function routersOf(g: Group, volume: string): Promise<BlockBackend[]> {
  for (let i = 0; i < 100; i++) {
    const rs = ['p1', 'p2', 'p3'].map((id) => g.peer(id).core.targets.hostPathFor(volume));
    if (rs.every((r) => r)) return rs as BlockBackend[];
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error('volume not open everywhere');
}

/**
 * Take `rounds` snapshots (of one volume, or of several as a consistency group) while three
 * chains write; return the inconsistent cuts found. Chain c writes pages 3c, 3c+1, 3c+2
 * (owned by p1, p2, p3) of each volume in turn, each lane through a different peer's router.
 */
async function checkerRun(t: { ok(v: unknown, m: string): void }, g: Group, volumes: string[], rounds: number, mode: 'barrier' | 'timestamp' = 'barrier'): Promise<{ violations: string[]; held: number[]; tookMs: number[] }> {
  const routers = new Map<string, BlockBackend[]>();
  for (const v of volumes) routers.set(v, await routersOf(g, v));
  const chains = [0, 1, 2].map((c) => new Chain(c + 1, volumes.flatMap((v, vi) => [0, 1, 2].map((k) => ({ volume: v, page: 3 * c + k, router: routers.get(v)![(c + k + vi) % 3] })))));
  for (const c of chains) c.start();
  const violations: string[] = [];
  const held: number[] = [];
  const tookMs: number[] = [];
  try {
    for (let i = 0; i < rounds; i++) {
      await new Promise((r) => setTimeout(r, 5 + Math.random() * 20));
      const ackedBefore = chains.map((c) => c.acked);
      const coordinator = g.peer(['p1', 'p2', 'p3'][i % 3]);
      const made = await coordinator.admin.createSnapshots(volumes, { name: `s${i}`, mode, group: volumes.length > 1 ? 'g' : undefined });
      held.push(made[0].heldMs);
      tookMs.push(made[0].tookMs);
      const readers = new Map<string, { read(lba: number, blocks: number): Promise<Buffer> }>();
      for (const v of volumes) readers.set(v, await readerOf(g, 'p2', v, `s${i}`));
      for (const [k, c] of chains.entries()) {
        const why = await judge((v, lba, blocks) => readers.get(v)!.read(lba, blocks), c, ackedBefore[k]);
        if (why) violations.push(`snapshot s${i}: ${why}`);
      }
      for (const v of volumes) await coordinator.admin.deleteSnapshot(v, `s${i}`);
    }
  } finally {
    for (const c of chains) await c.stop();
  }
  t.ok(chains.every((c) => c.acked > rounds), `chains kept writing (${chains.map((c) => c.acked).join('/')} writes)`);
  return { violations, held, tookMs };
}

async function readerOf(g: Group, peer: string, volume: string, name: string) {
  for (let i = 0; i < 200; i++) {
    const r = g.peer(peer).core.snapshotTargets.reader(volume, name);
    if (r) return r;
    await new Promise((res) => setTimeout(res, 10));
  }
  throw new Error(`snapshot ${name} not visible on ${peer}`);
}

t.test('barrier snapshots are consistent cuts (one volume, and a group of two); a freeze without the barrier is caught by the same checker', async (t) => {
  const g = await startGroup(t, 3, { network: { forwardDelayMs: 4, prepareJitterMs: 0 } });
  // A fresh volume for each run: the checker assumes slots start empty.
  for (const name of ['vol', 'vol2', 'vol3']) await g.peer('p1').admin.createVolume({ name, size: '48M' });

  const one = await checkerRun(t, g, ['vol'], 50);
  t.same(one.violations, [], 'no inconsistent cut in 50 barrier snapshots of one volume');
  t.match(await g.peer('p2').metrics.text(), /peersan_snapshot_held_seconds_total\{volume="vol",peer="p2"\} [0-9.]*[1-9]/, '/metrics: time held');
  const sorted = [...one.held].sort((a, b) => a - b);
  t.comment(`hosts held per snapshot: median ${sorted[25]} ms, max ${sorted[49]} ms`);
  const group = await checkerRun(t, g, ['vol2', 'vol3'], 50);
  t.same(group.violations, [], 'no inconsistent cut in 50 barrier snapshots of a group of two volumes (chains cross both)');

  // The same network, peers whose coordinator skips the barrier.
  const nb = await startGroup(t, 3, { network: { forwardDelayMs: 4, prepareJitterMs: 0 }, protocols: { snapshots: NoBarrierSnapshots } });
  await nb.peer('p1').admin.createVolume({ name: 'vol', size: '48M' });
  const loose = await checkerRun(t, nb, ['vol'], 50);
  const bad = new Set(loose.violations.map((v) => v.split(':')[0])).size;
  t.ok(bad > 0, `the checker finds inconsistent cuts without the barrier (${bad} of 50 snapshots; e.g. ${loose.violations[0]})`);
});

t.test('timestamp snapshots are consistent cuts (one volume, and a group of two) and hold no host I/O', async (t) => {
  // Forwarded writes arrive late at their owners: after the freeze, with stamps before the cut.
  const network = { forwardDelayMs: 4, prepareJitterMs: 0 };
  const g = await startGroup(t, 3, { network });
  for (const name of ['vol', 'vol2', 'vol3']) await g.peer('p1').admin.createVolume({ name, size: '48M' });
  const heldBefore = await heldSeconds(g);

  const one = await checkerRun(t, g, ['vol'], 50, 'timestamp');
  t.same(one.violations, [], 'no inconsistent cut in 50 timestamp snapshots of one volume');
  t.same([...new Set(one.held)], [0], 'no snapshot held host I/O');
  const sorted = [...one.tookMs].sort((a, b) => a - b);
  t.comment(`timestamp snapshot creation: median ${sorted[25]} ms, max ${sorted[49]} ms`);
  // PREPARE now reaches the peers up to 20 ms apart, so they freeze at different times: the cut must not depend on when each froze.
  network.prepareJitterMs = 20;
  const group = await checkerRun(t, g, ['vol2', 'vol3'], 50, 'timestamp');
  t.same(group.violations, [], 'no inconsistent cut in 50 timestamp snapshots of a group of two volumes (chains cross both), peers freezing up to 20 ms apart');
  t.equal(await heldSeconds(g), heldBefore, 'the gates never closed (held seconds unchanged in /metrics)');
  const late = ['p1', 'p2', 'p3'].reduce((n, id) => n + g.peer(id).core.snapshots.lateChangesApplied, 0);
  t.ok(late > 0, `writes stamped before the cut that reached their owner after it froze went into the snapshots (${late})`);

  // Without FINISH each snapshot is each peer's own freeze, up to 20 ms apart: the checker must see it.
  const nf = await startGroup(t, 3, { network: { forwardDelayMs: 4, prepareJitterMs: 20 }, protocols: { snapshots: NoFinishSnapshots } });
  await nf.peer('p1').admin.createVolume({ name: 'vol', size: '48M' });
  const loose = await checkerRun(t, nf, ['vol'], 50, 'timestamp');
  const bad = new Set(loose.violations.map((v) => v.split(':')[0])).size;
  t.ok(bad > 0, `the checker finds inconsistent cuts when the late writes are left out (${bad} of 50 snapshots; e.g. ${loose.violations[0]})`);
});

async function heldSeconds(g: Group): Promise<number> {
  let total = 0;
  for (const id of ['p1', 'p2', 'p3']) {
    for (const m of (await g.peer(id).metrics.text()).matchAll(/^peersan_snapshot_held_seconds_total\{[^}]*\} ([0-9.e+-]+)$/gm)) total += Number(m[1]);
  }
  return total;
}

const tools = hasTool('qemu-img') && hasTool('qemu-io');

t.test('a snapshot is a read-only target on every portal; it survives a page move', { skip: tools ? false : 'qemu-img/qemu-io not installed' }, async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 4 } });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '24M' });
  const file = join(g.dir, 'before.img');
  const before = randomBytes(24 * 1024 * 1024);
  writeFileSync(file, before);
  await qemuImg(['convert', '-n', '-f', 'raw', '-O', 'raw', file, g.url('p1', 'vol')]);

  // Page 0 (p1's) starts moving to p3 slowly; the snapshot is taken while it is in transit.
  const info = await g.peer('p2').admin.movePage('vol', 0, 'p3');
  for (let i = 0; i < 200 && (g.peer('p1').core.migrator.list()[0]?.done ?? 0) < 3; i++) await new Promise((r) => setTimeout(r, 25));
  const [snap] = await g.peer('p2').admin.createSnapshots(['vol'], { name: 'before' });
  t.equal(snap.targetName, 'iqn.2026-11.io.peersan:vol.before');
  // And one in timestamp mode, the move still running.
  const [ts] = await g.peer('p3').admin.createSnapshots(['vol'], { name: 'ts', mode: 'timestamp' });
  t.equal(ts.heldMs, 0, 'the timestamp snapshot held no host I/O');
  t.ok(g.peer('p1').core.migrator.list().length === 1, 'the move was still running at both cuts');

  // Hosts change the volume afterwards, the move commits.
  t.ok((await qemuIo(g.url('p3', 'vol'), 'write -P 0x55 0 8M')).ok, 'overwrite the first 8 MiB after the snapshot');
  await g.peer('p1').core.migrator.wait(info.volumeId, 0);
  t.equal((await g.peer('p1').admin.pageMap('vol')).pages[0].owner, 'p3', 'the move committed');

  const snapUrl = (via: string, name = 'before'): string => g.url(via, 'vol').replace(':vol/0', `:vol.${name}/0`);
  for (const via of ['p2', 'p3']) {
    t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, snapUrl(via)]), /Images are identical/, `the snapshot through ${via} equals the data at the cut`);
    t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, snapUrl(via, 'ts')]), /Images are identical/, `the timestamp snapshot through ${via} too`);
  }
  // Every peer's part of the snapshot survives its restart.
  for (const id of ['p1', 'p3']) {
    await g.peer(id).stop();
    await g.start(id);
  }
  t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, snapUrl('p3')]), /Images are identical/, 'after p1 and p3 restart, still identical through p3');
  t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, snapUrl('p3', 'ts')]), /Images are identical/, 'the timestamp snapshot too');
  const write = await qemuIo(snapUrl('p1'), 'write -P 1 0 4k');
  t.notOk(write.ok, `the snapshot target refuses writes: ${write.out.trim().split('\n')[0]}`);
  t.notOk(/Images are identical/.test(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, g.url('p1', 'vol')]).catch((e: Error) => e.message)), 'while the volume itself has changed');

  const listed = await g.peer('p3').admin.listSnapshots('vol');
  t.match(listed, [{ name: 'before', state: 'ready', mode: 'barrier' }, { name: 'ts', state: 'ready', mode: 'timestamp' }]);
  await g.peer('p1').admin.deleteSnapshot('vol', 'ts');
  await g.peer('p1').admin.deleteSnapshot('vol', 'before');
  for (let i = 0; i < 100 && g.peer('p2').core.targets.find(snap.targetName); i++) await new Promise((r) => setTimeout(r, 20));
  t.equal(g.peer('p2').core.targets.find(snap.targetName), undefined, 'deleted: the target is gone');
});

t.test('restore, clone and schedules', { skip: tools ? false : 'qemu-img/qemu-io not installed' }, async (t) => {
  const g = await startGroup(t, 3);
  await g.peer('p1').admin.createVolume({ name: 'db', size: '24M' });
  const first = join(g.dir, 'first.img');
  writeFileSync(first, randomBytes(24 * 1024 * 1024));
  await qemuImg(['convert', '-n', '-f', 'raw', '-O', 'raw', first, g.url('p1', 'db')]);
  await g.peer('p2').admin.createSnapshots(['db'], { name: 'first' });
  t.ok((await qemuIo(g.url('p2', 'db'), 'write -P 0x77 4M 12M')).ok, 'the volume changes after the snapshot');

  const clone = await g.peer('p3').admin.cloneSnapshot('db', 'first', 'db-copy');
  t.equal(clone.sizeBytes, 24 * 1024 * 1024);
  t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', first, g.url('p1', 'db-copy')]), /Images are identical/, 'the clone holds the snapshot\'s data');
  t.ok((await qemuIo(g.url('p1', 'db-copy'), 'write -P 0x11 0 1M')).ok, 'the clone is writable');
  t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', first, g.url('p2', 'db').replace(':db/0', ':db.first/0')]), /Images are identical/, 'writing the clone leaves the snapshot as it was');
  t.ok((await qemuIo(g.url('p3', 'db'), 'read -P 0x77 4M 12M')).ok, 'and the origin volume as it was');

  await t.rejects(g.peer('p1').admin.restoreSnapshot('db', 'nope', false), /no snapshot named nope/);
  const restored = await g.peer('p1').admin.restoreSnapshot('db', 'first', false);
  t.ok(restored.copiedBytes >= 24 * 1024 * 1024 - 64 * 1024, `restored (${restored.copiedBytes} bytes copied)`);
  t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', first, g.url('p3', 'db')]), /Images are identical/, 'the volume is back at the snapshot');

  await g.peer('p2').admin.scheduleSnapshots('db', '1s', 2);
  await new Promise((r) => setTimeout(r, 4_500));
  await g.peer('p2').admin.scheduleSnapshots('db', 'off', 0);
  // A run claimed just before the schedule was removed still finishes: it takes its snapshot,
  // then deletes the oldest beyond `keep`. Between the two the list holds keep + 1, so read
  // the list once it has stopped changing.
  const names = async (): Promise<string> => (await g.peer('p3').admin.listSnapshots('db')).map((s) => s.name).join(', ');
  let settled = await names();
  for (let i = 0; i < 20; i++) {
    await new Promise((r) => setTimeout(r, 1_000));
    const now = await names();
    if (now === settled) break;
    settled = now;
  }
  const autos = settled.split(', ').filter((n) => n.startsWith('auto-'));
  t.equal(autos.length, 2, `the schedule kept the newest 2 (${settled})`);
  await new Promise((r) => setTimeout(r, 2_000));
  t.equal(await names(), settled, 'no more after the schedule is removed');
});
