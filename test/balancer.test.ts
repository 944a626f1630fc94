// The balancer without sockets: the greedy planner (examples and fast-check properties), the
// driver with a fake mover, and a simulated 3-peer group (hand-driven clock, real meters,
// gossip through GroupView, a mover that commits after a delay) that replays acceptance 3:
// a skewed load is evened out within 60 s and then nothing moves for 2 minutes.

import t from 'tap';
import fc from 'fast-check';
import pino from 'pino';
import { balancerDefaults, cost, plan, type BalancerConfig, type PlanInput, type PlanPage } from '../src/loadmon/balancer';
import { BalancerDriver, planInputFromView, type PageMover } from '../src/loadmon/balancer-driver';
import { parseBalancerConfig } from '../src/loadmon/config';
import { ManualClock } from '../src/env/manual';
import { simulatedBalancers } from './helpers/balancer-group';
import type { GroupLoadView } from '../src/loadmon/view';
import { balancerSettleMs } from '../src/limits';

const config: BalancerConfig = { ...balancerDefaults, maxMovesPerRound: 16, reserveFreeBytes: 0 };
const GiB = 1024 ** 3;

function skewed(hot: number, each: number): PlanInput {
  const pages: PlanPage[] = Array.from({ length: hot }, (_, i) => ({ volumeId: 'v1', volumeName: 'vol', page: i * 3, owner: 'p1', load: each, bytesMax: 4 << 20 }));
  return {
    nowMs: 1_000_000,
    peers: [{ id: 'p1', load: hot * each + 10, freeBytes: 10 * GiB }, { id: 'p2', load: 10, freeBytes: 10 * GiB }, { id: 'p3', load: 10, freeBytes: 10 * GiB }],
    pages,
  };
}

function apply(input: PlanInput, moves: { volumeId: string; page: number; from: string; to: string; load: number }[], atMs?: number): PlanInput {
  const peers = input.peers.map((p) => ({ ...p }));
  const pages = input.pages.map((p) => ({ ...p }));
  for (const m of moves) {
    const page = pages.find((p) => p.volumeId === m.volumeId && p.page === m.page)!;
    page.owner = m.to;
    if (atMs !== undefined) page.lastMovedAtMs = atMs;
    peers.find((p) => p.id === m.from)!.load -= m.load;
    peers.find((p) => p.id === m.to)!.load += m.load;
  }
  return { ...input, peers, pages };
}

t.test('planner: a skewed group is evened out and the busiest share drops markedly', async (t) => {
  const input = skewed(8, 100);
  const p = plan(input, config);
  t.ok(p.triggered);
  t.ok(p.moves.length >= 4, `${p.moves.length} moves`);
  t.ok(p.moves.every((m) => m.from === 'p1'), 'only the hot peer gives pages away');
  const share = (id: string, which: 'before' | 'after'): number => p.loads.find((l) => l.id === id)![which] / p.loads.reduce((a, l) => a + l[which], 0);
  t.ok(share('p1', 'before') > 0.9 && share('p1', 'after') < 0.45, `p1 share ${share('p1', 'before').toFixed(2)} → ${share('p1', 'after').toFixed(2)}`);
  t.ok(p.varianceAfter < p.varianceBefore / 10, `variance ${p.varianceBefore.toFixed(0)} → ${p.varianceAfter.toFixed(0)}`);
  t.ok(p.costAfter < p.costBefore);
  const ceiling = p.meanLoad * (1 + config.threshold);
  t.ok(p.loads.filter((l) => l.id !== 'p1').every((l) => l.after <= ceiling), 'no destination becomes a hot spot');
  t.same(plan(apply(input, p.moves), config).moves, [], 're-planning the result moves nothing');
});

