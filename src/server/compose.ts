// The composition root of a peer's protocols (DESIGN.md 1, 12): one function builds the page
// store's volumes, the catalog, routing, page moves, snapshots and the load monitor from an Env,
// a catalog store, a page store and a peer transport. PeerServer calls it with the real ones
// (disk, etcd or LevelDB, gRPC); the simulator (test/sim) calls it with simulated ones, so both
// run the same wiring. What only a real process has (the iSCSI portal, gRPC servers, the console,
// /metrics, host balancing, snapshot schedules) is wired around it in peer.ts.
//
// Order: the catalog first (everything reads routes and volumes from it), then the volumes'
// targets and snapshot layers, then moves in flight at the last stop resume (before any request
// is served, so a move's page is never served as if it were not moving), then the page service.

import type { Logger } from 'pino';
import { Catalog } from '../cluster/catalog';
import type { MembersView } from '../cluster/members';
import type { MetaStore } from '../cluster/metastore';
import type { PeerHandlers } from '../cluster/peer-rpc';
import type { PeerTransport } from '../cluster/transport';
import type { Env } from '../env/env';
import { downOutMsDefault, failoverWaitMsMax, flushTakeoverRecheckMs, loadGossipMsMax, loadStaleMs, moveRpcMsMax, peerConnectMsMax, resyncAskMsMax, statusPeerMsMax } from '../limits';
import type { BalancerConfig } from '../loadmon/balancer';
import type { PeerFacts } from '../loadmon/monitor';
import { LoadService } from '../loadmon/service';
import { BalancerSwitch } from '../loadmon/switches';
import { Migrator, type MigrationSettings } from '../migration/migrator';
import { MovableVolume } from '../migration/movable';
import { ActivityLog } from '../replication/activity';
import { Failover, learnTakeover } from '../replication/failover';
import type { ReplicaPort } from '../replication/hooks';
import { Leases } from '../replication/leases';
import { checkLedAnswer, checkResyncAsk, checkRouteAnswer, parseBody, type ReplicationHandler } from '../replication/messages';
import { Resyncer, ResyncTracker } from '../replication/resync';
import { VolumeProtection } from '../replication/admin';
import { newReplicationCounters, type ReplicationCounters } from '../replication/protection';
import type { ReadRepairHooks } from '../replication/read-repair';
import { Reaper } from '../replication/reaper';
import { CopyKeeper } from '../replication/rebuild';
import { hotPeers, SpreadDriver } from '../replication/spread';
import { dropFromInSync, ReplicatedVolume } from '../replication/replicated';
import { PageService } from '../routing/page-service';
import { newRoutingCounters, type RoutingCounters } from '../routing/router';
import { inSyncOf, staleCopiesOf, type Route } from '../routing/table';
import { HybridClock } from '../snapshot/hlc';
import { prepareMsMax, sealMsMax, SnapshotService } from '../snapshot/service';
import { SnapshotLayerSync } from '../snapshot/layer-sync';
import { SnapshotTargets } from '../snapshot/targets';
import type { PageStore } from '../store/page-store';
import type { BlockBackend } from '../store/types';
import { ConflictError, InvalidArgumentError, PeersanError } from '../errors';
import { BlockOp, ReplyStatus } from '../routing/frame';
import type { EventKind } from './events';
import type { ReadBuffers } from '../routing/read-buffers';
import { PortGroups } from './port-groups';
import { productRevision, VolumeTargets } from './targets';


/**
 * Protocol classes a peer is built from. Production uses the defaults; the simulator's negative
 * controls (test/sim/controls) pass variants with a known bug, to prove its checker finds it.
 */
export interface PeerProtocols {
  snapshots: typeof SnapshotService;
  migrator: typeof Migrator;
  movable: typeof MovableVolume;
  replicated: typeof ReplicatedVolume;
  layerSync: typeof SnapshotLayerSync;
  keeper: typeof CopyKeeper;
}

