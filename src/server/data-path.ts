// A volume's data path on one peer (DESIGN.md 2, 4, 6): every layer a block request passes,
// built in one place. Two entries share the owner-side layers: the host path (commands from
// this peer's iSCSI sessions) and the served path (requests other peers forward here, what
// the page service runs). Top to bottom:
//
//   MeteredLogicalUnit  host load per session (loadmon). Built by targets.ts with the target's
//   BlockLogicalUnit    logical unit: they carry its identity and reservations, not blocks.
//   meter (optional)    the console's per-volume host I/O metrics: what hosts asked of this peer.
//   VolumeGate          a barrier snapshot holds host requests here, BEFORE they are routed, so a
//                       held request has gone nowhere yet and close() can wait for the ones that
//                       did (local or forwarded); host writes get their hybrid-clock stamp here,
//                       once, so a forwarded write carries the stamp of the peer the host chose.
//   VolumeRouter        picks each run's owner from the route table: ours goes down this path,
//                       the rest is forwarded to the owner's served path. It checks nothing about
//                       ownership; MOVED (an owner's answer, or PageMovedError from our own
//                       store) is learned and retried in its one loop, at most routeRetriesMax
//                       times, then BUSY to the host (moved.ts).
//   ─── served path: the page service enters here, after decoding and bounds (page-service.ts)
//   MeteredBackend      owner load per page (loadmon): below the router, so it counts what this
//                       peer serves as owner, whoever's host asked; the balancer moves pages by it.
//   ReplicatedVolume    a page with several copies (src/replication/replicated.ts): its primary
//                       orders each change under a range lock and sends it to the other copies,
//                       acknowledging once every in-sync copy has it. Above MovableVolume, so that
//                       every change of a moving page reaches the other copies whichever of the
//                       move's two homes holds the piece, and so that a move's copier and cleanup
//                       (movable.raw) work on this peer's copy alone. Pages of one copy pass
//                       straight through. Replica changes from another peer's primary enter below
//                       it (served.replica), on the stamp log: a copy that is not the primary has
//                       nothing to check in MovableVolume.
//   MovableVolume       THE ownership check, and pages moving away piece by piece (migration).
//   StampLog            records changes for a timestamp snapshot, right above the store, so it
//                       sees every change in the store's order: host writes, forwarded writes and
//                       a move's copies and staging writes alike. It is the `raw` those use, below
//                       the owner meter: migration traffic is not host load.
//   StoreVolume         the page store.
//
// Ownership is checked once, in MovableVolume, at a request's entry: it reads the route table
// (the catalog's in-memory copy, shared by the router, the page service and the catalog watch)
// and its own map of pages moving away, and in the same synchronous step counts the request as
// active on its pages (or queues it on its pieces' locks), before anything awaits. JavaScript
// runs one step at a time, and a commit's two steps (the route learned, Catalog.setRoute; later
// MovableVolume.end) each fall wholly before or after that check. Before the route is learned
// the page is ours; between the two the page is still in the moving map, so the request takes
// its piece lock and is forwarded to the destination; after end() it gets PageMovedError and
// is re-routed. A move's begin() waits for the requests counted active. So nothing above needs
// to check again: the router's choice of "local" and the sender's route are only guesses this
// check corrects. The one thing the page service adds is the sender's knowledge: a sender that
// routed by a newer route version than our table holds makes it re-read those routes from the
// catalog first (our watch may lag), so the check decides by them. A change of a replicated
// page reaches the check only after the replicated layer's waits (guard, range lock); that
// layer refuses a replicated page this peer is not the primary of itself, in a move's commit
// window too, so that every change of such a page is sent to its copies by its primary.

import type { Env } from '../env/env';
import { MeteredBackend } from '../loadmon/metered';
import type { VolumeMeter } from '../loadmon/monitor';
import { MovableVolume } from '../migration/movable';
import { ReplicatedVolume, type ReplicationWiring } from '../replication/replicated';
import type { ServedVolume } from '../routing/page-service';
import { VolumeRouter, type BlockSender, type PeerSilence, type RoutingCounters } from '../routing/router';
import type { Route, RouteTable } from '../routing/table';
import { VolumeGate } from '../snapshot/gate';
import type { HybridClock } from '../snapshot/hlc';
import { StampLog } from '../snapshot/stamp-log';
import type { BlockBackend } from '../store/types';
import type { ReadBuffers } from '../routing/read-buffers';

