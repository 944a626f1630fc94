// The load monitor: EWMA meters on a hand-driven clock, page attribution and bounded memory,
// the metering decorators, summaries and the group view (merge, staleness, bad input), the
// group switch in the catalog, and an in-process 3-peer group where I/O through one portal
// shows up in `top` on another peer through gossip.

import t from 'tap';
import { ManualClock } from '../src/env/manual';
import { LoadMeter, loadOf, sumStats, zeroStats } from '../src/loadmon/ewma';
import { MeteredBackend, MeteredLogicalUnit } from '../src/loadmon/metered';
import { LoadMonitor, type LoadSummary } from '../src/loadmon/monitor';
import { BalancerSwitch } from '../src/loadmon/switches';
import { cleanSummary, GroupView } from '../src/loadmon/view';
import type { LogicalUnit, Nexus, ScsiCommand } from '../src/scsi/types';
import { planText, topText } from '../src/cli/load';
import { AdminClient } from '../src/server/admin';
import { parseConfig } from '../src/server/config';
import { MemoryBackend } from './helpers/memory-backend';
import { startGroup } from './helpers/group';
import { hasTool, qemuImg, qemuIo } from './helpers/processes';
import { tempMetaStore } from './helpers/temp-meta';

const close = (a: number, b: number, tolerance: number): boolean => Math.abs(a - b) <= tolerance;

t.test('meter: rates, latency and queue over 1 s / 10 s / 60 s on a hand-driven clock', async (t) => {
  let now = 0;
  const m = new LoadMeter(now);
  // 100 ops/s of 4 KiB for 60 s, each taking 20 ms (so two are always in flight), folded each second.
  for (let ms = 0; ms < 60_000; ms += 10) {
    now = ms;
    m.begin(now);
    if (ms >= 20) m.end(ms - 20, now, 4096);
    if (ms % 1000 === 990) m.fold(ms + 10);
  }
  t.ok(close(m.iops[0], 100, 0.5), `1 s: ${m.iops[0].toFixed(2)} ops/s`);
  t.ok(close(m.iops[1], 100 * (1 - Math.exp(-6)), 0.5), `10 s: ${m.iops[1].toFixed(2)}`);
  t.ok(close(m.iops[2], 100 * (1 - Math.exp(-1)), 0.5), `60 s: ${m.iops[2].toFixed(2)} (63% of the way after one window)`);
  t.ok(close(m.bytesPerSec[0], 409_600, 2_000), `bytes/s ${m.bytesPerSec[0].toFixed(0)}`);
  t.ok(close(m.latencyMs[0], 20, 1e-9) && close(m.latencyMs[2], 20, 1e-9), 'latency 20 ms in every window (seeded by the first sample)');
  t.ok(close(m.outstandingAvg[0], 2, 0.05), `time-averaged queue ${m.outstandingAvg[0].toFixed(3)}`);
  t.equal(m.outstanding, 2);
  t.ok(close(m.load(), m.iops[1] + m.bytesPerSec[1] / 65536, 1e-9), 'load = iops + bytes/s ÷ 64 KiB (10 s)');

  // Silence: the 1 s average falls to 1/e per second, the 60 s one barely moves, latency stays.
  const [i0, i2] = [m.iops[0], m.iops[2]];
  m.fold(61_000);
  t.ok(close(m.iops[0], i0 * Math.exp(-1), 0.01), '1 s window decays by e per second');
  t.ok(close(m.iops[2], i2 * Math.exp(-1 / 60), 0.01), '60 s window decays slowly');
  t.equal(m.latencyMs[0], 20, 'no completions: latency unchanged');
});