export interface PeerWiring {
  self: string;
  /**
   * The group's members (src/cluster/members.ts): who is in the group now, their addresses,
   * tags, zones and states. A process passes its live Members; the simulator a fixed group.
   */
  members: MembersView;
  pageBlocks: number;
  env: Env;
  log: Logger;
  store: PageStore;
  meta: MetaStore;
  transport: PeerTransport;
  /** This peer's iSCSI portal (what targets advertise); its portal group tag is its member record's. */
  portal: { address: string };
  migration: MigrationSettings;
  balancer: BalancerConfig;
  /** Sessions and capacity of this peer, for the load monitor. */
  facts(): Promise<PeerFacts>;
  /** Something a person watching the group wants to know (the console's events). */
  event(kind: EventKind, message: string, fields: { volume?: string; peer?: string }): void;
  /** Wraps each volume's host path (the console's per-volume I/O metrics); default: none. */
  meter?(volumeName: string, backend: BlockBackend): BlockBackend;
  protocols?: Partial<PeerProtocols>;
  /** Where the routers count their runs (the peer's /metrics reads it); default: a new one. */
  routing?: RoutingCounters;
  /** The receive buffers the peer's data streams and portal share (src/routing/read-buffers.ts); default: none reused. */
  readBuffers?: ReadBuffers;
  /** Copies: the lost-peer interval (cluster.yaml); default: downOutMsDefault. */
  replication?: ReplicationSettings;
}

export interface ReplicationSettings {
  downOutMs: number;
}

/** Copies kept at the asked count, freed when no longer ours, and reported (src/replication). */
export interface ReplicationCore {
  counters: ReplicationCounters;
  keeper: CopyKeeper;
  /** Copies spread in proportion to the peers' capacities (src/replication/spread.ts). */
  spread: SpreadDriver;
  reaper: Reaper;
  protection: VolumeProtection;
  zoneOf(peer: string): string | undefined;
}

/** A peer's protocols, wired. */
export interface PeerCore {
  catalog: Catalog;
  /** The group's members (PeerWiring.members). */
  members: MembersView;
  targets: VolumeTargets;
  snapshotTargets: SnapshotTargets;
  migrator: Migrator;
  snapshots: SnapshotService;
  /** Copies of a page that lack a snapshot's layer of it take it from the holders (src/snapshot/layer-sync.ts). */
  layerSync: SnapshotLayerSync;
  load: LoadService;
  balancerSwitch: BalancerSwitch;
  pages: PageService;
  /** Stamps host writes for timestamp-mode snapshots (src/snapshot/hlc.ts). */
  clock: HybridClock;
  /** Leases with every other peer, and failover: the primary guard of replicated pages (src/replication). */
  leases: Leases;
  failover: Failover;
  /** Local runs, forwarded runs and MOVED retries of this peer's routers. */
  routing: RoutingCounters;
  /** The activity log, the dirty grains (the write path's ChangeTracker) and resync (src/replication). */
  resync: { activity: ActivityLog; tracker: ResyncTracker; resyncer: Resyncer };
  replication: ReplicationCore;
  /** What another peer's PeerService calls reach (the block stream and the process-only calls aside). */
  handlers: Omit<PeerHandlers, 'blocks' | 'status' | 'moveSession' | 'planHostMove' | 'replication'> & Required<Pick<PeerHandlers, 'replication'>>;
  /** Stop the protocols' timers and watches (the store and the catalog store stay open: their owner closes them). */
  close(): void;
}