t.test('planner: hysteresis, minimum load, cool-down, pinned volumes, capacity', async (t) => {
  const even = { nowMs: 0, peers: [{ id: 'a', load: 110, freeBytes: GiB }, { id: 'b', load: 95, freeBytes: GiB }, { id: 'c', load: 95, freeBytes: GiB }], pages: [{ volumeId: 'v', volumeName: 'v', page: 0, owner: 'a', load: 30, bytesMax: 1 }] };
  const p = plan(even, config);
  t.notOk(p.triggered, 'within the threshold: no round');
  t.match(p.reason, /^balanced/);
  t.match(plan(skewed(8, 1), config).reason, /below 20: nothing worth balancing/);

  const input = skewed(8, 100);
  const cooling = { ...input, pages: input.pages.map((pg) => ({ ...pg, lastMovedAtMs: input.nowMs - 1000 })) };
  const c = plan(cooling, config);
  t.equal(c.moves.length, 0, 'every page cooling down: no moves');
  t.match(c.reason, /no allowed move/);
  const expired = { ...input, pages: input.pages.map((pg) => ({ ...pg, lastMovedAtMs: input.nowMs - config.cooldownMs })) };
  t.ok(plan(expired, config).moves.length > 0, 'cool-down over: moves again');

  const pinned = { ...input, pages: input.pages.map((pg, i) => ({ ...pg, pinned: i % 2 === 0 })) };
  t.ok(plan(pinned, config).moves.every((m) => m.page % 6 !== 0), 'pinned pages never move');

  const full = { ...input, peers: input.peers.map((pe) => (pe.id === 'p2' ? { ...pe, freeBytes: 6 << 20 } : pe)) };
  const fp = plan(full, { ...config, reserveFreeBytes: 1 << 20 });
  t.equal(fp.moves.filter((m) => m.to === 'p2').length, 1, 'p2 has room for one page above its reserve');

  const single = { nowMs: 0, peers: [{ id: 'p1', load: 1000, freeBytes: GiB }, { id: 'p2', load: 0, freeBytes: GiB }, { id: 'p3', load: 0, freeBytes: GiB }], pages: [{ volumeId: 'v', volumeName: 'v', page: 0, owner: 'p1', load: 1000, bytesMax: 1 }] };
  t.same(plan(single, config).moves, [], 'one page carrying all the load is not shifted to another peer (same variance, a new hot spot)');

  const lumpy = { nowMs: 0, peers: [{ id: 'p1', load: 300, freeBytes: GiB }, { id: 'p2', load: 0, freeBytes: GiB }, { id: 'p3', load: 150, freeBytes: GiB }], pages: [{ volumeId: 'v', volumeName: 'v', page: 0, owner: 'p1', load: 200, bytesMax: 1 }] };
  t.same(plan(lumpy, config).moves, [], 'a move that would lower the variance but push its destination over the threshold is not made');
  t.equal(plan(lumpy, { ...config, threshold: 0.5 }).moves.length, 1, '... and is made when the destination stays under it');

  const limited = plan(skewed(8, 100), { ...config, maxMovesPerRound: 2 });
  t.equal(limited.moves.length, 2, 'maxMovesPerRound');
});

const arbInput = fc
  .record({
    peers: fc.integer({ min: 2, max: 6 }),
    pages: fc.array(fc.record({ owner: fc.nat(5), load: fc.double({ min: 0, max: 500, noNaN: true }), cooling: fc.boolean(), pinned: fc.boolean() }), { maxLength: 40 }),
    residual: fc.array(fc.double({ min: 0, max: 300, noNaN: true }), { minLength: 6, maxLength: 6 }),
    free: fc.array(fc.integer({ min: 0, max: 40 }), { minLength: 6, maxLength: 6 }),
  })
  .map(({ peers, pages, residual, free }): PlanInput => {
    const ids = Array.from({ length: peers }, (_, i) => `p${i + 1}`);
    const planPages: PlanPage[] = pages.map((pg, i) => ({
      volumeId: 'v', volumeName: 'v', page: i, owner: ids[pg.owner % peers], load: pg.load, bytesMax: 4,
      lastMovedAtMs: pg.cooling ? 990 : undefined, pinned: pg.pinned,
    }));
    const load = (id: string): number => residual[ids.indexOf(id)] + planPages.filter((pg) => pg.owner === id).reduce((a, pg) => a + pg.load, 0);
    return { nowMs: 1000, peers: ids.map((id, i) => ({ id, load: load(id), freeBytes: free[i] })), pages: planPages };
  });