t.test('meter: folding every 250 ms or every 1 s gives the same averages for a steady rate', async (t) => {
  const a = new LoadMeter(0);
  const b = new LoadMeter(0);
  for (let ms = 0; ms < 30_000; ms += 5) {
    for (const m of [a, b]) m.end(ms, ms, 512);
    if ((ms + 5) % 250 === 0) a.fold(ms + 5);
    if ((ms + 5) % 1000 === 0) b.fold(ms + 5);
  }
  for (let w = 0; w < 3; w++) t.ok(close(a.iops[w], b.iops[w], 1e-6 * b.iops[w] + 1e-9), `window ${w}: ${a.iops[w].toFixed(4)} = ${b.iops[w].toFixed(4)}`);
});

t.test('stats: sums add rates and weigh latency by operations', async (t) => {
  const x = { ...zeroStats(), iops: [100, 100, 100], latencyMs: [1, 1, 1] };
  const y = { ...zeroStats(), iops: [300, 300, 300], latencyMs: [5, 5, 5], outstanding: 2 };
  const s = sumStats([x, y]);
  t.same(s.iops, [400, 400, 400]);
  t.same(s.latencyMs, [4, 4, 4]);
  t.equal(s.outstanding, 2);
  t.equal(loadOf({ ...zeroStats(), iops: [0, 10, 0], bytesPerSec: [0, 65536 * 5, 0] }), 15);
});

t.test('monitor: pages by blocks, bounded tables, idle entries dropped, hottest first', async (t) => {
  const clock = new ManualClock();
  const mon = new LoadMonitor({ self: 'p1', clock, pagesTrackedMax: 4, hottestPagesPerVolume: 2, entryIdleMs: 10_000 });
  const v = mon.volume('v1', 'vol', 8192);
  t.equal(mon.volume('v1', 'vol', 8192), v, 'one VolumeMeter per volume');
  // A 16-block request starting 4 blocks before the end of page 0: 4 blocks in page 0, 12 in page 1.
  v.end(8188, 16, v.begin(8188, 16), 8192);
  clock.set(1000);
  mon.tick();
  t.ok(close(v.pages.get(0)!.iops[0], 0.25 * (1 - Math.exp(-1)), 1e-9), 'page 0 gets a quarter of the operation');
  t.ok(close(v.pages.get(1)!.bytesPerSec[0], 6144 * (1 - Math.exp(-1)), 1e-6), 'page 1 gets three quarters of the bytes');
  t.ok(close(mon.owner.iops[0], 1 - Math.exp(-1), 1e-9), 'the peer total counts it once');

  for (let page = 2; page < 10; page++) for (let i = 0; i < page; i++) v.end(page * 8192, 8, v.begin(page * 8192, 8), 4096);
  t.equal(mon.pagesTrackedCount, 4, 'no more than pagesTrackedMax pages metered');
  t.ok(mon.pagesRefused > 0, 'refusals counted');
  clock.set(2000);
  mon.tick();
  const s = mon.summary({ sessions: 0, freeBytes: 1, totalBytes: 2, allocatedBytes: 0 });
  t.same(s.volumes[0].pages.map((p) => p.page), [3, 2], 'hottest two pages, hottest first');
  t.equal(s.volumes[0].pagesTracked, 4);
  t.ok(close(s.volumes[0].owner.iops[0], s.owner.iops[0], 1e-9), 'untracked pages still count in the volume and peer totals');
  t.ok(s.seq < mon.summary({ sessions: 0, freeBytes: 1, totalBytes: 2, allocatedBytes: 0 }).seq, 'seq increases');

  clock.set(12_000);
  mon.tick();
  t.equal(mon.pagesTrackedCount, 0, 'pages idle for entryIdleMs are dropped');
  v.end(0, 1, v.begin(0, 1), 512);
  t.equal(mon.pagesTrackedCount, 1, 'and metered again when they get I/O');
  mon.retainVolumes(new Set());
  t.equal(mon.pagesTrackedCount, 0, 'a deleted volume releases its pages');
});

