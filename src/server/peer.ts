// One peer process, a thin composition root: the page store, the catalog and the transport,
// the protocols over them (compose.ts composePeer, the function the simulator calls too), and
// what only a process has around them: the iSCSI portal, the rpc port (gRPC AdminService for the
// CLI and PeerService for the other peers, and their block data streams beside it), the console and /metrics, host balancing
// and snapshot schedules, wired from cluster.yaml. The admin operations live with their
// concepts (cluster/volume-admin.ts, cluster/group-status.ts, migration/admin.ts,
// snapshot/admin.ts, loadmon/admin.ts, host-balance-wiring.ts); `admin` puts them together.
// start() brings everything up in dependency order; stop() takes it down in reverse, draining
// in-flight commands first.

import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { formatBytes } from '../cluster/catalog';
import { EmbeddedMetaStore } from '../cluster/embedded';
import { EtcdMetaStore } from '../cluster/etcd';
import type { PeerStatusView } from '../cluster/group-status';
import type { MetaStore } from '../cluster/metastore';
import { addPeerServices, PeerAuthenticator, peerChannelOptions } from '../cluster/peer-rpc';
import { loadPeerTls, peerServerCredentials, peerTlsServerOptions, type PeerTls } from '../cluster/peer-tls';
import type { PeerTransport } from '../cluster/transport';
import { InvalidArgumentError } from '../errors';
import type { Env } from '../env/env';
import { realEnv } from '../env/real';
import { Portal, type SessionInfo } from '../iscsi/portal';
import { consoleEventsMax, downOutMsDefault, gracefulStopMs, readBuffersFreeBytesMax } from '../limits';
import { balancerDefaults } from '../loadmon/balancer';
import { RpcListener } from '../routing/data-stream';
import { newRoutingCounters, type RoutingCounters } from '../routing/router';
import { ReadBuffers } from '../routing/read-buffers';
import { sharedInlineWrites } from '../store/data-file';
import { sharedWriteThreads } from '../store/write-threads';
import { SnapshotScheduler } from '../snapshot/schedule';
import { PageStore } from '../store/page-store';
import { addAdminService } from './admin';
import { composePeer, type PeerCore, type PeerProtocols } from './compose';
import { splitHostPort, type ClusterConfig, type PeerConfig } from './config';
import { EventLog, volumeEvents, type EventKind } from './events';
import { registerFeatureMetrics } from './feature-metrics';
import { leave, markLeaving } from '../cluster/graceful-leave';
import { defaultHostBalanceSettings } from './host-balance';
import { askHostsToLeave, drainRedirect, followMembers } from './member-effects';
import { GrpcTransport } from './grpc-transport';
import type { HostBalanceService } from './host-balance-service';
import { createHostBalance, reservationPins } from './host-balance-wiring';
import { HttpConsole } from './http';
import { joinGroup, markUp } from './membership';
import type { Members } from '../cluster/members';
import { PeerMetrics } from './metrics';
import { peerAdmin, type PeerAdmin } from './peer-admin';
import { makePrivateDir, securityWarnings, warnOnce } from './security';
import { productRevision } from './targets';

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

