// The TargetDirectory the portal serves: one target per catalog volume, LUN 0 a
// BlockLogicalUnit whose backend is the volume's host path (data-path.ts: the snapshot gate
// over the router; local pages from this peer's store, the rest forwarded to their owners),
// under the host sessions' meter, and whose reservations are shared by the whole group
// through the catalog. Kept in step with the catalog by its watch; a target is visible only
// once its store volume is open. Every peer serves every volume.

import { PeersanError } from '../errors';
import type { StampLog } from '../snapshot/stamp-log';
import type { HybridClock } from '../snapshot/hlc';
import type { Env } from '../env/env';
import { stampLogBytesMax } from '../snapshot/service';
import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { reservationPrefix } from '../cluster/catalog';
import { SharedReservationKeeper, type ReservationNotice } from '../cluster/shared-reservations';
import { targetNameFor, type TargetDirectory, type TargetInfo, type TargetPortal } from '../iscsi/target';
import type { MovableVolume } from '../migration/movable';
import type { ChangeTracker, PrimaryGuard } from '../replication/hooks';
import type { ReadRepairHooks } from '../replication/read-repair';
import type { ReplicatedVolume } from '../replication/replicated';
import type { VolumeGate } from '../snapshot/gate';
import type { SnapshotTargets } from '../snapshot/targets';
import type { ServedVolume } from '../routing/page-service';
import type { BlockSender, PeerSilence, RoutingCounters, VolumeRouter } from '../routing/router';
import type { Route } from '../routing/table';
import type { ReservationState } from '../scsi/reservations';
import { BlockLogicalUnit } from '../scsi/device';
import { naaIdentifier } from '../scsi/inquiry';
import type { PageStore, StoreVolume } from '../store/page-store';
import type { BlockBackend } from '../store/types';
import { MeteredLogicalUnit } from '../loadmon/metered';
import type { LoadMonitor } from '../loadmon/monitor';
import { buildDataPath, type DataPath } from './data-path';
import type { PortGroups } from './port-groups';
import type { ReadBuffers } from '../routing/read-buffers';

export const productRevision = '0.2';

interface Entry {
  record: VolumeRecord;
  volume: StoreVolume;
  /** The volume's layers on this peer, host path and served path (data-path.ts). */
  path: DataPath;
  keeper: SharedReservationKeeper;
  lu: BlockLogicalUnit;
  target: TargetInfo;
}

export interface VolumeTargetsOptions {
  self: string;
  store: PageStore;
  catalog: Catalog;
  portalAddress: string;
  /** This peer's target portal group (and relative target port): its 1-based place in the group. */
  portalGroupTag: number;
  /** The group's target port groups (ALUA) and the other peers' portals; default: this portal alone. */
  portGroups?: PortGroups;
  link(peerId: string): BlockSender;
  notifyReservations(notice: ReservationNotice): Promise<void>;
  /** Snapshot targets and layers (src/snapshot); set once the peer has built them. */
  snapshots?: SnapshotTargets;
  /** True while this peer receives the page by a move (src/migration). */
  receiving(volumeId: string, page: number): boolean;
  counters: RoutingCounters;
  log: Logger;
  /** This peer's hybrid clock: host writes are stamped at the gate. */
  clock: HybridClock;
  /** Clock and timers of the routers and snapshot gates. */
  env: Env;
  /** Wraps each volume's router for the SCSI layer (host I/O metrics); default: none. */
  meter?(volumeName: string, backend: BlockBackend): BlockBackend;
  /** Load monitor: meters the store volume (owner side) and the logical unit (host sessions). */
  monitor?: LoadMonitor;
  /** The class of a volume's pages that move (src/migration/movable.ts); the simulator's negative controls pass a variant. */
  movable?: typeof MovableVolume;
  /** Ask `peer` to take over a page whose primary is unreachable (src/replication/failover.ts); the route it answers. */
  promote?(volumeId: string, peer: string, page: number, route: Route): Promise<Route>;
  /** How many pages of the volume `peer` holds in sync whose primary is still `primary` (src/replication/failover.ts ledBy). */
  ledBy?(volumeId: string, peer: string, primary: string): Promise<number>;
  /** Peers nothing came from for leaseMs + margin (src/replication/leases.ts): the routers give up on them as primaries. */
  silence?: PeerSilence;
  /** The peer's reused receive buffers (src/routing/read-buffers.ts), for every volume's router. */
  readBuffers?: ReadBuffers;
  /** The class of a volume's replicated layer (src/replication/replicated.ts); the simulator's negative controls pass a variant. */
  replicated?: typeof ReplicatedVolume;
  /** The activity log and the primary's guard every volume's replicated layer calls (src/replication/hooks.ts). */
  replication: { tracker: ChangeTracker; guard: PrimaryGuard; readRepair?: ReadRepairHooks; gone?(peer: string): boolean };
}

/** The record, if it is still of the volume `id` (a name is reused after a delete). */
function sameVolume(record: VolumeRecord | undefined, id: string): VolumeRecord | undefined {
  return record?.id === id ? record : undefined;
}