t.test('planner properties (fast-check)', async (t) => {
  fc.assert(
    fc.property(arbInput, (input) => {
      const p = plan(input, config);
      const before = input.peers.map((pe) => pe.load);
      const after = apply(input, p.moves).peers.map((pe) => pe.load);
      // Never increases the cost (computed independently of the planner's own figures).
      if (cost(after, p.moves.length, config) > cost(before, 0, config) + 1e-9) return false;
      // Never moves a page in cool-down or pinned, never the same page twice, at most the limit.
      const byPage = new Map(input.pages.map((pg) => [pg.page, pg]));
      if (p.moves.some((m) => byPage.get(m.page)!.lastMovedAtMs !== undefined || byPage.get(m.page)!.pinned)) return false;
      if (new Set(p.moves.map((m) => m.page)).size !== p.moves.length || p.moves.length > config.maxMovesPerRound) return false;
      // Capacity: every destination keeps its reserve.
      for (const pe of input.peers) if (pe.freeBytes - p.moves.filter((m) => m.to === pe.id).length * 4 < config.reserveFreeBytes) return false;
      return true;
    }),
    { numRuns: 500 },
  );
  t.pass('cost never rises; no cooling or pinned page moves; capacity kept');

  fc.assert(
    fc.property(arbInput, (input) => {
      const big = { ...config, maxMovesPerRound: 64 };
      const p = plan(input, big);
      // Applying the plan and re-planning on the same loads gives no moves, whether or not
      // the moved pages are marked as cooling down.
      return plan(apply(input, p.moves), big).moves.length === 0 && plan(apply(input, p.moves, input.nowMs), big).moves.length === 0;
    }),
    { numRuns: 500 },
  );
  t.pass('apply then re-plan: no moves');
});

t.test('config: defaults, overrides, one clear error', async (t) => {
  t.same(parseBalancerConfig(undefined, 'c'), balancerDefaults);
  t.same(parseBalancerConfig({ enabled: false, threshold: 0.5, intervalMs: 2000 }, 'c'), { ...balancerDefaults, enabled: false, threshold: 0.5, intervalMs: 2000 });
  t.throws(() => parseBalancerConfig({ threshold: 'x' }, 'c'), /balancer\.threshold must be a number/);
  t.throws(() => parseBalancerConfig({ tresh: 1 }, 'c'), /unknown key balancer\.tresh/);
  t.throws(() => parseBalancerConfig({ maxMovesPerRound: 1000 }, 'c'), /maxMovesPerRound must be a number from 1 to 64/);
  t.throws(() => parseBalancerConfig([], 'c'), /must be a mapping/);
});

// ---- the driver -----------------------------------------------------------------------------

class FakeMover implements PageMover {
  calls: { volumeName: string; page: number; to: string }[] = [];
  inFlight = 0;
  fail: string | undefined;
  movePage(volumeName: string, page: number, to: string): Promise<void> {
    this.calls.push({ volumeName, page, to });
    return this.fail ? Promise.reject(new Error(this.fail)) : Promise.resolve();
  }
  movesInFlight(): number {
    return this.inFlight;
  }
}

/** A group view with page loads as reported: p1 has `hot` pages of `each`, p2 has one warm page. */
function viewOf(hot: number, each: number): GroupLoadView {
  const stats = (load: number) => ({ iops: [load, load, load], bytesPerSec: [0, 0, 0], latencyMs: [1, 1, 1], outstandingAvg: [0, 0, 0], outstanding: 0 });
  const peer = (id: string, load: number) => ({ id, stale: false, ageMs: 100, owner: stats(load), received: stats(0), load, sessions: 0, freeBytes: 10 * GiB, totalBytes: 20 * GiB, allocatedBytes: 0 });
  return {
    self: 'p1',
    peers: [peer('p1', hot * each), peer('p2', 30), peer('p3', 0)],
    volumes: [{
      volumeId: 'v1', volumeName: 'vol', owner: stats(hot * each + 30), load: hot * each + 30,
      pages: [...Array.from({ length: hot }, (_, i) => ({ page: i * 3, peer: 'p1', stats: stats(each), load: each })), { page: 1, peer: 'p2', stats: stats(30), load: 30 }],
    }],
    hosts: [],
    recentMoves: [],
  };
}