export class PeerServer {
  /** Handed to every protocol module; built (or received) here once. */
  private readonly env: Env;
  /** Local runs, forwarded runs and MOVED retries of this peer's routers. */
  readonly routing: RoutingCounters = newRoutingCounters();
  /** Large read replies from other peers, reused once the host read they answer has sent them. */
  private readonly readBuffers = new ReadBuffers(readBuffersFreeBytesMax);
  private readonly startedAtMs: number;
  private store!: PageStore;
  private meta!: MetaStore;
  /** The group's members (the catalog's records), this peer registered among them. */
  members!: Members;
  private transport: PeerTransport | undefined;
  /** The peer's protocols (compose.ts): catalog, targets, moves, snapshots, load. */
  core!: PeerCore;
  /** What the CLI (AdminService) and the console call. */
  admin!: PeerAdmin;
  private scheduler: SnapshotScheduler | undefined;
  private portal!: Portal;
  private grpcServer!: grpc.Server;
  /** The rpc port's listener: gRPC connections go to grpcServer, data streams to the page service. */
  private rpcListener: RpcListener | undefined;
  private stopping: Promise<void> | undefined;
  private unfollowMembers: (() => void) | undefined;
  /** Resolves when this peer was asked to stop (`peersan peer stop`, or removed from the group): its process stops it. */
  readonly stopRequested: Promise<void>;
  private requestStop!: () => void;
  // ---- console and metrics (src/server/http*.ts, events.ts, metrics.ts) ----
  /** Recent events the console shows; every feature adds to it through its `event` hook. */
  readonly events = new EventLog(consoleEventsMax);
  /** How every feature adds to `events`. */
  private readonly event = (kind: EventKind, message: string, fields: { volume?: string; peer?: string }) => void this.events.add(kind, message, fields);
  /** This peer's Prometheus registry; features register their metrics through it. */
  readonly metrics: PeerMetrics;
  private http: HttpConsole | undefined;
  /** Host balancing (login redirect, async logout), its state and counters; undefined when off. */
  hostBalancer: HostBalanceService | undefined;

  private constructor(readonly config: ClusterConfig, readonly peer: PeerConfig, readonly log: Logger, private readonly opts: PeerStartOptions) {
    this.env = opts.env ?? realEnv();
    this.startedAtMs = this.env.clock.nowMs();
    this.stopRequested = new Promise((resolve) => (this.requestStop = resolve));
    this.metrics = new PeerMetrics({
      peer: peer.id, routing: this.routing,
      sessions: () => this.portal?.sessions() ?? [],
      volumeAllocatedBytes: () => new Map((this.core?.catalog.listVolumes() ?? []).map((v) => [v.name, this.core.targets.allocatedBytes(v.name)])),
    });
    const reads = this.readBuffers.counts;
    this.metrics.followCounter('peersan_read_buffers_total', 'Large replies received from other peers: buffers taken for them (new or reused), reused, and given back once their host read was sent (src/routing/read-buffers.ts)', ['event'],
      () => [[{ event: 'taken' }, reads.taken], [{ event: 'reused' }, reads.reused], [{ event: 'given_back' }, reads.givenBack]]);
    const writes = sharedWriteThreads().counts;
    const inlined = sharedInlineWrites().counts;
    this.metrics.followCounter('peersan_store_inline_writes_total', "The store's small writes written inline, on the event loop's thread, for the whole process: runs of adjacent writes, the writes in them, and slow runs (each turned inline writes off for a while) (src/store/data-file.ts)", ['event'],
      () => [[{ event: 'run' }, inlined.runs], [{ event: 'write' }, inlined.writes], [{ event: 'slow' }, inlined.slow]]);
    this.metrics.followCounter('peersan_store_write_threads_total', "The store's write threads, for the whole process: batches of small writes sent to them, the writes in those batches, and batches refused (no staging buffer free: written through the thread pool instead) (src/store/write-threads.ts)", ['event'],
      () => [[{ event: 'batch' }, writes.batches], [{ event: 'write' }, writes.writes], [{ event: 'refused' }, writes.refused]]);
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
    if (this.opts.meta) return this.opts.meta;
    const c = this.config.catalog;
    if (c.backend === 'etcd') return EtcdMetaStore.fromConfig(c, `peersan/${this.config.name}/`);
    // The catalog holds CHAP secrets: its folder is private before LevelDB creates a file in it.
    const dir = this.embeddedCatalogDir!;
    makePrivateDir(dir);
    return EmbeddedMetaStore.open(dir);
  }

