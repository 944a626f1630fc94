// Pages follow their hosts (issue 19, acceptance 3), without sockets: the planner's forward term
// (examples and fast-check properties), the traffic matrix from the router's hook through the
// monitor's summary and the gossip view into the plan input, and a simulated 3-peer group
// (hand-driven clock, real meters, gossip through GroupView, a mover that commits after a delay)
// where three hosts write through three different peers.

import t from 'tap';
import fc from 'fast-check';
import { balancerDefaults, cost, plan, roleSwitchCostShare, type BalancerConfig, type PlanInput, type PlanPage } from '../src/loadmon/balancer';
import { planInputFromView } from '../src/loadmon/balancer-driver';
import { parseBalancerConfig } from '../src/loadmon/config';
import { LoadMonitor, type LoadSummary } from '../src/loadmon/monitor';
import { ManualClock } from '../src/env/manual';
import { simulatedBalancers } from './helpers/balancer-group';
import { cleanSummary, GroupView } from '../src/loadmon/view';
import { balancerSettleMs, loadForwardedPagesPerVolume } from '../src/limits';

const config: BalancerConfig = { ...balancerDefaults, maxMovesPerRound: 64, reserveFreeBytes: 0 };
const GiB = 1024 ** 3;
const peers = ['p1', 'p2', 'p3'];

/** 48 pages striped over p1..p3, 16 per host region; region r's host writes through peers[r]. Loads even. */
function striped(load = 10): PlanInput {
  const pages: PlanPage[] = Array.from({ length: 48 }, (_, i) => ({
    volumeId: 'v', volumeName: 'vol', page: i, owner: peers[i % 3], load, bytesMax: 4 << 20,
    arrivals: [{ peer: peers[Math.floor(i / 16)], load }],
  }));
  return { nowMs: 1_000_000, peers: peers.map((id) => ({ id, load: 16 * load, freeBytes: 10 * GiB })), pages };
}

function apply(input: PlanInput, moves: { page: number; from: string; to: string; load: number }[], atMs?: number): PlanInput {
  const peersOut = input.peers.map((p) => ({ ...p }));
  const pages = input.pages.map((p) => ({ ...p }));
  for (const m of moves) {
    const page = pages.find((p) => p.page === m.page)!;
    page.owner = m.to;
    if (atMs !== undefined) page.lastMovedAtMs = atMs;
    peersOut.find((p) => p.id === m.from)!.load -= m.load;
    peersOut.find((p) => p.id === m.to)!.load += m.load;
  }
  return { ...input, peers: peersOut, pages };
}

/** The share of the load that arrives elsewhere than at each page's owner. */
function forwardedShare(input: PlanInput): number {
  let fwd = 0;
  let total = 0;
  for (const p of input.pages) {
    const all = (p.arrivals ?? []).reduce((a, x) => a + x.load, 0);
    const here = (p.arrivals ?? []).filter((x) => x.peer === p.owner).reduce((a, x) => a + x.load, 0);
    total += p.load;
    if (all > 0) fwd += p.load * (1 - here / all);
  }
  return fwd / total;
}

const dominant = (p: PlanPage): string => [...(p.arrivals ?? [])].sort((a, b) => b.load - a.load)[0].peer;

t.test('planner: with even loads, forwarded pages move to the peer their I/O arrives through', async (t) => {
  let input = striped();
  t.ok(forwardedShare(input) > 0.6, `about two thirds forwarded at first (${forwardedShare(input).toFixed(2)})`);
  const first = plan(input, { ...config, maxMovesPerRound: 4 });
  t.ok(first.triggered && first.moves.length === 4, `loads even, yet follow moves are planned: ${first.reason}`);
  t.match(first.reason, /pages follow their hosts/);
  t.ok(first.costAfter < first.costBefore, 'the cost (forward term included) falls');
  let rounds = 0;
  for (let now = input.nowMs; rounds < 40; rounds++, now += 5_000) {
    input = { ...input, nowMs: now };
    const p = plan(input, { ...config, maxMovesPerRound: 4 });
    if (p.moves.length === 0) break;
    for (const m of p.moves) t.equal(m.to, dominant(input.pages.find((pg) => pg.page === m.page)!), `page ${m.page} goes where its host writes`);
    const ceiling = p.meanLoad * (1 + config.threshold);
    t.ok(p.loads.every((l) => l.after <= ceiling + 1e-9), 'no follow move makes a peer stand out');
    input = apply(input, p.moves, now);
  }
  t.ok(rounds < 40, `settles (${rounds} rounds)`);
  t.ok(forwardedShare(input) < 0.2, `forwarded share after ${rounds} rounds: ${forwardedShare(input).toFixed(2)}`);
  const later = { ...input, nowMs: input.nowMs + 10 * config.cooldownMs };
  t.same(plan(later, config).moves, [], 'nothing moves once the pages are with their hosts, cool-downs long over');
  t.same(plan(striped(), { ...config, wForward: 0 }).moves, [], 'wForward 0: by load only, as before');
});

