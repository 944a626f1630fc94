// cluster.yaml: the group's name, secrets, catalog backend and its peers. Validated with
// errors that name the field; relative data paths resolve against the file's folder.

import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { parse, stringify } from 'yaml';
import type { TlsFiles } from '../cluster/peer-tls';
import { InvalidArgumentError } from '../errors';
import { pageBlocks as pageBlocksDefault } from '../limits';
import type { BalancerConfig } from '../loadmon/balancer';
import { parseBalancerConfig } from '../loadmon/config';

export interface PeerConfig {
  id: string;
  /** host:port of the iSCSI portal. */
  iscsi: string;
  /** host:port of the gRPC services (admin and peer). */
  rpc: string;
  /** host:port of the HTTP console and metrics. */
  http: string;
  /** Absolute data folder. */
  data: string;
  /** Failure zone (rack, room, site): a page's copies go to distinct zones when peers declare one. */
  zone?: string;
  /** Relative capacity (default 1): the balancer gives each peer copies in proportion to it. */
  capacity?: number;
}

/**
 * Where the cluster catalog lives. `embedded`: LevelDB in one process (a one-peer group, or
 * `peersan demo` running every peer in one process). `etcd`: shared by peer processes.
 */
export type CatalogConfig =
  | { backend: 'embedded'; /** Absolute folder; default: the first peer's data dir + /catalog. */ path?: string }
  | {
      backend: 'etcd';
      endpoints: string[];
      /** Key prefix; default "peersan/<cluster name>/". */
      namespace?: string;
      /** TLS to etcd: its CA, and a client certificate when etcd asks for one (absolute paths). */
      tls?: EtcdTlsFiles;
      /** etcd user and password (etcd's RBAC), when etcd has authentication on. */
      user?: string;
      password?: string;
    };

export interface EtcdTlsFiles {
  ca: string;
  cert?: string;
  key?: string;
}

/**
 * Host balancing (login redirect + async logout, src/server/host-balance.ts). `enabled`
 * defaults to on for a group of several peers; the numbers override its defaults.
 */
export interface HostBalanceConfig {
  enabled?: boolean;
  autoMove?: boolean;
  marginSessions?: number;
  moveMarginSessions?: number;
  logoutSeconds?: number;
  moveIntervalMs?: number;
  sessionMinAgeMs?: number;
}

const hostBalanceNumbers = ['marginSessions', 'moveMarginSessions', 'logoutSeconds', 'moveIntervalMs', 'sessionMinAgeMs'] as const;

export interface ClusterConfig {
  name: string;
  adminToken: string;
  secret: string;
  catalog: CatalogConfig;
  /** Logical blocks per page (DESIGN.md 2). */
  pageBlocks: number;
  peers: PeerConfig[];
  /** Page migration (DESIGN.md 4). */
  migration: MigrationConfig;
  /** `balancer:` section (src/loadmon/config.ts); absent: the defaults. */
  balancer?: BalancerConfig;
  /** `cluster.hostBalance` (or a top-level `hostBalance:`); absent: defaults. */
  hostBalance?: HostBalanceConfig;
  /** `cluster.tls`: mutual TLS between peers and TLS for admin RPC (src/cluster/peer-tls.ts); absent: plain. */
  tls?: TlsFiles;
  /** `cluster.downOutMs`: a peer unreachable this long is lost and its copies are rebuilt elsewhere; absent: downOutMsDefault. */
  downOutMs?: number;
  /** Where the config was read from (for messages). */
  path?: string;
}

export interface MigrationConfig {
  /** Copy rate per peer in MB/s (10^6 bytes); 0 = unlimited. */
  rateMBps: number;
  /** Piece size in KiB: the unit that is dual-written while in transit and checkpointed when done. */
  pieceKiB: number;
  /**
   * How hard a move pushes against host I/O (1-100 %). A copied chunk that takes longer than
   * the move's fastest recent chunks waited behind other work, mostly host I/O; the copier then
   * pauses so that such waiting is at most this share of the time. On idle peers it copies at
   * rateMBps; under host load it slows down by itself. 100: never pauses.
   */
  dutyPercent: number;
}

export const migrationDefaults: MigrationConfig = { rateMBps: 64, pieceKiB: 256, dutyPercent: 10 };

function parseMigration(m: Record<string, unknown>, where: string): MigrationConfig {
  const out = { ...migrationDefaults };
  for (const [k, v] of Object.entries(m)) {
    if (!(k in out)) throw new InvalidArgumentError(`${where}: cluster.migration.${k} is not a setting (rateMBps, pieceKiB, dutyPercent)`);
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new InvalidArgumentError(`${where}: cluster.migration.${k} must be a number ≥ 0`);
    out[k as keyof MigrationConfig] = v;
  }
  if (out.pieceKiB < 4 || out.pieceKiB > 4096 || !Number.isInteger(out.pieceKiB)) throw new InvalidArgumentError(`${where}: cluster.migration.pieceKiB must be a whole number from 4 to 4096`);
  if (out.dutyPercent < 1 || out.dutyPercent > 100) throw new InvalidArgumentError(`${where}: cluster.migration.dutyPercent must be from 1 to 100`);
  return out;
}

