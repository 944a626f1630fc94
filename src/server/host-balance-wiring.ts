// Host balancing built for one peer from cluster.yaml (host-balance-service.ts does the work):
// what it asks of the rest of the peer (the gossiped loads, which hosts a reservation pins, how
// a volume's pages are spread), and the admin operation "move this session", which may name a
// session logged in on any peer.

import type { Logger } from 'pino';
import type { Catalog } from '../cluster/catalog';
import type { MembersView } from '../cluster/members';
import type { GroupStatus } from '../cluster/group-status';
import type { PeerCalls } from '../cluster/transport';
import type { Env } from '../env/env';
import { InvalidArgumentError, NotFoundError } from '../errors';
import type { Portal } from '../iscsi/portal';
import { targetNameFor } from '../iscsi/target';
import type { HostLoadView, PeerLoadView } from '../loadmon/view';
import type { ClusterConfig } from './config';
import { statusPeerMsMax } from '../limits';
import type { PageShares } from './host-balance';
import { HostBalanceService, type MovedSession } from './host-balance-service';
import { GossipLoadView } from './host-view';
import type { VolumeTargets } from './targets';

/** How long a volume's page shares are reused: routes change slowly. */
const sharesRefreshMs = 5_000;

export interface HostBalanceWiring {
  config: Pick<ClusterConfig, 'hostBalance'>;
  /** The group's members: their portals and tags; logins go to members that are up. */
  members: MembersView;
  self: string;
  env: Env;
  portal(): Portal;
  /** The gossiped loads (LoadService.peerLoads). */
  loads(): PeerLoadView[];
  /** The host sessions the fresh peers gossip (LoadService.hostLoads). */
  hosts(): HostLoadView[];
  catalog: Catalog;
  targets: Pick<VolumeTargets, 'reservationsOf'>;
  calls(peerId: string): Pick<PeerCalls, 'planHostMove'>;
  /** A redirect or a host asked to move, for the console's events. */
  event(message: string, volume: string | undefined): void;
  log: Logger;
}

/**
 * Whether a host session on `peer` is pinned there: a host holding a persistent reservation
 * registration (or a RESERVE) through that peer's target port stays (host balancing never moves
 * it; a drain lists it for the operator), because registrations are per I_T nexus and the target
 * port differs per peer. The reservations are the catalog's, so any peer can tell for any other.
 */
export function reservationPins(o: { catalog: Catalog; targets: Pick<VolumeTargets, 'reservationsOf'>; tag(peer: string): number }): (peer: string, initiatorName: string, isid: string, targetName: string) => boolean {
  return (peer, initiatorName, isid, targetName) => {
    const v = o.catalog.listVolumes().find((x) => targetNameFor(x.name) === targetName);
    const state = v && o.targets.reservationsOf(v.id)?.current.state();
    if (!state) return false;
    const port = `${initiatorName},i,0x${isid}`;
    return state.registrations.some((r) => r.initiatorPort === port && r.relativeTargetPort === o.tag(peer)) || (state.legacyHolder?.startsWith(`${port}|`) ?? false);
  };
}