t.test('metering decorators: backend per page, logical unit per session', async (t) => {
  const clock = new ManualClock();
  const mon = new LoadMonitor({ self: 'p1', clock, entryIdleMs: 5_000 });
  const inner = new MemoryBackend(512, 4 * 8192);
  const b = new MeteredBackend(inner, mon.volume('v1', 'vol', 8192));
  t.equal(b.blockCount, inner.blockCount);
  await b.write(8192, Buffer.alloc(4096, 1));
  t.same(await b.read(8192, 8), Buffer.alloc(4096, 1), 'data passes through');
  await b.unmap(2 * 8192, 8);
  const caw = await b.compareAndWrite(8192, Buffer.alloc(512, 1), Buffer.alloc(512, 2));
  t.same(caw, { ok: true });
  await b.flush();
  await t.rejects(b.read(4 * 8192, 1), /range/, 'errors pass through');
  clock.set(1000);
  mon.tick();
  const pages = mon.volume('v1', 'vol', 8192).pages;
  t.same([...pages.keys()].sort(), [1, 2, 4], 'pages 1 (write, read, caw), 2 (unmap), 4 (failed read)');
  t.ok(close(pages.get(1)!.iops[0], 3 * (1 - Math.exp(-1)), 1e-9));
  t.ok(close(pages.get(2)!.bytesPerSec[0], 0, 1e-9), 'unmap moves no bytes');
  t.equal(mon.owner.outstanding, 0, 'nothing left in flight');

  const nexus: Nexus = { initiatorPort: 'iqn.2026-11.test:h1,i,0x400001370000', initiatorName: 'iqn.2026-11.test:h1', targetPort: 'iqn.2026-11.io.peersan:vol,t,0x0001', relativeTargetPort: 1 };
  const lu: LogicalUnit = { lun: 0, execute: async (c) => ({ status: 0, dataIn: c.dataOut ? undefined : Buffer.alloc(4096) }), reset: () => undefined, nexusLost: () => undefined };
  const metered = new MeteredLogicalUnit(lu, mon);
  const cmd = (dataOut: Buffer | null): ScsiCommand => ({ cdb: Buffer.alloc(10), lun: 0, nexus, taskAttr: 1, expectedDataLength: 4096, dataOut });
  await metered.execute(cmd(null));
  await metered.execute(cmd(Buffer.alloc(8192)));
  clock.set(2000);
  mon.tick();
  const h = mon.summary({ sessions: 1, freeBytes: 0, totalBytes: 0, allocatedBytes: 0 }).hosts;
  t.equal(h.length, 1);
  t.match(h[0], { initiatorPort: nexus.initiatorPort, targetName: 'iqn.2026-11.io.peersan:vol', ended: false });
  t.ok(close(h[0].stats.bytesPerSec[0], 12_288 * (1 - Math.exp(-1)), 1e-6), 'read and write bytes of the session');
  metered.nexusLost(nexus);
  clock.set(3000);
  mon.tick();
  t.equal(mon.summary({ sessions: 0, freeBytes: 0, totalBytes: 0, allocatedBytes: 0 }).hosts[0].ended, true, 'an ended session stays listed for a while');
  clock.set(8000);
  mon.tick();
  t.equal(mon.hostsTrackedCount, 0, 'then goes once idle');
});

function summaryOf(peerId: string, seq: number, iops: number, pages: number[] = []): LoadSummary {
  const stats = { ...zeroStats(), iops: [iops, iops, iops], latencyMs: [1, 1, 1] };
  return {
    peerId, seq, owner: stats, received: zeroStats(), sessions: 1, freeBytes: 100, totalBytes: 200, allocatedBytes: 10,
    volumes: [{ volumeId: 'v1', volumeName: 'vol', owner: stats, pagesTracked: pages.length, pages: pages.map((p) => ({ page: p, stats })) }],
    hosts: [{ initiatorPort: `iqn.x:${peerId},i,0x1`, targetName: 'iqn.2026-11.io.peersan:vol', ended: false, stats }],
    recentMoves: [{ volumeId: 'v1', page: 7, to: 'p3', agoMs: 500, state: 'moving' }],
  };
}

