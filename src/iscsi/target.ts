// What the iSCSI portal needs to know about the targets it serves. The server implements
// this over the catalog; tests implement it with a map. Pure data + lookups, no I/O.

import type { LogicalUnit } from '../scsi/types';

export interface ChapCredentials {
  /** The initiator authenticates to us with this user/secret. */
  user: string;
  secret: string;
  /** Mutual CHAP: we authenticate to the initiator with this user/secret. */
  mutualUser?: string;
  mutualSecret?: string;
}

export interface TargetInfo {
  /** iqn.2026-11.io.peersan:<volume> */
  name: string;
  /** Initiator names allowed to log in; empty = any. */
  allow: readonly string[];
  chap?: ChapCredentials;
  /** LUN number → logical unit (LUN 0 for a volume). */
  luns: ReadonlyMap<number, LogicalUnit>;
}

/** A portal of another peer of the group: SendTargets lists it as TargetAddress=address,groupTag. */
export interface TargetPortal {
  address: string;
  groupTag: number;
}

export interface TargetDirectory {
  /** Our portal group tag (each peer its own). */
  readonly portalGroupTag: number;
  /** "host:port" addresses of this portal, as SendTargets reports them (TargetAddress=addr,tpgt). */
  readonly portalAddresses: readonly string[];
  /**
   * The portals of the group's other peers that serve the same targets and are up now, each its
   * own portal group: SendTargets lists them after ours, so a multipath host logs in through
   * every peer. Absent: this portal alone.
   */
  otherPortals?(): readonly TargetPortal[];
  /** Optional group-wide CHAP for discovery sessions; undefined = AuthMethod None allowed. */
  readonly discoveryChap?: ChapCredentials;
  find(targetName: string): TargetInfo | undefined;
  /** Targets this initiator may see (allow lists applied), sorted by name. */
  visibleTo(initiatorName: string): TargetInfo[];
}

/** The target name for a volume (DESIGN.md 7). */
export const targetPrefix = 'iqn.2026-11.io.peersan:';
export function targetNameFor(volumeName: string): string {
  return targetPrefix + volumeName;
}
