// The replication messages between peers (DESIGN.md 10), carried by PeerService.Replication as
// a kind and a JSON body (proto/peersan.proto). Bodies come from other peers, which may be buggy
// or hostile: each kind's checker reads only fields it validates (shapes, bounds) and throws
// InvalidArgumentError on anything else. Which kinds are safe to deliver twice is stated here
// (the simulated network repeats those).
//
// Kinds (each section of src/replication adds its own, with its checker and handler):
//   lease     — leases.ts: a peer renews the leases its in-sync copies grant it.
//   promote   — failover.ts: "the primary of this page is unreachable from me; take over if you may".
//   recent    — failover.ts asks replicated.ts: the grains of writes not known acknowledged everywhere.
//   resync    — resync.ts: a stale copy asks the page's primary to bring it back in sync.

import { InvalidArgumentError } from '../errors';
import { pageGrainsMax, wireUint32Max } from '../limits';

/** Kinds a receiver handles the same way however often they arrive. */
const idempotentKinds = new Set(['lease', 'promote', 'recent', 'resync']);

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
}

export function checkResyncAsk(b: Record<string, unknown>): ResyncAsk {
  const grains = b.grains ?? [];
  if (!Array.isArray(grains) || grains.length > pageGrainsMax) throw new InvalidArgumentError(`resync: grains must be a list of at most ${pageGrainsMax}`);
  if (typeof b.full !== 'boolean') throw new InvalidArgumentError('resync: full must be true or false');
  return {
    volumeId: checkVolumeId(b.volumeId),
    page: checkCount(b.page, 'page', 0, wireUint32Max),
    version: checkCount(b.version, 'version', 1, Number.MAX_SAFE_INTEGER),
    full: b.full,
    grains: [...new Set(grains.map((g) => checkCount(g, 'grain', 0, pageGrainsMax - 1)))],
  };
}

function checkVolumeId(v: unknown): string {
  if (typeof v !== 'string' || !/^[0-9a-f]{16}$/.test(v)) throw new InvalidArgumentError('replication message: bad volume id');
  return v;
}

function checkCount(v: unknown, what: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) throw new InvalidArgumentError(`replication message: ${what} must be an integer from ${min} to ${max}`);
  return v;
}
