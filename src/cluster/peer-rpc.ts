// PeerService (proto/peersan.proto) on the peer's gRPC server, requiring peer authentication
// (peer-auth.ts); the authenticator it shares with the block data streams on the same port
// (src/routing/data-stream.ts: one NonceLedger, one log limiter); and the client side one peer
// uses to call another's PeerService. The data stream's client is src/routing/link.ts.

import type { PeerCertificate } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { LogLimiter } from '../log';
import { ConflictError, InvalidArgumentError, NotFoundError, PeersanError, PeerUnavailableError } from '../errors';
import type { FinishRequest, MoveInfo, PrepareRequest } from '../migration/migrator';
import type { FrozenReport } from '../snapshot/records';
import type { PrepareReply, PrepareSnapshot, TakeSnapshot } from '../snapshot/service';
import { statusForCode, type PeerStatusView } from '../server/admin';
import type { PlannedMove } from '../loadmon/balancer';
import type { MoveOutcome } from '../loadmon/balancer-driver';
import type { LoadSummary } from '../loadmon/monitor';
import type { MovedSession } from '../server/host-balance-service';
import { hostMovePlanMsMax, peerBatchBytesMax, peerPlannedMovesMax, peerReplicationBodyBytesMax, peerRequestVolumesMax, peerUnitAttentionsMax } from '../limits';
import { NonceLedger, peerAuthFieldsOf, peerAuthMetadata, peerDataMethod, verifyPeerAuthFields, type Members, type PeerAuthFields, type PeerAuthVerdict } from './peer-auth';
import { certifiedPeerId, type TlsChannel } from './peer-tls';
import {
  checkIscsiName, checkLayers, checkList, checkPage, checkPeerId, checkPeerIdOrEmpty, checkPlannedMove, checkSnapshotId, checkString, checkUint, checkVolumeId, checkVolumeName, proto,
  type MoveFinishRequestMessage, type MovePageRequestMessage, type MovePrepareRequestMessage, type MoveSessionRequestMessage, type PlannedMoveListMessage,
  type ReservationNoticeMessage, type SnapshotPrepareRequestMessage, type SnapshotReleaseRequestMessage, type SnapshotTakeRequestMessage,
} from './proto';
import type { ReservationNotice } from './shared-reservations';

export interface PeerHandlers {
  status(): Promise<PeerStatusView>;
  reservationChanged(notice: ReservationNotice): Promise<void>;
  startMove(volume: string, page: number, to: string): Promise<MoveInfo>;
  cancelMove(volume: string, page: number): Promise<void>;
  moves(): MoveInfo[];
  movePrepare(req: PrepareRequest): Promise<void>;
  moveFinish(req: FinishRequest): Promise<void>;
  snapshotPrepare(req: PrepareSnapshot): Promise<PrepareReply>;
  snapshotTake(req: TakeSnapshot): Promise<FrozenReport>;
  snapshotRelease(snapshotId: string, abort: boolean, finish?: boolean): Promise<number>;
  /** A load summary from peer `from` (authenticated). */
  gossip?(from: string, summary: LoadSummary): void;
  /** `peersan rebalance` on another peer: start these moves of pages this peer owns. */
  startMoves?(moves: PlannedMove[]): Promise<MoveOutcome[]>;
  /** Host balancing (absent: the peer answers UNIMPLEMENTED-like errors). */
  moveSession?(session: string, to: string): Promise<MovedSession[]>;
  planHostMove?(plan: HostMovePlanMessage): Promise<void>;
  /** Replicas (src/replication): a message of `kind` from peer `from` (authenticated); the answer's JSON. */
  replication?(from: string, kind: string, body: string): Promise<string>;
}

export interface HostMovePlanMessage {
  initiatorName: string;
  targetName: string;
  to: string;
  ttlMs: number;
}

type Unary<Req> = (call: grpc.ServerUnaryCall<Req, unknown>, cb: grpc.sendUnaryData<unknown>) => void;