export async function composePeer(w: PeerWiring): Promise<PeerCore> {
  const { self, env, log, transport } = w;
  const P: PeerProtocols = { snapshots: SnapshotService, migrator: Migrator, movable: MovableVolume, replicated: ReplicatedVolume, layerSync: SnapshotLayerSync, keeper: CopyKeeper, ...w.protocols };
  const clock = new HybridClock(env.clock);
  const routing = w.routing ?? newRoutingCounters();
  const { members } = w;
  const groupPeers = (): readonly string[] => members.ids();
  const catalog = await Catalog.open(w.meta, { members, pageBlocks: w.pageBlocks, env });
  const blocks = (peerId: string) => transport.blocks(peerId);
  const call = async (peer: string, kind: string, body: Record<string, unknown>, timeoutMs: number): Promise<Record<string, unknown>> =>
    parseBody(await transport.calls(peer).replication(kind, JSON.stringify(body), timeoutMs));
  // Late-bound: the targets, the migrator and the snapshot service refer to each other.
  const core = { catalog, members, clock, routing } as PeerCore;
  const counters = newReplicationCounters();
  const balancerSwitch = (core.balancerSwitch = await BalancerSwitch.open(w.meta));
  core.resync = await openResync(w, core, counters);
  core.load = loadService(w, core);
  // Which peers are up (ALUA states, SendTargets), read again after every load tick.
  const portGroups = new PortGroups({ self, members, loads: () => core.load.peerLoads(), nowMs: () => env.clock.monotonicMs(), log });
  core.load.onTick(() => portGroups.refresh());
  core.snapshotTargets = new SnapshotTargets({ self, catalog, stored: (id) => core.targets.stored(id), link: blocks, revision: productRevision, log });
  core.targets = new VolumeTargets({
    self, store: w.store, catalog, portalAddress: w.portal.address, portalGroupTag: members.get(self)!.tag, portGroups, snapshots: core.snapshotTargets,
    link: blocks, counters: routing, log, clock, env, monitor: core.load.monitor, movable: P.movable, replicated: P.replicated,
    notifyReservations: async (notice) => {
      await Promise.all(groupPeers().filter((p) => p !== self).map((p) =>
        transport.calls(p).reservationChanged(notice, statusPeerMsMax).catch((err: Error) => log.warn({ to: p, reason: err.message }, 'peer did not confirm a reservation change (it reads the catalog when it returns)'))));
    },
    receiving: (volumeId, page) => core.migrator.acceptsStaging(volumeId, page),
    // The activity log and dirty grains, and the primary's guard (leases, takeovers: built below,
    // before the page service, so no request reaches a volume before it exists).
    replication: {
      tracker: core.resync.tracker,
      guard: { run: (volumeId, page, route, read, op) => core.failover.run(volumeId, page, route, read, op) },
      readRepair: readRepairHooks(w, core, counters),
      gone: (peer) => ['leaving', 'removed'].includes(members.get(peer)?.state ?? '') || (core.leases?.unheard(peer) ?? false),
    },
    ...(w.meter ? { meter: w.meter } : {}),
    // A router that cannot reach a page's primary asks an in-sync copy (maybe this peer) to take over.
    promote: async (volumeId, peer, page, route) => {
      const body = { volumeId, page, version: route.version, handover: false };
      return checkRouteAnswer(peer === self ? ((await replicationHandler('promote')(self, body)) as Record<string, unknown>) : await call(peer, 'promote', body, failoverWaitMsMax));
    },
    // A flush a primary did not answer waits until a copy that did holds no page that primary still leads.
    ledBy: async (volumeId, peer, primary) => {
      const body = { volumeId, primary };
      return checkLedAnswer(peer === self ? ((await replicationHandler('led')(self, body)) as Record<string, unknown>) : await call(peer, 'led', body, flushTakeoverRecheckMs * 4));
    },
    // ... and gives up on a primary nothing came from for its lease and margin (the leases, built below).
    silence: { unheard: (peer) => core.leases?.unheard(peer) ?? false, onUnheard: (listener) => core.leases?.onUnheard(listener) ?? (() => undefined) },
    ...(w.readBuffers ? { readBuffers: w.readBuffers } : {}),
  });
  /** The failover holds the suspect pages (failover.start() resolved): a move's commit waits for it. */
  let failoverStarted = false;
  core.migrator = new P.migrator({
    self, env, members, store: w.store, catalog, movable: (id) => core.targets.movable(id), log, settings: w.migration,
    rpc: {
      prepare: (to, req) => transport.calls(to).movePrepare(req, moveRpcMsMax),
      finish: (to, req) => transport.calls(to).moveFinish(req, moveRpcMsMax),
    },
    event: (kind, message, volume) => w.event(kind, message, { volume, peer: self }),
    committed: (move) => core.load.driver.noteCommitted(move),
    hold: (volumeId) => core.snapshots.hold(volumeId),
    flushCopy: async (peer, volumeId) => {
      const reply = await blocks(peer).send({ op: BlockOp.flush, fua: true, replica: true, volumeId, lba: 0, blocks: 0, routeVersion: 0, compareBytes: 0 });
      if (reply.status !== ReplyStatus.ok) throw new PeersanError(`peer ${peer} did not flush its copies of the volume (reply status ${reply.status})`);
    },
    distrust: (volumeId, page) => core.resync.activity.distrust(volumeId, page),
    // A source stepping out of the page as suspect (a move resumed after its restart) may lack a
    // change it applied before the crash that reached D or a copy: no commit; it hands the page
    // over instead (the move is then abandoned), and the new primary reconciles.
    beforeHandoff: async (volumeId, page) => {
      // A move resumed at start-up runs while the migrator's recover() is awaited, before the
      // failover holds the suspect pages, and could reach its commit then (simulator, seed 110567:
      // it committed a copy that had lost a write its secondary held): not before they are held.
      if (!failoverStarted) throw new PeersanError(`${self} is still starting (its suspect pages are not held yet): the move commits later`);
      if (core.failover?.isHeld(volumeId, page)) throw new ConflictError(`page ${page} is suspect or failing over on ${self}: the move does not commit meanwhile`);
      await core.failover?.reconcileBeforeHandoff(volumeId, page);
    },
    cancelled: (volumeId, page) => core.failover?.settleOwn(volumeId, page),
    // D restarted mid-move of a replicated page: this copy misses what it forwarded to D, so the
    // role goes to an in-sync copy (which has every acknowledged write) before the move is abandoned.
    handOff: async (volumeId, page) => {
      const volume = catalog.volumeById(volumeId);
      if (!volume || !core.failover) return false;
      // A roll-back made this copy D's (or it lacks what it forwarded to D): a copy out of sync resyncs all of it.
      core.resync.tracker.rewritten(volumeId, page);
      const route = await catalog.fetchRoute(volume, page);
      if (route.owner !== self) return true;
      if (!inSyncOf(route).some((p) => p !== self)) return false;
      // The move hears of the new route (Migrator.launch): it distrusts this copy and abandons.
      if (!(await core.failover.handOver(volume, page, route, 'the destination of its move restarted and may miss writes'))) throw new PeersanError(`no in-sync copy of page ${page} took it over yet`);
      return true;
    },
    settled: async (volumeId, page) => (await core.failover?.settled(volumeId, page)) ?? true,
    copiesChanging: (volumeId, page) => core.replication?.keeper.changing(volumeId, page) ?? false,
    // A replicated page moved here: reconcile its copies (a move of a one-copy page has none).
    adopted: (volumeId, page) => {
      const volume = catalog.volumeById(volumeId);
      if (volume && ((volume.replicas ?? 1) > 1 || catalog.routes(volume).route(page).copies)) core.failover?.adopt(volumeId, page);
    },
    // A role switch runs while no change of the page runs on the old primary (its range lock).
    quiet: (volumeId, page, fn) => {
      const port = core.targets.replicated(volumeId);
      if (!port) return fn();
      const pageBlocks = catalog.volumeById(volumeId)?.pageBlocks ?? w.pageBlocks;
      return port.exclusive(page, page * pageBlocks, Math.min(pageBlocks, port.local.blockCount - page * pageBlocks), () => {
        // A change that failed here after it may have reached some copies is not on every in-sync
        // copy: the new primary would not reconcile it (a switch keeps no change in doubt).
        if (port.unsettled(page)) throw new ConflictError(`a change of page ${page} failed on ${self} and its copies are not settled yet; try the move again shortly`);
        return fn();
      });
    },
  });
  const snapshots: SnapshotService = (core.snapshots = new P.snapshots({
    self, env, groupPeers, catalog, log, clock,
    gate: (id) => core.targets.gate(id),
    store: (id) => core.targets.stored(id),
    stampLog: (id) => core.targets.stampLog(id),
    moving: (id) => core.migrator.cursors(id),
    suspect: (id) => [...core.resync.activity.suspect(id), ...core.migrator.restartedPages(id)],
    changesBefore: (id, t) => core.targets.replicated(id)?.changesBefore(t),
    undropped: (id) => {
      const port = core.targets.replicated(id);
      return [...(port?.undroppedCopies() ?? []), ...(port?.divergedCopies() ?? []), ...(core.failover?.unreconciledCopies(id) ?? [])];
    },
    idle: (id) => core.migrator.idle(id),
    rpc: {
      reach: async (peer) => (peer === self ? undefined : transport.calls(peer).ready(peerConnectMsMax)),
      prepare: (peer, req) => (peer === self ? snapshots.prepare(req) : transport.calls(peer).snapshotPrepare(req, prepareMsMax + 1_000)),
      take: (peer, req) => (peer === self ? snapshots.take(req) : transport.calls(peer).snapshotTake(req, req.cut === undefined ? prepareMsMax : sealMsMax + 1_000)),
      release: (peer, id, abort, finish) => (peer === self ? snapshots.release(id, abort, finish) : transport.calls(peer).snapshotRelease(id, abort, abort ? statusPeerMsMax : prepareMsMax, finish)),
    },
    event: (message, volume) => w.event('snapshot', message, { volume, peer: self }),
  }));
  await core.targets.follow();
  await core.snapshotTargets.follow();
  // Before anything is served: this start's token (answered to staging and replica requests),
  // then moves in flight at the last stop resume, or are cleaned up.
  const startToken = await w.store.nextStartToken();
  await core.migrator.recover();
  // Replicas: suspect pages (activity log) are held before anything is served; then leases run.
  const leases = (core.leases = new Leases({ self, groupPeers, env, log, call, learn: (t) => learnTakeover(catalog, t), refreshRoutes: () => catalog.fetchRoutes() }));
  core.failover = new Failover({
    self, env, log, catalog, leases, call,
    heldPages: (volumeId) => core.targets.stored(volumeId)?.heldPages() ?? [],
    movingOut: (volumeId, page) => core.migrator.movingOut(volumeId, page),
    port: (volumeId) => core.targets.replicated(volumeId),
    suspect: (volumeId) => [...core.resync.activity.suspect(volumeId)],
    drop: (volume, page, route, peers) => dropFromInSync(catalog, volume, page, route, peers),
    logged: (volumeId, page) => core.resync.activity.beforeChange(volumeId, page),
    // The store itself, not the moves above it: a move's destination out of reach must not stop a takeover.
    flushStore: async (volumeId) => core.targets.stored(volumeId)?.flush(),
  });
  await core.failover.start();
  failoverStarted = true;
  leases.start();
  core.resync.activity.start();
  core.resync.resyncer.start();
  core.layerSync = new P.layerSync({ self, env, log, catalog, stored: (id) => core.targets.stored(id), link: blocks, settings: w.migration });
  await core.layerSync.start();
  core.replication = replicationCore(w, core, counters, P.keeper);
  core.pages = new PageService({ self, volume: (id) => core.targets.served(id), clock, log, startToken });
  const migrator = core.migrator;
  // Replication message handlers by kind (src/replication/messages.ts); each part of src/replication registers its own.
  const replicationHandlers = new Map<string, ReplicationHandler>([
    ['lease', async (from, body) => leases.handle(from, body)],
    ...core.failover.handlers(),
  ]);
  const replicationHandler = (kind: string): ReplicationHandler => {
    const h = replicationHandlers.get(kind);
    if (!h) throw new InvalidArgumentError(`unknown replication message kind "${kind}"`);
    return h;
  };
  replicationHandlers.set('resync', (from, body) => core.resync.resyncer.handle(from, checkResyncAsk(body)));
  core.handlers = {
    reservationChanged: async (n) => core.targets.reservationsOf(n.volumeId)?.noticed(n),
    startMove: (volume, page, to) => migrator.start(volume, page, to),
    cancelMove: async (volume, page) => migrator.cancel(catalog.require(volume).id, page),
    moves: () => migrator.list(),
    movePrepare: (req) => migrator.prepare(req),
    moveFinish: (req) => migrator.finish(req),
    snapshotPrepare: (req) => snapshots.prepare(req),
    snapshotTake: (req) => snapshots.take(req),
    snapshotRelease: (id, abort, finish) => snapshots.release(id, abort, finish),
    gossip: (from, summary) => core.load.received(from, summary),
    startMoves: async (moves) => core.load.driver.start(moves),
    replication: async (from, kind, body) => JSON.stringify((await replicationHandler(kind)(from, parseBody(body))) ?? {}),
  };
  core.close = () => {
    core.resync.resyncer.close();
    core.layerSync.close();
    core.resync.tracker.close();
    core.resync.activity.close();
    leases.close();
    core.failover.close();
    core.replication.keeper.stop();
    core.replication.spread.stop();
    core.replication.reaper.stop();
    core.load.stop();
    balancerSwitch.close();
    migrator.close();
    core.targets.close();
    core.snapshotTargets.close();
    catalog.close();
  };
  return core;
}

