// AdminService over gRPC (proto/peersan.proto): the server side maps calls onto an AdminApi
// after checking the admin token; the client side is what the CLI uses. Errors travel as
// gRPC status codes with our one-line message.

import { timingSafeEqual } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import type { TlsChannel } from '../cluster/peer-tls';
import type { Logger } from 'pino';
import type { GroupStatus, PeerStatusView } from '../cluster/group-status';
import type { PeerFill } from '../replication/spread';
import type { PageMapView, PageRange, VolumeAdmin, VolumeView } from '../cluster/volume-admin';
import { proto } from '../cluster/proto';
import { PeersanError, UnauthorizedError } from '../errors';
import { LogLimiter } from '../log';
import { wireUint32 } from './admin-input';
import type { MoveAdmin } from '../migration/admin';
import type { MoveInfo } from '../migration/migrator';
import type { SnapshotMode } from '../snapshot/records';
import type { SnapshotView } from '../snapshot/service';
import type { LoadAdmin } from '../loadmon/admin';
import type { RebalanceReply, TopReply } from '../loadmon/service';
import type { SnapshotAdmin } from '../snapshot/admin';
import type { MovedSession } from './host-balance-service';
import type { SessionAdmin } from './host-balance-wiring';
import type { ReplicationAdmin } from '../replication/admin';
import type { ProtectionSummary } from '../replication/protection';
import type { DrainProgress, MembershipAdmin } from '../cluster/membership-admin';
import type { MemberRecord } from '../cluster/members';

export type { PeerStatusView } from '../cluster/group-status';
export type { PageMapView, PageRange, VolumeView } from '../cluster/volume-admin';

/**
 * What AdminService serves: each operation is its concept's (the modules named in the imports);
 * a peer's full set (PeerServer.admin) has the console's extras too (http-api.ts OptionalAdminOps).
 */
export interface AdminApi
  extends Pick<GroupStatus, 'status'>,
    Omit<VolumeAdmin, 'setVolumeAccess'>,
    Pick<MoveAdmin, 'movePage' | 'cancelMove' | 'migrations'>,
    Omit<SnapshotAdmin, 'createSnapshot'>,
    Pick<LoadAdmin, 'top' | 'rebalance' | 'setAutoBalance'>,
    Pick<ReplicationAdmin, 'setReplicas'>,
    Partial<SessionAdmin>,
    MembershipAdmin {
  status(): Promise<StatusReply>;
  top(pages: number): Promise<TopReply & { protection?: ProtectionSummary } & Partial<CopySpreadView>>;
}

/** Each peer's stored copies against its share, and the spread's last round (status, top). */
export interface CopySpreadView {
  fills: PeerFill[];
  spreadRound: string;
}

/** The group's peers and how many volumes are in each protection state. */
export interface StatusReply {
  cluster: string;
  peers: PeerStatusView[];
  protection?: ProtectionSummary;
  fills?: PeerFill[];
}

export const statusForCode: Record<string, grpc.status> = {
  PEERSAN_ERR_INVALID_ARGUMENT: grpc.status.INVALID_ARGUMENT,
  PEERSAN_ERR_NOT_FOUND: grpc.status.NOT_FOUND,
  PEERSAN_ERR_ALREADY_EXISTS: grpc.status.ALREADY_EXISTS,
  PEERSAN_ERR_CONFLICT: grpc.status.ABORTED,
  PEERSAN_ERR_UNAUTHORIZED: grpc.status.UNAUTHENTICATED,
  PEERSAN_ERR_CLOSED: grpc.status.UNAVAILABLE,
};

/** Constant-time comparison of a presented admin token (also used by the HTTP console). */
export function tokenEquals(presented: string, token: string): boolean {
  const got = Buffer.from(presented);
  const want = Buffer.from(token);
  return got.length === want.length && timingSafeEqual(got, want);
}

function tokenMatches(metadata: grpc.Metadata, token: string): boolean {
  const header = metadata.get('authorization')[0];
  return tokenEquals(typeof header === 'string' ? header.replace(/^Bearer /, '') : '', token);
}