/** A unary PeerService method of the generated client (proto.ts loads the service at run time). */
type UnaryMethod = (request: object, md: grpc.Metadata, options: grpc.CallOptions, cb: (err: grpc.ServiceError | null, reply: unknown) => void) => void;

export interface PeerServiceAuth {
  secret: string;
  /** The group's members: the catalog's records (members join while this runs). */
  members: Members;
  self: string;
  /** Mutual TLS (peer-tls.ts): the caller's certificate must name the peer its header claims. */
  tls: boolean;
}

/** Options of gRPC channels between peers (PeerService) and of the server. */
export const peerChannelOptions: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': peerBatchBytesMax,
  'grpc.max_send_message_length': peerBatchBytesMax,
  // A peer that comes back is reached again within about a second (gRPC's default backoff grows to minutes).
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 1_000,
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
};

/** A PeerService call, as far as authenticating it goes. */
interface AuthenticatedCall {
  metadata: grpc.Metadata;
  getPath(): string;
  getPeer(): string;
  getAuthContext(): { sslPeerCertificate?: PeerCertificate } | null;
}

/** Checks the peer-auth fields of PeerService calls and data-stream hellos: one nonce ledger for both. */
export class PeerAuthenticator {
  private readonly headerAuth: { secret: string; members: Members; nonces: NonceLedger };
  private readonly limiter = new LogLimiter();
  readonly self: string;

  constructor(
    private readonly auth: PeerServiceAuth,
    private readonly log: Logger,
  ) {
    this.self = auth.self;
    this.headerAuth = { secret: auth.secret, members: auth.members, nonces: new NonceLedger() };
  }

  /**
   * The caller's peer id, or why it is refused: the fields first, then (TLS) the certificate,
   * `certified` being the peer id the client's verified certificate names. Refusals are logged.
   */
  check(fields: PeerAuthFields, method: string, certified: string | undefined, from: string): PeerAuthVerdict {
    const verdict = this.verdict(fields, method, certified);
    if (!verdict.ok) this.limiter.warn(this.log, `peer-auth:${method}`, { from, method, reason: verdict.why }, 'refused a peer call without valid peer authentication');
    return verdict;
  }

  /** A data stream's hello (src/routing/data-stream.ts RpcListenerOptions.authenticate). */
  readonly hello = (fields: PeerAuthFields, certified: string | undefined, from: string): PeerAuthVerdict => this.check(fields, peerDataMethod, certified, from);

  /** A gRPC call's calling peer, or undefined when refused. */
  call(call: AuthenticatedCall): string | undefined {
    const v = this.check(peerAuthFieldsOf(call.metadata), call.getPath(), certifiedPeerId(call), call.getPeer());
    return v.ok ? v.peerId : undefined;
  }

  private verdict(fields: PeerAuthFields, method: string, certified: string | undefined): PeerAuthVerdict {
    const verdict = verifyPeerAuthFields(fields, method, this.headerAuth);
    if (!verdict.ok || !this.auth.tls) return verdict;
    return certified === verdict.peerId ? verdict : { ok: false, why: `the TLS client certificate names ${certified ?? 'nobody'}, not ${verdict.peerId}` };
  }
}