/**
 * The activity log and dirty grains as the last run left them, read BEFORE any volume opens (a
 * change of a page must find its page logged or log it first), and the resyncer (started once
 * the volumes are open).
 */
async function openResync(w: PeerWiring, core: PeerCore, counters: ReplicationCounters): Promise<PeerCore['resync']> {
  const { self, env, log } = w;
  const { catalog } = core;
  // The replicated layer of a volume (ReplicatedVolume, src/replication/replicated.ts), once open.
  const port = (volumeId: string): ReplicaPort | undefined => core.targets?.replicated(volumeId);
  const activity = await ActivityLog.open({
    kv: w.store, env, log,
    // A page held by failover (a takeover reconciling) is not quiet: its reconcile is a change (failover.ts takeOver).
    recentGrains: (id, page) => (port(id)?.recentGrains(page).length ?? 0) + (core.failover?.isHeld(id, page) ? 1 : 0),
    settle: async (id) => {
      await tracker.writeOut(id);
      await core.targets.stored(id)?.flush();
    },
    exists: (id) => catalog.volumeById(id) !== undefined,
  });
  const tracker = await ResyncTracker.open({ self, kv: w.store, activity, env, log, port, volume: (id) => catalog.volumeById(id) });
  const resyncer = new Resyncer({
    self, env, catalog, tracker, activity, port, settings: w.migration, log, counters,
    untrusted: (volumeId, page) => core.failover?.isSteppingOut(volumeId, page) ?? false,
    moveEnded: (volumeId, page) => core.migrator.moveEnded(volumeId, page),
    confirmMove: (volumeId, page) => core.migrator.confirmMove(volumeId, page),
    snapshotHold: (volumeId) => core.snapshots?.hold(volumeId),
    unsettled: (volumeId, page) => (core.failover?.isHeld(volumeId, page) ?? false) || (core.targets?.replicated(volumeId)?.unsettled(page) ?? false),
    ask: async (primary, ask) => parseBody(await w.transport.calls(primary).replication('resync', JSON.stringify(ask), resyncAskMsMax)),
  });
  return { activity, tracker, resyncer };
}

