// A simulated group of balancers for the load tests (balancer.test.ts, follow-hosts.test.ts): one
// load monitor, group view and BalancerDriver per peer on a manual clock, and a mover that takes
// `moveMs` per move (its commit is the caller's to apply from `pendingCommits`).

import pino from 'pino';
import type { ManualClock } from '../../src/env/manual';
import type { BalancerConfig } from '../../src/loadmon/balancer';
import { BalancerDriver, type PageMover } from '../../src/loadmon/balancer-driver';
import { LoadMonitor, type VolumeMeter } from '../../src/loadmon/monitor';
import { GroupView } from '../../src/loadmon/view';

const GiB = 1024 ** 3;

export function simulatedBalancers(o: { peers: string[]; clock: ManualClock; owner: Map<number, string>; config: BalancerConfig; moveMs: number }) {
  const { peers, clock, owner } = o;
  const monitors = new Map(peers.map((id) => [id, new LoadMonitor({ self: id, clock })]));
  const meters = new Map<string, VolumeMeter>(peers.map((id) => [id, monitors.get(id)!.volume('v1', 'vol', 8192)]));
  const views = new Map(peers.map((id) => [id, new GroupView(id, peers)]));
  const pendingCommits: { atMs: number; page: number; to: string }[] = [];
  const moves: { atMs: number; page: number; from: string; to: string }[] = [];
  const drivers = new Map(peers.map((id) => {
    const mover: PageMover = {
      movePage: async (_v, page, to) => {
        moves.push({ atMs: clock.monotonicMs(), page, from: id, to });
        pendingCommits.push({ atMs: clock.monotonicMs() + o.moveMs, page, to });
      },
      movesInFlight: () => pendingCommits.filter((c) => owner.get(c.page) === id).length,
    };
    const d = new BalancerDriver({
      self: id, config: () => o.config, mover: () => mover, clock,
      view: () => views.get(id)!.snapshot(clock.monotonicMs(), 1000), ownerOf: (_v, page) => owner.get(page),
      volume: () => ({ name: 'vol', pageBytes: 4 << 20, autoBalance: true }), groupAuto: () => true, log: pino({ level: 'silent' }),
    });
    return [id, d] as const;
  }));
  /** One step of the simulation: the moves due commit; on each whole second every peer gossips its summary. */
  const commitAndGossip = (): void => {
    for (const c of pendingCommits.filter((c) => c.atMs <= clock.monotonicMs())) {
      owner.set(c.page, c.to);
      pendingCommits.splice(pendingCommits.indexOf(c), 1);
    }
    if (clock.monotonicMs() % 1000 !== 0) return;
    for (const id of peers) {
      const summary = monitors.get(id)!.summary({ sessions: 1, freeBytes: 100 * GiB, totalBytes: 200 * GiB, allocatedBytes: 0 }, drivers.get(id)!.recentMoves());
      monitors.get(id)!.tick();
      for (const v of views.values()) v.put(summary, clock.monotonicMs());
    }
  };
  return { monitors, meters, views, pendingCommits, moves, drivers, commitAndGossip };
}