export function addPeerServices(server: grpc.Server, h: PeerHandlers, authenticator: PeerAuthenticator): void {
  const authenticate = (call: AuthenticatedCall): string | undefined => authenticator.call(call);
  const denied = { code: grpc.status.UNAUTHENTICATED, details: 'not a member of this group (peer authentication failed)' };
  // Each handler checks its request's fields (proto.ts check*) before use: a throw there is INVALID_ARGUMENT.
  const wrap = <Req = unknown>(fn: (req: Req) => Promise<unknown>): Unary<Req> => (call, cb) => {
    if (authenticate(call) === undefined) return cb(denied);
    Promise.resolve().then(() => fn(call.request)).then(
      (reply) => cb(null, reply ?? {}),
      (err: Error) => cb({ code: err instanceof PeersanError ? (statusForCode[err.code] ?? grpc.status.INTERNAL) : grpc.status.INTERNAL, details: err.message }),
    );
  };
  const service = (proto().PeerService as grpc.ServiceClientConstructor).service;
  server.addService(service, {
    ping: wrap(async () => ({ id: authenticator.self, sentAtMs: Date.now() })),
    status: wrap(() => h.status()),
    reservationChanged: wrap((r: ReservationNoticeMessage) =>
      h.reservationChanged({
        volumeId: checkVolumeId(r.volumeId),
        version: checkUint(r.version, 'version', Number.MAX_SAFE_INTEGER),
        unitAttentions: checkList(r.unitAttentions, 'unitAttentions', peerUnitAttentionsMax, (u, what) => {
          const ua = u as { nexusKey?: unknown; asc?: unknown };
          return [checkString(ua.nexusKey, `${what}.nexusKey`, 2 * 255 + 16), checkUint(ua.asc, `${what}.asc`, 0xffff)] as [string, number];
        }),
      }),
    ),
    startMove: wrap((r: MovePageRequestMessage) => h.startMove(checkVolumeName(r.volume), checkPage(r.page), checkPeerId(r.to, 'to'))),
    cancelMove: wrap((r: MovePageRequestMessage) => h.cancelMove(checkVolumeName(r.volume), checkPage(r.page))),
    moves: wrap(async () => ({ moves: h.moves() })),
    movePrepare: wrap((r: MovePrepareRequestMessage) => h.movePrepare({ volumeId: checkVolumeId(r.volumeId), page: checkPage(r.page), from: checkPeerId(r.from, 'from'), fresh: r.fresh === true })),
    moveFinish: wrap((r: MoveFinishRequestMessage) => h.moveFinish({ volumeId: checkVolumeId(r.volumeId), page: checkPage(r.page), committed: r.committed === true, version: checkUint(r.version, 'version', 0xffff_ffff), ...(r.from ? { from: checkPeerId(r.from, 'from') } : {}) })),
    snapshotPrepare: wrap((r: SnapshotPrepareRequestMessage) =>
      h.snapshotPrepare({
        snapshotId: checkSnapshotId(r.snapshotId),
        volumeIds: checkList(r.volumeIds, 'volumeIds', peerRequestVolumesMax, (v, what) => checkVolumeId(v, what)),
        mode: r.mode === 'timestamp' ? 'timestamp' : undefined,
        layers: checkLayers(r.layers),
      }),
    ),
    snapshotTake: wrap(async (r: SnapshotTakeRequestMessage) => {
      // A cut is a hybrid-clock stamp (src/snapshot/hlc.ts): a whole, safe number; 0 or absent for barrier snapshots.
      const cut = r.cut === 0 || r.cut === undefined ? undefined : checkUint(r.cut, 'cut', Number.MAX_SAFE_INTEGER);
      return h.snapshotTake({ snapshotId: checkSnapshotId(r.snapshotId), layers: checkLayers(r.layers), cut });
    }),
    snapshotRelease: wrap(async (r: SnapshotReleaseRequestMessage) => ({ heldMs: await h.snapshotRelease(checkSnapshotId(r.snapshotId), r.abort === true, r.finish === true) })),
    // Load monitoring (src/loadmon): the summary's sender must be the authenticated peer.
    gossip: (call: grpc.ServerUnaryCall<LoadSummary, object>, cb: grpc.sendUnaryData<object>) => {
      const from = authenticate(call);
      if (!from) return cb(denied);
      h.gossip?.(from, call.request);
      cb(null, {});
    },
    startMoves: wrap(async (r: PlannedMoveListMessage) => {
      const moves: PlannedMove[] = checkList(r.moves, 'moves', peerPlannedMovesMax, checkPlannedMove);
      return { moves: h.startMoves ? await h.startMoves(moves) : [] };
    }),
    moveSession: wrap(async (r: MoveSessionRequestMessage) => ({ moved: h.moveSession ? await h.moveSession(checkIscsiName(r.session, 'session'), checkPeerIdOrEmpty(r.to, 'to')) : [] })),
    replication: (call: grpc.ServerUnaryCall<{ kind?: unknown; body?: unknown }, object>, cb: grpc.sendUnaryData<object>) => {
      const from = authenticate(call);
      if (!from) return cb(denied);
      const kind = checkString(call.request.kind, 'kind', 64);
      const body = checkString(call.request.body ?? '', 'body', peerReplicationBodyBytesMax);
      if (!h.replication) return cb({ code: grpc.status.UNIMPLEMENTED, details: 'this peer does not replicate' });
      h.replication(from, kind, body).then(
        (reply) => cb(null, { body: reply }),
        (err: Error) => cb({ code: err instanceof PeersanError ? (statusForCode[err.code] ?? grpc.status.INTERNAL) : grpc.status.INTERNAL, details: err.message }),
      );
    },
    planHostMove: wrap(async (r: HostMovePlanMessage) =>
      h.planHostMove?.({ initiatorName: checkIscsiName(r.initiatorName, 'initiatorName'), targetName: checkIscsiName(r.targetName, 'targetName'), to: checkPeerId(r.to, 'to'), ttlMs: checkUint(r.ttlMs, 'ttlMs', hostMovePlanMsMax) }),
    ),
  });
}