export function splitHostPort(value: string, what: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(value);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new InvalidArgumentError(`${what}: "${value}" is not host:port`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port };
}

function str(obj: Record<string, unknown>, key: string, where: string): string {
  const v = obj[key];
  if (typeof v !== 'string' || v.length === 0) throw new InvalidArgumentError(`${where}.${key} must be a non-empty string`);
  return v;
}

export function parseConfig(text: string, path?: string): ClusterConfig {
  let doc: unknown;
  try {
    doc = parse(text);
  } catch (err) {
    throw new InvalidArgumentError(`${path ?? 'config'}: not valid YAML: ${(err as Error).message}`);
  }
  const where = path ?? 'config';
  if (!doc || typeof doc !== 'object') throw new InvalidArgumentError(`${where}: empty`);
  const root = doc as Record<string, unknown>;
  const cluster = root.cluster as Record<string, unknown> | undefined;
  if (!cluster || typeof cluster !== 'object') throw new InvalidArgumentError(`${where}: missing "cluster:" section`);
  const base = path ? dirname(resolve(path)) : process.cwd();
  const catalog = parseCatalog((cluster.catalog ?? { backend: 'embedded' }) as Record<string, unknown>, where, base);
  const pageBlocks = cluster.pageBlocks ?? pageBlocksDefault;
  if (pageBlocks !== pageBlocksDefault) throw new InvalidArgumentError(`${where}: cluster.pageBlocks must be ${pageBlocksDefault} (the page size is fixed in this release)`);
  const peersRaw = root.peers;
  if (!Array.isArray(peersRaw) || peersRaw.length === 0) throw new InvalidArgumentError(`${where}: "peers:" must list at least one peer`);
  const ids = new Set<string>();
  const peers = peersRaw.map((p: Record<string, unknown>, i: number): PeerConfig => {
    const w = `peers[${i}]`;
    const peer = {
      id: str(p, 'id', w),
      iscsi: str(p, 'iscsi', w),
      rpc: str(p, 'rpc', w),
      http: str(p, 'http', w),
      data: resolve(base, str(p, 'data', w)),
      ...(p.zone === undefined || p.zone === null ? {} : { zone: str(p, 'zone', w) }),
      ...(p.capacity === undefined || p.capacity === null ? {} : { capacity: capacityOf(p.capacity, w) }),
    };
    if (!/^[a-z0-9][a-z0-9-]{0,31}$/.test(peer.id)) throw new InvalidArgumentError(`${w}.id "${peer.id}": use a-z, 0-9, '-'`);
    if (ids.has(peer.id)) throw new InvalidArgumentError(`${w}.id "${peer.id}" appears twice`);
    ids.add(peer.id);
    splitHostPort(peer.iscsi, `${w}.iscsi`);
    splitHostPort(peer.rpc, `${w}.rpc`);
    splitHostPort(peer.http, `${w}.http`);
    return peer;
  });
  return {
    name: str(cluster, 'name', 'cluster'),
    adminToken: str(cluster, 'adminToken', 'cluster'),
    secret: str(cluster, 'secret', 'cluster'),
    catalog,
    pageBlocks,
    peers,
    migration: parseMigration((cluster.migration ?? {}) as Record<string, unknown>, where),
    balancer: parseBalancerConfig(root.balancer, where),
    ...parseHostBalance(cluster.hostBalance ?? root.hostBalance, where),
    ...(cluster.tls === undefined || cluster.tls === null ? {} : { tls: parseTls(cluster.tls, `${where}: cluster.tls`, base) }),
    ...(cluster.downOutMs === undefined || cluster.downOutMs === null ? {} : { downOutMs: parseDownOut(cluster.downOutMs, where) }),
    path,
  };
}

function parseDownOut(v: unknown, where: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1_000) throw new InvalidArgumentError(`${where}: cluster.downOutMs must be a whole number of milliseconds, at least 1000`);
  return v;
}

function parseHostBalance(v: unknown, where: string): { hostBalance?: HostBalanceConfig } {
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object') throw new InvalidArgumentError(`${where}: hostBalance must be a mapping, e.g. { enabled: false }`);
  const o = v as Record<string, unknown>;
  const out: HostBalanceConfig = {};
  for (const flag of ['enabled', 'autoMove'] as const) {
    if (o[flag] === undefined) continue;
    if (typeof o[flag] !== 'boolean') throw new InvalidArgumentError(`${where}: hostBalance.${flag} must be true or false`);
    out[flag] = o[flag] as boolean;
  }
  for (const n of hostBalanceNumbers) {
    if (o[n] === undefined) continue;
    if (typeof o[n] !== 'number' || !Number.isFinite(o[n]) || (o[n] as number) < 0) throw new InvalidArgumentError(`${where}: hostBalance.${n} must be a number ≥ 0`);
    out[n] = o[n] as number;
  }
  if (out.logoutSeconds !== undefined && (out.logoutSeconds < 1 || out.logoutSeconds > 65535 || !Number.isInteger(out.logoutSeconds))) {
    throw new InvalidArgumentError(`${where}: hostBalance.logoutSeconds must be a whole number of seconds, 1..65535 (AsyncEvent Parameter3)`);
  }
  return { hostBalance: out };
}