t.test('group view: merge, order, staleness, late and foreign summaries, bounds', async (t) => {
  const v = new GroupView('p1', ['p1', 'p2', 'p3'], 3000);
  t.ok(v.put(summaryOf('p1', 1, 100, [0, 3]), 0));
  t.ok(v.put(summaryOf('p2', 5, 50, [1]), 0));
  t.notOk(v.put(summaryOf('p2', 4, 999), 100), 'an older summary that arrives late is ignored');
  t.notOk(v.put(summaryOf('p9', 1, 1), 100), 'a peer outside the group is ignored');
  const s = v.snapshot(1000);
  t.same(s.peers.map((p) => [p.id, p.stale]), [['p1', false], ['p2', false], ['p3', true]], 'never heard: stale');
  t.equal(s.peers[2].ageMs, -1);
  t.equal(s.volumes[0].owner.iops[0], 150, 'volume totals summed over peers');
  t.same(s.volumes[0].pages.map((p) => [p.page, p.peer]), [[0, 'p1'], [3, 'p1'], [1, 'p2']], 'hottest pages of every peer, hottest first');
  t.same(s.hosts.map((h) => h.peer), ['p1', 'p2']);
  t.same(v.snapshot(1000, 64, 2).volumes[0].pages.map((p) => p.page), [0, 3], 'at most pagesMax pages in all');
  t.match(s.recentMoves[0], { volumeId: 'v1', page: 7, to: 'p3', state: 'moving' });
  const later = v.snapshot(3500);
  t.same(later.peers.map((p) => p.stale), [true, true, true], 'not heard for 3 s: stale');
  t.equal(later.volumes.length, 0, 'stale peers leave the merged figures');
  t.ok(v.put(summaryOf('p2', 1, 10), 3600), 'a restarted peer (seq from 1) is accepted once the old one went stale');

  const bad = summaryOf('p3', 1, 1) as unknown as Record<string, unknown>;
  (bad.owner as Record<string, unknown>).iops = [NaN, -5, 'x', 7, 8];
  bad.hosts = Array.from({ length: 10_000 }, () => (summaryOf('p3', 1, 1).hosts[0]));
  (bad.volumes as { pages: unknown[] }[])[0].pages = Array.from({ length: 1000 }, (_, i) => ({ page: i, stats: {} }));
  const clean = cleanSummary(bad as unknown as LoadSummary);
  t.same(clean.owner.iops, [0, 0, 0], 'malformed numbers become 0, extra entries are cut');
  t.equal(clean.hosts.length, 256, 'hosts bounded');
  t.equal(clean.volumes[0].pages.length, 64, 'pages bounded');
  t.same(clean.volumes[0].pages[5].stats.latencyMs, [0, 0, 0], 'missing stats filled');
});

t.test('group switch lives in the catalog and every watcher sees it', async (t) => {
  const { meta } = await tempMetaStore(t, 'peersan-switch-');
  const a = await BalancerSwitch.open(meta);
  const b = await BalancerSwitch.open(meta);
  t.equal(a.auto, true, 'on by default');
  await a.setAuto(false);
  t.equal(b.auto, false, 'the other peer sees it off');
  await b.setAuto(true);
  t.equal(a.auto, true);
  a.close();
  b.close();
});

// ---- an in-process group --------------------------------------------------------------------

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const tools = hasTool('qemu-img') && hasTool('qemu-io');