t.test('planner: a page two hosts share (about 50/50) never goes back and forth', async (t) => {
  // Page 0 shared by hosts on p1 and p2 with noisy arrivals; the rest keep the loads even.
  const rng = fc.sample(fc.double({ min: 0.41, max: 0.59, noNaN: true }), { numRuns: 200, seed: 7 });
  let input: PlanInput = {
    nowMs: 0,
    peers: peers.map((id) => ({ id, load: 300, freeBytes: 10 * GiB })),
    pages: [{ volumeId: 'v', volumeName: 'vol', page: 0, owner: 'p1', load: 30, bytesMax: 1, arrivals: [] }],
  };
  // A forward weight high enough that the shares alone would decide: only the majority rule holds the page.
  const eager = { ...config, wForward: 10 };
  const moves: string[] = [];
  for (let round = 0; round < rng.length; round++) {
    const a = rng[round]; // p1's share, 41 % to 59 %
    input = { ...input, nowMs: round * config.cooldownMs, pages: [{ ...input.pages[0], arrivals: [{ peer: 'p1', load: 30 * a }, { peer: 'p2', load: 30 * (1 - a) }] }] };
    const p = plan(input, eager);
    for (const m of p.moves) moves.push(`${round}:${m.from}→${m.to}`);
    input = apply(input, p.moves, input.nowMs);
  }
  t.same(moves, [], 'no move in 200 rounds of 41–59 % shares, each past the cool-down');

  // The traffic really shifts to p2 (90 %): one move; then back to a noisy 50/50: it stays.
  input = { ...input, nowMs: 1e9, pages: [{ ...input.pages[0], owner: 'p1', arrivals: [{ peer: 'p1', load: 3 }, { peer: 'p2', load: 27 }] }] };
  const shifted = plan(input, eager);
  t.same(shifted.moves.map((m) => m.to), ['p2'], 'a clear majority at p2: the page follows');
  input = apply(input, shifted.moves, input.nowMs);
  let back = 0;
  for (let round = 1; round <= 100; round++) {
    const a = rng[round];
    input = { ...input, nowMs: 1e9 + round * config.cooldownMs, pages: [{ ...input.pages[0], arrivals: [{ peer: 'p1', load: 30 * a }, { peer: 'p2', load: 30 * (1 - a) }] }] };
    back += plan(input, eager).moves.length;
  }
  t.equal(back, 0, 'and does not go back while the shares hover around 50/50');
});

t.test('planner: cool-down, placeable peers, room, and a replicated page switches roles', async (t) => {
  const base = striped();
  const cooling = { ...base, pages: base.pages.map((p) => ({ ...p, lastMovedAtMs: base.nowMs - 1_000 })) };
  t.same(plan(cooling, config).moves, [], 'pages cooling down do not follow');
  const draining = { ...base, peers: base.peers.map((p) => (p.id === 'p2' ? { ...p, placeable: false } : p)) };
  t.ok(plan(draining, config).moves.every((m) => m.to !== 'p2'), 'a peer that is not up receives nothing');
  const full = { ...base, peers: base.peers.map((p) => (p.id === 'p3' ? { ...p, freeBytes: 0 } : p)) };
  t.ok(plan(full, { ...config, reserveFreeBytes: 1 }).moves.every((m) => m.to !== 'p3'), 'a full peer receives no page');

  // Replicated page 1 (owner p2) has an in-sync copy on p1, where its host writes: a role switch, no room needed.
  const replicated: PlanInput = {
    ...full,
    peers: full.peers.map((p) => ({ ...p, freeBytes: 0 })),
    pages: [{ ...base.pages[1], holders: { inSync: ['p1'], stale: [] } }, { ...base.pages[2], holders: { inSync: [], stale: ['p1'] } }],
  };
  const r = plan(replicated, { ...config, reserveFreeBytes: 1 });
  t.same(r.moves.map((m) => `${m.page}:${m.from}→${m.to}`), ['1:p2→p1'], 'the in-sync copy where the host writes becomes primary; a stale copy is never a destination');
});

