// The group's target port groups (implicit ALUA, src/scsi/alua.ts) and the other peers' portals
// SendTargets lists, as THIS peer knows them. Every peer is a portal group of its own; its
// portal group tag is also its target port group id and its relative target port id (VPD 0x83).
//
// "Up" is the load monitor's notion (src/loadmon/view.ts): a peer whose gossip arrived lately.
// This peer is up in its own eyes (it is answering). Up → active/optimized, or
// active/non-optimized while its member record says draining or leaving (multipath hosts move
// their I/O to other paths, nothing is refused: src/scsi/alua.ts); otherwise unavailable. A peer once
// heard is counted down only after aluaUnavailableMs of silence, longer than gossip's own
// staleness: every change raises a unit attention on every nexus, and a peer whose gossip is
// late for a moment (a loaded machine) must not make hosts see one (libiscsi's conformance tests
// fail on an unexpected unit attention). A peer that is really gone fails its own paths anyway.
//
// Order: the states are read again after every load tick (refresh), because a peer becomes stale
// by the passing of time, not by a message. A change is kept first, then the listeners hear of
// it (the targets raise ASYMMETRIC ACCESS STATE CHANGED), so a host that reads REPORT TARGET
// PORT GROUPS after the unit attention sees the new states.

import type { Logger } from 'pino';
import type { TargetPortal } from '../iscsi/target';
import type { PeerLoadView } from '../loadmon/view';
import { aluaUnavailableMs } from '../limits';
import { AluaState, type TargetPortGroup } from '../scsi/alua';
import type { MembersView } from '../cluster/members';

export interface PortGroupsOptions {
  self: string;
  /** The group's members: each one's tag (its group and relative port) and portal; members not removed have a group. */
  members: MembersView;
  /** The gossiped loads (LoadService.peerLoads): `stale` means not heard from lately. */
  loads(): readonly Pick<PeerLoadView, 'id' | 'stale' | 'ageMs'>[];
  /** Monotonic milliseconds; a peer never heard from counts as up for aluaUnavailableMs after this one starts. Absent: no grace. */
  nowMs?(): number;
  log?: Logger;
}

interface PeerPort {
  peerId: string;
  group: TargetPortGroup;
}

export class PortGroups {
  private ports: PeerPort[];
  private readonly listeners: (() => void)[] = [];

  private readonly startedMs: number | undefined;

  constructor(private readonly o: PortGroupsOptions) {
    this.startedMs = o.nowMs?.();
    this.ports = this.read();
  }

  /** The groups and their states as of the last refresh (REPORT TARGET PORT GROUPS). */
  groups(): TargetPortGroup[] {
    return this.ports.map((p) => p.group);
  }

  /** The other peers' portals whose group is active now (SendTargets), in tag order; a draining or leaving peer's is not offered. */
  otherPortals(): TargetPortal[] {
    return this.ports.flatMap((p): TargetPortal[] => {
      const m = this.o.members.get(p.peerId);
      const address = p.peerId === this.o.self || p.group.state !== AluaState.activeOptimized || m?.state !== 'up' ? undefined : m.iscsi;
      return address ? [{ address, groupTag: p.group.id }] : [];
    });
  }

  /** Called after each change of a group's state. */
  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  /** Read the states again (after each load tick); a change is kept, logged, then told. */
  refresh(): void {
    const next = this.read();
    // A member that joined or was removed changes the list itself.
    const before = new Map(this.ports.map((p) => [p.peerId, p.group.state]));
    const changed = next.filter((p) => p.group.state !== before.get(p.peerId));
    if (changed.length === 0 && next.length === this.ports.length) return;
    this.ports = next;
    this.o.log?.info({ groups: changed.map((p) => `${p.peerId}:${stateName(p.group.state)}`).join(' ') }, 'target port group states changed');
    for (const listener of this.listeners) listener();
  }

  private read(): PeerPort[] {
    // Peers start together: one not heard from yet is not reported down (and then up, a unit
    // attention each time, libiscsi's GetLBAStatus.Simple failed on it) before it had the time to speak.
    const starting = this.startedMs !== undefined && this.o.nowMs!() - this.startedMs < aluaUnavailableMs;
    const heard = (l: { stale: boolean; ageMs: number }): boolean => !l.stale || (l.ageMs >= 0 ? l.ageMs < aluaUnavailableMs : starting);
    const fresh = new Set(this.o.loads().filter(heard).map((l) => l.id));
    return this.o.members.ids().map((peerId): PeerPort => {
      const m = this.o.members.get(peerId)!;
      const up = peerId === this.o.self || fresh.has(peerId);
      const going = m.state === 'draining' || m.state === 'leaving';
      const state = !up ? AluaState.unavailable : going ? AluaState.activeNonOptimized : AluaState.activeOptimized;
      return { peerId, group: { id: m.tag, state, relativePorts: [m.tag] } };
    });
  }
}

const stateNames: Record<AluaState, string> = {
  [AluaState.activeOptimized]: 'active/optimized',
  [AluaState.activeNonOptimized]: 'active/non-optimized',
  [AluaState.unavailable]: 'unavailable',
};

function stateName(state: AluaState): string {
  return stateNames[state];
}