/** After a volume change could not be applied (catalog out of reach), try again after this long. */
const applyRetryMs = 500;

export class VolumeTargets implements TargetDirectory {
  private closed = false;
  readonly portalGroupTag: number;
  readonly portalAddresses: readonly string[];
  private readonly entries = new Map<string, Entry>();
  private readonly byTargetName = new Map<string, Entry>();
  private readonly byId = new Map<string, Entry>();
  private readonly o: VolumeTargetsOptions;
  /** Serialises changes so create/resize/delete apply in catalog order. */
  private chain: Promise<void> = Promise.resolve();
  private unwatch: (() => void) | undefined;

  constructor(opts: VolumeTargetsOptions) {
    this.o = opts;
    this.portalGroupTag = opts.portalGroupTag;
    this.portalAddresses = [opts.portalAddress];
    // A group changed state: every nexus of every volume on this peer hears it (06/2A/06).
    opts.portGroups?.onChange(() => {
      for (const e of this.entries.values()) e.lu.accessStatesChanged();
    });
  }

  /** Follow the catalog: open new volumes, resize, delete. Resolves when the current ones are open. */
  async follow(): Promise<void> {
    const { catalog, store } = this.o;
    catalog.onVolumeChange((name, record) => void this.apply(name, record));
    this.unwatch = await catalog.store.watch(reservationPrefix, (ev) => {
      const id = (ev.type === 'put' ? ev.record.key : ev.key).slice(reservationPrefix.length);
      const state = ev.type === 'put' ? (JSON.parse(ev.record.value.toString()) as ReservationState) : undefined;
      this.byId.get(id)?.keeper.watched(state, ev.type === 'put' ? ev.record.version : 0);
    });
    for (const v of catalog.listVolumes()) await this.apply(v.name, v);
    // A peer serves only once it has every volume open: moves in flight resume next
    // (migrator.recover), and they need their volumes. A catalog out of reach fails the start.
    const unopened = catalog.listVolumes().filter((v) => !this.byId.has(v.id)).map((v) => v.name);
    if (unopened.length > 0) throw new PeersanError(`could not open volume ${unopened.join(', ')} (the catalog did not answer); not serving until it can`);
    // A volume deleted while this peer was down: free its pages now.
    const known = new Set(catalog.listVolumes().map((v) => v.id));
    for (const id of await store.storedVolumeIds()) {
      if (known.has(id)) continue;
      await store.deleteVolume(id);
      this.o.log.info({ volumeId: id }, 'freed the pages of a volume deleted while this peer was away');
    }
  }

  /** Apply one catalog change; the returned promise resolves once the target reflects it. */
  apply(name: string, record: VolumeRecord | undefined): Promise<void> {
    this.chain = this.chain.then(() => this.applyNow(name, record)).catch((err: Error) => {
      // Opening a volume reads the catalog (reservations): a catalog out of reach for a moment
      // must not leave the volume unserved on this peer until its next change (the simulator
      // found a peer up for good without its volume). Try again with the record as it is then.
      if (this.closed) return;
      this.o.log.warn({ volume: name, reason: err.message }, 'applying a volume change failed; retrying');
      this.o.env.timers.setTimeout(() => void this.apply(name, this.o.catalog.volume(name)), applyRetryMs).unref();
    });
    return this.chain;
  }

  private async applyNow(name: string, record: VolumeRecord | undefined): Promise<void> {
    const entry = this.entries.get(name);
    if (entry && entry.record.id !== record?.id) await this.remove(name, entry);
    if (!record) return;
    const current = this.entries.get(name);
    if (current) return this.update(current, record);
    await this.add(record);
  }

  private async remove(name: string, entry: Entry): Promise<void> {
    this.entries.delete(name);
    this.byTargetName.delete(entry.target.name);
    this.byId.delete(entry.record.id);
    await this.o.store.deleteVolume(entry.record.id);
    this.o.log.info({ volume: name }, 'volume deleted; its pages on this peer are freed');
  }

  private async update(entry: Entry, record: VolumeRecord): Promise<void> {
    const blockCount = record.sizeBytes / record.blockBytes;
    if (blockCount !== entry.volume.blockCount) {
      await entry.volume.resize(blockCount);
      entry.lu.capacityChanged();
      this.o.log.info({ volume: record.name, sizeBytes: record.sizeBytes }, 'volume resized');
    }
    entry.record = record;
    entry.target = this.targetInfo(record, entry.lu);
    this.byTargetName.set(entry.target.name, entry);
  }

