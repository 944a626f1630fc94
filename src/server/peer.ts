// One peer process: the page store, the catalog, the iSCSI portal and the gRPC services
// (AdminService for the CLI, PeerService + PeerData for the other peers), wired from
// cluster.yaml. start() brings them up in dependency order; stop() takes them down in
// reverse, draining in-flight commands first.

import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { Catalog, type CreateVolumeInput, type VolumeRecord } from '../cluster/catalog';
import { EmbeddedMetaStore } from '../cluster/embedded';
import { EtcdMetaStore } from '../cluster/etcd';
import type { MetaStore } from '../cluster/metastore';
import { peerAuthMetadata } from '../cluster/peer-auth';
import { addPeerServices, PeerRpcClient } from '../cluster/peer-rpc';
import { loadPeerTls, peerServerCredentials, peerTlsChannel, type PeerTls } from '../cluster/peer-tls';
import type { ReservationNotice } from '../cluster/shared-reservations';
import { InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import { sleep, type Env } from '../env/env';
import { realEnv } from '../env/real';
import { Portal, type SessionInfo } from '../iscsi/portal';
import { targetNameFor } from '../iscsi/target';
import { gracefulStopMs, loadGossipMsMax, loadHottestPagesPerVolume, peerConnectMsMax, reservationNotifyMsMax } from '../limits';
import { balancerDefaults } from '../loadmon/balancer';
import { LoadService, type RebalanceReply, type TopReply } from '../loadmon/service';
import { BalancerSwitch } from '../loadmon/switches';
import { peerChannelOptions, PeerLink } from '../routing/link';
import { Migrator, type MoveInfo } from '../migration/migrator';
import { listSnapshotRecords, type SnapshotMode } from '../snapshot/records';
import { prepareMsMax, sealMsMax, SnapshotService, viewOf, type SnapshotView } from '../snapshot/service';
import { HybridClock } from '../snapshot/hlc';
import { SnapshotTargets } from '../snapshot/targets';
import { copyInto } from '../snapshot/copy';
import { parseEvery, removeSchedule, setSchedule, SnapshotScheduler } from '../snapshot/schedule';
import { everyNexus } from '../scsi/reservations';
import { Asc } from '../scsi/sense';
import type { BlockBackend } from '../store/types';
import { PageService } from '../routing/page-service';
import { newRoutingCounters, type BlockSender, type RoutingCounters } from '../routing/router';
import { PageStore } from '../store/page-store';
import { addAdminService, type AdminApi, type PageMapView, type PeerStatusView, type VolumeView } from './admin';
import { HostBalanceService, type MovedSession } from './host-balance-service';
import { GossipLoadView } from './host-view';
import { splitHostPort, type ClusterConfig, type PeerConfig } from './config';
import { productRevision, VolumeTargets } from './targets';
import { formatBytes, type ChapSettings } from '../cluster/catalog';
import { consoleEventsMax } from '../limits';
import { EventLog, volumeEvents, type EventKind, type PeerEvent } from './events';
import { HttpConsole } from './http';
import type { PageHeatView, PeerLoadView as ConsolePeerLoad } from './http-api';
import { PeerMetrics } from './metrics';
import { makePrivateDir, securityWarnings, warnOnce } from './security';

/** How long `status` waits for each other peer before reporting it down. */
const statusPeerMsMax = 1_500;
/** Page-move control calls between peers (prepare clears a page on the destination). */
const moveRpcMsMax = 10_000;

/**
 * Fault injection for the migration and snapshot crash tests: PEERSAN_TEST_CRASH="p2:source-mid-piece"
 * makes peer p2 kill itself (as kill -9 would) when its move reaches that point.
 */
function testCrashPoint(self: string): ((point: string) => void) | undefined {
  const spec = process.env.PEERSAN_TEST_CRASH;
  if (!spec) return undefined;
  return (point) => {
    if (spec === `${self}:${point}`) process.kill(process.pid, 'SIGKILL');
  };
}

export interface PeerStartOptions {
  /** A catalog shared by several peers in this process (peersan demo); not closed by stop(). */
  meta?: MetaStore;
  /** Clock, timers and randomness for every protocol module of the peer; default: the real ones. */
  env?: Env;
}

export class PeerServer implements AdminApi {
  readonly config: ClusterConfig;
  readonly peer: PeerConfig;
  readonly log: Logger;
  /** Handed to every protocol module; built (or received) here once. */
  private readonly env: Env;
  /** Local runs, forwarded runs and MOVED retries of this peer's routers. */
  readonly routing: RoutingCounters = newRoutingCounters();
  private readonly startedAtMs: number;
  private readonly sharedMeta: MetaStore | undefined;
  private store!: PageStore;
  private meta!: MetaStore;
  private catalog!: Catalog;
  private targets!: VolumeTargets;
  private migrator!: Migrator;
  private snapshots!: SnapshotService;
  private snapshotTargets!: SnapshotTargets;
  private scheduler: SnapshotScheduler | undefined;
  private portal!: Portal;
  private grpcServer!: grpc.Server;
  private pageService?: PageService;
  /** Stamps host writes for timestamp-mode snapshots (src/snapshot/hlc.ts). */
  private readonly clock: HybridClock;
  private readonly links = new Map<string, PeerLink>();
  private readonly rpcClients = new Map<string, PeerRpcClient>();
  private stopping: Promise<void> | undefined;
  // ---- console and metrics (src/server/http*.ts, events.ts, metrics.ts) ----
  /** Recent events the console shows; anyone in the peer may add to it (addEvent). */
  readonly events = new EventLog(consoleEventsMax);
  /** This peer's Prometheus registry; features register their metrics through it. */
  readonly metrics: PeerMetrics;
  private http: HttpConsole | undefined;
  /** Load monitor, gossip and balancer (src/loadmon). */
  private load: LoadService | undefined;
  private balancerSwitch: BalancerSwitch | undefined;
  /** Host balancing (login redirect, async logout); undefined when off. */
  private hostBalance: HostBalanceService | undefined;
  /** This peer's certificate and the cluster CA (`cluster.tls`); undefined: plain gRPC. */
  private tls: PeerTls | undefined;

  private constructor(config: ClusterConfig, peer: PeerConfig, log: Logger, opts: PeerStartOptions) {
    this.config = config;
    this.peer = peer;
    this.log = log;
    this.env = opts.env ?? realEnv();
    this.startedAtMs = this.env.clock.nowMs();
    this.clock = new HybridClock(this.env.clock);
    this.sharedMeta = opts.meta;
    this.metrics = new PeerMetrics({
      peer: peer.id, routing: this.routing,
      sessions: () => this.portal?.sessions() ?? [],
      volumeAllocatedBytes: () => new Map((this.catalog?.listVolumes() ?? []).map((v) => [v.name, this.targets.allocatedBytes(v.name)])),
    });
  }

  /** Record an event for the console (page moves, redirects, snapshots, …). */
  addEvent(kind: EventKind, message: string, fields: { volume?: string; peer?: string } = {}): PeerEvent {
    return this.events.add(kind, message, fields);
  }

  /** Where the console and /metrics listen (after start). */
  get httpAddress(): { host: string; port: number } | undefined {
    return this.http?.address;
  }

  static async start(config: ClusterConfig, peerId: string, log: Logger, opts: PeerStartOptions = {}): Promise<PeerServer> {
    const peer = config.peers.find((p) => p.id === peerId);
    if (!peer) throw new InvalidArgumentError(`peer ${peerId} is not in ${config.path ?? 'the config'} (peers: ${config.peers.map((p) => p.id).join(', ')})`);
    if (config.peers.length > 1 && config.catalog.backend === 'embedded' && !opts.meta) {
      throw new InvalidArgumentError('the embedded catalog lives inside one process: run a group of several peer processes with catalog.backend etcd (or try it with `peersan demo`)');
    }
    const server = new PeerServer(config, peer, log.child({ peer: peer.id }), opts);
    try {
      await server.bringUp();
    } catch (err) {
      await server.stop().catch(() => undefined);
      throw err;
    }
    return server;
  }

  private get embeddedCatalogDir(): string | undefined {
    const c = this.config.catalog;
    return c.backend === 'embedded' ? (c.path ?? join(this.peer.data, 'catalog')) : undefined;
  }

  private async openMeta(): Promise<MetaStore> {
    if (this.sharedMeta) return this.sharedMeta;
    const c = this.config.catalog;
    if (c.backend === 'etcd') return EtcdMetaStore.fromConfig(c, `peersan/${this.config.name}/`);
    // The catalog holds CHAP secrets: its folder is private before LevelDB creates a file in it.
    const dir = this.embeddedCatalogDir!;
    makePrivateDir(dir);
    return EmbeddedMetaStore.open(dir);
  }

  private async bringUp(): Promise<void> {
    const self = this.peer.id;
    const groupPeers = this.config.peers.map((p) => p.id);
    // TLS material is checked before anything starts: a wrong certificate fails the start.
    this.tls = this.config.tls ? loadPeerTls(this.config.tls, self) : undefined;
    makePrivateDir(this.peer.data);
    warnOnce(this.log, securityWarnings(this.config, this.peer, this.embeddedCatalogDir));
    this.store = await PageStore.open(join(this.peer.data, 'store'), { log: this.log });
    this.meta = await this.openMeta();
    this.catalog = await Catalog.open(this.meta, { groupPeers, pageBlocks: this.config.pageBlocks, env: this.env });
    const load = (this.load = await this.startLoadService(groupPeers));
    this.snapshotTargets = new SnapshotTargets({
      self, catalog: this.catalog, stored: (id) => this.targets.stored(id), link: (id) => this.sender(id), revision: productRevision, log: this.log,
    });
    this.targets = new VolumeTargets({
      snapshots: this.snapshotTargets,
      self, store: this.store, catalog: this.catalog, portalAddress: this.peer.iscsi, portalGroupTag: groupPeers.indexOf(self) + 1,
      link: (id) => this.sender(id), notifyReservations: (n) => this.notifyReservations(n), counters: this.routing, log: this.log, clock: this.clock, env: this.env,
      receiving: (volumeId, page) => this.migrator.receiving(volumeId, page),
      meter: (name, backend) => this.metrics.meter(name, backend),
      monitor: load.monitor,
    });
    this.migrator = new Migrator({
      self, env: this.env, groupPeers, store: this.store, catalog: this.catalog, movable: (id) => this.targets.movable(id), log: this.log,
      settings: { rateBytesPerSec: this.config.migration.rateMBps * 1e6, pieceBytes: this.config.migration.pieceKiB * 1024, duty: this.config.migration.dutyPercent / 100 },
      rpc: {
        prepare: (to, req) => this.rpc(to).movePrepare(req, moveRpcMsMax),
        finish: (to, req) => this.rpc(to).moveFinish(req, moveRpcMsMax),
      },
      crashPoint: testCrashPoint(self),
      event: (kind, message, volume) => this.addEvent(kind, message, { volume, peer: self }),
      committed: (move) => this.load?.driver.noteCommitted(move),
      holding: (volumeId) => this.snapshots.holding(volumeId),
    });
    this.snapshots = new SnapshotService({
      self, env: this.env, groupPeers, catalog: this.catalog, log: this.log,
      gate: (id) => this.targets.gate(id),
      store: (id) => this.targets.stored(id),
      stampLog: (id) => this.targets.stampLog(id),
      clock: this.clock,
      moving: (id) => this.migrator.cursors(id),
      idle: (id) => this.migrator.idle(id),
      rpc: {
        reach: async (peer) => (peer === self ? undefined : this.rpc(peer).ready(peerConnectMsMax)),
        prepare: (peer, req) => (peer === self ? this.snapshots.prepare(req) : this.rpc(peer).snapshotPrepare(req, prepareMsMax + 1_000)),
        take: (peer, req) => (peer === self ? this.snapshots.take(req) : this.rpc(peer).snapshotTake(req, req.cut === undefined ? prepareMsMax : sealMsMax + 1_000)),
        release: (peer, id, abort) => (peer === self ? this.snapshots.release(id, abort) : this.rpc(peer).snapshotRelease(id, abort, abort ? statusPeerMsMax : prepareMsMax)),
      },
      event: (message, volume) => this.addEvent('snapshot', message, { volume, peer: self }),
      crashPoint: testCrashPoint(self),
    });
    this.registerFeatureMetrics();
    const onVolume = volumeEvents(this.events, this.catalog.listVolumes(), formatBytes);
    this.catalog.onVolumeChange((name, record) => {
      onVolume(name, record);
      if (!record) this.metrics.forgetVolume(name);
    });
    await this.targets.follow();
    await this.snapshotTargets.follow();
    this.scheduler = new SnapshotScheduler({
      self, env: this.env, catalog: this.catalog, log: this.log,
      // The first peer of the group that is up runs the schedules (gossip says who is up).
      isRunner: () => {
        const stale = new Set((this.load?.peerLoads() ?? []).filter((p) => p.stale).map((p) => p.id));
        return groupPeers.find((p) => p === self || !stale.has(p)) === self;
      },
      take: async (volume, name) => void (await this.snapshots.create([volume], { name })),
      list: async (volume) => (await this.listSnapshots(volume)).map((x) => x.name),
      remove: (volume, name) => this.snapshots.delete(volume, name),
    });
    // Before anything is served: moves in flight at the last stop resume, or are cleaned up.
    await this.migrator.recover();
    const pages = (this.pageService = new PageService({ self, volume: (id) => this.targets.served(id), clock: this.clock, log: this.log }));
    this.grpcServer = new grpc.Server(peerChannelOptions);
    addAdminService(this.grpcServer, this, this.config.adminToken, this.log);
    addPeerServices(this.grpcServer, {
      status: () => this.selfStatus(),
      reservationChanged: async (n) => this.targets.reservationsOf(n.volumeId)?.noticed(n),
      startMove: (volume, page, to) => this.migrator.start(volume, page, to),
      cancelMove: async (volume, page) => this.migrator.cancel(this.catalog.require(volume).id, page),
      moves: () => this.migrator.list(),
      movePrepare: (req) => this.migrator.prepare(req),
      moveFinish: (req) => this.migrator.finish(req),
      snapshotPrepare: (req) => this.snapshots.prepare(req),
      snapshotTake: (req) => this.snapshots.take(req),
      snapshotRelease: (id, abort) => this.snapshots.release(id, abort),
      blocks: (call) => pages.serveStream(call),
      gossip: (from, summary) => this.load?.received(from, summary),
      startMoves: async (moves) => (this.load ? this.load.driver.start(moves) : []),
      moveSession: (session, to) => this.moveLocalSessions(session, to),
      planHostMove: async (p) => this.hostBalance?.plan({ initiatorName: p.initiatorName, targetName: p.targetName, to: p.to, untilMs: this.env.clock.nowMs() + p.ttlMs }),
    }, { secret: this.config.secret, members: groupPeers, self, tls: this.tls !== undefined }, this.log);
    const credentials = this.tls ? peerServerCredentials(this.tls) : grpc.ServerCredentials.createInsecure();
    await new Promise<void>((resolve, reject) => {
      this.grpcServer.bindAsync(this.peer.rpc, credentials, (err) => (err ? reject(new PeersanError(`cannot listen on ${this.peer.rpc}: ${err.message}`)) : resolve()));
    });
    const iscsi = splitHostPort(this.peer.iscsi, 'iscsi');
    this.hostBalance = this.createHostBalance();
    const hb = this.hostBalance;
    this.portal = new Portal({
      host: iscsi.host, port: iscsi.port, directory: this.targets, log: this.log,
      ...(hb ? { redirectFor: (i: string, t: string, isid: string) => hb.redirectFor(i, t, isid), sessionStarted: (info: SessionInfo) => hb.sessionStarted(info) } : {}),
    });
    await this.portal.listen();
    this.http = await HttpConsole.start({ address: this.peer.http, self, adminToken: this.config.adminToken, api: this, events: this.events, metrics: this.metrics, log: this.log });
    load.start();
    this.scheduler.start();
    this.hostBalance?.start();
    this.log.info({ iscsi: this.peer.iscsi, rpc: this.peer.rpc, peers: groupPeers.length, catalog: this.config.catalog.backend, volumes: this.catalog.listVolumes().length, cleanStart: this.store.wasClean }, 'peer started');
  }

  private link(peerId: string): PeerLink {
    let l = this.links.get(peerId);
    if (!l) {
      const peer = this.config.peers.find((p) => p.id === peerId);
      if (!peer) throw new PeersanError(`route names an unknown peer ${peerId}`);
      l = new PeerLink({
        peerId, address: peer.rpc, env: this.env,
        metadata: (method) => peerAuthMetadata(this.config.secret, this.peer.id, method),
        ...(this.tls ? { tls: peerTlsChannel(this.tls, peerId) } : {}),
      });
      this.links.set(peerId, l);
    }
    return l;
  }

  /**
   * Test hook: delay every forwarded block request by a random 0..ms (a slow network), as the
   * snapshot consistency checker needs.
   */
  forwardDelayMsForTests = 0;

  /** What routers, page moves and snapshot readers send block requests through. */
  private sender(peerId: string): BlockSender {
    const link = this.link(peerId);
    if (this.forwardDelayMsForTests <= 0) return link;
    const ms = this.forwardDelayMsForTests;
    return { send: async (req) => {
      await sleep(this.env.timers, this.env.random.float() * ms);
      return link.send(req);
    } };
  }

  private rpc(peerId: string): PeerRpcClient {
    let c = this.rpcClients.get(peerId);
    if (!c) {
      const peer = this.config.peers.find((p) => p.id === peerId)!;
      c = new PeerRpcClient(peerId, peer.rpc, { secret: this.config.secret, self: this.peer.id }, this.tls ? peerTlsChannel(this.tls, peerId) : undefined);
      this.rpcClients.set(peerId, c);
    }
    return c;
  }

  private async notifyReservations(notice: ReservationNotice): Promise<void> {
    await Promise.all(
      this.config.peers
        .filter((p) => p.id !== this.peer.id)
        .map((p) => this.rpc(p.id).reservationChanged(notice, reservationNotifyMsMax).catch((err: Error) => this.log.warn({ to: p.id, reason: err.message }, 'peer did not confirm a reservation change (it reads the catalog when it returns)'))),
    );
  }

  /** Graceful: refuse new logins, finish in-flight commands, flush, close. Idempotent. */
  stop(): Promise<void> {
    if (!this.stopping) this.stopping = this.shutDown();
    return this.stopping;
  }

  private async shutDown(): Promise<void> {
    const timer = this.env.timers.setTimeout(() => {
      this.log.warn('graceful stop took too long, aborting connections');
      this.portal?.destroy();
      this.grpcServer?.forceShutdown();
    }, gracefulStopMs).unref();
    try {
      this.load?.stop();
      this.balancerSwitch?.close();
      if (this.http) await this.http.close();
      this.hostBalance?.stop();
      if (this.portal) await this.portal.close();
      if (this.grpcServer) {
        // No new calls from here; the other peers' block streams end once answered.
        const shut = new Promise<void>((r) => this.grpcServer.tryShutdown(() => r()));
        this.pageService?.endStreams();
        await shut;
      }
      this.migrator?.close();
      for (const l of this.links.values()) l.close();
      for (const c of this.rpcClients.values()) c.close();
      this.targets?.close();
      this.snapshotTargets?.close();
      this.scheduler?.stop();
      this.catalog?.close();
      if (this.store) await this.store.close();
      if (this.meta && this.meta !== this.sharedMeta) await this.meta.close();
      this.log.info('peer stopped');
    } finally {
      this.env.timers.clearTimeout(timer);
    }
  }

  /** /metrics for page migration and host balancing (their figures are running totals read at scrape time). */
  private registerFeatureMetrics(): void {
    const m = this.migrator;
    this.metrics.followCounter('peersan_page_moves_total', 'Page moves this peer ran as the source, by outcome', ['result'], () => [[{ result: 'committed' }, m.counters.committed], [{ result: 'cancelled' }, m.counters.cancelled]]);
    this.metrics.followCounter('peersan_migration_bytes_total', 'Bytes this peer copied for page moves (both directions)', [], () => [[{}, m.counters.bytesCopied]]);
    this.metrics.gauge({ name: 'peersan_page_moves_in_flight', help: 'Page moves this peer is running as the source', collect() { this.set(m.inFlight); } });
    this.metrics.followCounter('peersan_login_redirects_total', 'Logins answered Target Moved Temporarily (host balancing), by reason', ['reason'], () => {
      const c = this.hostBalance?.counters;
      return c ? [[{ reason: 'load' }, c.redirects], [{ reason: 'planned' }, c.plannedRedirects]] : [];
    });
    this.metrics.followCounter('peersan_snapshot_held_seconds_total', 'Time host I/O for the volume was held at this peer by barrier snapshots', ['volume'], () => this.targets.gates().map(([volume, g]) => [{ volume }, g.heldMsTotal / 1000]));
    this.metrics.followCounter('peersan_logout_requests_total', 'Sessions asked to log out (AsyncEvent 1) to move them to another peer', [], () => [[{}, this.hostBalance?.counters.logoutRequests ?? 0]]);
  }

  // ---- Host balancing (src/server/host-balance*.ts) ----------------------------------------

  private createHostBalance(): HostBalanceService | undefined {
    const hb = this.config.hostBalance ?? {};
    if (!(hb.enabled ?? this.config.peers.length > 1)) return undefined;
    const self = this.peer.id;
    const tag = (id: string): number => this.config.peers.findIndex((p) => p.id === id) + 1;
    const view = new GossipLoadView({
      selfId: self,
      peers: this.config.peers.map((p) => ({ id: p.id, iscsi: p.iscsi, portalGroupTag: tag(p.id) })),
      ownSessions: () => this.portal.sessions().filter((s) => s.sessionType === 'Normal').length,
      loads: () => this.load?.peerLoads() ?? [],
    });
    const { enabled: _enabled, ...settings } = hb;
    return new HostBalanceService({
      selfId: self, env: this.env, settings, view, portal: () => this.portal, log: this.log,
      pinned: (initiator, isid, target) => this.pinnedByReservation(initiator, isid, target),
      shares: (target) => this.pageShares(target),
      event: (message, target) => this.addEvent('redirect', message, { volume: this.catalog.listVolumes().find((v) => targetNameFor(v.name) === target)?.name, peer: self }),
      broadcastPlan: async (plan) => {
        const message = { initiatorName: plan.initiatorName, targetName: plan.targetName, to: plan.to, ttlMs: Math.max(0, plan.untilMs - this.env.clock.nowMs()) };
        await Promise.all(this.config.peers.filter((p) => p.id !== self).map((p) =>
          this.rpc(p.id).planHostMove(message, statusPeerMsMax).catch((err: Error) => this.log.warn({ to: p.id, reason: err.message }, 'peer did not take a host move plan (a login there is placed by the usual rule)'))));
      },
    });
  }

  /**
   * A host holding a persistent reservation registration (or a RESERVE) through this peer's
   * target port stays: registrations are per I_T nexus and the target port differs per peer.
   */
  private pinnedByReservation(initiatorName: string, isid: string, targetName: string): boolean {
    const v = this.catalog.listVolumes().find((x) => targetNameFor(x.name) === targetName);
    const state = v && this.targets.reservationsOf(v.id)?.current.state();
    if (!state) return false;
    const port = `${initiatorName},i,0x${isid}`;
    const tag = this.config.peers.findIndex((p) => p.id === this.peer.id) + 1;
    return state.registrations.some((r) => r.initiatorPort === port && r.relativeTargetPort === tag) || (state.legacyHolder?.startsWith(`${port}|`) ?? false);
  }

  private readonly sharesCache = new Map<string, { atMs: number; shares: Map<string, number> }>();

  /** Share of a volume's pages per owner (refreshed every few seconds; routes change slowly). */
  private pageShares(targetName: string): Map<string, number> | undefined {
    const cached = this.sharesCache.get(targetName);
    if (cached && this.env.clock.monotonicMs() - cached.atMs < 5_000) return cached.shares;
    const v = this.catalog.listVolumes().find((x) => targetNameFor(x.name) === targetName);
    if (!v) return undefined;
    const owners = this.catalog.routes(v).owners(v.sizeBytes / v.blockBytes);
    const shares = new Map<string, number>();
    for (const r of owners) shares.set(r.owner, (shares.get(r.owner) ?? 0) + 1 / owners.length);
    this.sharesCache.set(targetName, { atMs: this.env.clock.monotonicMs(), shares });
    return shares;
  }

  private async moveLocalSessions(session: string, to: string): Promise<MovedSession[]> {
    if (!this.hostBalance) return [];
    return this.hostBalance.move(session, to);
  }

  /** AdminApi: move sessions wherever they are logged in (or only on peer `on`). */
  async moveSession(session: string, to: string, on: string): Promise<MovedSession[]> {
    if (!this.hostBalance) throw new InvalidArgumentError('host balancing is off on this peer (cluster.hostBalance.enabled)');
    if (!session) throw new InvalidArgumentError('name a session: its TSIH or its initiator name');
    if (/^(0x[0-9a-f]+|[0-9]+)$/i.test(session) && !on) {
      // TSIHs are per peer: find which peer has it, and refuse to guess between several.
      const holders = (await this.status()).peers.filter((p) => p.sessions.some((x) => x.tsih === Number(session) && x.sessionType === 'Normal')).map((p) => p.id);
      if (holders.length > 1) throw new InvalidArgumentError(`TSIH ${session} is logged in on ${holders.join(', ')}: say which with --on PEER`);
      on = holders[0] ?? '';
    }
    const peers = this.config.peers.filter((p) => !on || p.id === on);
    if (peers.length === 0) throw new InvalidArgumentError(`no peer ${on} in this group`);
    const moved = (await Promise.all(peers.map((p) => (p.id === this.peer.id ? this.moveLocalSessions(session, to) : this.rpc(p.id).moveSession(session, to, 10_000))))).flat();
    if (moved.length === 0) throw new NotFoundError(`no session ${session} logged in${on ? ` on ${on}` : ''}`);
    return moved;
  }

  /** Test hook: host balancing counters (undefined when off). */
  get hostBalanceForTests(): HostBalanceService | undefined {
    return this.hostBalance;
  }

  // ---- AdminApi (the one admin layer the CLI and later the console use) --------------------

  async selfStatus(): Promise<PeerStatusView> {
    const fs = await statfs(this.peer.data).catch(() => undefined);
    return {
      id: this.peer.id, iscsi: this.peer.iscsi, rpc: this.peer.rpc, http: this.peer.http, up: true,
      uptimeMs: this.env.clock.nowMs() - this.startedAtMs, allocatedBytes: this.store.usage().allocatedBytes,
      freeBytes: fs ? fs.bavail * fs.bsize : 0, totalBytes: fs ? fs.blocks * fs.bsize : 0,
      volumes: this.catalog.listVolumes().length, sessions: this.portal.sessions(), version: productRevision,
    };
  }

  async status(): Promise<{ cluster: string; peers: PeerStatusView[] }> {
    const peers = await Promise.all(
      this.config.peers.map(async (p): Promise<PeerStatusView> => {
        if (p.id === this.peer.id) return this.selfStatus();
        try {
          return { ...(await this.rpc(p.id).status(statusPeerMsMax)), up: true };
        } catch {
          return { id: p.id, iscsi: p.iscsi, rpc: p.rpc, http: p.http, up: false, uptimeMs: 0, allocatedBytes: 0, freeBytes: 0, totalBytes: 0, volumes: 0, sessions: [], version: '' };
        }
      }),
    );
    return { cluster: this.config.name, peers };
  }

  async createVolume(input: CreateVolumeInput): Promise<VolumeView> {
    const record = await this.catalog.createVolume(input);
    // Visible to initiators on this peer before the CLI hears "created".
    await this.targets.apply(record.name, record);
    return this.view(record);
  }

  async listVolumes(): Promise<VolumeView[]> {
    return this.catalog.listVolumes().map((v) => this.view(v));
  }

  async getVolume(name: string): Promise<VolumeView> {
    return this.view(this.catalog.require(name));
  }

  async deleteVolume(name: string, force: boolean): Promise<void> {
    const record = this.catalog.require(name);
    const target = targetNameFor(name);
    const { peers } = await this.status();
    const sessions = peers.flatMap((p) => p.sessions.filter((s) => s.targetName === target).map(() => p.id));
    if (sessions.length > 0 && !force) {
      throw new InvalidArgumentError(`volume ${name} has ${sessions.length} session(s) logged in (through ${[...new Set(sessions)].join(', ')}); log them out first or use --force`);
    }
    await this.catalog.deleteVolume(name);
    await this.targets.apply(name, undefined);
    this.log.info({ volume: name, id: record.id, force }, 'volume deleted by admin');
  }

  async resizeVolume(name: string, size: string): Promise<VolumeView> {
    const record = await this.catalog.resizeVolume(name, size);
    await this.targets.apply(name, record);
    return this.view(record);
  }

  /** Console: change who may log in (allow list, CHAP). Sessions already in stay. */
  async setVolumeAccess(name: string, access: { allow: string[]; chap?: ChapSettings | null }): Promise<VolumeView> {
    const record = await this.catalog.setAccess(name, access);
    await this.targets.apply(record.name, record);
    this.log.info({ volume: name, allow: record.allow.length, chap: record.chap !== undefined }, 'volume access changed by admin');
    return this.view(record);
  }

  async pageMap(name: string): Promise<PageMapView> {
    const v = this.catalog.require(name);
    const routes = this.catalog.routes(v).owners(v.sizeBytes / v.blockBytes);
    return { volume: v.name, pageBlocks: v.pageBlocks, peers: v.peers, pages: routes.map((r, page) => ({ page, owner: r.owner, version: r.version })) };
  }

  /** Move a page: the page's owner runs the move (this peer, or asked over PeerService). */
  async movePage(name: string, page: number, to: string): Promise<MoveInfo> {
    const v = this.catalog.require(name);
    const owner = this.catalog.routes(v).route(page).owner;
    if (owner === this.peer.id) return this.migrator.start(name, page, to);
    return this.rpc(owner).startMove(name, page, to, moveRpcMsMax);
  }

  async cancelMove(name: string, page: number): Promise<void> {
    const v = this.catalog.require(name);
    const owner = this.catalog.routes(v).route(page).owner;
    if (owner === this.peer.id) return this.migrator.cancel(v.id, page);
    await this.rpc(owner).cancelMove(name, page, moveRpcMsMax);
  }

  /** Moves in flight on every peer (each reports the moves it is the source of). */
  async migrations(): Promise<{ moves: MoveInfo[]; unreachable: string[] }> {
    const unreachable: string[] = [];
    const lists = await Promise.all(
      this.config.peers.map(async (p) => {
        if (p.id === this.peer.id) return this.migrator.list();
        return this.rpc(p.id).moves(statusPeerMsMax).catch(() => {
          unreachable.push(p.id);
          return [];
        });
      }),
    );
    return { moves: lists.flat(), unreachable };
  }

  // ---- snapshots (src/snapshot) ----

  /** One snapshot of each volume, all at one consistent cut (a consistency group when several). */
  createSnapshots(volumes: string[], opts: { name?: string; mode?: SnapshotMode; group?: string }): Promise<SnapshotView[]> {
    return this.snapshots.create(volumes, opts);
  }

  /** The console's form: one volume. */
  async createSnapshot(volume: string, opts: { name?: string; mode?: SnapshotMode }): Promise<SnapshotView> {
    return (await this.snapshots.create([volume], opts))[0];
  }

  async listSnapshots(volume: string): Promise<SnapshotView[]> {
    const v = this.catalog.require(volume);
    return (await listSnapshotRecords(this.catalog.store, v.id)).map(viewOf).sort((a, b) => a.seq - b.seq);
  }

  deleteSnapshot(volume: string, name: string): Promise<void> {
    return this.snapshots.delete(volume, name);
  }

  private snapshotReader(volume: string, name: string): BlockBackend {
    const v = this.catalog.require(volume);
    const reader = this.snapshotTargets.reader(v.name, name);
    if (!reader) throw new NotFoundError(`volume ${volume} has no snapshot named ${name}`);
    return reader;
  }

  /**
   * Roll the volume back to the snapshot: its data is copied over the live volume through the
   * routers (wherever pages live now), then every host path gets a unit attention (29/00).
   * Refused while hosts are logged in, unless forced (they see the data change under them).
   */
  async restoreSnapshot(volume: string, name: string, force: boolean): Promise<{ copiedBytes: number; unmappedBytes: number }> {
    const reader = this.snapshotReader(volume, name);
    const v = this.catalog.require(volume);
    const { peers } = await this.status();
    const sessions = peers.flatMap((p) => p.sessions.filter((s) => s.targetName === targetNameFor(v.name)));
    if (sessions.length > 0 && !force) throw new InvalidArgumentError(`volume ${volume} has ${sessions.length} session(s) logged in; log them out first or use --force`);
    const router = this.targets.routerFor(v.name);
    if (!router) throw new PeersanError(`volume ${volume} is not open on ${this.peer.id} yet`);
    const t0 = this.env.clock.monotonicMs();
    const done = await copyInto(reader, router);
    await router.flush();
    await this.targets.reservationsOf(v.id)?.announce([[everyNexus, Asc.powerOnReset]]);
    this.addEvent('snapshot', `volume ${volume} restored from snapshot ${name} (${formatBytes(done.copiedBytes)} copied in ${Math.round(this.env.clock.monotonicMs() - t0)} ms)`, { volume, peer: this.peer.id });
    this.log.info({ volume, name, ...done }, 'volume restored from a snapshot');
    return done;
  }

  /** A new writable volume holding the snapshot's data (copied; thin: unwritten blocks stay unallocated). */
  async cloneSnapshot(volume: string, name: string, newName: string): Promise<VolumeView> {
    const reader = this.snapshotReader(volume, name);
    const v = this.catalog.require(volume);
    const record = await this.createVolume({ name: newName, size: String(reader.blockCount * reader.blockBytes), blockBytes: reader.blockBytes, peers: v.peers, allow: v.allow, chap: v.chap });
    const router = this.targets.routerFor(newName);
    if (!router) throw new PeersanError(`volume ${newName} is not open on ${this.peer.id} yet`);
    const done = await copyInto(reader, router);
    await router.flush();
    this.addEvent('snapshot', `volume ${newName} cloned from snapshot ${name} of ${volume} (${formatBytes(done.copiedBytes)} copied)`, { volume: newName, peer: this.peer.id });
    return this.getVolume(record.name);
  }

  async scheduleSnapshots(volume: string, every: string, keep: number): Promise<{ volume: string; everyMs: number; keep: number }> {
    const v = this.catalog.require(volume);
    if (every === 'off') {
      if (!(await removeSchedule(this.catalog.store, v.id))) throw new NotFoundError(`volume ${volume} has no snapshot schedule`);
      return { volume, everyMs: 0, keep: 0 };
    }
    const r = await setSchedule(this.catalog.store, { volumeId: v.id, volume: v.name, everyMs: parseEvery(every), keep }, this.env.clock.nowMs());
    return { volume, everyMs: r.everyMs, keep: r.keep };
  }

  /** Test hook: snapshot targets and their readers. */
  get snapshotTargetsForTests(): SnapshotTargets {
    return this.snapshotTargets;
  }

  /** Test hook: the snapshot service (uncoordinated mode for the checker's negative control). */
  get snapshotsForTests(): SnapshotService {
    return this.snapshots;
  }

  /** The console's migrations panel: moves in flight on every peer that answers. */
  async listMigrations(): Promise<MoveInfo[]> {
    return (await this.migrations()).moves;
  }

  /** The migrator (balancer, tests). */
  get migration(): Migrator {
    return this.migrator;
  }

  /** Test hook: the targets this peer's portal serves. */
  get targetsForTests(): VolumeTargets {
    return this.targets;
  }

  /** Test and tooling hook: the catalog this peer reads (routes, volumes). */
  get catalogForTests(): Catalog {
    return this.catalog;
  }

  // ---- Load monitoring and balancing (src/loadmon) -----------------------------------------

  private async startLoadService(groupPeers: string[]): Promise<LoadService> {
    this.balancerSwitch = await BalancerSwitch.open(this.meta);
    const catalog = this.catalog;
    let lastVolume: VolumeRecord | undefined;
    return new LoadService({
      self: this.peer.id, env: this.env, peers: groupPeers, config: this.config.balancer ?? { ...balancerDefaults }, log: this.log,
      facts: async () => {
        const fs = await statfs(this.peer.data);
        const sessions = this.portal ? this.portal.sessions().filter((s) => s.sessionType === 'Normal').length : 0;
        return { sessions, freeBytes: fs.bavail * fs.bsize, totalBytes: fs.blocks * fs.bsize, allocatedBytes: this.store.usage().allocatedBytes };
      },
      sendGossip: (peerId, summary) => this.rpc(peerId).gossip(summary, loadGossipMsMax),
      startMovesOn: (peerId, moves) => this.rpc(peerId).startMoves(moves, statusPeerMsMax),
      mover: {
        movePage: async (volume, page, to) => {
          const info = await this.migrator.start(volume, page, to);
          await this.migrator.wait(info.volumeId, page);
        },
        movesInFlight: () => this.migrator?.inFlight ?? 0,
      },
      ownerOf: (volumeId, page) => {
        // Asked for many pages of one volume in a row: look the record up once per run.
        if (lastVolume?.id !== volumeId) lastVolume = catalog.volumeById(volumeId);
        return lastVolume ? catalog.routes(lastVolume).route(page).owner : undefined;
      },
      volume: (volumeId) => {
        const v = catalog.volumeById(volumeId);
        return v ? { name: v.name, pageBytes: v.pageBlocks * v.blockBytes, autoBalance: v.autoBalance !== false } : undefined;
      },
      volumeIds: () => new Set(catalog.listVolumes().map((v) => v.id)),
      groupAuto: () => this.balancerSwitch?.auto ?? true,
    });
  }

  /** This peer's load monitor, group view and balancer (for the console, /metrics, host balancing and tests). */
  get loadService(): LoadService | undefined {
    return this.load;
  }

  async top(pages: number): Promise<TopReply> {
    return this.load!.top(Math.min(Math.max(pages, 1), loadHottestPagesPerVolume));
  }

  async rebalance(dryRun: boolean): Promise<RebalanceReply> {
    return this.load!.rebalance(dryRun);
  }

  // ---- the console's view of load and balancing (http-api.ts OptionalAdminOps) ----

  /** The volume's hottest pages (at most 64, each reported by its owner), 10 s averages. */
  async pageHeat(volume: string): Promise<PageHeatView> {
    const v = this.catalog.require(volume);
    const loads = this.load!.top(loadHottestPagesPerVolume).volumes.find((x) => x.volumeId === v.id);
    return { volume: v.name, windowMs: 10_000, pages: (loads?.pages ?? []).map((p) => ({ page: p.page, iops: p.stats.iops[1], bytesPerSec: p.stats.bytesPerSec[1] })) };
  }

  /** Each peer's load as page owner, 10 s averages (stale peers left out). */
  async peerLoads(): Promise<ConsolePeerLoad[]> {
    return this.load!.peerLoads().filter((p) => !p.stale).map((p) => ({ peer: p.id, iops: p.owner.iops[1], bytesPerSec: p.owner.bytesPerSec[1], latencyMs: p.owner.latencyMs[1] }));
  }

  async rebalancing(): Promise<{ enabled: boolean }> {
    return { enabled: this.balancerSwitch!.auto };
  }

  async setRebalancing(enabled: boolean): Promise<{ enabled: boolean }> {
    await this.setAutoBalance('', enabled);
    return { enabled };
  }

  async setAutoBalance(volume: string, on: boolean): Promise<{ volume: string; on: boolean }> {
    if (!volume) {
      await this.balancerSwitch!.setAuto(on);
      this.log.info({ on }, 'automatic balancing switched for the group');
      return { volume: '', on };
    }
    const record = await this.catalog.setAutoBalance(volume, on);
    this.log.info({ volume, on }, 'automatic balancing switched for a volume');
    return { volume: record.name, on: record.autoBalance !== false };
  }

  private sessionsOn(name: string): number {
    const target = targetNameFor(name);
    return this.portal.sessions().filter((s) => s.targetName === target).length;
  }

  private view(v: VolumeRecord | undefined): VolumeView {
    if (!v) throw new NotFoundError('no such volume');
    return {
      name: v.name, id: v.id, sizeBytes: v.sizeBytes, blockBytes: v.blockBytes, allow: v.allow,
      chapEnabled: v.chap !== undefined, chapUser: v.chap?.user ?? '', mutualChap: v.chap?.mutualUser !== undefined,
      allocatedBytes: this.targets.allocatedBytes(v.name), targetName: targetNameFor(v.name),
      sessions: this.sessionsOn(v.name), createdAtMs: v.createdAtMs, version: v.version, peers: v.peers,
    };
  }

  get iscsiAddress(): { host: string; port: number } {
    return this.portal.address;
  }
}