t.test('planner: right after a move, a peer that stands out is not trusted (loads settling); pages still follow their hosts', async (t) => {
  // After follow moves: every page is with its host, but p1's figure is fresh and p2's is older, so p1 looks 2.5 times as busy.
  const home: PlanInput = {
    nowMs: 1_000_000,
    peers: [{ id: 'p1', load: 200, freeBytes: 10 * GiB }, { id: 'p2', load: 80, freeBytes: 10 * GiB }],
    pages: Array.from({ length: 16 }, (_, i) => ({ volumeId: 'v', volumeName: 'vol', page: i, owner: i < 8 ? 'p1' : 'p2', load: i < 8 ? 25 : 10, bytesMax: 4 << 20, arrivals: [{ peer: i < 8 ? 'p1' : 'p2', load: i < 8 ? 25 : 10 }] })),
  };
  const settled = plan({ ...home, settling: { agoMs: balancerSettleMs, after: 'a move' } }, config);
  t.ok(settled.moves.length > 0 && settled.moves.every((m) => m.from === 'p1' && m.to === 'p2'), `settled: the imbalance is believed, pages go from p1 to p2 though their host writes through p1 (${settled.reason})`);
  const settling = plan({ ...home, settling: { agoMs: balancerSettleMs - 1, after: 'a move' } }, config);
  t.same(settling.moves, [], 'within the settle time of a move: nothing moves by load');
  t.notOk(settling.triggered);
  t.match(settling.reason, /busiest p1 is 43% above the mean.*loads settling after a move 10 s ago/);
  t.same(plan(home, config).moves, settled.moves, 'no move known: as settled');
  // Page 3 still arrives through p2: it follows its host even while loads settle.
  const away = { ...home, settling: { agoMs: 2_000, after: 'the load began' }, pages: home.pages.map((p) => (p.page === 3 ? { ...p, arrivals: [{ peer: 'p2', load: 25 }] } : p)) };
  const follow = plan(away, config);
  t.same(follow.moves.map((m) => `${m.page}:${m.from}→${m.to}`), ['3:p1→p2'], `only the follow move (${follow.reason})`);
  t.match(follow.reason, /pages follow their hosts; loads settling after the load began 2 s ago/);
});

t.test('planner properties with arrivals (fast-check): cost never rises, destinations never stand out, re-plan moves nothing', async (t) => {
  const arb = fc
    .record({
      pages: fc.array(fc.record({ owner: fc.nat(2), load: fc.double({ min: 0, max: 100, noNaN: true }), arrivals: fc.array(fc.double({ min: 0, max: 100, noNaN: true }), { minLength: 3, maxLength: 3 }), cooling: fc.boolean(), copy: fc.nat(3) }), { maxLength: 30 }),
      residual: fc.array(fc.double({ min: 0, max: 200, noNaN: true }), { minLength: 3, maxLength: 3 }),
    })
    .map(({ pages, residual }): PlanInput => {
      const planPages: PlanPage[] = pages.map((pg, i) => ({
        volumeId: 'v', volumeName: 'v', page: i, owner: peers[pg.owner], load: pg.load, bytesMax: 1,
        arrivals: pg.arrivals.map((load, j) => ({ peer: peers[j], load })), lastMovedAtMs: pg.cooling ? 990 : undefined,
        ...(pg.copy < 3 && peers[pg.copy] !== peers[pg.owner] ? { holders: { inSync: [peers[pg.copy]], stale: [] } } : {}),
      }));
      const load = (id: string, i: number): number => residual[i] + planPages.filter((pg) => pg.owner === id).reduce((a, pg) => a + pg.load, 0);
      return { nowMs: 1000, peers: peers.map((id, i) => ({ id, load: load(id, i), freeBytes: GiB })), pages: planPages };
    });
  fc.assert(
    fc.property(arb, (input) => {
      const p = plan(input, config);
      const after = apply(input, p.moves);
      const fwd = (x: PlanInput): number => forwardedShare(x) * x.pages.reduce((a, pg) => a + pg.load, 0);
      // A role switch (to an in-sync copy) costs roleSwitchCostShare of a move, as the planner counts it.
      const moveCost = p.moves.reduce((a, m) => a + (input.pages[m.page].holders?.inSync.includes(m.to) ? roleSwitchCostShare : 1), 0);
      if (cost(after.peers.map((pe) => pe.load), moveCost, config, fwd(after)) > cost(input.peers.map((pe) => pe.load), 0, config, fwd(input)) + 1e-9) return false;
      const ceiling = p.meanLoad * (1 + config.threshold);
      if (p.moves.some((m) => after.peers.find((pe) => pe.id === m.to)!.load > ceiling + 1e-9)) return false;
      if (p.moves.some((m) => input.pages[m.page].lastMovedAtMs !== undefined)) return false;
      return plan(apply(input, p.moves, input.nowMs), config).moves.length === 0 && plan(after, config).moves.length === 0;
    }),
    { numRuns: 500 },
  );
  t.pass('cost (forward term included) never rises; no destination over the ceiling; no cooling page moves; re-planning the result moves nothing');
});