/**
 * The copy keeper and the reaper, started once moves in flight are recovered (both leave a page
 * being moved to the move), and each volume's protection. Liveness is the load view's.
 */
function replicationCore(w: PeerWiring, core: PeerCore, counters: ReplicationCounters, Keeper: typeof CopyKeeper): ReplicationCore {
  const { self, env, log } = w;
  const { catalog } = core;
  const zoneOf = (peer: string): string | undefined => w.members.get(peer)?.zone;
  // A move running, or being started (its route read: a copy added now would be swapped in twice).
  const movingAway = (volumeId: string, page: number): boolean => (core.targets.movable(volumeId)?.moves.has(page) ?? false) || core.migrator.startingMove(volumeId, page);
  const keeper = new Keeper({
    self, env, log: log.child({ component: 'copies' }), catalog, downOutMs: w.replication?.downOutMs ?? downOutMsDefault, zoneOf,
    reserveFreeBytes: w.balancer.reserveFreeBytes, peers: () => core.load.peerLoads(), movingAway,
    movePrimary: async (v, page, to) => void (await core.migrator.start(v.name, page, to)),
    event: (message, volume) => w.event('replication', message, { volume, peer: self }),
  });
  const reaper = new Reaper({
    self, catalog, log, movingAway, store: (id) => core.targets.stored(id), receiving: (id, page) => core.migrator.receiving(id, page),
  });
  // A peer not heard from yet counts as up for the first loadStaleMs of this peer's life: right
  // after a start, gossip has not had the time to say anything.
  const startedMs = env.clock.monotonicMs();
  const livePeers = (): Set<string> => {
    const starting = env.clock.monotonicMs() - startedMs < loadStaleMs;
    return new Set(core.load.peerLoads().filter((p) => !p.stale || (starting && p.ageMs < 0)).map((p) => p.id));
  };
  const protection = new VolumeProtection({ self, catalog, clock: env.clock, shortage: (id) => keeper.shortage(id), livePeers });
  const spread = new SpreadDriver({
    self, env, log: log.child({ component: 'spread' }), catalog, zoneOf,
    enabled: () => w.balancer.enabled && (core.balancerSwitch?.auto ?? true),
    relocate: (volumeId, page, from, to) => keeper.relocate(volumeId, page, from, to), relocationsPending: () => keeper.relocationsPending(),
    movePage: async (v, page, to) => void (await core.migrator.start(v.name, page, to)), movingAway: (volumeId, page) => core.migrator.movingOut(volumeId, page),
    // Busier than the mean: a copy moved there would be load the balancer moves away again.
    hot: () => hotPeers(core.load.peerLoads().filter((p) => !p.stale), 0, w.balancer.minMeanLoad),
    pageLoad: (volumeId, page) => core.load.monitor.pageLoad(volumeId, page),
  });
  reaper.start();
  keeper.start();
  spread.start();
  // Resync and read repairs count where /metrics reads it.
  return { counters, keeper, spread, reaper, protection, zoneOf };
}