function parseCatalog(c: Record<string, unknown>, where: string, base: string): CatalogConfig {
  if (c.backend === 'embedded') {
    return typeof c.path === 'string' && c.path ? { backend: 'embedded', path: resolve(base, c.path) } : { backend: 'embedded' };
  }
  if (c.backend === 'etcd') {
    const endpoints = c.endpoints;
    if (!Array.isArray(endpoints) || endpoints.length === 0 || !endpoints.every((e) => typeof e === 'string' && e.length > 0)) {
      throw new InvalidArgumentError(`${where}: cluster.catalog.endpoints must list etcd addresses (e.g. [127.0.0.1:2379])`);
    }
    if (c.namespace !== undefined && typeof c.namespace !== 'string') throw new InvalidArgumentError(`${where}: cluster.catalog.namespace must be a string`);
    for (const k of ['user', 'password'] as const) {
      if (c[k] !== undefined && (typeof c[k] !== 'string' || c[k] === '')) throw new InvalidArgumentError(`${where}: cluster.catalog.${k} must be a non-empty string`);
    }
    if ((c.user === undefined) !== (c.password === undefined)) throw new InvalidArgumentError(`${where}: cluster.catalog.user and password go together`);
    return {
      backend: 'etcd',
      endpoints: endpoints as string[],
      namespace: c.namespace as string | undefined,
      ...(c.tls === undefined || c.tls === null ? {} : { tls: parseEtcdTls(c.tls, `${where}: cluster.catalog.tls`, base) }),
      ...(c.user === undefined ? {} : { user: c.user as string, password: c.password as string }),
    };
  }
  throw new InvalidArgumentError(`${where}: cluster.catalog.backend must be embedded or etcd, got "${String(c.backend)}"`);
}

function tlsPath(o: Record<string, unknown>, key: string, where: string, base: string): string {
  const v = o[key];
  if (typeof v !== 'string' || v.length === 0) throw new InvalidArgumentError(`${where}.${key} must be a file path`);
  return resolve(base, v);
}

/** `{ ca, cert, key }`; `{peer}` in cert and key stands for each peer's id (one line for the whole group). */
function parseTls(v: unknown, where: string, base: string): TlsFiles {
  if (typeof v !== 'object' || v === null) throw new InvalidArgumentError(`${where} must be a mapping { ca, cert, key } (see \`peersan init\`)`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) if (!['ca', 'cert', 'key'].includes(k)) throw new InvalidArgumentError(`${where}.${k} is not a setting (ca, cert, key)`);
  return { ca: tlsPath(o, 'ca', where, base), cert: tlsPath(o, 'cert', where, base), key: tlsPath(o, 'key', where, base) };
}

function parseEtcdTls(v: unknown, where: string, base: string): EtcdTlsFiles {
  if (typeof v !== 'object' || v === null) throw new InvalidArgumentError(`${where} must be a mapping { ca, cert, key } (cert and key only when etcd asks clients for certificates)`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) if (!['ca', 'cert', 'key'].includes(k)) throw new InvalidArgumentError(`${where}.${k} is not a setting (ca, cert, key)`);
  if ((o.cert === undefined) !== (o.key === undefined)) throw new InvalidArgumentError(`${where}: cert and key go together`);
  return { ca: tlsPath(o, 'ca', where, base), ...(o.cert === undefined ? {} : { cert: tlsPath(o, 'cert', where, base), key: tlsPath(o, 'key', where, base) }) };
}

export function loadConfig(path: string): ClusterConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new InvalidArgumentError(`cannot read config ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  return parseConfig(text, path);
}

/** A peer's `capacity:` (relative: 2 takes twice the copies of 1). */
function capacityOf(v: unknown, where: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || v > 1e6) throw new InvalidArgumentError(`${where}.capacity must be a positive number (relative to the other peers, default 1), got ${JSON.stringify(v)}`);
  return v;
}

export function renderConfig(c: ClusterConfig): string {
  return stringify({
    cluster: {
      name: c.name, adminToken: c.adminToken, secret: c.secret, pageBlocks: c.pageBlocks, catalog: c.catalog, migration: c.migration,
      ...(c.hostBalance ? { hostBalance: c.hostBalance } : {}),
      ...(c.tls ? { tls: c.tls } : {}),
      ...(c.downOutMs !== undefined ? { downOutMs: c.downOutMs } : {}),
    },
    peers: c.peers.map((p) => ({ id: p.id, iscsi: p.iscsi, rpc: p.rpc, http: p.http, data: p.data, ...(p.zone ? { zone: p.zone } : {}), ...(p.capacity !== undefined ? { capacity: p.capacity } : {}) })),
    ...(c.balancer ? { balancer: c.balancer } : {}),
  });
}