t.test('config: wForward from cluster.yaml', async (t) => {
  t.equal(parseBalancerConfig({ wForward: 2.5 }, 'c').wForward, 2.5);
  t.equal(parseBalancerConfig(undefined, 'c').wForward, balancerDefaults.wForward);
  t.throws(() => parseBalancerConfig({ wForward: -1 }, 'c'), /balancer.wForward must be a number/);
});

// ---- the traffic matrix: router hook → monitor → summary → view → plan input -----------------

t.test('traffic matrix: arrivals metered per page, carried bounded in the summary, summed by receiving peer', async (t) => {
  const clock = new ManualClock();
  const m1 = new LoadMonitor({ self: 'p1', clock });
  const m2 = new LoadMonitor({ self: 'p2', clock, arrivalPagesTrackedMax: 3 });
  const v1 = m1.volume('v', 'vol', 8192);
  const v2 = m2.volume('v', 'vol', 8192);
  for (let s = 1; s <= 20; s++) {
    clock.set(s * 500);
    for (let i = 0; i < 50; i++) {
      // Page 0 is p1's: 50 ops/s arrive at p1 (local) and 150 at p2 (forwarded to p1).
      v1.end(0, 8, v1.begin(0, 8), 4096);
      v1.arrived(0, 8, true, 4096);
      for (let k = 0; k < 3; k++) {
        v1.end(0, 8, v1.begin(0, 8), 4096);
        v2.arrived(0, 8, false, 4096);
      }
      // A run spanning pages 1 and 2 at p2 counts half for each.
      v2.arrived(8192 + 8188, 8, false, 4096);
    }
    for (let page = 3; page < 10; page++) v2.arrived(page * 8192, 8, false, 4096);
    m1.tick();
    m2.tick();
  }
  t.equal(m2.arrivalPagesTrackedCount, 3, 'bounded: at most arrivalPagesTrackedMax pages metered');
  const facts = { sessions: 1, freeBytes: GiB, totalBytes: GiB, allocatedBytes: 0 };
  const s1 = m1.summary(facts);
  const s2 = m2.summary(facts);
  const page0 = s1.volumes[0].pages.find((p) => p.page === 0)!;
  t.ok(page0.local! > 0, 'the owner reports the part of its page that arrived through its own portal');
  const fwd = s2.volumes[0].forwarded!;
  t.same(fwd.map((f) => f.page), [0, 1, 2], 'the forwarding peer reports its most forwarded pages, most first');
  t.ok(Math.abs(fwd[1].load - fwd[2].load) < 1e-9 && fwd[1].load < fwd[0].load, 'a run over two pages counts by its share of blocks');
  const ratio = fwd[0].load / page0.local!;
  t.ok(ratio > 2.7 && ratio < 3.3, `p2 forwards about 3× what arrives at p1 (${ratio.toFixed(2)})`);

  // Off the wire: malformed numbers are zeroed and the list is bounded.
  const hostile = { ...s2, volumes: [{ ...s2.volumes[0], forwarded: Array.from({ length: 1000 }, (_, i) => ({ page: i, load: i % 2 ? NaN : -5 })) }] } as LoadSummary;
  const clean = cleanSummary(hostile);
  t.equal(clean.volumes[0].forwarded!.length, loadForwardedPagesPerVolume, 'a hostile summary is cut to the bound');
  t.ok(clean.volumes[0].forwarded!.every((f) => f.load === 0), 'and its malformed loads count nothing');

  const view = new GroupView('p1', ['p1', 'p2', 'p3']);
  view.put(s1, clock.monotonicMs());
  view.put(s2, clock.monotonicMs());
  const snap = view.snapshot(clock.monotonicMs());
  t.same(snap.volumes[0].forwarded!.map((f) => f.page), [0], 'the view keeps arrivals of the pages it shows only');
  const input = planInputFromView(snap, {
    nowMs: clock.monotonicMs(), cooldownMs: 120_000, ownerOf: () => 'p1', volume: () => ({ name: 'vol', pageBytes: 4 << 20, autoBalance: true }), manual: false, moves: [],
  });
  const arrivals = input.pages.find((p) => p.page === 0)!.arrivals!;
  t.same(arrivals.map((a) => a.peer), ['p1', 'p2'], 'the plan input has the page\'s load by receiving peer');
  const share = arrivals[1].load / (arrivals[0].load + arrivals[1].load);
  t.ok(share > 0.7 && share < 0.8, `p2 receives about 75 % of page 0 (${share.toFixed(2)})`);
});