/**
 * Read errors on pages this peer is primary of (read-repair.ts): counted and told; a copy that
 * cannot be rewritten is made to resync whole (distrusted) and its page handed over.
 */
function readRepairHooks(w: PeerWiring, core: PeerCore, counters: ReplicationCounters): ReadRepairHooks {
  const { self } = w;
  const { catalog } = core;
  return {
    done: (volumeId, page, result, d) => {
      counters.readRepairs[result]++;
      const volume = catalog.volumeById(volumeId)?.name ?? volumeId;
      const outcome = { repaired: `served from ${d.from}; ${d.rewrittenBlocks} blocks rewritten here`, unrepaired: `served from ${d.from}; this copy could not be rewritten: the page is handed over`, unserved: 'no other in-sync copy could serve it: the host got the error' }[result];
      w.event('replication', `read error on page ${page} (${d.blocks} blocks: ${d.reason}): ${outcome}`, { volume, peer: self });
    },
    stepDown: async (volumeId, page, route) => {
      core.resync.activity.distrust(volumeId, page);
      const volume = catalog.volumeById(volumeId);
      if (volume && !(await core.failover.handOver(volume, page, route, 'its copy here cannot be rewritten'))) throw new ConflictError(`no in-sync copy of page ${page} took it over`);
    },
    untrusted: (volumeId, page) => core.failover?.isSteppingOut(volumeId, page) ?? false,
  };
}

