// The replication messages between peers (DESIGN.md 10), carried by PeerService.Replication as
// a kind and a JSON body (proto/peersan.proto). Bodies come from other peers, which may be buggy
// or hostile: each kind's checker reads only fields it validates (shapes, bounds) and throws
// InvalidArgumentError on anything else. Which kinds are safe to deliver twice is stated here
// (the simulated network repeats those).
//
// Kinds (each section of src/replication adds its own, with its checker and handler):
//   lease     — leases.ts: a peer renews the leases its in-sync copies grant it; the answer
//               carries the pages the answering peer took over from it, to learn first.
//   promote   — failover.ts: "the primary of this page is unreachable from me; take over if you may".
//   recent    — failover.ts asks replicated.ts: the grains of writes not known acknowledged everywhere.
//   resync    — resync.ts: a stale copy asks the page's primary to bring it back in sync.
//   led       — failover.ts: a flush that a primary did not answer asks a copy that did how many
//               of the pages it holds that primary still leads (the router waits for none).

import { replicasMax } from '../cluster/catalog';
import { InvalidArgumentError } from '../errors';
import { leaseTakeoversPerAnswerMax, pageBlocks, pageGrainsMax, volumeBytesMax } from '../limits';
import type { Route } from '../routing/table';

/** Kinds a receiver handles the same way however often they arrive. */
const idempotentKinds = new Set(['lease', 'promote', 'recent', 'resync', 'led']);

export function replicationIdempotent(kind: string): boolean {
  return idempotentKinds.has(kind);
}

/** The parsed body of a message, an object; anything else is refused. */
export function parseBody(body: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(body || '{}');
  } catch {
    throw new InvalidArgumentError('replication message body is not JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new InvalidArgumentError('replication message body is not an object');
  return v as Record<string, unknown>;
}

/** A handler of one kind on the receiving peer: the sender's id (authenticated) and the parsed body; the answer is sent as JSON. */
export type ReplicationHandler = (from: string, body: Record<string, unknown>) => Promise<unknown>;

// ---- field checks ----------------------------------------------------------------------------

const volumeIdPattern = /^[0-9a-f]{16}$/;
/** Peer ids as cluster.yaml allows them are short; anything longer is not one. */
const peerIdBytesMax = 255;
/** Pages of the largest volume of the smallest block. */
const pageMax = volumeBytesMax / (pageBlocks * 512);

function wholeNumber(v: unknown, what: string, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max) throw new InvalidArgumentError(`replication message: bad ${what}`);
  return v;
}

function peerId(v: unknown, what: string): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > peerIdBytesMax) throw new InvalidArgumentError(`replication message: bad ${what}`);
  return v;
}

function peerList(v: unknown, what: string): string[] {
  if (!Array.isArray(v) || v.length === 0 || v.length > replicasMax) throw new InvalidArgumentError(`replication message: bad ${what}`);
  return v.map((p) => peerId(p, what));
}

/** A route as another peer sends it (the catalog checks routes it stores; this checks only the shape). */
export function checkRoute(v: unknown): Route {
  if (typeof v !== 'object' || v === null) throw new InvalidArgumentError('replication message: bad route');
  const r = v as Record<string, unknown>;
  const route: Route = { owner: peerId(r.owner, 'route owner'), version: wholeNumber(r.version, 'route version', Number.MAX_SAFE_INTEGER) };
  if (r.copies !== undefined) route.copies = peerList(r.copies, 'route copies');
  if (r.inSync !== undefined) route.inSync = peerList(r.inSync, 'route in-sync set');
  return route;
}

/** Which page of which volume, at which epoch (promote, recent). */
export interface PageAtEpoch {
  volumeId: string;
  page: number;
  version: number;
}

function pageAtEpoch(b: Record<string, unknown>): PageAtEpoch {
  if (typeof b.volumeId !== 'string' || !volumeIdPattern.test(b.volumeId)) throw new InvalidArgumentError('replication message: bad volume id');
  return { volumeId: b.volumeId, page: wholeNumber(b.page, 'page', pageMax), version: wholeNumber(b.version, 'version', Number.MAX_SAFE_INTEGER) };
}

// lease: {ack} → {granted, takeovers: [{seq, volumeId, page, route?}]}

/** A page the answering peer took over from the asker (route absent: read it from the catalog). */
export interface Takeover {
  seq: number;
  volumeId: string;
  page: number;
  route?: Route;
}