t.test('three peers: I/O through p1 shows up in top on p2 through gossip; rebalance plans from any peer', { skip: tools ? false : 'qemu-img/qemu-io not installed' }, async (t) => {
  const g = await startGroup(t, 3);
  const admin = new AdminClient(g.config.peers[1].rpc, 'admin-token');
  t.teardown(() => admin.close());
  // Automatic balancing off for the group first, so no automatic round puts pages in cool-down
  // before the manual rebalance below; every peer sees the switch through the catalog.
  await admin.setAutoBalance('', false);
  await until('p3 to see the group switch off', async () => ((await g.peer('p3').admin.top(1)).balancer.auto === false ? true : undefined), 5_000);

  await g.peer('p1').admin.createVolume({ name: 'vol', size: '96M' });
  // Pages 0-5 (24 MiB): owners p1, p2, p3, p1, p2, p3. Everything enters through p1's portal.
  const w = await qemuIo(g.url('p1', 'vol'), 'write -P 0x3c 0 24M');
  t.ok(w.ok, `write: ${w.out.trim().split('\n')[0]}`);
  await qemuImg(['bench', '-c', '3000', '-d', '8', '-s', '4096', '-S', '8192', '-f', 'raw', g.url('p1', 'vol')]);

  const top = await until('p2 to see load from every owner', async () => {
    const v = await admin.top(64);
    return v.peers.every((p) => !p.stale && p.owner.iops[1] > 0 && p.freeBytes > 0) ? v : undefined;
  }, 20_000);
  t.equal(top.self, 'p2', 'asked p2');
  for (const p of top.peers) t.ok(p.owner.iops[1] > 0, `${p.id} served ${p.owner.iops[1].toFixed(1)} ops/s (10 s) as owner`);
  const p1 = top.peers.find((p) => p.id === 'p1')!;
  t.ok(p1.received.iops[1] > 0, `p1 received ${p1.received.iops[1].toFixed(1)} commands/s from the host`);
  t.ok(top.peers.filter((p) => p.id !== 'p1').every((p) => p.received.iops[1] === 0), 'the others received nothing from hosts');
  const vol = top.volumes.find((v) => v.volumeName === 'vol')!;
  t.ok(vol, 'the volume is listed');
  const hot = new Set(vol.pages.map((p) => p.page));
  t.ok([0, 1, 2, 3, 4, 5].every((p) => hot.has(p)), `hottest pages include the written ones (${[...hot].sort((a, b) => a - b).join(',')})`);
  t.ok(vol.pages.every((p) => p.page < 6), 'and no page that got no I/O');
  t.ok(vol.pages.every((p) => p.peer === ['p1', 'p2', 'p3'][p.page % 3]), 'each page reported by its owner');
  t.ok(top.hosts.some((h) => h.peer === 'p1' && h.targetName === 'iqn.2026-11.io.peersan:vol'), 'the host sessions on p1 are listed');

  // Skew: 4 KiB reads every 12 MiB hit pages 0, 3, 6, … 21, all p1's.
  await qemuImg(['bench', '-c', '20000', '-d', '8', '-s', '4096', '-S', String(12 * 1024 * 1024), '-f', 'raw', g.url('p2', 'vol')]);
  const plan = await until('a plan that moves pages off p1', async () => {
    const r = await admin.rebalance(true);
    return r.triggered && r.moves.length > 0 ? r : undefined;
  }, 10_000);
  const share = (id: string, k: 'before' | 'after'): number => plan.loads.find((l) => l.id === id)![k] / plan.loads.reduce((a, l) => a + l[k], 0);
  t.ok(plan.moves.every((m) => m.from === 'p1' && m.page % 3 === 0), `moves only p1's hot pages (${plan.moves.map((m) => `${m.page}→${m.to}`).join(' ')})`);
  t.ok(share('p1', 'after') < share('p1', 'before') - 0.2, `p1's predicted share ${share('p1', 'before').toFixed(2)} → ${share('p1', 'after').toFixed(2)}; variance ${plan.varianceBefore.toFixed(0)} → ${plan.varianceAfter.toFixed(0)}`);
  // Not a dry run, asked of p2: p2 has p1 (the owner) start the moves.
  const run = await admin.rebalance(false);
  t.ok(run.moves.length > 0);
  t.ok(run.moves.every((m) => m.started), `every owner started its moves (${run.moves.map((m) => m.error).filter(Boolean).join('; ')})`);
  const map = await until('the planned pages to reach their new owners', async () => {
    const m = await g.peer('p3').admin.pageMap('vol');
    return run.moves.every((mv) => m.pages[mv.page].owner === mv.to) ? m : undefined;
  }, 60_000);
  t.ok(map, `pages moved: ${run.moves.map((m) => `${m.page}→${m.to}`).join(' ')}`);
  const remembered = await until('p1 to list the moves', async () => (await g.peer('p1').admin.top(1)).recentMoves[0], 5_000);
  t.match(remembered, { from: 'p1' }, 'the moves are remembered (cool-down) on p1');

  await admin.setAutoBalance('vol', false);
  t.equal(g.peer('p3').core.catalog.require('vol').autoBalance, false, 'volume flag in the catalog, seen by p3');
  await t.rejects(admin.setAutoBalance('nope', true), /no volume named nope/);
});

