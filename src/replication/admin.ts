// The admin operations on copies (DESIGN.md 10): create a volume with its copies spread over
// zones, change the copies asked (`peersan volume set NAME --replicas N`), and each volume's
// protection as `volume show`, `status`, `top`, the console and /metrics report it. Composed
// into the peer's admin by server/peer-admin.ts, like the other concepts' admin modules.
//
// A replica count change only records the number on the volume (compare-and-swap on its
// record): every peer's copy keeper (rebuild.ts) hears the change on the catalog's watch and
// brings the pages it is primary of to the new count, paced.

import type { Logger } from 'pino';
import type { Catalog, CreateVolumeInput, VolumeRecord } from '../cluster/catalog';
import type { VolumeAdmin, VolumeView } from '../cluster/volume-admin';
import type { Clock } from '../env/env';
import { zoneSpread } from './placement';
import { protectionOf, RebuildProgress, summarize, weightedRoutes, type Protection, type ProtectionSummary } from './protection';
import type { Shortage } from './rebuild';

export interface ReplicationAdmin {
  /** Create a volume; when peers declare zones, its peer list is ordered so that each page's copies span zones. */
  createVolume(input: CreateVolumeInput): Promise<VolumeView>;
  /** Record the copies asked per page (1-3); the pages follow, paced. */
  setReplicas(volume: string, replicas: number): Promise<VolumeView>;
}

export interface ReplicationAdminOptions {
  catalog: Catalog;
  /** cluster.yaml `zone:` of a peer. */
  zoneOf(peer: string): string | undefined;
  volumes: Pick<VolumeAdmin, 'createVolume' | 'getVolume'>;
  /** This peer's copy keeper: told to look at once rather than at its next tick. */
  keeper?: { kick(): void };
  log: Logger;
}

export function replicationAdmin(o: ReplicationAdminOptions): ReplicationAdmin {
  const { catalog } = o;
  return {
    async createVolume(input) {
      const spansGroup = !(input.peers && input.peers.length > 0);
      const peers = spansGroup ? catalog.options.members.placeable() : input.peers!;
      if (!peers.some((p) => o.zoneOf(p) !== undefined)) return o.volumes.createVolume(input);
      // The catalog checks replicas; the spread only needs a plausible window. A volume that
      // spans the group still does: the zones only order its stripe.
      const window = Math.max(1, Math.min(input.replicas ?? 2, peers.length));
      return o.volumes.createVolume({ ...input, peers: zoneSpread([...new Set(peers)], o.zoneOf, window), spansGroup });
    },
    async setReplicas(volume, replicas) {
      const before = catalog.require(volume).replicas ?? 1;
      const record = await catalog.setReplicas(volume, replicas);
      o.log.info({ volume, from: before, to: record.replicas }, 'copies per page changed by admin');
      o.keeper?.kick();
      return o.volumes.getVolume(volume);
    },
  };
}

export interface VolumeProtectionOptions {
  self: string;
  catalog: Catalog;
  /** The peers reachable now (the load view's gossip is fresh), read once per volume looked at. */
  livePeers(): ReadonlySet<string>;
  clock: Clock;
  /** This peer's copy keeper: copies its pages lack for want of room. */
  shortage(volumeId: string): Shortage | undefined;
}

/** Each volume's protection from its routes as this peer knows them, with the progress of a rebuild this peer watched. */
export class VolumeProtection {
  private readonly o: VolumeProtectionOptions;
  private readonly progress = new RebuildProgress();

  constructor(o: VolumeProtectionOptions) {
    this.o = o;
  }

  of(v: VolumeRecord): Protection {
    const { catalog, self } = this.o;
    const routes = weightedRoutes(catalog.routes(v), Math.ceil(v.sizeBytes / v.blockBytes / v.pageBlocks));
    const live = this.o.livePeers();
    const p = protectionOf({ routes, replicas: v.replicas ?? 1, groupPeers: Math.max(1, catalog.spanOf(v).length), alive: (peer) => peer === self || live.has(peer) });
    const watched = this.progress.observe(v.id, p, this.o.clock.monotonicMs());
    return { ...watched, missingBytes: this.o.shortage(v.id)?.bytes ?? 0 };
  }

  /** How many volumes are in each state. */
  summary(): ProtectionSummary {
    return summarize(this.o.catalog.listVolumes().map((v) => this.of(v).state));
  }
}
