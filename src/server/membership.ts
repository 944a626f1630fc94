// A peer process joining its group at start (DESIGN.md 11), before it serves anything:
//   1. the group's record (made by the first peer ever to start) names the group; a data
//      directory that belongs to another group is refused (its pages would be taken for this
//      group's), and one that belongs to none is marked as this group's;
//   2. the first peer ever to start makes the group and registers its cluster.yaml's peers;
//   3. a process already running with this id (it answers at its record's address, with another
//      incarnation) is refused: two peers with one id would both serve its pages;
//   4. this peer's record is created (joining) or brought up to date (addresses, capacity).
// Once it serves, markUp() makes it `up` (placeable): a joining or leaving peer comes back.

import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { Members, type MemberRecord } from '../cluster/members';
import type { MetaStore } from '../cluster/metastore';
import { PeerRpcClient } from '../cluster/peer-rpc';
import { peerTlsChannel, type PeerTls } from '../cluster/peer-tls';
import type { Env } from '../env/env';
import { InvalidArgumentError } from '../errors';
import type { ClusterConfig, PeerConfig } from './config';

/** How long a start waits for a process that may hold its id; an address where nothing listens refuses at once. */
const duplicateCheckMs = 2_000;

/** The file in a peer's data directory naming the group it belongs to. */
const groupFile = 'group.json';

export interface JoinOptions {
  meta: MetaStore;
  env: Env;
  config: ClusterConfig;
  peer: PeerConfig;
  tls: PeerTls | undefined;
  log: Logger;
}

/** Steps 1-4 of the top. Returns the live membership and this start's incarnation. */
export async function joinGroup(o: JoinOptions): Promise<{ members: Members; incarnation: string }> {
  const members = await Members.open(o.meta, o.env);
  try {
    const group = await members.group(o.config.peers, o.peer.id);
    claimDataDir(o.peer.data, o.config.name, group.id);
    const known = members.get(o.peer.id);
    if (known && known.state !== 'removed') await refuseTwin(o, known);
    const incarnation = o.env.random.bytes(8).toString('hex');
    const record = await members.registerSelf(o.peer, incarnation);
    o.log.info({ state: record.state, tag: record.tag }, record.joinedAtMs === record.changedAtMs && record.state === 'joining' ? 'peer registered in the group' : 'peer known to the group');
    return { members, incarnation };
  } catch (err) {
    members.close();
    throw err;
  }
}

/** Step 1: the data directory is this group's, or becomes so. */
export function claimDataDir(dir: string, cluster: string, groupId: string): void {
  const file = join(dir, groupFile);
  if (existsSync(file)) {
    const held = JSON.parse(readFileSync(file, 'utf8')) as { cluster?: string; group?: string };
    if (held.group !== groupId) {
      throw new InvalidArgumentError(`data directory ${dir} belongs to group "${held.cluster}" (${held.group}), not to this catalog's group "${cluster}" (${groupId}): give this peer an empty directory, or point it at its own group's catalog`);
    }
    return;
  }
  writeFileSync(file, JSON.stringify({ cluster, group: groupId }) + '\n', { mode: 0o600 });
}

/** Step 3: a process answering at the record's address as this peer, with another incarnation, holds the id. */
async function refuseTwin(o: JoinOptions, known: MemberRecord): Promise<void> {
  const client = new PeerRpcClient(o.peer.id, known.rpc, { secret: o.config.secret, self: o.peer.id }, o.tls ? peerTlsChannel(o.tls, o.peer.id) : undefined);
  try {
    // No waiting for the channel: a refused connection is the common answer (no twin), and it
    // fails this call at once; a twin that answers does so within the deadline.
    const status = await client.status(duplicateCheckMs, false).catch(() => undefined);
    if (status?.id === o.peer.id) {
      throw new InvalidArgumentError(`peer ${o.peer.id} is already running (it answers at ${known.rpc}, up ${Math.round(status.uptimeMs / 1000)} s): two processes cannot share an id; stop it first, or give this one another id`);
    }
  } finally {
    client.close();
  }
}

/** After the start: a joining (or leaving, restarted) peer is up; a draining one stays draining. */
export async function markUp(members: Members, self: string): Promise<MemberRecord> {
  const now = members.get(self);
  if (now && (now.state === 'joining' || now.state === 'leaving')) return members.setState(self, 'up', self);
  return now!;
}