/** The load monitor, gossip and balancer (src/loadmon), reading routes and volumes from the catalog. */
function loadService(w: PeerWiring, core: PeerCore): LoadService {
  const { catalog } = core;
  let lastVolume: ReturnType<Catalog['volumeById']>;
  const routeOf = (volumeId: string, page: number): Route | undefined => {
    // Asked for many pages of one volume in a row: look the record up once per run.
    if (lastVolume?.id !== volumeId) lastVolume = catalog.volumeById(volumeId);
    return lastVolume ? catalog.routes(lastVolume).route(page) : undefined;
  };
  return new LoadService({
    self: w.self, env: w.env, peers: () => w.members.ids(), placeable: () => w.members.placeable(), config: w.balancer, log: w.log, facts: w.facts,
    sendGossip: (peerId, summary) => w.transport.calls(peerId).gossip(summary, loadGossipMsMax),
    startMovesOn: (peerId, moves) => w.transport.calls(peerId).startMoves(moves, statusPeerMsMax),
    mover: {
      movePage: async (volume, page, to) => {
        const info = await core.migrator.start(volume, page, to);
        await core.migrator.wait(info.volumeId, page);
      },
      movesInFlight: () => core.migrator?.inFlight ?? 0,
    },
    ownerOf: (volumeId, page) => routeOf(volumeId, page)?.owner,
    holdersOf: (volumeId, page) => {
      const r = routeOf(volumeId, page);
      return r?.copies ? { inSync: inSyncOf(r).filter((p) => p !== r.owner), stale: staleCopiesOf(r) } : undefined;
    },
    volume: (volumeId) => {
      const v = catalog.volumeById(volumeId);
      return v ? { name: v.name, pageBytes: v.pageBlocks * v.blockBytes, autoBalance: v.autoBalance !== false } : undefined;
    },
    volumeIds: () => new Set(catalog.listVolumes().map((v) => v.id)),
    groupAuto: () => core.balancerSwitch?.auto ?? true,
  });
}
