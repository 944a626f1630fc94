// The console's JSON API: routes onto the same AdminApi the gRPC AdminService serves, so the
// console and the CLI get the same checks and the same one-line errors. Pure: a request
// (method, path, query, parsed body) in, {status, body} out; the socket side is http.ts.
//
// Operations other features will bring (page moves, migrations, per-page heat, peer load,
// rebalancing, snapshots, changing a volume's access) are optional methods of the API: a
// route whose method the peer lacks answers 501 "… is not available on this peer yet", and
// /api/status lists which ones exist so the page can say so before anyone clicks.

import { replicasMax, type ChapSettings, type CreateVolumeInput } from '../cluster/catalog';
import type { PeerFill } from '../replication/spread';
import { InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import type { AdminApi, PeerStatusView, VolumeView } from './admin';
import { pageNumber, wholeNumber, wireUint32 } from './admin-input';
import { wireUint32Max } from '../limits';
import type { EventLog } from './events';
import type { MoveInfo } from '../migration/migrator';
import type { HostIoTotals } from './metrics';

/** A page move in flight (src/migration/migrator.ts). */
export type MigrationView = MoveInfo;

export interface PageHeatView {
  volume: string;
  /** The window the rates are averaged over. */
  windowMs: number;
  pages: { page: number; iops: number; bytesPerSec: number }[];
}

export interface PeerLoadView {
  peer: string;
  iops: number;
  bytesPerSec: number;
  latencyMs?: number;
}

export interface SnapshotView {
  volume: string;
  name: string;
  createdAtMs: number;
  mode?: string;
}

export interface VolumeAccessInput {
  allow: string[];
  /** null: CHAP off; undefined: unchanged. */
  chap?: ChapSettings | null;
}

/** What later features add to AdminApi; each one is optional until it lands. */
export interface OptionalAdminOps {
  movePage(volume: string, page: number, to: string): Promise<MigrationView>;
  listMigrations(): Promise<MigrationView[]>;
  pageHeat(volume: string): Promise<PageHeatView>;
  peerLoads(): Promise<PeerLoadView[]>;
  rebalancing(): Promise<{ enabled: boolean }>;
  setRebalancing(enabled: boolean): Promise<{ enabled: boolean }>;
  listSnapshots(volume: string): Promise<SnapshotView[]>;
  createSnapshot(volume: string, opts: { name?: string; mode?: 'barrier' | 'timestamp' }): Promise<SnapshotView>;
  deleteSnapshot(volume: string, name: string): Promise<void>;
  setVolumeAccess(volume: string, access: VolumeAccessInput): Promise<VolumeView>;
}

export type ConsoleAdminApi = AdminApi & Partial<OptionalAdminOps>;

const optionalOps: Record<keyof OptionalAdminOps, string> = {
  movePage: 'moving pages',
  listMigrations: 'the migrations list',
  pageHeat: 'per-page load (heat)',
  peerLoads: 'per-peer load',
  rebalancing: 'the balancer',
  setRebalancing: 'starting and stopping the balancer',
  listSnapshots: 'snapshots',
  createSnapshot: 'taking snapshots',
  deleteSnapshot: 'deleting snapshots',
  setVolumeAccess: 'changing a volume\'s allow list and CHAP',
};

export class NotAvailableError extends PeersanError {
  constructor(what: string) {
    super(`${what} is not available on this peer yet`, 'PEERSAN_ERR_NOT_AVAILABLE');
    this.name = 'NotAvailableError';
  }
}

export class MethodNotAllowedError extends PeersanError {
  constructor(method: string, path: string) {
    super(`${method} is not allowed on ${path}`, 'PEERSAN_ERR_METHOD');
    this.name = 'MethodNotAllowedError';
  }
}

/** HTTP status per error code, like admin.ts maps them to gRPC codes. Anything else is 500. */
const httpStatusForCode: Record<string, number> = {
  PEERSAN_ERR_INVALID_ARGUMENT: 400,
  PEERSAN_ERR_UNAUTHORIZED: 401,
  PEERSAN_ERR_NOT_FOUND: 404,
  PEERSAN_ERR_METHOD: 405,
  PEERSAN_ERR_ALREADY_EXISTS: 409,
  PEERSAN_ERR_CONFLICT: 409,
  PEERSAN_ERR_TOO_LARGE: 413,
  PEERSAN_ERR_NOT_AVAILABLE: 501,
  PEERSAN_ERR_CLOSED: 503,
  PEERSAN_ERR_BUSY: 503,
};

export function httpStatusOf(err: unknown): number {
  return err instanceof PeersanError ? (httpStatusForCode[err.code] ?? 500) : 500;
}

/**
 * An answer we give on purpose (busy, not available, bad input), not a fault of ours: the log
 * gets its message, never a stack, since a client can ask for it as often as it likes.
 */
export function isExpectedRefusal(err: unknown): err is PeersanError {
  return err instanceof PeersanError && httpStatusForCode[err.code] !== undefined;
}

export interface ApiRequest {
  method: string;
  /** Path below /api/, split on '/', each part URI-decoded. */
  parts: string[];
  query: URLSearchParams;
  /** Parsed JSON body (undefined when there was none). */
  body: unknown;
}

export interface ApiReply {
  status: number;
  body: unknown;
  /** The error behind a 5xx answer, for the log. */
  err?: unknown;
}

export interface ApiContext {
  api: ConsoleAdminApi;
  self: string;
  events: EventLog;
  hostIo(): HostIoTotals;
}

/** The state the console shows, in one answer (also what the event stream pushes). */
export interface ConsoleState {
  cluster: string;
  self: string;
  atMs: number;
  /** Each peer with its load and its stored copies against its share (src/replication/spread.ts). */
  peers: (PeerStatusView & { load?: PeerLoadView; fill?: PeerFill })[];
  /** Host I/O received by this peer (running totals; the page turns two into rates). */
  hostIo: HostIoTotals;
  volumes: VolumeView[];
  rebalancing?: { enabled: boolean };
  /** Which optional operations this peer has. */
  features: Record<keyof OptionalAdminOps, boolean>;
}

export function features(api: ConsoleAdminApi): Record<keyof OptionalAdminOps, boolean> {
  const out = {} as Record<keyof OptionalAdminOps, boolean>;
  for (const k of Object.keys(optionalOps) as (keyof OptionalAdminOps)[]) out[k] = typeof api[k] === 'function';
  return out;
}

function optional<K extends keyof OptionalAdminOps>(api: ConsoleAdminApi, op: K): OptionalAdminOps[K] {
  const fn = api[op];
  if (typeof fn !== 'function') throw new NotAvailableError(optionalOps[op]);
  return (fn as (...a: unknown[]) => unknown).bind(api) as OptionalAdminOps[K];
}

export async function consoleState(ctx: ApiContext): Promise<ConsoleState> {
  const { api } = ctx;
  const [status, volumes, loads, rebalancing] = await Promise.all([
    api.status(),
    api.listVolumes(),
    api.peerLoads ? api.peerLoads() : Promise.resolve(undefined),
    api.rebalancing ? api.rebalancing() : Promise.resolve(undefined),
  ]);
  const loadOf = new Map((loads ?? []).map((l) => [l.peer, l]));
  const fillOf = new Map((status.fills ?? []).map((f) => [f.id, f]));
  const extras = (id: string) => ({ ...(loadOf.has(id) ? { load: loadOf.get(id) } : {}), ...(fillOf.has(id) ? { fill: fillOf.get(id) } : {}) });
  return {
    cluster: status.cluster, self: ctx.self, atMs: Date.now(),
    peers: status.peers.map((p) => ({ ...p, ...extras(p.id) })),
    hostIo: { ...ctx.hostIo() }, volumes, rebalancing, features: features(api),
  };
}

// ---- body checks: the JSON the page sends, typed before it reaches the admin layer ------

function asObject(body: unknown): Record<string, unknown> {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw new InvalidArgumentError('the request body must be a JSON object');
  return body as Record<string, unknown>;
}

function str(o: Record<string, unknown>, key: string, required: boolean): string | undefined {
  const v = o[key];
  if (v === undefined || v === null || v === '') {
    if (required) throw new InvalidArgumentError(`${key} is required`);
    return undefined;
  }
  if (typeof v !== 'string') throw new InvalidArgumentError(`${key} must be a string`);
  return v;
}

function strList(o: Record<string, unknown>, key: string): string[] {
  const v = o[key];
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw new InvalidArgumentError(`${key} must be a list of strings`);
  return v.map((x: string) => x.trim()).filter(Boolean);
}

/** The same pairing rules as the CLI's --chap-user/--chap-secret/--mutual-* options. */
function chapOf(o: Record<string, unknown>): ChapSettings | undefined {
  const raw = o.chap;
  if (raw === undefined || raw === null) return undefined;
  const c = asObject(raw);
  const user = str(c, 'user', false);
  const secret = str(c, 'secret', false);
  const mutualUser = str(c, 'mutualUser', false);
  const mutualSecret = str(c, 'mutualSecret', false);
  if (!user && !secret && !mutualUser && !mutualSecret) return undefined;
  if ((user === undefined) !== (secret === undefined)) throw new InvalidArgumentError('CHAP user and CHAP secret go together');
  if ((mutualUser !== undefined || mutualSecret !== undefined) && !user) throw new InvalidArgumentError('mutual CHAP needs a CHAP user and secret too');
  return { user: user!, secret: secret!, mutualUser, mutualSecret };
}

/** blockBytes as the page sends it: a number, or decimal digits ("0x200" is not 512); the catalog checks the value. */
/** A whole number of the body, as a JSON number or decimal digits; undefined when absent. */
function wholeOf(raw: unknown, what: string, wrongType: string): number | undefined {
  if (raw === undefined || raw === null || raw === '') return undefined;
  if (typeof raw === 'string') return wholeNumber(raw, what, wireUint32Max);
  if (typeof raw === 'number') return wireUint32(raw, what);
  throw new InvalidArgumentError(wrongType);
}

const blockBytesOf = (raw: unknown): number | undefined => wholeOf(raw, 'blockBytes', 'blockBytes must be 512 or 4096');
const replicasOf = (raw: unknown): number | undefined => wholeOf(raw, 'replicas', `replicas must be 1 to ${replicasMax}`);
/** ?from= / ?count= of the page map; absent or empty: not given (the peer bounds the range). */
const queryPage = (req: ApiRequest, key: string): number | undefined => wholeOf(req.query.get(key) ?? undefined, key, `${key} must be a whole number`);

function createInput(body: unknown): CreateVolumeInput {
  const o = asObject(body);
  const size = o.size;
  if (typeof size !== 'string' && typeof size !== 'number') throw new InvalidArgumentError('size is required (e.g. "10G")');
  return { name: str(o, 'name', true)!, size, blockBytes: blockBytesOf(o.blockBytes), allow: strList(o, 'allow'), chap: chapOf(o), peers: strList(o, 'peers'), replicas: replicasOf(o.replicas) };
}

// ---- routes -----------------------------------------------------------------------------

type Handler = (ctx: ApiContext, req: ApiRequest, params: string[]) => Promise<ApiReply>;

const ok = (body: unknown, status = 200): ApiReply => ({ status, body });

/** [method, pattern (':' = one path part, captured), handler]. First match wins. */
const routes: [string, string[], Handler][] = [
  ['GET', ['status'], async (ctx) => ok(await consoleState(ctx))],
  ['GET', ['events', 'recent'], async (ctx, req) => ok({ events: ctx.events.since(Number(req.query.get('after') ?? 0) || 0) })],
  ['GET', ['volumes'], async (ctx) => ok({ volumes: await ctx.api.listVolumes() })],
  ['POST', ['volumes'], async (ctx, req) => ok(await ctx.api.createVolume(createInput(req.body)), 201)],
  ['GET', ['volumes', ':'], async (ctx, _r, [name]) => ok(await ctx.api.getVolume(name))],
  ['DELETE', ['volumes', ':'], async (ctx, req, [name]) => {
    await ctx.api.deleteVolume(name, ['1', 'true'].includes(req.query.get('force') ?? ''));
    return ok({ deleted: name });
  }],
  ['POST', ['volumes', ':', 'resize'], async (ctx, req, [name]) => ok(await ctx.api.resizeVolume(name, str(asObject(req.body), 'size', true)!))],
  ['PUT', ['volumes', ':', 'access'], async (ctx, req, [name]) => {
    const o = asObject(req.body);
    const chap = o.chap === null ? null : chapOf(o);
    return ok(await optional(ctx.api, 'setVolumeAccess')(name, { allow: strList(o, 'allow'), chap }));
  }],
  ['GET', ['volumes', ':', 'pagemap'], async (ctx, req, [name]) => ok(await ctx.api.pageMap(name, { from: queryPage(req, 'from'), count: queryPage(req, 'count') }))],
  ['PUT', ['volumes', ':', 'replicas'], async (ctx, req, [name]) => {
    const replicas = replicasOf(asObject(req.body).replicas);
    if (replicas === undefined) throw new InvalidArgumentError(`replicas is required (1 to ${replicasMax})`);
    return ok(await ctx.api.setReplicas(name, replicas));
  }],
  ['GET', ['volumes', ':', 'heat'], async (ctx, _r, [name]) => ok(await optional(ctx.api, 'pageHeat')(name))],
  ['POST', ['volumes', ':', 'pages', ':', 'move'], async (ctx, req, [name, page]) => {
    const to = str(asObject(req.body), 'to', true)!;
    return ok(await optional(ctx.api, 'movePage')(name, pageNumber(page), to), 202);
  }],
  ['GET', ['volumes', ':', 'snapshots'], async (ctx, _r, [name]) => ok({ snapshots: await optional(ctx.api, 'listSnapshots')(name) })],
  ['POST', ['volumes', ':', 'snapshots'], async (ctx, req, [name]) => {
    const o = req.body === undefined ? {} : asObject(req.body);
    const mode = str(o, 'mode', false);
    if (mode !== undefined && mode !== 'barrier' && mode !== 'timestamp') throw new InvalidArgumentError('mode must be barrier or timestamp');
    return ok(await optional(ctx.api, 'createSnapshot')(name, { name: str(o, 'name', false), mode }), 201);
  }],
  ['DELETE', ['volumes', ':', 'snapshots', ':'], async (ctx, _r, [name, snap]) => {
    await optional(ctx.api, 'deleteSnapshot')(name, snap);
    return ok({ deleted: snap });
  }],
  ['GET', ['migrations'], async (ctx) => ok({ migrations: await optional(ctx.api, 'listMigrations')() })],
  ['PUT', ['rebalancing'], async (ctx, req) => {
    const enabled = asObject(req.body).enabled;
    if (typeof enabled !== 'boolean') throw new InvalidArgumentError('enabled must be true or false');
    return ok(await optional(ctx.api, 'setRebalancing')(enabled));
  }],
];

function match(pattern: string[], parts: string[]): string[] | undefined {
  if (pattern.length !== parts.length) return undefined;
  const params: string[] = [];
  for (let i = 0; i < pattern.length; i++) {
    if (pattern[i] === ':') params.push(parts[i]);
    else if (pattern[i] !== parts[i]) return undefined;
  }
  return params;
}

/** Answer one authenticated /api request; errors become {error} with their HTTP status. */
export async function handleApi(ctx: ApiContext, req: ApiRequest): Promise<ApiReply> {
  let pathKnown = false;
  try {
    for (const [method, pattern, handler] of routes) {
      const params = match(pattern, req.parts);
      if (!params) continue;
      pathKnown = true;
      if (method === req.method) return await handler(ctx, req, params);
    }
    if (pathKnown) throw new MethodNotAllowedError(req.method, `/api/${req.parts.join('/')}`);
    throw new NotFoundError(`no API route /api/${req.parts.join('/')}`);
  } catch (err) {
    const status = httpStatusOf(err);
    return { status, body: { error: err instanceof Error ? err.message : String(err) }, err: status >= 500 ? err : undefined };
  }
}

/** Every route, for tests that must try each one (e.g. without the token). */
export function apiRoutes(): { method: string; path: string }[] {
  return routes.map(([method, pattern]) => ({ method, path: '/api/' + pattern.map((p) => (p === ':' ? '0' : p)).join('/') }));
}