type Unary = (call: grpc.ServerUnaryCall<any, any>, cb: grpc.sendUnaryData<any>) => void;

export function addAdminService(server: grpc.Server, api: AdminApi, adminToken: string, log: Logger): void {
  // A caller with the token can repeat a failing call at will: one line per call per window.
  const limiter = new LogLimiter();
  const wrap = (name: string, fn: (req: any) => Promise<unknown>): Unary => (call, cb) => {
    if (!tokenMatches(call.metadata, adminToken)) {
      cb({ code: grpc.status.UNAUTHENTICATED, details: 'admin token missing or wrong (use --token, $PEERSAN_TOKEN or the config file)' });
      return;
    }
    fn(call.request).then(
      (reply) => cb(null, reply ?? {}),
      (err: unknown) => {
        const code = err instanceof PeersanError ? (statusForCode[err.code] ?? grpc.status.INTERNAL) : grpc.status.INTERNAL;
        if (code === grpc.status.INTERNAL) limiter.log(log, 'error', name, { err, call: name }, 'admin call failed');
        cb({ code, details: err instanceof Error ? err.message : String(err) });
      },
    );
  };
  const service = (proto().AdminService as grpc.ServiceClientConstructor).service;
  server.addService(service, {
    status: wrap('status', () => api.status()),
    createVolume: wrap('createVolume', (r) =>
      api.createVolume({
        name: r.name, size: r.size, blockBytes: r.blockBytes || undefined, allow: r.allow,
        chap: r.chap && r.chap.user ? { user: r.chap.user, secret: r.chap.secret, mutualUser: r.chap.mutualUser || undefined, mutualSecret: r.chap.mutualSecret || undefined } : undefined,
        peers: r.peers, replicas: r.replicas || undefined,
      })),
    listVolumes: wrap('listVolumes', async () => ({ volumes: await api.listVolumes() })),
    getVolume: wrap('getVolume', (r) => api.getVolume(r.name)),
    deleteVolume: wrap('deleteVolume', (r) => api.deleteVolume(r.name, r.force)),
    resizeVolume: wrap('resizeVolume', (r) => api.resizeVolume(r.name, r.size)),
    // from and count 0: not given (proto3 fills in defaults); the peer checks the range.
    pageMap: wrap('pageMap', (r) => api.pageMap(r.name, { from: r.from || undefined, count: r.count || undefined })),
    movePage: wrap('movePage', (r) => api.movePage(r.volume, r.page, r.to)),
    createSnapshot: wrap('createSnapshot', async (r) => ({ snapshots: await api.createSnapshots(r.volumes ?? [], { name: r.name || undefined, mode: (r.mode || undefined) as SnapshotMode | undefined, group: r.group || undefined }) })),
    listSnapshots: wrap('listSnapshots', async (r) => ({ snapshots: await api.listSnapshots(r.name) })),
    deleteSnapshot: wrap('deleteSnapshot', (r) => api.deleteSnapshot(r.volume, r.name)),
    restoreSnapshot: wrap('restoreSnapshot', (r) => api.restoreSnapshot(r.volume, r.name, r.force === true)),
    cloneSnapshot: wrap('cloneSnapshot', (r) => api.cloneSnapshot(r.volume, r.name, r.newVolume)),
    scheduleSnapshots: wrap('scheduleSnapshots', (r) => api.scheduleSnapshots(r.volume, r.every, r.keep)),
    cancelMove: wrap('cancelMove', (r) => api.cancelMove(r.volume, r.page)),
    migrations: wrap('migrations', () => api.migrations()),
    top: wrap('top', (r) => api.top(r.pages || 16)),
    rebalance: wrap('rebalance', (r) => api.rebalance(r.dryRun === true)),
    setAutoBalance: wrap('setAutoBalance', (r) => api.setAutoBalance(r.volume, r.on === true)),
    setReplicas: wrap('setReplicas', (r) => api.setReplicas(r.volume, r.replicas)),
    moveSession: wrap('moveSession', async (r) => {
      if (!api.moveSession) throw new PeersanError('host balancing is not available on this peer', 'PEERSAN_ERR_INVALID_ARGUMENT');
      return { moved: await api.moveSession(r.session, r.to, r.on) };
    }),
    drainPeer: wrap('drainPeer', (r) => api.drainPeer(r.id)),
    undrainPeer: wrap('undrainPeer', (r) => api.undrainPeer(r.id)),
    removePeer: wrap('removePeer', (r) => api.removePeer(r.id, r.force === true)),
    stopPeer: wrap('stopPeer', (r) => api.stopPeer(r.id)),
    getDrainProgress: wrap('getDrainProgress', (r) => api.drainProgress(r.id)),
  });
}