/** The peer's host balancing, or undefined when cluster.hostBalance turns it off (default: on). */
export function createHostBalance(w: HostBalanceWiring): HostBalanceService | undefined {
  const { config, self, env, catalog } = w;
  const hb = config.hostBalance ?? {};
  const { members } = w;
  // On unless cluster.yaml turns it off: a group of one peer may grow (DESIGN.md 11), and with one
  // member every login stays where it is (the best peer is this one).
  if (!(hb.enabled ?? true)) return undefined;
  const tag = (id: string): number => members.get(id)?.tag ?? 0;
  const volumeOf = (targetName: string) => catalog.listVolumes().find((v) => targetNameFor(v.name) === targetName);
  const view = new GossipLoadView({
    selfId: self,
    // A login is placed on a member that is up (not joining, draining or leaving).
    peers: () => members.placeable().map((id) => ({ id, iscsi: members.get(id)!.iscsi, portalGroupTag: tag(id) })),
    ownSessions: () => w.portal().sessions().filter((s) => s.sessionType === 'Normal').length,
    loads: w.loads,
  });
  const pins = reservationPins({ catalog, targets: w.targets, tag });
  const pinned = (initiatorName: string, isid: string, targetName: string): boolean => pins(self, initiatorName, isid, targetName);
  const sharesCache = new Map<string, { atMs: number; shares: PageShares }>();
  // Share of a volume's pages per owner.
  const shares = (targetName: string): PageShares | undefined => {
    const cached = sharesCache.get(targetName);
    if (cached && env.clock.monotonicMs() - cached.atMs < sharesRefreshMs) return cached.shares;
    const v = volumeOf(targetName);
    if (!v) return undefined;
    const table = catalog.routes(v);
    const pages = table.pageCount(v.sizeBytes / v.blockBytes);
    const out = new Map<string, number>();
    for (const c of table.classes(pages)) out.set(c.route.owner, (out.get(c.route.owner) ?? 0) + c.pages / pages);
    sharesCache.set(targetName, { atMs: env.clock.monotonicMs(), shares: out });
    return out;
  };
  const { enabled: _enabled, ...settings } = hb;
  return new HostBalanceService({
    selfId: self, env, settings, view, portal: w.portal, log: w.log, pinned, reportedSessions: w.hosts, shares,
    event: (message, target) => w.event(message, volumeOf(target)?.name),
    broadcastPlan: async (plan) => {
      const message = { initiatorName: plan.initiatorName, targetName: plan.targetName, to: plan.to, ttlMs: Math.max(0, plan.untilMs - env.clock.nowMs()) };
      await Promise.all(members.ids().filter((p) => p !== self).map((p) =>
        w.calls(p).planHostMove(message, statusPeerMsMax).catch((err: Error) => w.log.warn({ to: p, reason: err.message }, 'peer did not take a host move plan (a login there is placed by the usual rule)'))));
    },
  });
}

export interface SessionAdmin {
  /** Ask sessions to log out and log in again on peer `to`, wherever they are logged in (or only on peer `on`). */
  moveSession(session: string, to: string, on: string): Promise<MovedSession[]>;
}

export function sessionAdmin(o: {
  self: string;
  groupPeers(): readonly string[];
  hostBalance: HostBalanceService | undefined;
  group: Pick<GroupStatus, 'sessions'>;
  calls(peerId: string): Pick<PeerCalls, 'moveSession'>;
}): SessionAdmin {
  return {
    async moveSession(session, to, on) {
      const hb = o.hostBalance;
      if (!hb) throw new InvalidArgumentError('host balancing is off on this peer (cluster.hostBalance.enabled)');
      if (!session) throw new InvalidArgumentError('name a session: its TSIH or its initiator name');
      if (/^(0x[0-9a-f]+|[0-9]+)$/i.test(session) && !on) {
        // TSIHs are per peer: find which peer has it, and refuse to guess between several.
        const holders = [...new Set((await o.group.sessions()).filter((x) => x.session.tsih === Number(session) && x.session.sessionType === 'Normal').map((x) => x.peer))];
        if (holders.length > 1) throw new InvalidArgumentError(`TSIH ${session} is logged in on ${holders.join(', ')}: say which with --on PEER`);
        on = holders[0] ?? '';
      }
      const peers = o.groupPeers().filter((p) => !on || p === on);
      if (peers.length === 0) throw new InvalidArgumentError(`no peer ${on} in this group`);
      const moved = (await Promise.all(peers.map((p) => (p === o.self ? hb.move(session, to) : o.calls(p).moveSession(session, to, 10_000))))).flat();
      if (moved.length === 0) throw new NotFoundError(`no session ${session} logged in${on ? ` on ${on}` : ''}`);
      return moved;
    },
  };
}
