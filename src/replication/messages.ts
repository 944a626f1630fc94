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