function atMs(ms: number): ManualClock {
  const clock = new ManualClock();
  clock.set(ms);
  return clock;
}

function driverFor(self: string, view: () => GroupLoadView, opts: { mover: PageMover; config?: Partial<BalancerConfig>; auto?: () => boolean; clock?: ManualClock; owner?: Map<number, string>; autoBalance?: boolean; fresh?: boolean }) {
  const clock = opts.clock ?? atMs(1_000_000);
  const warnings: string[] = [];
  const log = pino({ level: 'warn' }, { write: (s: string) => warnings.push(s) });
  const driver = new BalancerDriver({
    self, config: () => ({ ...config, maxMovesPerRound: 3, ...opts.config }), mover: () => opts.mover, clock, view,
    ownerOf: (_v, page) => opts.owner?.get(page) ?? (page % 3 === 1 ? 'p2' : 'p1'),
    volume: () => ({ name: 'vol', pageBytes: 4 << 20, autoBalance: opts.autoBalance ?? true }),
    groupAuto: opts.auto ?? (() => true), log,
  });
  // The load began one settle time ago: the driver saw it then (a fresh driver waits, see below).
  if (!opts.fresh) {
    driver.plan(false);
    clock.set(clock.monotonicMs() + balancerSettleMs);
  }
  return { driver, clock, warnings };
}

t.test('driver: a load that has just begun is not trusted to stand out for the settle time', async (t) => {
  const mover = new FakeMover();
  const { driver, clock } = driverFor('p1', () => viewOf(8, 100), { mover, fresh: true });
  const first = await driver.round();
  t.same(first!.plan.moves, [], 'the first round that sees the load: nothing by load');
  t.match(driver.lastRound, /busiest p1 is \d+% above the mean.*loads settling after the load began 0 s ago/);
  clock.set(clock.monotonicMs() + balancerSettleMs - 1);
  await driver.round();
  t.equal(mover.calls.length, 0, 'nor just before the settle time');
  clock.set(clock.monotonicMs() + 1);
  await driver.round();
  t.equal(mover.calls.length, 3, 'then the pages move');
  // The load falls below minMeanLoad and rises again: it settles again.
  let load = 100;
  const again = driverFor('p1', () => viewOf(8, load), { mover: new FakeMover() });
  load = 0;
  await again.driver.round();
  load = 100;
  again.clock.set(again.clock.monotonicMs() + 1_000);
  t.same((await again.driver.round())!.plan.moves, [], 'a load that rose again settles again');
});

t.test('driver: starts only its own pages, at most maxMovesPerRound, never twice within the cool-down', async (t) => {
  const mover = new FakeMover();
  const { driver, clock } = driverFor('p1', () => viewOf(8, 100), { mover });
  const r = await driver.round();
  t.ok(r && r.plan.moves.length > 0);
  t.equal(mover.calls.length, 3, 'maxMovesPerRound = 3');
  t.ok(mover.calls.every((c) => c.page % 3 === 0 && c.to !== 'p1'), 'only pages p1 owns, to other peers');
  t.ok(r!.outcomes.every((o) => o.started));
  const first = mover.calls.map((c) => c.page);

  // The loads are 10 s averages: right after the moves they do not yet show them, so nothing moves by load.
  clock.set(clock.monotonicMs() + 5_000);
  const settling = await driver.round();
  t.same(settling!.plan.moves, [], 'a round 5 s after the moves: nothing by load');
  t.match(driver.lastRound, /busiest p1 is \d+% above the mean.*loads settling after a move 5 s ago/);
  t.ok(driver.plan(true).moves.length > 0, 'a manual rebalance does not wait');
  t.equal(mover.calls.length, 3);
  clock.set(clock.monotonicMs() + balancerSettleMs - 5_000);
  await driver.round();
  const second = mover.calls.slice(3).map((c) => c.page);
  t.ok(second.length > 0, `the round ${balancerSettleMs / 1000} s after the moves moves more pages`);
  t.notOk(second.some((p) => first.includes(p)), 'pages of the first round are cooling down');

  // The same plan seen by p2: p2 owns none of the pages to move, so it starts nothing.
  const m2 = new FakeMover();
  await driverFor('p2', () => viewOf(8, 100), { mover: m2 }).driver.round();
  t.equal(m2.calls.length, 0, 'p2 moves nothing of p1');

  // Moves asked of the wrong peer (manual rebalance) are refused with a reason.
  const refused = await driver.start([{ volumeId: 'v1', volumeName: 'vol', page: 1, from: 'p1', to: 'p3', load: 30 }]);
  t.match(refused[0], { started: false, error: /p1 does not own page 1 of vol \(p2 does\)/ });
  const again = await driver.start([{ volumeId: 'v1', volumeName: 'vol', page: first[0], from: 'p1', to: 'p3', load: 100 }]);
  t.match(again[0], { started: false, error: /cool-down/ });
});