// ---- acceptance 3, simulated ---------------------------------------------------------------

t.test('simulated group: three hosts on three peers; forwarded share < 20 % within 2 minutes, then no moves for 2 minutes', async (t) => {
  const clock = new ManualClock();
  const owner = new Map<number, string>();
  const pageCount = 48; // 16 pages (64 MiB of 4 MiB pages) per host, striped over the peers
  for (let page = 0; page < pageCount; page++) owner.set(page, peers[page % 3]);
  const hostPeer = (page: number): string => peers[Math.floor(page / 16)];
  const { meters, moves, drivers, commitAndGossip } = simulatedBalancers({ peers, clock, owner, config: { ...balancerDefaults, intervalMs: 5_000 }, moveMs: 3_000 });
  let forwardedOps = 0;
  let allOps = 0;
  const shares: string[] = [];
  let below20AtMs: number | undefined;
  // 240 s of steady load in 50 ms steps: every page 2 writes of 64 KiB per step (40/s), through its host's peer.
  for (let step = 0; clock.monotonicMs() < 240_000; step++) {
    clock.set(step * 50);
    for (let page = 0; page < pageCount; page++) {
      const via = hostPeer(page);
      const own = owner.get(page)!;
      for (let i = 0; i < 2; i++) {
        meters.get(via)!.arrived(page * 8192, 128, via === own, 65536);
        const m = meters.get(own)!;
        m.end(page * 8192, 128, m.begin(page * 8192, 128), 65536);
        allOps++;
        if (via !== own) forwardedOps++;
      }
    }
    commitAndGossip();
    if (clock.monotonicMs() % 5000 === 0) {
      const share = forwardedOps / Math.max(1, allOps);
      shares.push(`${clock.monotonicMs() / 1000}s ${Math.round(share * 100)}%`);
      if (below20AtMs === undefined && share < 0.2) below20AtMs = clock.monotonicMs();
      forwardedOps = 0;
      allOps = 0;
      if (clock.monotonicMs() > 0) for (const id of peers) await drivers.get(id)!.round();
    }
  }
  t.comment(`forwarded share per 5 s: ${shares.join(', ')}`);
  t.comment(`${moves.length} moves, last at ${Math.max(...moves.map((m) => m.atMs)) / 1000} s`);
  t.ok(below20AtMs !== undefined && below20AtMs <= 120_000, `forwarded share below 20 % within 2 minutes (at ${below20AtMs! / 1000} s)`);
  t.ok(moves.every((m) => m.to === hostPeer(m.page)), 'every move took a page to the peer its host writes through');
  const lastMove = Math.max(...moves.map((m) => m.atMs));
  t.ok(lastMove <= 120_000, `no page moved in the 2 minutes after 120 s (last move at ${lastMove / 1000} s)`);
  t.equal(new Set(moves.map((m) => m.page)).size, moves.length, 'no page moved twice');
});