/** A short reason for an unreachable peer instead of gRPC's paragraph. */
export function unreachableReason(err: grpc.ServiceError): string {
  if (err.code === grpc.status.DEADLINE_EXCEEDED) return 'timed out';
  const errno = /\b(ECONNREFUSED|EHOSTUNREACH|ENETUNREACH|ENOTFOUND|ECONNRESET|ETIMEDOUT)\b/.exec(err.details)?.[1];
  const names: Record<string, string> = { ECONNREFUSED: 'connection refused', ENOTFOUND: 'unknown host', ETIMEDOUT: 'timed out' };
  return errno ? (names[errno] ?? errno) : 'unavailable';
}

/** The CLI's view of a peer's AdminService. */
export class AdminClient {
  private readonly client: grpc.Client & Record<string, any>;
  private readonly token: string;
  readonly address: string;

  /** `tls`: TLS against the cluster CA (src/cluster/peer-tls.ts) for a group with `cluster.tls`; absent: plain. */
  constructor(address: string, token: string, tls?: TlsChannel) {
    const Ctor = proto().AdminService as grpc.ServiceClientConstructor;
    this.client = new Ctor(address, tls?.credentials ?? grpc.credentials.createInsecure(), tls?.options) as grpc.Client & Record<string, any>;
    this.token = token;
    this.address = address;
  }

