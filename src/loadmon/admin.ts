// The admin operations on load and balancing: the hottest pages (`top`, the console's heat map),
// each peer's load, a balancing round on demand, and the switches for automatic balancing (the
// group's, kept in the catalog so every peer's balancer reads the same, and each volume's).
// The figures are the 10 s averages the load monitor keeps (index 1 of its windows).

import type { Logger } from 'pino';
import type { Catalog } from '../cluster/catalog';
import { loadHottestPagesPerVolume } from '../limits';
import type { PageHeatView, PeerLoadView } from '../server/http-api';
import type { LoadService, RebalanceReply, TopReply } from './service';
import type { BalancerSwitch } from './switches';

export interface LoadAdmin {
  top(pages: number): Promise<TopReply>;
  rebalance(dryRun: boolean): Promise<RebalanceReply>;
  /** The volume's hottest pages (at most 64, each reported by its owner), 10 s averages. */
  pageHeat(volume: string): Promise<PageHeatView>;
  /** Each peer's load as page owner, 10 s averages (stale peers left out). */
  peerLoads(): Promise<PeerLoadView[]>;
  rebalancing(): Promise<{ enabled: boolean }>;
  setRebalancing(enabled: boolean): Promise<{ enabled: boolean }>;
  /** volume '' = the group switch. */
  setAutoBalance(volume: string, on: boolean): Promise<{ volume: string; on: boolean }>;
}

export interface LoadAdminOptions {
  catalog: Catalog;
  load: Pick<LoadService, 'top' | 'rebalance' | 'peerLoads'>;
  balancerSwitch: BalancerSwitch;
  log: Logger;
}

export function loadAdmin(o: LoadAdminOptions): LoadAdmin {
  const { catalog, load, balancerSwitch, log } = o;
  const setAutoBalance = async (volume: string, on: boolean) => {
    if (!volume) {
      await balancerSwitch.setAuto(on);
      log.info({ on }, 'automatic balancing switched for the group');
      return { volume: '', on };
    }
    const record = await catalog.setAutoBalance(volume, on);
    log.info({ volume, on }, 'automatic balancing switched for a volume');
    return { volume: record.name, on: record.autoBalance !== false };
  };
  return {
    top: async (pages) => load.top(Math.min(Math.max(pages, 1), loadHottestPagesPerVolume)),
    rebalance: (dryRun) => load.rebalance(dryRun),
    async pageHeat(volume) {
      const v = catalog.require(volume);
      const loads = load.top(loadHottestPagesPerVolume).volumes.find((x) => x.volumeId === v.id);
      return { volume: v.name, windowMs: 10_000, pages: (loads?.pages ?? []).map((p) => ({ page: p.page, iops: p.stats.iops[1], bytesPerSec: p.stats.bytesPerSec[1] })) };
    },
    peerLoads: async () => load.peerLoads().filter((p) => !p.stale).map((p) => ({ peer: p.id, iops: p.owner.iops[1], bytesPerSec: p.owner.bytesPerSec[1], latencyMs: p.owner.latencyMs[1] })),
    rebalancing: async () => ({ enabled: balancerSwitch.auto }),
    async setRebalancing(enabled) {
      await setAutoBalance('', enabled);
      return { enabled };
    },
    setAutoBalance,
  };
}
