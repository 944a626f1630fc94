// One peer process: the page store, the catalog, the iSCSI portal and the gRPC services
// (AdminService for the CLI, PeerService + PeerData for the other peers), wired from
// cluster.yaml. start() brings them up in dependency order; stop() takes them down in
// reverse, draining in-flight commands first.

import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { formatBytes, type ChapSettings, type CreateVolumeInput, type VolumeRecord } from '../cluster/catalog';
import { EmbeddedMetaStore } from '../cluster/embedded';
import { EtcdMetaStore } from '../cluster/etcd';
import type { MetaStore } from '../cluster/metastore';
import { addPeerServices } from '../cluster/peer-rpc';
import { loadPeerTls, peerServerCredentials, type PeerTls } from '../cluster/peer-tls';
import type { PeerCalls, PeerTransport } from '../cluster/transport';
import { InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import type { Env } from '../env/env';
import { realEnv } from '../env/real';
import { Portal, type SessionInfo } from '../iscsi/portal';
import { targetNameFor } from '../iscsi/target';
import { consoleEventsMax, gracefulStopMs, loadHottestPagesPerVolume } from '../limits';
import { balancerDefaults } from '../loadmon/balancer';
import type { LoadService, RebalanceReply, TopReply } from '../loadmon/service';
import { peerChannelOptions } from '../routing/link';
import type { Migrator, MoveInfo } from '../migration/migrator';
import { listSnapshotRecords, type SnapshotMode } from '../snapshot/records';
import { viewOf, type SnapshotView } from '../snapshot/service';
import { copyInto } from '../snapshot/copy';
import { parseEvery, removeSchedule, setSchedule, SnapshotScheduler } from '../snapshot/schedule';
import { everyNexus } from '../scsi/reservations';
import { Asc } from '../scsi/sense';
import type { BlockBackend } from '../store/types';
import { newRoutingCounters, type RoutingCounters } from '../routing/router';
import { PageStore } from '../store/page-store';
import { addAdminService, type AdminApi, type PageMapView, type PeerStatusView, type VolumeView } from './admin';
import { composePeer, moveRpcMsMax, statusPeerMsMax, type PeerCore, type PeerProtocols } from './compose';
import { GrpcTransport } from './grpc-transport';
import { HostBalanceService, type MovedSession } from './host-balance-service';
import { GossipLoadView } from './host-view';
import { splitHostPort, type ClusterConfig, type PeerConfig } from './config';
import { productRevision } from './targets';
import { EventLog, volumeEvents, type EventKind, type PeerEvent } from './events';
import { HttpConsole } from './http';
import type { PageHeatView, PeerLoadView as ConsolePeerLoad } from './http-api';
import { PeerMetrics } from './metrics';
import { makePrivateDir, securityWarnings, warnOnce } from './security';

export interface PeerStartOptions {
  /** A catalog shared by several peers in this process (peersan demo); not closed by stop(). */
  meta?: MetaStore;
  /** Clock, timers and randomness for every protocol module of the peer; default: the real ones. */
  env?: Env;
  /**
   * Wraps the peer transport (gRPC) the protocols use: in-process tests put a slow network under
   * it. The faults come from the environment, never from switches in the protocols.
   */
  transport?(grpc: PeerTransport): PeerTransport;
  /** Protocol variants (compose.ts PeerProtocols): negative controls in tests; default: the real ones. */
  protocols?: Partial<PeerProtocols>;
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
  private readonly opts: PeerStartOptions;
  private store!: PageStore;
  private meta!: MetaStore;
  private transport: PeerTransport | undefined;
  /** The peer's protocols (compose.ts): catalog, targets, moves, snapshots, load. */
  core!: PeerCore;
  private scheduler: SnapshotScheduler | undefined;
  private portal!: Portal;
  private grpcServer!: grpc.Server;
  private stopping: Promise<void> | undefined;
  // ---- console and metrics (src/server/http*.ts, events.ts, metrics.ts) ----
  /** Recent events the console shows; anyone in the peer may add to it (addEvent). */
  readonly events = new EventLog(consoleEventsMax);
  /** This peer's Prometheus registry; features register their metrics through it. */
  readonly metrics: PeerMetrics;
  private http: HttpConsole | undefined;
  /** Host balancing (login redirect, async logout); undefined when off. */
  private hostBalance: HostBalanceService | undefined;

  /** Host balancing's state and counters (undefined when off). */
  get hostBalancer(): HostBalanceService | undefined {
    return this.hostBalance;
  }
  /** This peer's certificate and the cluster CA (`cluster.tls`); undefined: plain gRPC. */
  private tls: PeerTls | undefined;

  private constructor(config: ClusterConfig, peer: PeerConfig, log: Logger, opts: PeerStartOptions) {
    this.config = config;
    this.peer = peer;
    this.log = log;
    this.env = opts.env ?? realEnv();
    this.startedAtMs = this.env.clock.nowMs();
    this.sharedMeta = opts.meta;
    this.opts = opts;
    this.metrics = new PeerMetrics({
      peer: peer.id, routing: this.routing,
      sessions: () => this.portal?.sessions() ?? [],
      volumeAllocatedBytes: () => new Map((this.core?.catalog.listVolumes() ?? []).map((v) => [v.name, this.core.targets.allocatedBytes(v.name)])),
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
    const tls = this.config.tls ? loadPeerTls(this.config.tls, self) : undefined;
    this.tls = tls;
    makePrivateDir(this.peer.data);
    warnOnce(this.log, securityWarnings(this.config, this.peer, this.embeddedCatalogDir));
    this.store = await PageStore.open(join(this.peer.data, 'store'), { log: this.log });
    this.meta = await this.openMeta();
    const grpcTransport = new GrpcTransport({ self, peers: this.config.peers, secret: this.config.secret, tls, env: this.env });
    const transport = (this.transport = this.opts.transport ? this.opts.transport(grpcTransport) : grpcTransport);
    const core = (this.core = await composePeer({
      self, groupPeers, pageBlocks: this.config.pageBlocks, env: this.env, log: this.log, store: this.store, meta: this.meta, transport,
      portal: { address: this.peer.iscsi, groupTag: groupPeers.indexOf(self) + 1 },
      migration: { rateBytesPerSec: this.config.migration.rateMBps * 1e6, pieceBytes: this.config.migration.pieceKiB * 1024, duty: this.config.migration.dutyPercent / 100 },
      balancer: this.config.balancer ?? { ...balancerDefaults },
      facts: async () => {
        const fs = await statfs(this.peer.data);
        const sessions = this.portal ? this.portal.sessions().filter((s) => s.sessionType === 'Normal').length : 0;
        return { sessions, freeBytes: fs.bavail * fs.bsize, totalBytes: fs.blocks * fs.bsize, allocatedBytes: this.store.usage().allocatedBytes };
      },
      event: (kind, message, fields) => this.addEvent(kind, message, fields),
      meter: (name, backend) => this.metrics.meter(name, backend),
      routing: this.routing,
      ...(this.opts.protocols ? { protocols: this.opts.protocols } : {}),
    }));
    this.registerFeatureMetrics();
    const onVolume = volumeEvents(this.events, core.catalog.listVolumes(), formatBytes);
    core.catalog.onVolumeChange((name, record) => {
      onVolume(name, record);
      if (!record) this.metrics.forgetVolume(name);
    });
    this.scheduler = new SnapshotScheduler({
      self, env: this.env, catalog: core.catalog, log: this.log,
      // The first peer of the group that is up runs the schedules (gossip says who is up).
      isRunner: () => {
        const stale = new Set(core.load.peerLoads().filter((p) => p.stale).map((p) => p.id));
        return groupPeers.find((p) => p === self || !stale.has(p)) === self;
      },
      take: async (volume, name) => void (await core.snapshots.create([volume], { name })),
      list: async (volume) => (await this.listSnapshots(volume)).map((x) => x.name),
      remove: (volume, name) => core.snapshots.delete(volume, name),
    });
    this.grpcServer = new grpc.Server(peerChannelOptions);
    addAdminService(this.grpcServer, this, this.config.adminToken, this.log);
    addPeerServices(this.grpcServer, {
      ...core.handlers,
      status: () => this.selfStatus(),
      blocks: (call) => core.pages.serveStream(call),
      moveSession: (session, to) => this.moveLocalSessions(session, to),
      planHostMove: async (p) => this.hostBalance?.plan({ initiatorName: p.initiatorName, targetName: p.targetName, to: p.to, untilMs: this.env.clock.nowMs() + p.ttlMs }),
    }, { secret: this.config.secret, members: groupPeers, self, tls: tls !== undefined }, this.log);
    const credentials = tls ? peerServerCredentials(tls) : grpc.ServerCredentials.createInsecure();
    await new Promise<void>((resolve, reject) => {
      this.grpcServer.bindAsync(this.peer.rpc, credentials, (err) => (err ? reject(new PeersanError(`cannot listen on ${this.peer.rpc}: ${err.message}`)) : resolve()));
    });
    const iscsi = splitHostPort(this.peer.iscsi, 'iscsi');
    this.hostBalance = this.createHostBalance();
    const hb = this.hostBalance;
    this.portal = new Portal({
      host: iscsi.host, port: iscsi.port, directory: core.targets, log: this.log,
      ...(hb ? { redirectFor: (i: string, t: string, isid: string) => hb.redirectFor(i, t, isid), sessionStarted: (info: SessionInfo) => hb.sessionStarted(info) } : {}),
    });
    await this.portal.listen();
    this.http = await HttpConsole.start({ address: this.peer.http, self, adminToken: this.config.adminToken, api: this, events: this.events, metrics: this.metrics, log: this.log });
    core.load.start();
    this.scheduler.start();
    this.hostBalance?.start();
    this.log.info({ iscsi: this.peer.iscsi, rpc: this.peer.rpc, peers: groupPeers.length, catalog: this.config.catalog.backend, volumes: core.catalog.listVolumes().length, cleanStart: this.store.wasClean }, 'peer started');
  }

  private rpc(peerId: string): PeerCalls {
    return this.transport!.calls(peerId);
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
      // Nothing new starts: no gossip, no balancing round.
      this.core?.load.stop();
      if (this.http) await this.http.close();
      this.hostBalance?.stop();
      if (this.portal) await this.portal.close();
      if (this.grpcServer) {
        // No new calls from here; the other peers' block streams end once answered.
        const shut = new Promise<void>((r) => this.grpcServer.tryShutdown(() => r()));
        this.core?.pages.endStreams();
        await shut;
      }
      this.core?.close();
      this.transport?.close();
      this.scheduler?.stop();
      if (this.store) await this.store.close();
      if (this.meta && this.meta !== this.sharedMeta) await this.meta.close();
      this.log.info('peer stopped');
    } finally {
      this.env.timers.clearTimeout(timer);
    }
  }

  /** /metrics for page migration and host balancing (their figures are running totals read at scrape time). */
  private registerFeatureMetrics(): void {
    const m = this.core.migrator;
    this.metrics.followCounter('peersan_page_moves_total', 'Page moves this peer ran as the source, by outcome', ['result'], () => [[{ result: 'committed' }, m.counters.committed], [{ result: 'cancelled' }, m.counters.cancelled]]);
    this.metrics.followCounter('peersan_migration_bytes_total', 'Bytes this peer copied for page moves (both directions)', [], () => [[{}, m.counters.bytesCopied]]);
    this.metrics.gauge({ name: 'peersan_page_moves_in_flight', help: 'Page moves this peer is running as the source', collect() { this.set(m.inFlight); } });
    this.metrics.followCounter('peersan_login_redirects_total', 'Logins answered Target Moved Temporarily (host balancing), by reason', ['reason'], () => {
      const c = this.hostBalance?.counters;
      return c ? [[{ reason: 'load' }, c.redirects], [{ reason: 'planned' }, c.plannedRedirects]] : [];
    });
    this.metrics.followCounter('peersan_snapshot_held_seconds_total', 'Time host I/O for the volume was held at this peer by barrier snapshots', ['volume'], () => this.core.targets.gates().map(([volume, g]) => [{ volume }, g.heldMsTotal / 1000]));
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
      loads: () => this.core?.load.peerLoads() ?? [],
    });
    const { enabled: _enabled, ...settings } = hb;
    return new HostBalanceService({
      selfId: self, env: this.env, settings, view, portal: () => this.portal, log: this.log,
      pinned: (initiator, isid, target) => this.pinnedByReservation(initiator, isid, target),
      shares: (target) => this.pageShares(target),
      event: (message, target) => this.addEvent('redirect', message, { volume: this.core.catalog.listVolumes().find((v) => targetNameFor(v.name) === target)?.name, peer: self }),
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
    const v = this.core.catalog.listVolumes().find((x) => targetNameFor(x.name) === targetName);
    const state = v && this.core.targets.reservationsOf(v.id)?.current.state();
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
    const v = this.core.catalog.listVolumes().find((x) => targetNameFor(x.name) === targetName);
    if (!v) return undefined;
    const owners = this.core.catalog.routes(v).owners(v.sizeBytes / v.blockBytes);
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


  // ---- AdminApi (the one admin layer the CLI and later the console use) --------------------

  async selfStatus(): Promise<PeerStatusView> {
    const fs = await statfs(this.peer.data).catch(() => undefined);
    return {
      id: this.peer.id, iscsi: this.peer.iscsi, rpc: this.peer.rpc, http: this.peer.http, up: true,
      uptimeMs: this.env.clock.nowMs() - this.startedAtMs, allocatedBytes: this.store.usage().allocatedBytes,
      freeBytes: fs ? fs.bavail * fs.bsize : 0, totalBytes: fs ? fs.blocks * fs.bsize : 0,
      volumes: this.core.catalog.listVolumes().length, sessions: this.portal.sessions(), version: productRevision,
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
    const record = await this.core.catalog.createVolume(input);
    // Visible to initiators on this peer before the CLI hears "created".
    await this.core.targets.apply(record.name, record);
    return this.view(record);
  }

  async listVolumes(): Promise<VolumeView[]> {
    return this.core.catalog.listVolumes().map((v) => this.view(v));
  }

  async getVolume(name: string): Promise<VolumeView> {
    return this.view(this.core.catalog.require(name));
  }

  async deleteVolume(name: string, force: boolean): Promise<void> {
    const record = this.core.catalog.require(name);
    const target = targetNameFor(name);
    const { peers } = await this.status();
    const sessions = peers.flatMap((p) => p.sessions.filter((s) => s.targetName === target).map(() => p.id));
    if (sessions.length > 0 && !force) {
      throw new InvalidArgumentError(`volume ${name} has ${sessions.length} session(s) logged in (through ${[...new Set(sessions)].join(', ')}); log them out first or use --force`);
    }
    await this.core.catalog.deleteVolume(name);
    await this.core.targets.apply(name, undefined);
    this.log.info({ volume: name, id: record.id, force }, 'volume deleted by admin');
  }

  async resizeVolume(name: string, size: string): Promise<VolumeView> {
    const record = await this.core.catalog.resizeVolume(name, size);
    await this.core.targets.apply(name, record);
    return this.view(record);
  }

  /** Console: change who may log in (allow list, CHAP). Sessions already in stay. */
  async setVolumeAccess(name: string, access: { allow: string[]; chap?: ChapSettings | null }): Promise<VolumeView> {
    const record = await this.core.catalog.setAccess(name, access);
    await this.core.targets.apply(record.name, record);
    this.log.info({ volume: name, allow: record.allow.length, chap: record.chap !== undefined }, 'volume access changed by admin');
    return this.view(record);
  }

  async pageMap(name: string): Promise<PageMapView> {
    const v = this.core.catalog.require(name);
    const routes = this.core.catalog.routes(v).owners(v.sizeBytes / v.blockBytes);
    return { volume: v.name, pageBlocks: v.pageBlocks, peers: v.peers, pages: routes.map((r, page) => ({ page, owner: r.owner, version: r.version })) };
  }

  /** Move a page: the page's owner runs the move (this peer, or asked over PeerService). */
  async movePage(name: string, page: number, to: string): Promise<MoveInfo> {
    const v = this.core.catalog.require(name);
    const owner = this.core.catalog.routes(v).route(page).owner;
    if (owner === this.peer.id) return this.core.migrator.start(name, page, to);
    return this.rpc(owner).startMove(name, page, to, moveRpcMsMax);
  }

  async cancelMove(name: string, page: number): Promise<void> {
    const v = this.core.catalog.require(name);
    const owner = this.core.catalog.routes(v).route(page).owner;
    if (owner === this.peer.id) return this.core.migrator.cancel(v.id, page);
    await this.rpc(owner).cancelMove(name, page, moveRpcMsMax);
  }

  /** Moves in flight on every peer (each reports the moves it is the source of). */
  async migrations(): Promise<{ moves: MoveInfo[]; unreachable: string[] }> {
    const unreachable: string[] = [];
    const lists = await Promise.all(
      this.config.peers.map(async (p) => {
        if (p.id === this.peer.id) return this.core.migrator.list();
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
    return this.core.snapshots.create(volumes, opts);
  }

  /** The console's form: one volume. */
  async createSnapshot(volume: string, opts: { name?: string; mode?: SnapshotMode }): Promise<SnapshotView> {
    return (await this.core.snapshots.create([volume], opts))[0];
  }

  async listSnapshots(volume: string): Promise<SnapshotView[]> {
    const v = this.core.catalog.require(volume);
    return (await listSnapshotRecords(this.core.catalog.store, v.id)).map(viewOf).sort((a, b) => a.seq - b.seq);
  }

  deleteSnapshot(volume: string, name: string): Promise<void> {
    return this.core.snapshots.delete(volume, name);
  }

  private snapshotReader(volume: string, name: string): BlockBackend {
    const v = this.core.catalog.require(volume);
    const reader = this.core.snapshotTargets.reader(v.name, name);
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
    const v = this.core.catalog.require(volume);
    const { peers } = await this.status();
    const sessions = peers.flatMap((p) => p.sessions.filter((s) => s.targetName === targetNameFor(v.name)));
    if (sessions.length > 0 && !force) throw new InvalidArgumentError(`volume ${volume} has ${sessions.length} session(s) logged in; log them out first or use --force`);
    const router = this.core.targets.routerFor(v.name);
    if (!router) throw new PeersanError(`volume ${volume} is not open on ${this.peer.id} yet`);
    const t0 = this.env.clock.monotonicMs();
    const done = await copyInto(reader, router);
    await router.flush();
    await this.core.targets.reservationsOf(v.id)?.announce([[everyNexus, Asc.powerOnReset]]);
    this.addEvent('snapshot', `volume ${volume} restored from snapshot ${name} (${formatBytes(done.copiedBytes)} copied in ${Math.round(this.env.clock.monotonicMs() - t0)} ms)`, { volume, peer: this.peer.id });
    this.log.info({ volume, name, ...done }, 'volume restored from a snapshot');
    return done;
  }

  /** A new writable volume holding the snapshot's data (copied; thin: unwritten blocks stay unallocated). */
  async cloneSnapshot(volume: string, name: string, newName: string): Promise<VolumeView> {
    const reader = this.snapshotReader(volume, name);
    const v = this.core.catalog.require(volume);
    const record = await this.createVolume({ name: newName, size: String(reader.blockCount * reader.blockBytes), blockBytes: reader.blockBytes, peers: v.peers, allow: v.allow, chap: v.chap });
    const router = this.core.targets.routerFor(newName);
    if (!router) throw new PeersanError(`volume ${newName} is not open on ${this.peer.id} yet`);
    const done = await copyInto(reader, router);
    await router.flush();
    this.addEvent('snapshot', `volume ${newName} cloned from snapshot ${name} of ${volume} (${formatBytes(done.copiedBytes)} copied)`, { volume: newName, peer: this.peer.id });
    return this.getVolume(record.name);
  }

  async scheduleSnapshots(volume: string, every: string, keep: number): Promise<{ volume: string; everyMs: number; keep: number }> {
    const v = this.core.catalog.require(volume);
    if (every === 'off') {
      if (!(await removeSchedule(this.core.catalog.store, v.id))) throw new NotFoundError(`volume ${volume} has no snapshot schedule`);
      return { volume, everyMs: 0, keep: 0 };
    }
    const r = await setSchedule(this.core.catalog.store, { volumeId: v.id, volume: v.name, everyMs: parseEvery(every), keep }, this.env.clock.nowMs());
    return { volume, everyMs: r.everyMs, keep: r.keep };
  }



  /** The console's migrations panel: moves in flight on every peer that answers. */
  async listMigrations(): Promise<MoveInfo[]> {
    return (await this.migrations()).moves;
  }

  /** The migrator (balancer, tests). */
  get migration(): Migrator {
    return this.core.migrator;
  }



  // ---- Load monitoring and balancing (src/loadmon) -----------------------------------------

  /** This peer's load monitor, group view and balancer (for the console, /metrics, host balancing and tests). */
  get loadService(): LoadService | undefined {
    return this.core?.load;
  }

  async top(pages: number): Promise<TopReply> {
    return this.core.load.top(Math.min(Math.max(pages, 1), loadHottestPagesPerVolume));
  }

  async rebalance(dryRun: boolean): Promise<RebalanceReply> {
    return this.core.load.rebalance(dryRun);
  }

  // ---- the console's view of load and balancing (http-api.ts OptionalAdminOps) ----

  /** The volume's hottest pages (at most 64, each reported by its owner), 10 s averages. */
  async pageHeat(volume: string): Promise<PageHeatView> {
    const v = this.core.catalog.require(volume);
    const loads = this.core.load.top(loadHottestPagesPerVolume).volumes.find((x) => x.volumeId === v.id);
    return { volume: v.name, windowMs: 10_000, pages: (loads?.pages ?? []).map((p) => ({ page: p.page, iops: p.stats.iops[1], bytesPerSec: p.stats.bytesPerSec[1] })) };
  }

  /** Each peer's load as page owner, 10 s averages (stale peers left out). */
  async peerLoads(): Promise<ConsolePeerLoad[]> {
    return this.core.load.peerLoads().filter((p) => !p.stale).map((p) => ({ peer: p.id, iops: p.owner.iops[1], bytesPerSec: p.owner.bytesPerSec[1], latencyMs: p.owner.latencyMs[1] }));
  }

  async rebalancing(): Promise<{ enabled: boolean }> {
    return { enabled: this.core.balancerSwitch.auto };
  }

  async setRebalancing(enabled: boolean): Promise<{ enabled: boolean }> {
    await this.setAutoBalance('', enabled);
    return { enabled };
  }

  async setAutoBalance(volume: string, on: boolean): Promise<{ volume: string; on: boolean }> {
    if (!volume) {
      await this.core.balancerSwitch.setAuto(on);
      this.log.info({ on }, 'automatic balancing switched for the group');
      return { volume: '', on };
    }
    const record = await this.core.catalog.setAutoBalance(volume, on);
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
      allocatedBytes: this.core.targets.allocatedBytes(v.name), targetName: targetNameFor(v.name),
      sessions: this.sessionsOn(v.name), createdAtMs: v.createdAtMs, version: v.version, peers: v.peers,
    };
  }

  get iscsiAddress(): { host: string; port: number } {
    return this.portal.address;
  }
}