export interface DataPathOptions {
  self: string;
  volumeId: string;
  /** The volume's routes; refresh() must update this very table (Catalog.fetchRoute does). */
  table: RouteTable;
  /** This peer's store of the volume (its pages). */
  stored: BlockBackend;
  /** Re-read the page's route from the catalog into `table`. */
  refresh(page: number): Promise<Route>;
  /** True while this peer receives the page by a move (src/migration): staging requests for it are served. */
  receiving(page: number): boolean;
  /** This peer's layer of the volume's snapshot `seq`, if it holds one. */
  snapshot(seq: number): BlockBackend | undefined;
  link(peerId: string): BlockSender;
  counters: RoutingCounters;
  /** Clock and timers of the router and the gate. */
  env: Env;
  /** This peer's hybrid clock: the gate stamps host writes, the stamp log unstamped changes. */
  clock: HybridClock;
  /** Bytes a timestamp snapshot's recording may keep. */
  stampLogBytesMax: number;
  /** The class of the moving-pages layer; the simulator's negative controls pass a variant. */
  movable?: typeof MovableVolume | undefined;
  /** The class of the replicated layer; the simulator's negative controls pass a variant. */
  replicated?: typeof ReplicatedVolume | undefined;
  /** Owner load per page and the router's arrivals (the load monitor's meter of the volume); default: not metered. */
  ownerMeter?: VolumeMeter | undefined;
  /** Wraps the host path above the gate (the console's per-volume I/O metrics); default: none. */
  hostMeter?: ((backend: BlockBackend) => BlockBackend) | undefined;
  /** Ask an in-sync copy to take over a page whose primary is unreachable (the router's failover wait); default: none. */
  promote?: ((peer: string, page: number, route: Route) => Promise<Route>) | undefined;
  /** How many pages `peer` holds in sync whose primary is still `primary` (a flush's wait for new primaries); default: none. */
  ledBy?: ((peer: string, primary: string) => Promise<number>) | undefined;
  /** Peers nothing came from for leaseMs + margin: the router gives up on them as primaries (default: waited for until the link's deadline). */
  silence?: PeerSilence | undefined;
  /** The peer's reused receive buffers (src/routing/read-buffers.ts); default: none reused. */
  readBuffers?: ReadBuffers | undefined;
  /** The catalog and the activity log, leases and failover, for the replicated layer. */
  replication: ReplicationWiring;
}

export interface DataPath {
  /** What the volume's logical unit runs host commands on: the top of the host path. */
  host: BlockBackend;
  gate: VolumeGate;
  router: VolumeRouter;
  /** The store plus the pages moving away (the migrator's handle). */
  movable: MovableVolume;
  /** The replicated layer (resync and failover use it as ReplicaPort). */
  replicated: ReplicatedVolume;
  stampLog: StampLog;
  /** What the page service serves forwarded requests from. */
  served: ServedVolume;
}

/** Build a volume's layers, bottom up, in the order the head comment gives and explains. */
export function buildDataPath(o: DataPathOptions): DataPath {
  const { self, volumeId, table } = o;
  const stampLog = new StampLog(o.stored, o.clock, o.stampLogBytesMax);
  const movable = new (o.movable ?? MovableVolume)({ self, volumeId, table, raw: stampLog, link: o.link });
  const replicated = new (o.replicated ?? ReplicatedVolume)({ ...o.replication, self, volumeId, table, local: movable, copy: stampLog, link: o.link, refresh: o.refresh, env: o.env });
  const owned: BlockBackend = o.ownerMeter ? new MeteredBackend(replicated, o.ownerMeter) : replicated;
  const meter = o.ownerMeter;
  const router = new VolumeRouter({
    self, volumeId, table, local: owned, link: o.link, refresh: o.refresh, counters: o.counters, env: o.env, ...(o.promote ? { promote: o.promote } : {}), ...(o.ledBy ? { ledBy: o.ledBy } : {}), ...(o.silence ? { silence: o.silence } : {}), ...(o.readBuffers ? { readBuffers: o.readBuffers } : {}),
    ...(meter ? { arrived: (lba: number, blocks: number, local: boolean, bytes: number) => meter.arrived(lba, blocks, local, bytes) } : {}),
  });
  const gate = new VolumeGate(router, o.env, o.clock);
  const served: ServedVolume = {
    table,
    store: owned,
    raw: stampLog,
    replica: replicated.receiver,
    // Staging admission (not ownership): a move's source sends only pages this peer receives, or now owns.
    receiving: (page) => o.receiving(page) || table.route(page).owner === self,
    snapshot: o.snapshot,
    refresh: o.refresh,
  };
  return { host: o.hostMeter ? o.hostMeter(gate) : gate, gate, router, movable, replicated, stampLog, served };
}