export interface LeaseAnswer {
  granted: boolean;
  takeovers: Takeover[];
}

/** A renewal: `ack` is the highest takeover sequence number the asker has learned from this peer. */
export function checkLease(b: Record<string, unknown>): { ack: number } {
  return { ack: wholeNumber(b.ack ?? 0, 'lease ack', Number.MAX_SAFE_INTEGER) };
}

export function checkLeaseAnswer(b: Record<string, unknown>): LeaseAnswer {
  if (typeof b.granted !== 'boolean' || !Array.isArray(b.takeovers) || b.takeovers.length > leaseTakeoversPerAnswerMax) throw new InvalidArgumentError('replication message: bad lease answer');
  const takeovers = b.takeovers.map((t: unknown): Takeover => {
    if (typeof t !== 'object' || t === null) throw new InvalidArgumentError('replication message: bad takeover');
    const x = t as Record<string, unknown>;
    const { volumeId, page } = pageAtEpoch({ ...x, version: 0 });
    const out: Takeover = { seq: wholeNumber(x.seq, 'takeover seq', Number.MAX_SAFE_INTEGER), volumeId, page };
    if (x.route !== undefined) out.route = checkRoute(x.route);
    return out;
  });
  return { granted: b.granted, takeovers };
}

// promote: {volumeId, page, version, handover} → {route}

export function checkPromote(b: Record<string, unknown>): PageAtEpoch & { handover: boolean } {
  if (b.handover !== undefined && typeof b.handover !== 'boolean') throw new InvalidArgumentError('replication message: bad handover flag');
  return { ...pageAtEpoch(b), handover: b.handover === true };
}

/** The answer to promote (and to a refused recent): the route the answering peer holds now. */
export function checkRouteAnswer(b: Record<string, unknown>): Route {
  return checkRoute(b.route);
}

// led: {volumeId, primary} → {pages}

export function checkLed(b: Record<string, unknown>): { volumeId: string; primary: string } {
  const { volumeId } = pageAtEpoch({ volumeId: b.volumeId, page: 0, version: 0 });
  return { volumeId, primary: peerId(b.primary, 'primary') };
}

export function checkLedAnswer(b: Record<string, unknown>): number {
  return wholeNumber(b.pages, 'led pages', pageMax);
}

// recent: {volumeId, page, version} → {grains} | {route} (a newer epoch than the asker's)

export function checkRecent(b: Record<string, unknown>): PageAtEpoch {
  return pageAtEpoch(b);
}

export function checkRecentAnswer(b: Record<string, unknown>): { grains: number[] } | { route: Route } {
  if (b.route !== undefined) return { route: checkRoute(b.route) };
  if (!Array.isArray(b.grains) || b.grains.length > pageGrainsMax) throw new InvalidArgumentError('replication message: bad recent grains');
  return { grains: b.grains.map((g) => wholeNumber(g, 'grain', pageGrainsMax - 1)) };
}

// resync: {volumeId, page, version, full, grains, again} → {version} | {running: true}

/** A stale copy asks the page's primary to bring it back in sync (resync.ts). */
export interface ResyncAsk {
  volumeId: string;
  page: number;
  /** The page's epoch as the asker knows it. */
  version: number;
  /** The asker holds nothing valid of the page (suspect after a crash): copy it whole. */
  full: boolean;
  /** The asker's own recent grains (changes it applied that may not be everywhere): copied too. */
  grains: number[];
  /** The same ask again after a `running` answer: it joins the running resync, marking nothing more (none running: a fresh ask). */
  again?: boolean;
}

export function checkResyncAsk(b: Record<string, unknown>): ResyncAsk {
  const grains = b.grains ?? [];
  if (!Array.isArray(grains) || grains.length > pageGrainsMax) throw new InvalidArgumentError(`resync: grains must be a list of at most ${pageGrainsMax}`);
  if (typeof b.full !== 'boolean') throw new InvalidArgumentError('resync: full must be true or false');
  const at = pageAtEpoch(b);
  if (at.version < 1) throw new InvalidArgumentError('replication message: bad version');
  if (b.again !== undefined && typeof b.again !== 'boolean') throw new InvalidArgumentError('resync: again must be true or false');
  return { ...at, full: b.full, grains: [...new Set(grains.map((g) => wholeNumber(g, 'grain', pageGrainsMax - 1)))], ...(b.again === true ? { again: true } : {}) };
}