/** Calls to one other peer's PeerService. */
export class PeerRpcClient {
  private readonly client: grpc.Client & Record<string, UnaryMethod>;

  /** gRPC path of each method by its client-side name ("status" → "/peersan.PeerService/Status"): the MAC covers it. */
  private readonly paths: Map<string, string>;

  /** `tls`: mutual TLS to this peer (peer-tls.ts); absent for a group without `cluster.tls`. */
  constructor(
    readonly peerId: string,
    address: string,
    private readonly auth: { secret: string; self: string },
    tls?: TlsChannel,
  ) {
    const Ctor = proto().PeerService as grpc.ServiceClientConstructor;
    this.paths = new Map(Object.values(Ctor.service).map((d) => [String(d.originalName), d.path]));
    this.client = new Ctor(address, tls?.credentials ?? grpc.credentials.createInsecure(), { ...peerChannelOptions, ...tls?.options }) as grpc.Client & Record<string, UnaryMethod>;
  }

  /**
   * Resolves once the channel is connected, waiting at most `timeoutMs`. A channel in its
   * reconnect backoff fails calls at once, even when the peer has just come back: a step that
   * must not start half-done (a snapshot's PREPARE) waits for every peer here first.
   */
  ready(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.client.waitForReady(Date.now() + timeoutMs, (err?: Error) => (err ? reject(new PeerUnavailableError(this.peerId, `not reachable within ${timeoutMs} ms`, true)) : resolve()));
    });
  }

  /**
   * One unary call. `waitForReady`: a channel in its reconnect backoff (the peer restarted a
   * moment ago) makes the call wait for the connection, within the deadline, instead of failing
   * at once; for the steps of a page move, which must reach the one peer that can act.
   */
  private call<T>(method: string, request: object, timeoutMs: number, waitForReady = false): Promise<T> {
    return new Promise((resolve, reject) => {
      const md = peerAuthMetadata(this.auth.secret, this.auth.self, this.paths.get(method)!);
      // grpc-js reads waitForReady from the metadata's options, not from the call options.
      if (waitForReady) md.setOptions({ waitForReady: true });
      this.client[method](request, md, { deadline: Date.now() + timeoutMs }, (err, reply) => {
        if (!err) return resolve(reply as T);
        const Known = errorForStatus.get(err.code);
        reject(Known ? new Known(err.details) : new PeerUnavailableError(this.peerId, err.details || err.message, err.code === grpc.status.DEADLINE_EXCEEDED));
      });
    });
  }

  /**
   * Waits for the connection within the deadline: a peer that started a moment ago may find this
   * channel in its reconnect backoff (the leases ping every peer from the start), and would be
   * shown down although it answers. `waitForReady` false: an address where nothing listens
   * answers at once (the first connection attempt is refused), not at the deadline.
   */
  status(timeoutMs: number, waitForReady = true): Promise<PeerStatusView> {
    return this.call('status', {}, timeoutMs, waitForReady);
  }

  async reservationChanged(notice: ReservationNotice, timeoutMs: number): Promise<void> {
    await this.call('reservationChanged', { volumeId: notice.volumeId, version: notice.version, unitAttentions: notice.unitAttentions.map(([nexusKey, asc]) => ({ nexusKey, asc })) }, timeoutMs);
  }

  startMove(volume: string, page: number, to: string, timeoutMs: number): Promise<MoveInfo> {
    return this.call('startMove', { volume, page, to }, timeoutMs, true);
  }

  async cancelMove(volume: string, page: number, timeoutMs: number): Promise<void> {
    await this.call('cancelMove', { volume, page }, timeoutMs, true);
  }

  async moves(timeoutMs: number): Promise<MoveInfo[]> {
    return (await this.call<{ moves?: MoveInfo[] }>('moves', {}, timeoutMs)).moves ?? [];
  }

  async movePrepare(req: PrepareRequest, timeoutMs: number): Promise<void> {
    await this.call('movePrepare', req, timeoutMs, true);
  }

  async moveFinish(req: FinishRequest, timeoutMs: number): Promise<void> {
    await this.call('moveFinish', req, timeoutMs, true);
  }

  async snapshotPrepare(req: PrepareSnapshot, timeoutMs: number): Promise<PrepareReply> {
    const r = await this.call<{ clock?: number } & Partial<FrozenReport>>('snapshotPrepare', req, timeoutMs);
    return { clock: r.clock ?? 0, moving: r.moving ?? [], suspect: r.suspect ?? [] };
  }

  async snapshotTake(req: TakeSnapshot, timeoutMs: number): Promise<FrozenReport> {
    const r = await this.call<Partial<FrozenReport>>('snapshotTake', req, timeoutMs);
    return { moving: r.moving ?? [], suspect: r.suspect ?? [] };
  }

  async snapshotRelease(snapshotId: string, abort: boolean, timeoutMs: number, finish = false): Promise<number> {
    return (await this.call<{ heldMs?: number }>('snapshotRelease', { snapshotId, abort, finish }, timeoutMs)).heldMs ?? 0;
  }

  async gossip(summary: LoadSummary, timeoutMs: number): Promise<void> {
    await this.call('gossip', summary, timeoutMs);
  }

  async startMoves(moves: PlannedMove[], timeoutMs: number): Promise<MoveOutcome[]> {
    return (await this.call<{ moves: MoveOutcome[] }>('startMoves', { moves }, timeoutMs)).moves;
  }

  async moveSession(session: string, to: string, timeoutMs: number): Promise<MovedSession[]> {
    return (await this.call<{ moved: MovedSession[] }>('moveSession', { session, to }, timeoutMs)).moved ?? [];
  }

  async planHostMove(plan: HostMovePlanMessage, timeoutMs: number): Promise<void> {
    await this.call('planHostMove', plan, timeoutMs);
  }

  /** A replication message (src/replication/messages.ts): its answer's JSON. */
  async replication(kind: string, body: string, timeoutMs: number): Promise<string> {
    return (await this.call<{ body?: string }>('replication', { kind, body }, timeoutMs)).body ?? '';
  }

  close(): void {
    this.client.close();
  }
}

/** Errors a peer answered on purpose (not "unreachable"), rebuilt on the caller's side. */
const errorForStatus = new Map<grpc.status, new (message: string) => PeersanError>([
  [grpc.status.INVALID_ARGUMENT, InvalidArgumentError],
  [grpc.status.NOT_FOUND, NotFoundError],
  [grpc.status.ABORTED, ConflictError],
  [grpc.status.INTERNAL, PeersanError],
]);