  private async bringUp(): Promise<void> {
    // TLS material is checked before anything starts: a wrong certificate fails the start.
    const tls = this.config.tls ? loadPeerTls(this.config.tls, this.peer.id) : undefined;
    makePrivateDir(this.peer.data);
    warnOnce(this.log, securityWarnings(this.config, this.peer, this.embeddedCatalogDir));
    const core = (this.core = await this.openCore(tls));
    this.wireProcessServices(core);
    // Served from here on: the other peers and the CLI first, then the hosts, then the console.
    await this.serveRpc(core, tls);
    await this.servePortal(core);
    this.http = await HttpConsole.start({ address: this.peer.http, self: this.peer.id, adminToken: this.config.adminToken, api: this.admin, events: this.events, metrics: this.metrics, log: this.log });
    core.load.start();
    this.scheduler!.start();
    this.hostBalancer?.start();
    // Serving: the others may place data here from now on.
    await markUp(this.members, this.peer.id);
    this.log.info({ iscsi: this.peer.iscsi, rpc: this.peer.rpc, peers: this.members.ids().length, catalog: this.config.catalog.backend, volumes: core.catalog.listVolumes().length, cleanStart: this.store.wasClean, peerTls: this.config.tls !== undefined }, 'peer started');
  }

  /** The store, the catalog and the transport, and the protocols over them (compose.ts, as the simulator builds them). */
  private async openCore(tls: PeerTls | undefined): Promise<PeerCore> {
    const self = this.peer.id;
    this.meta = await this.openMeta();
    // Before the store opens: a data directory of another group is refused untouched.
    const { members } = await joinGroup({ meta: this.meta, env: this.env, config: this.config, peer: this.peer, tls, log: this.log });
    this.members = members;
    this.store = await PageStore.open(join(this.peer.data, 'store'), { log: this.log });
    const dialOf = (id: string): string | undefined => this.config.peers.find((p) => p.id === id)?.rpc;
    const grpcTransport = new GrpcTransport({ self, members, dialOf, secret: this.config.secret, tls, env: this.env, readBuffers: this.readBuffers });
    const transport = (this.transport = this.opts.transport ? this.opts.transport(grpcTransport) : grpcTransport);
    const { migration } = this.config;
    return composePeer({
      self, members, pageBlocks: this.config.pageBlocks, env: this.env, log: this.log, store: this.store, meta: this.meta, transport,
      portal: { address: this.peer.iscsi },
      migration: { rateBytesPerSec: migration.rateMBps * 1e6, pieceBytes: migration.pieceKiB * 1024, duty: migration.dutyPercent / 100 },
      balancer: this.config.balancer ?? { ...balancerDefaults },
      facts: async () => {
        const fs = await statfs(this.peer.data);
        const sessions = this.portal ? this.portal.sessions().filter((s) => s.sessionType === 'Normal').length : 0;
        return { sessions, freeBytes: fs.bavail * fs.bsize, totalBytes: fs.blocks * fs.bsize, allocatedBytes: this.store.usage().allocatedBytes };
      },
      event: this.event,
      meter: (name, backend) => this.metrics.meter(name, backend),
      routing: this.routing,
      readBuffers: this.readBuffers,
      replication: { downOutMs: this.config.downOutMs ?? downOutMsDefault },
      ...(this.opts.protocols ? { protocols: this.opts.protocols } : {}),
    });
  }