t.test('CLI rendering of top and of a plan', async (t) => {
  const table = (rows: string[][]): string => rows.map((r) => r.join(' | ')).join('\n');
  const v = new GroupView('p1', ['p1', 'p2'], 3000);
  v.put(summaryOf('p1', 1, 120, [4]), 0);
  const snap = v.snapshot(500);
  const text = topText({
    ...snap, recentMoves: [{ volumeId: 'v1', volumeName: 'vol', page: 7, from: 'p1', to: 'p2', agoMs: 4000, state: 'failed' }],
    balancer: { enabled: true, auto: true, lastRound: 'balanced', movesInFlight: 0 },
  }, table);
  t.match(text, /group load as seen from p1 · balancer automatic · last round: balanced/);
  t.match(text, /^p1 \| up \| 120 \| 120\/120\/120 \|/m);
  t.match(text, /^p2 \| unheard \|/m);
  t.match(text, /^vol \| 4 \| p1 \| 120 \|/m, 'hottest page row');
  t.match(text, /^vol \| 7 \| p1 \| p2 \| failed \| 4s$/m, 'recent move by volume name');
  const plan = planText({
    dryRun: false, triggered: true, reason: 'busiest p1 is 200% above the mean (threshold 25%): 1 move(s)', meanLoad: 100,
    varianceBefore: 20000, varianceAfter: 5000, costBefore: 2, costAfter: 0.51, loads: [{ id: 'p1', before: 300, after: 200 }, { id: 'p2', before: 0, after: 100 }],
    moves: [{ volumeId: 'v1', volumeName: 'vol', page: 3, from: 'p1', to: 'p2', load: 100, started: false, error: 'page migration is not available yet' }],
  }, table);
  t.match(plan, /predicted variance of peer load 20000 → 5000 \(relative to mean² 2\.000 → 0\.500; cost 2\.000 → 0\.510\)/);
  t.match(plan, /^p1 \| 300 \| 100% \| 200 \| 67%$/m);
  t.match(plan, /^vol \| 3 \| p1 \| p2 \| 100 \| no: page migration is not available yet$/m);
});

t.test('cluster.yaml balancer section', async (t) => {
  const base = 'cluster: { name: c, adminToken: a, secret: s }\npeers: [{ id: p1, iscsi: "127.0.0.1:1", rpc: "127.0.0.1:2", http: "127.0.0.1:3", data: d }]\n';
  t.match(parseConfig(base).balancer, { enabled: true, threshold: 0.25 }, 'defaults');
  t.match(parseConfig(base + 'balancer: { enabled: false, cooldownMs: 60000 }\n').balancer, { enabled: false, cooldownMs: 60000 });
  t.throws(() => parseConfig(base + 'balancer: { threshold: -1 }\n', 'x.yaml'), /x\.yaml: balancer\.threshold must be a number from 0\.01/);
});
