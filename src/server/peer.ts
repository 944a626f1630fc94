// One peer process: the page store, the catalog, the iSCSI portal and the gRPC services,
// wired from cluster.yaml. start() brings them up in dependency order; stop() takes them
// down in reverse, draining in-flight commands first.

import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { Catalog, type VolumeRecord } from '../cluster/catalog';
import { EmbeddedMetaStore } from '../cluster/embedded';
import { InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import { Portal } from '../iscsi/portal';
import { targetNameFor } from '../iscsi/target';
import { gracefulStopMs } from '../limits';
import { PageStore } from '../store/page-store';
import { addAdminService, type AdminApi, type PeerStatusView, type VolumeView } from './admin';
import { splitHostPort, type ClusterConfig, type PeerConfig } from './config';
import { productRevision, VolumeTargets } from './targets';

export class PeerServer implements AdminApi {
  readonly config: ClusterConfig;
  readonly peer: PeerConfig;
  readonly log: Logger;
  private readonly startedAtMs = Date.now();
  private store!: PageStore;
  private meta!: EmbeddedMetaStore;
  private catalog!: Catalog;
  private targets!: VolumeTargets;
  private portal!: Portal;
  private grpcServer!: grpc.Server;
  private stopping: Promise<void> | undefined;

  private constructor(config: ClusterConfig, peer: PeerConfig, log: Logger) {
    this.config = config;
    this.peer = peer;
    this.log = log;
  }

  static async start(config: ClusterConfig, peerId: string, log: Logger): Promise<PeerServer> {
    const peer = config.peers.find((p) => p.id === peerId);
    if (!peer) throw new InvalidArgumentError(`peer ${peerId} is not in ${config.path ?? 'the config'} (peers: ${config.peers.map((p) => p.id).join(', ')})`);
    if (config.peers.length > 1) {
      throw new InvalidArgumentError('this build runs one-peer groups; multi-peer groups (routing, forwarding, etcd catalog) come with the peer group');
    }
    const server = new PeerServer(config, peer, log.child({ peer: peer.id }));
    try {
      await server.bringUp();
    } catch (err) {
      await server.stop().catch(() => undefined);
      throw err;
    }
    return server;
  }

  private async bringUp(): Promise<void> {
    this.store = await PageStore.open(join(this.peer.data, 'store'), { log: this.log });
    this.meta = await EmbeddedMetaStore.open(join(this.peer.data, 'catalog'));
    this.catalog = await Catalog.open(this.meta);
    this.targets = new VolumeTargets({ store: this.store, portalAddress: this.peer.iscsi, log: this.log });
    await this.targets.follow(this.catalog);
    const iscsi = splitHostPort(this.peer.iscsi, 'iscsi');
    this.portal = new Portal({ host: iscsi.host, port: iscsi.port, directory: this.targets, log: this.log });
    await this.portal.listen();
    this.grpcServer = new grpc.Server();
    addAdminService(this.grpcServer, this, this.config.adminToken, this.log);
    await new Promise<void>((resolve, reject) => {
      this.grpcServer.bindAsync(this.peer.rpc, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(new PeersanError(`cannot listen on ${this.peer.rpc}: ${err.message}`)) : resolve()));
    });
    this.log.info({ iscsi: this.peer.iscsi, rpc: this.peer.rpc, volumes: this.catalog.listVolumes().length, cleanStart: this.store.wasClean }, 'peer started');
  }

  /** Graceful: refuse new logins, finish in-flight commands, flush, close. Idempotent. */
  stop(): Promise<void> {
    if (!this.stopping) this.stopping = this.shutDown();
    return this.stopping;
  }

  private async shutDown(): Promise<void> {
    const timer = setTimeout(() => {
      this.log.warn('graceful stop took too long, aborting connections');
      this.portal?.destroy();
    }, gracefulStopMs);
    timer.unref();
    try {
      if (this.grpcServer) await new Promise<void>((r) => this.grpcServer.tryShutdown(() => r()));
      if (this.portal) await this.portal.close();
      this.catalog?.close();
      if (this.store) await this.store.close();
      if (this.meta) await this.meta.close();
      this.log.info('peer stopped');
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- AdminApi (the one admin layer the CLI and later the console use) --------------------

  async status(): Promise<{ cluster: string; peers: PeerStatusView[] }> {
    const fs = await statfs(this.peer.data).catch(() => undefined);
    const self: PeerStatusView = {
      id: this.peer.id, iscsi: this.peer.iscsi, rpc: this.peer.rpc, http: this.peer.http, up: true,
      uptimeMs: Date.now() - this.startedAtMs, allocatedBytes: this.store.usage().allocatedBytes,
      freeBytes: fs ? fs.bavail * fs.bsize : 0, totalBytes: fs ? fs.blocks * fs.bsize : 0,
      volumes: this.catalog.listVolumes().length, sessions: this.portal.sessions(), version: productRevision,
    };
    return { cluster: this.config.name, peers: [self] };
  }

  async createVolume(input: Parameters<Catalog['createVolume']>[0]): Promise<VolumeView> {
    const record = await this.catalog.createVolume(input);
    // Visible to initiators before the CLI hears "created".
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
    const sessions = this.sessionsOn(name);
    if (sessions > 0 && !force) {
      throw new InvalidArgumentError(`volume ${name} has ${sessions} session(s) logged in; log them out first or use --force`);
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
      sessions: this.sessionsOn(v.name), createdAtMs: v.createdAtMs, version: v.version,
    };
  }

  get iscsiAddress(): { host: string; port: number } {
    return this.portal.address;
  }
}