  /** What only a process has around the protocols: metrics, host balancing, the admin operations, volume events, snapshot schedules. */
  private wireProcessServices(core: PeerCore): void {
    const self = this.peer.id;
    const { members } = this;
    const calls = (peerId: string) => this.transport!.calls(peerId);
    const hostBalance = (this.hostBalancer = createHostBalance({
      config: this.config, members, self, env: this.env, portal: () => this.portal, loads: () => core.load.peerLoads(), hosts: () => core.load.hostLoads(), catalog: core.catalog, targets: core.targets,
      calls, event: (message, volume) => this.event('redirect', message, { volume, peer: self }), log: this.log,
    }));
    registerFeatureMetrics(this.metrics, { migrator: core.migrator, targets: core.targets, hostBalance, replication: core.replication, catalog: core.catalog });
    const pins = reservationPins({ catalog: core.catalog, targets: core.targets, tag: (id) => members.get(id)?.tag ?? 0 });
    const pinned = (peer: string, s: SessionInfo): boolean => pins(peer, s.initiatorName, s.isid, s.targetName);
    this.admin = peerAdmin({
      self, config: this.config, members, env: this.env, log: this.log, core, calls, hostBalance,
      selfStatus: () => this.selfStatus(), localSessions: () => this.portal.sessions(), event: this.event,
      pinned, requestStop: () => this.requestStop(),
    });
    const unfollow = followMembers({
      self, members, migrator: core.migrator, portal: () => this.portal, pinned: (s) => pinned(self, s),
      logoutSeconds: this.logoutSeconds(), event: this.event, removed: () => this.requestStop(), log: this.log,
    });
    // A drain, a join or a removal changes where copies belong: the keeper looks at once, not at its next tick.
    const unkick = members.onChange(() => core.replication.keeper.kick());
    this.unfollowMembers = () => {
      unfollow();
      unkick();
    };
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
        return members.ids().find((p) => p === self || !stale.has(p)) === self;
      },
      take: async (volume, name) => void (await core.snapshots.create([volume], { name })),
      list: async (volume) => (await this.admin.listSnapshots(volume)).map((x) => x.name),
      remove: (volume, name) => core.snapshots.delete(volume, name),
    });
  }

  /**
   * The rpc address: AdminService (the CLI) and PeerService (the other peers) on gRPC, and the
   * other peers' block data streams, told apart by their first bytes (src/routing/data-stream.ts).
   * Both authenticate peers with one PeerAuthenticator (one nonce ledger).
   */
  private async serveRpc(core: PeerCore, tls: PeerTls | undefined): Promise<void> {
    const self = this.peer.id;
    const server = (this.grpcServer = new grpc.Server(peerChannelOptions));
    addAdminService(server, this.admin, this.config.adminToken, this.log);
    const authenticator = new PeerAuthenticator({ secret: this.config.secret, members: (id) => this.members.ids().includes(id), self, tls: tls !== undefined }, this.log);
    addPeerServices(server, {
      ...core.handlers,
      status: () => this.selfStatus(),
      moveSession: async (session, to) => (await this.hostBalancer?.move(session, to)) ?? [],
      planHostMove: async (p) => this.hostBalancer?.plan({ initiatorName: p.initiatorName, targetName: p.targetName, to: p.to, untilMs: this.env.clock.nowMs() + p.ttlMs }),
    }, authenticator);
    // gRPC does its own TLS on the connections handed to it.
    const grpcConnections = server.createConnectionInjector(tls ? peerServerCredentials(tls) : grpc.ServerCredentials.createInsecure());
    this.rpcListener = new RpcListener({
      ...(tls ? { tls: peerTlsServerOptions(tls) } : {}),
      authenticate: authenticator.hello,
      serve: (stream) => core.pages.serveStream(stream),
      other: (socket) => grpcConnections.injectConnection(socket),
      log: this.log,
    });
    const { host, port } = splitHostPort(this.peer.rpc, 'rpc');
    await this.rpcListener.listen(host, port, this.peer.rpc);
  }

  /** The iSCSI portal; host balancing, when on, places logins (redirect) and counts sessions. */
  private async servePortal(core: PeerCore): Promise<void> {
    const iscsi = splitHostPort(this.peer.iscsi, 'iscsi');
    const hb = this.hostBalancer;
    this.portal = new Portal({
      host: iscsi.host, port: iscsi.port, directory: core.targets, log: this.log,
      // A draining or leaving peer sends every login to an up peer, whatever host balancing says.
      redirectFor: (i: string, t: string, isid: string) => this.drainLogin(i, t) ?? hb?.redirectFor(i, t, isid),
      ...(hb ? { sessionStarted: (info: SessionInfo) => hb.sessionStarted(info) } : {}),
      readDataSent: (data) => this.readBuffers.giveBack(data),
    });
    await this.portal.listen();
  }

  /** While this peer drains or leaves: the up peer a login goes to (and the console says so). */
  private drainLogin(initiatorName: string, targetName: string): string | undefined {
    const to = drainRedirect(this.peer.id, this.members, initiatorName);
    if (to) this.event('redirect', `login of ${initiatorName} to ${targetName} redirected to ${to} (${this.peer.id} is ${this.members.get(this.peer.id)?.state})`, { peer: this.peer.id });
    return to;
  }

  /** This peer's own line of `peersan status` (also what the other peers' status calls get). */
  private async selfStatus(): Promise<PeerStatusView> {
    const fs = await statfs(this.peer.data).catch(() => undefined);
    return {
      id: this.peer.id, iscsi: this.peer.iscsi, rpc: this.peer.rpc, http: this.peer.http, up: true,
      uptimeMs: this.env.clock.nowMs() - this.startedAtMs, allocatedBytes: this.store.usage().allocatedBytes,
      freeBytes: fs ? fs.bavail * fs.bsize : 0, totalBytes: fs ? fs.blocks * fs.bsize : 0,
      volumes: this.core.catalog.listVolumes().length, sessions: this.portal.sessions(), version: productRevision,
    };
  }

  /** How long hosts asked to log out get (host balancing's setting, or its default). */
  private logoutSeconds(): number {
    return this.hostBalancer?.settings.logoutSeconds ?? defaultHostBalanceSettings.logoutSeconds;
  }

  /** Graceful: leave (roles handed over, hosts asked to log out), refuse new logins, finish in-flight commands, flush, close. Idempotent. */
  stop(why = `${this.peer.id} (stop)`): Promise<void> {
    if (!this.stopping) this.stopping = this.leave(why).then(() => this.shutDown());
    return this.stopping;
  }

  /** Marked leaving only (stopGroup: before any peer of the group hands roles around). */
  async markLeaving(why: string): Promise<void> {
    if (this.members) await markLeaving({ self: this.peer.id, members: this.members, why }).catch((err: Error) => this.log.warn({ reason: err.message }, 'could not mark this peer leaving'));
  }

  /** The graceful leave (src/cluster/graceful-leave.ts), then the hosts asked to log out; bounded, never throws. */
  private async leave(why: string): Promise<void> {
    if (!this.members || !this.core) return;
    await leave({ self: this.peer.id, members: this.members, catalog: this.core.catalog, migrator: this.core.migrator, env: this.env, log: this.log, why, stopAsking: () => this.core.resync.resyncer.stopAsking() });
    if (this.portal) askHostsToLeave(this.portal, () => false, this.logoutSeconds());
  }

  private async shutDown(): Promise<void> {
    const timer = this.env.timers.setTimeout(() => {
      this.log.warn('graceful stop took too long, aborting connections');
      this.portal?.destroy();
      this.rpcListener?.destroy();
      this.grpcServer?.forceShutdown();
    }, gracefulStopMs).unref();
    try {
      // Nothing new starts: no gossip, no balancing round.
      this.core?.load.stop();
      if (this.http) await this.http.close();
      this.hostBalancer?.stop();
      if (this.portal) await this.portal.close();
      if (this.grpcServer) {
        // No new connections or calls from here; the other peers' data streams end once answered.
        this.rpcListener?.close();
        const shut = new Promise<void>((r) => this.grpcServer.tryShutdown(() => r()));
        await Promise.all([shut, this.core?.pages.endStreams()]);
        // A connection whose handshake ended after the above (a data stream endStreams did not
        // know, a gRPC one handed over after the shutdown) is closed here, not left open.
        this.rpcListener?.destroy();
      }
      this.unfollowMembers?.();
      this.members?.close();
      this.core?.close();
      this.transport?.close();
      this.scheduler?.stop();
      if (this.store) await this.store.close();
      if (this.meta && this.meta !== this.opts.meta) await this.meta.close();
      this.log.info('peer stopped');
    } finally {
      this.env.timers.clearTimeout(timer);
    }
  }
}

/**
 * Stop every peer of a group at once (the demo's Ctrl-C, a test's end): every peer is marked
 * leaving first, so none hands its roles to another that is stopping too.
 */
export async function stopGroup(servers: readonly PeerServer[], why: string): Promise<void> {
  await Promise.allSettled(servers.map((s) => s.markLeaving(why)));
  await Promise.allSettled(servers.map((s) => s.stop(why)));
}
