// /metrics for page migration, snapshot holds and host balancing: their figures are running
// totals kept by the features themselves, read at scrape time (nothing to update on the hot path).

import type { Migrator } from '../migration/migrator';
import type { HostBalanceService } from './host-balance-service';
import type { PeerMetrics } from './metrics';
import type { VolumeTargets } from './targets';

export function registerFeatureMetrics(metrics: PeerMetrics, f: { migrator: Migrator; targets: VolumeTargets; hostBalance: HostBalanceService | undefined }): void {
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
}