t.test('driver: switches, moves in flight, and a missing migration engine logged once', async (t) => {
  const mover = new FakeMover();
  let auto = true;
  const off = driverFor('p1', () => viewOf(8, 100), { mover, config: { enabled: false } });
  t.equal(await off.driver.round(), undefined);
  t.match(off.driver.lastRound, /off in cluster\.yaml/);
  const group = driverFor('p1', () => viewOf(8, 100), { mover, auto: () => auto });
  auto = false;
  t.equal(await group.driver.round(), undefined);
  t.match(group.driver.lastRound, /off for the group/);
  const pinned = driverFor('p1', () => viewOf(8, 100), { mover, autoBalance: false });
  const pr = await pinned.driver.round();
  t.equal(pr!.plan.moves.length, 0, 'volume with autoBalance off: nothing planned automatically');
  t.ok(pinned.driver.plan(true).moves.length > 0, '... but a manual rebalance includes it');
  mover.inFlight = 1;
  auto = true;
  t.equal(await group.driver.round(), undefined, 'waits while its moves are in flight');
  t.equal(mover.calls.length, 0, 'nothing started by any of these');

  // A mover whose every move fails (say the destinations are unreachable).
  const failing: PageMover = {
    movePage: async () => {
      throw new Error('page migration is not available yet');
    },
    movesInFlight: () => 0,
  };
  const stub = driverFor('p1', () => viewOf(20, 100), { mover: failing });
  for (let i = 0; i < 4; i++) {
    const r = await stub.driver.round();
    if (i === 0) t.match(r!.outcomes[0], { started: false, error: 'page migration is not available yet' });
    stub.clock.set(stub.clock.monotonicMs() + 5_000);
  }
  t.equal(stub.warnings.filter((w) => w.includes('page migration is not available yet')).length, 1, 'logged once, not per round');
  t.ok(stub.driver.recentMoves().every((m) => m.state === 'failed'), 'failed attempts cool down too');
});

t.test('plan input: a moved page counts at its new owner while the meters catch up', async (t) => {
  const view = viewOf(2, 100);
  // Page 0 moved p1 → p3 three seconds ago: p1 still reports most of its load, p3 some.
  view.volumes[0].pages.push({ page: 0, peer: 'p3', stats: view.volumes[0].pages[0].stats, load: 25 });
  view.volumes[0].pages[0].load = 75;
  view.peers[0].load = 175;
  view.peers[2].load = 25;
  const input = planInputFromView(view, {
    nowMs: 10_000, cooldownMs: 120_000, manual: false, moves: [],
    ownerOf: (_v, page) => (page === 0 ? 'p3' : page === 1 ? 'p2' : 'p1'), volume: () => ({ name: 'vol', pageBytes: 1, autoBalance: true }),
  });
  const load = (id: string): number => input.peers.find((p) => p.id === id)!.load;
  t.equal(load('p3'), 100, 'p3 carries the whole page');
  t.equal(load('p1'), 100, 'p1 keeps only its other page');
  t.equal(input.pages.find((p) => p.page === 0)!.owner, 'p3');
  const inFlight = planInputFromView(viewOf(2, 100), {
    nowMs: 10_000, cooldownMs: 120_000, manual: false, moves: [{ volumeId: 'v1', page: 3, from: 'p1', to: 'p2', atMs: 9_000, state: 'moving' }],
    ownerOf: (_v, page) => (page === 1 ? 'p2' : 'p1'), volume: () => ({ name: 'vol', pageBytes: 1, autoBalance: true }),
  });
  t.match(inFlight.pages.find((p) => p.page === 3), { owner: 'p2', lastMovedAtMs: 9_000 }, 'a move in flight counts at its destination and cools down');
});

