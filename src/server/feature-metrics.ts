// /metrics for page migration, snapshot holds, host balancing and copies: their figures are
// running totals kept by the features themselves, read at scrape time (nothing to update on the
// hot path). A volume's protection is computed from its routes at scrape time, as this peer sees it.

import type { Catalog } from '../cluster/catalog';
import type { Migrator } from '../migration/migrator';
import type { ReplicationCore } from './compose';
import type { HostBalanceService } from './host-balance-service';
import type { PeerMetrics } from './metrics';
import type { VolumeTargets } from './targets';

export function registerFeatureMetrics(metrics: PeerMetrics, f: { migrator: Migrator; targets: VolumeTargets; hostBalance: HostBalanceService | undefined; replication: ReplicationCore; catalog: Catalog }): void {
  const m = f.migrator;
  metrics.followCounter('peersan_page_moves_total', 'Page moves this peer ran as the source, by outcome', ['result'], () => [[{ result: 'committed' }, m.counters.committed], [{ result: 'cancelled' }, m.counters.cancelled]]);
  metrics.followCounter('peersan_migration_bytes_total', 'Bytes this peer copied for page moves (both directions)', [], () => [[{}, m.counters.bytesCopied]]);
  metrics.gauge({ name: 'peersan_page_moves_in_flight', help: 'Page moves this peer is running as the source', collect() { this.set(m.inFlight); } });
  metrics.followCounter('peersan_login_redirects_total', 'Logins answered Target Moved Temporarily (host balancing), by reason', ['reason'], () => {
    const c = f.hostBalance?.counters;
    return c ? [[{ reason: 'load' }, c.redirects], [{ reason: 'planned' }, c.plannedRedirects]] : [];
  });
  metrics.followCounter('peersan_snapshot_held_seconds_total', 'Time host I/O for the volume was held at this peer by barrier snapshots', ['volume'], () => f.targets.gates().map(([volume, g]) => [{ volume }, g.heldMsTotal / 1000]));
  metrics.followCounter('peersan_logout_requests_total', 'Sessions asked to log out (AsyncEvent 1) to move them to another peer', [], () => [[{}, f.hostBalance?.counters.logoutRequests ?? 0]]);
  const r = f.replication;
  metrics.followCounter('peersan_resync_bytes_total', 'Bytes this peer sent to bring stale copies back in sync (quick resync)', [], () => [[{}, r.counters.resyncBytes]]);
  metrics.followCounter('peersan_read_repairs_total', 'Reads this peer\'s store failed on pages it is primary of, by outcome: repaired (served from another in-sync copy, rewritten here), unrepaired (served, not rewritable here: page handed over), unserved (no copy could serve: the host got the error)', ['result'], () =>
    (['repaired', 'unrepaired', 'unserved'] as const).map((result) => [{ result }, r.counters.readRepairs[result]]));
  metrics.followCounter('peersan_rebuild_bytes_total', 'Bytes this peer sent to fill new copies (more replicas, or the copies of a lost peer rebuilt)', [], () => [[{}, r.counters.rebuildBytes]]);
  metrics.gauge({
    name: 'peersan_volume_protection_pages', help: 'Pages of the volume per protection state, as this peer sees the routes (degraded, rebuilding, unavailable)', labelNames: ['volume', 'state'],
    collect() {
      this.reset();
      for (const v of f.catalog.listVolumes()) {
        const p = r.protection.of(v);
        this.set({ volume: v.name, state: 'degraded' }, p.degradedPages);
        this.set({ volume: v.name, state: 'rebuilding' }, p.rebuildingPages);
        this.set({ volume: v.name, state: 'unavailable' }, p.unavailablePages);
      }
    },
  });
}