  private async add(record: VolumeRecord): Promise<void> {
    const { catalog, self } = this.o;
    const stored = await this.o.store.openVolume(record.id, { blockBytes: record.blockBytes, blockCount: record.sizeBytes / record.blockBytes });
    const { meter, monitor, portGroups } = this.o;
    const path = buildDataPath({
      self, volumeId: record.id, table: catalog.routes(record), stored, link: this.o.link, counters: this.o.counters, env: this.o.env, clock: this.o.clock, stampLogBytesMax,
      refresh: (page) => catalog.fetchRoute(record, page),
      receiving: (page) => this.o.receiving(record.id, page),
      snapshot: (seq) => this.o.snapshots?.layer(record.id, seq),
      movable: this.o.movable,
      replicated: this.o.replicated,
      ownerMeter: monitor?.volume(record.id, record.name, record.pageBlocks),
      hostMeter: meter && ((backend) => meter(record.name, backend)),
      promote: this.o.promote && ((peer, page, route) => this.o.promote!(record.id, peer, page, route)),
      ledBy: this.o.ledBy && ((peer, primary) => this.o.ledBy!(record.id, peer, primary)),
      silence: this.o.silence,
      readBuffers: this.o.readBuffers,
      replication: { ...this.o.replication, catalog, log: this.o.log, volume: () => sameVolume(catalog.volume(record.name), record.id) },
    });
    const keeper = new SharedReservationKeeper({ volumeId: record.id, meta: catalog.store, notify: this.o.notifyReservations });
    await keeper.reload();
    const lu = new BlockLogicalUnit({
      lun: 0,
      identity: { volumeId: record.id, volumeName: record.name, vendor: 'PEERSAN', product: 'peersan volume', revision: productRevision, readOnly: false },
      backend: path.host,
      reservations: keeper,
      // EXTENDED COPY between volumes: the data moves between the peers, never through the host.
      copyTargets: (designator) => this.byDesignator(designator),
      targetName: targetNameFor(record.name),
      ...(portGroups ? { portGroups: () => portGroups.groups() } : {}),
      log: this.o.log,
    });
    const entry: Entry = { record, volume: stored, path, keeper, lu, target: this.targetInfo(record, lu) };
    this.entries.set(record.name, entry);
    this.byTargetName.set(entry.target.name, entry);
    this.byId.set(record.id, entry);
  }

  private targetInfo(record: VolumeRecord, lu: BlockLogicalUnit): TargetInfo {
    const served = this.o.monitor ? new MeteredLogicalUnit(lu, this.o.monitor) : lu;
    return { name: targetNameFor(record.name), allow: record.allow, chap: record.chap, luns: new Map([[0, served]]) };
  }

  find(targetName: string): TargetInfo | undefined {
    return this.byTargetName.get(targetName)?.target ?? this.o.snapshots?.find(targetName);
  }

  otherPortals(): readonly TargetPortal[] {
    return this.o.portGroups?.otherPortals() ?? [];
  }

  visibleTo(initiatorName: string): TargetInfo[] {
    return [...[...this.byTargetName.values()].map((e) => e.target), ...(this.o.snapshots?.all() ?? [])]
      .filter((t) => t.allow.length === 0 || t.allow.includes(initiatorName))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  /** For the page service: the volume as the owner serves it (its local pages). */
  served(volumeId: string): ServedVolume | undefined {
    return this.byId.get(volumeId)?.path.served;
  }

  private byDesignator(designator: Buffer): VolumeRouter | undefined {
    for (const e of this.byId.values()) if (naaIdentifier(e.record.id).equals(designator)) return e.path.router;
    return undefined;
  }

  /** The volume's block path as this peer's hosts use it (tests, tooling). */
  routerFor(volumeName: string): VolumeRouter | undefined {
    return this.entries.get(volumeName)?.path.router;
  }

  /** The block path a host command for the volume takes on this peer: the snapshot gate over the router (tests, tooling). */
  hostPathFor(volumeName: string): BlockBackend | undefined {
    return this.entries.get(volumeName)?.path.gate;
  }

  /** Every volume's gate, by volume name (metrics). */
  gates(): [string, VolumeGate][] {
    return [...this.entries.entries()].map(([name, e]) => [name, e.path.gate]);
  }

  /** The gate host I/O for the volume passes on this peer (barrier snapshots). */
  gate(volumeId: string): VolumeGate | undefined {
    return this.byId.get(volumeId)?.path.gate;
  }

  /** The volume's store on this peer (snapshot layers). */
  stored(volumeId: string): StoreVolume | undefined {
    return this.byId.get(volumeId)?.volume;
  }

  /** The recorder above the volume's store (timestamp snapshots). */
  stampLog(volumeId: string): StampLog | undefined {
    return this.byId.get(volumeId)?.path.stampLog;
  }

  /** The volume's pages on this peer, moves included (the migrator's handle). */
  movable(volumeId: string): MovableVolume | undefined {
    return this.byId.get(volumeId)?.path.movable;
  }

  /** The volume's replicated layer on this peer (resync and failover use it as ReplicaPort). */
  replicated(volumeId: string): ReplicatedVolume | undefined {
    return this.byId.get(volumeId)?.path.replicated;
  }

  reservationsOf(volumeId: string): SharedReservationKeeper | undefined {
    return this.byId.get(volumeId)?.keeper;
  }

  /** Bytes of the volume's pages held on this peer. */
  allocatedBytes(volumeName: string): number {
    return this.entries.get(volumeName)?.volume.allocatedBytes() ?? 0;
  }

  close(): void {
    this.closed = true;
    this.unwatch?.();
  }
}