  private call<T>(method: string, request: object, timeoutMs = 30_000): Promise<T> {
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Bearer ${this.token}`);
    return new Promise((resolve, reject) => {
      this.client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, reply: T) => {
        if (!err) return resolve(reply);
        if (err.code === grpc.status.UNAUTHENTICATED) return reject(new UnauthorizedError(err.details));
        if (err.code === grpc.status.UNAVAILABLE || err.code === grpc.status.DEADLINE_EXCEEDED) {
          return reject(new PeersanError(`cannot reach peer at ${this.address} (${unreachableReason(err)})`, 'PEERSAN_ERR_UNREACHABLE'));
        }
        reject(new PeersanError(err.details || err.message, 'PEERSAN_ERR_REMOTE'));
      });
    });
  }

  status(): Promise<StatusReply> {
    return this.call('status', {});
  }
  createVolume(input: { name: string; size: string; blockBytes?: number; allow?: string[]; peers?: string[]; replicas?: number; chap?: { user: string; secret: string; mutualUser?: string; mutualSecret?: string } }): Promise<VolumeView> {
    if (input.blockBytes !== undefined) wireUint32(input.blockBytes, 'block size');
    if (input.replicas !== undefined) wireUint32(input.replicas, 'replicas');
    return this.call('createVolume', input);
  }
  async listVolumes(): Promise<VolumeView[]> {
    return (await this.call<{ volumes: VolumeView[] }>('listVolumes', {})).volumes;
  }
  getVolume(name: string): Promise<VolumeView> {
    return this.call('getVolume', { name });
  }
  async deleteVolume(name: string, force: boolean): Promise<void> {
    await this.call('deleteVolume', { name, force });
  }
  resizeVolume(name: string, size: string): Promise<VolumeView> {
    return this.call('resizeVolume', { name, size });
  }
  /** A bounded page map: the summary and the detail of `range` (src/cluster/volume-admin.ts). */
  async pageMap(name: string, range: PageRange = {}): Promise<PageMapView> {
    const m = await this.call<PageMapView>('pageMap', { name, from: wireUint32(range.from ?? 0, 'from'), count: wireUint32(range.count ?? 0, 'count') });
    // proto3 says "no next page" as 0 (a next page is always after from ≥ 0).
    const { next, ...rest } = m;
    return next ? { ...rest, next } : rest;
  }
  async movePage(volume: string, page: number, to: string): Promise<MoveInfo> {
    return this.call('movePage', { volume, page: wireUint32(page, 'page'), to });
  }
  async createSnapshots(volumes: string[], opts: { name?: string; mode?: string; group?: string }): Promise<SnapshotView[]> {
    return (await this.call<{ snapshots?: SnapshotView[] }>('createSnapshot', { volumes, ...opts }, 60_000)).snapshots ?? [];
  }
  async listSnapshots(volume: string): Promise<SnapshotView[]> {
    return (await this.call<{ snapshots?: SnapshotView[] }>('listSnapshots', { name: volume })).snapshots ?? [];
  }
  async deleteSnapshot(volume: string, name: string): Promise<void> {
    await this.call('deleteSnapshot', { volume, name });
  }
  restoreSnapshot(volume: string, name: string, force: boolean): Promise<{ copiedBytes: number; unmappedBytes: number }> {
    return this.call('restoreSnapshot', { volume, name, force }, 3_600_000);
  }
  cloneSnapshot(volume: string, name: string, newVolume: string): Promise<VolumeView> {
    return this.call('cloneSnapshot', { volume, name, newVolume }, 3_600_000);
  }
  async scheduleSnapshots(volume: string, every: string, keep: number): Promise<{ volume: string; everyMs: number; keep: number }> {
    return this.call('scheduleSnapshots', { volume, every, keep: wireUint32(keep, 'keep') });
  }
  async cancelMove(volume: string, page: number): Promise<void> {
    await this.call('cancelMove', { volume, page: wireUint32(page, 'page') });
  }
  async migrations(): Promise<{ moves: MoveInfo[]; unreachable: string[] }> {
    const r = await this.call<{ moves?: MoveInfo[]; unreachable?: string[] }>('migrations', {});
    return { moves: r.moves ?? [], unreachable: r.unreachable ?? [] };
  }
  async top(pages = 16): Promise<TopReply & { protection?: ProtectionSummary }> {
    return this.call('top', { pages: wireUint32(pages, 'pages') }, 10_000);
  }
  rebalance(dryRun: boolean): Promise<RebalanceReply> {
    return this.call('rebalance', { dryRun });
  }
  setAutoBalance(volume: string, on: boolean): Promise<{ volume: string; on: boolean }> {
    return this.call('setAutoBalance', { volume, on });
  }
  setReplicas(volume: string, replicas: number): Promise<VolumeView> {
    return this.call('setReplicas', { volume, replicas: wireUint32(replicas, 'replicas') });
  }
  async moveSession(session: string, to: string, on = ''): Promise<MovedSession[]> {
    return (await this.call<{ moved: MovedSession[] }>('moveSession', { session, to, on })).moved ?? [];
  }
  drainPeer(id: string): Promise<DrainProgress> {
    return this.call<DrainProgress>('drainPeer', { id }).then(withPinned);
  }
  undrainPeer(id: string): Promise<MemberRecord> {
    return this.call('undrainPeer', { id });
  }
  removePeer(id: string, force: boolean): Promise<MemberRecord> {
    return this.call('removePeer', { id, force });
  }
  stopPeer(id: string): Promise<MemberRecord> {
    return this.call('stopPeer', { id });
  }
  drainProgress(id: string): Promise<DrainProgress> {
    return this.call<DrainProgress>('getDrainProgress', { id }).then(withPinned);
  }
  /** Resolves when the channel to the peer is connected, rejects at the deadline (no call made). */
  ready(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.client.waitForReady(Date.now() + timeoutMs, (err?: Error) => (err ? reject(new PeersanError(`cannot reach peer at ${this.address} (timed out)`, 'PEERSAN_ERR_UNREACHABLE')) : resolve()));
    });
  }
  close(): void {
    this.client.close();
  }
}

/** A repeated field left empty by proto-loader may be absent. */
function withPinned(p: DrainProgress): DrainProgress {
  return { ...p, pinned: p.pinned ?? [] };
}
