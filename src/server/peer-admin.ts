// A peer's admin operations put together. Each group is its concept's own module; this file
// only says which parts of the peer (its core, the group view, its host balancing) each gets.
// PeerServer hands the result to AdminService (the CLI) and to the console.

import type { Logger } from 'pino';
import { groupStatus, type PeerStatusView } from '../cluster/group-status';
import type { Members } from '../cluster/members';
import type { PeerCalls } from '../cluster/transport';
import { volumeAdmin } from '../cluster/volume-admin';
import type { Env } from '../env/env';
import type { SessionInfo } from '../iscsi/portal';
import { loadAdmin } from '../loadmon/admin';
import { moveAdmin } from '../migration/admin';
import { replicationAdmin } from '../replication/admin';
import { snapshotAdmin } from '../snapshot/admin';
import type { AdminApi } from './admin';
import type { PeerCore } from './compose';
import type { ClusterConfig } from './config';
import type { EventKind } from './events';
import type { HostBalanceService } from './host-balance-service';
import { sessionAdmin } from './host-balance-wiring';
import { membershipAdmin } from '../cluster/membership-admin';
import type { OptionalAdminOps } from './http-api';

/** Every admin operation of a peer: AdminService's and the console's. */
export type PeerAdmin = Required<AdminApi> & OptionalAdminOps;

export interface PeerAdminWiring {
  self: string;
  config: Pick<ClusterConfig, 'name' | 'peers'>;
  /** The group's members, live (the catalog's records): state changes go through it. */
  members: Members;
  env: Env;
  log: Logger;
  core: PeerCore;
  calls(peerId: string): PeerCalls;
  /** This peer's own status and sessions (the process knows its ports, disk and portal). */
  selfStatus(): Promise<PeerStatusView>;
  localSessions(): SessionInfo[];
  hostBalance: HostBalanceService | undefined;
  event(kind: EventKind, message: string, fields: { volume?: string; peer?: string }): void;
  /** A host session on `peer` is pinned there by a SCSI reservation (host-balance-wiring.ts reservationPins). */
  pinned(peer: string, session: SessionInfo): boolean;
  /** Stop this peer gracefully (`peersan peer stop`): after the reply. */
  requestStop(): void;
}

export function peerAdmin(w: PeerAdminWiring): PeerAdmin {
  const { self, env, log, core, calls } = w;
  const { catalog } = core;
  const { members } = w;
  const groupPeers = (): readonly string[] => members.ids();
  const group = groupStatus({ cluster: w.config.name, self, peers: () => members.ids().map((id) => members.get(id)!), selfStatus: w.selfStatus, calls });
  const { protection, keeper, zoneOf } = core.replication;
  const volumes = volumeAdmin({ catalog, targets: core.targets, localSessions: w.localSessions, group, log, protection: (v) => protection.of(v) });
  const load = loadAdmin({ catalog, load: core.load, balancerSwitch: core.balancerSwitch, log });
  return {
    ...volumes,
    ...replicationAdmin({ catalog, zoneOf, volumes, keeper, log }),
    status: async () => ({ ...(await group.status()), protection: protection.summary(), fills: core.replication.spread.fills() }),
    ...moveAdmin({ self, groupPeers, catalog, migrator: core.migrator, calls }),
    ...snapshotAdmin({
      self, env, catalog, snapshots: core.snapshots, reader: (volume, name) => core.snapshotTargets.reader(volume, name), targets: core.targets,
      volumes, group, event: (message, volume) => w.event('snapshot', message, { volume, peer: self }), log,
    }),
    ...load,
    top: async (pages) => ({ ...(await load.top(pages)), protection: protection.summary(), fills: core.replication.spread.fills(), spreadRound: core.replication.spread.lastRound }),
    ...sessionAdmin({ self, groupPeers, hostBalance: w.hostBalance, group, calls }),
    ...membershipAdmin({ self, members: w.members, catalog, group, pinned: w.pinned, requestStop: w.requestStop }),
  };
}