// ---- acceptance 3, simulated ---------------------------------------------------------------

t.test('simulated group: skewed load evened out within 60 s, then no moves for 2 minutes', async (t) => {
  const peers = ['p1', 'p2', 'p3'];
  const clock = new ManualClock();
  const owner = new Map<number, string>();
  const pageCount = 48;
  for (let page = 0; page < pageCount; page++) owner.set(page, peers[page % 3]);
  const hot = [0, 3, 6, 9, 12, 15, 18, 21]; // all owned by p1
  const { meters, moves, drivers, commitAndGossip } = simulatedBalancers({ peers, clock, owner, config: balancerDefaults, moveMs: 2_000 });
  const trueShare = (): number[] => {
    const load = new Map(peers.map((id) => [id, 0]));
    for (let page = 0; page < pageCount; page++) load.set(owner.get(page)!, load.get(owner.get(page)!)! + (hot.includes(page) ? 400 : 5));
    const total = [...load.values()].reduce((a, b) => a + b, 0);
    return peers.map((id) => load.get(id)! / total);
  };
  const plannedVariance: string[] = [];
  const before = trueShare();
  let p1ShareAt60 = 1;
  let movesAt60 = 0;
  // 180 s of steady load in 50 ms steps: hot pages 400 ops/s each, the rest 5 ops/s, 4 KiB.
  for (let step = 0; clock.monotonicMs() < 180_000; step++) {
    clock.set(step * 50);
    for (let page = 0; page < pageCount; page++) {
      const ops = hot.includes(page) ? 20 : step % 4 === 0 ? 1 : 0;
      const m = meters.get(owner.get(page)!)!;
      for (let i = 0; i < ops; i++) m.end(page * 8192, 8, m.begin(page * 8192, 8), 4096);
    }
    commitAndGossip();
    if (clock.monotonicMs() % 5000 === 0 && clock.monotonicMs() > 0) {
      for (const id of peers) {
        const r = await drivers.get(id)!.round();
        if (r && r.outcomes.some((o) => o.started)) plannedVariance.push(`${id}@${clock.monotonicMs() / 1000}s variance ${r.plan.varianceBefore.toFixed(0)} → ${r.plan.varianceAfter.toFixed(0)}`);
      }
    }
    if (clock.monotonicMs() === 60_000) {
      p1ShareAt60 = trueShare()[0];
      movesAt60 = moves.length;
    }
  }
  const after = trueShare();
  t.comment(`p1/p2/p3 share before ${before.map((s) => s.toFixed(2)).join('/')}, at 60 s p1 ${p1ShareAt60.toFixed(2)}, at 180 s ${after.map((s) => s.toFixed(2)).join('/')}`);
  t.comment(plannedVariance.join('; '));
  t.ok(before[0] > 0.9, 'p1 starts with nearly all the load');
  t.ok(p1ShareAt60 < 0.5, `within 60 s p1's share dropped markedly (${p1ShareAt60.toFixed(2)})`);
  t.ok(movesAt60 > 0 && moves.every((m) => m.atMs <= 60_000), `${movesAt60} moves, all within 60 s`);
  t.equal(moves.length, movesAt60, 'no further moves in the 2 minutes of steady load after that');
  t.equal(new Set(moves.map((m) => m.page)).size, moves.length, 'no page moved twice (no ping-pong)');
  t.ok(Math.max(...after) < 0.45, 'no peer became the new hot spot');
});
