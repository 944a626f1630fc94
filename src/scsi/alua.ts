// Asymmetric logical unit access (SPC-4 5.15, implicit ALUA only: TPGS = 01b). Every peer is a
// target port group of its own, with one target port: the relative target port identifier and
// the group identifier are both the peer's portal group tag, as VPD 0x83 reports them. The state
// of a group is what THIS peer knows of that peer; the host reads it with REPORT TARGET PORT
// GROUPS on each path and steers its I/O by it. Pure data: no I/O.

/** Asymmetric access states (SPC-4 table 161): the ones a peer group uses. */
export const AluaState = {
  activeOptimized: 0x0,
  activeNonOptimized: 0x1,
  unavailable: 0x3,
} as const;
export type AluaState = (typeof AluaState)[keyof typeof AluaState];

/** One target port group as REPORT TARGET PORT GROUPS describes it. */
export interface TargetPortGroup {
  /** TARGET PORT GROUP identifier (1..0xffff). */
  id: number;
  state: AluaState;
  /** Relative target port identifiers in the group. */
  relativePorts: readonly number[];
}

/**
 * The states a group can be in (the SUP bits of its descriptor): AO_SUP, AN_SUP and U_SUP.
 * A draining or leaving peer is active/non-optimized: it still serves every command (a
 * single-path host that host balancing has not moved yet must see no error), and multipath
 * hosts send their I/O to the optimized paths. Standby and transitioning would have the port
 * refuse most commands (SPC-4 5.15.2.4-5), which such a host would see as errors.
 */
const supportedStates = 0x08 /* U_SUP */ | 0x02 /* AN_SUP */ | 0x01; /* AO_SUP */

/** The PARAMETER DATA FORMAT field of the CDB (byte 1, bits 7-5): length-only or extended header. */
export const RtpgFormat = { lengthOnly: 0, extended: 1 } as const;

/** The header of an extended answer says how long an implicit transition may take (0: not stated). */
const implicitTransitionSeconds = 0;

function descriptor(g: TargetPortGroup): Buffer {
  const d = Buffer.alloc(8 + 4 * g.relativePorts.length);
  d[0] = g.state; // PREF = 0: no group is preferred over another
  d[1] = supportedStates;
  d.writeUInt16BE(g.id, 2);
  d[5] = 0x00; // STATUS CODE: no status available
  d[7] = g.relativePorts.length;
  g.relativePorts.forEach((port, i) => d.writeUInt16BE(port, 8 + 4 * i + 2));
  return d;
}

/** The parameter data of REPORT TARGET PORT GROUPS (SPC-4 6.36.2), not yet cut to the allocation length. */
export function reportTargetPortGroupsData(groups: readonly TargetPortGroup[], format: number): Buffer {
  const body = Buffer.concat(groups.map(descriptor));
  const header = Buffer.alloc(format === RtpgFormat.extended ? 8 : 4);
  // RETURN DATA LENGTH counts the bytes after the first four, the rest of the header included.
  header.writeUInt32BE(header.length - 4 + body.length, 0);
  if (format === RtpgFormat.extended) {
    header[4] = 0x10; // FORMAT TYPE 001b
    header[5] = implicitTransitionSeconds;
  }
  return Buffer.concat([header, body]);
}

/** What a logical unit answers when nobody told it about the group: its own port, active/optimized. */
export function loneGroup(relativeTargetPort: number): TargetPortGroup[] {
  return [{ id: relativeTargetPort, state: AluaState.activeOptimized, relativePorts: [relativeTargetPort] }];
}
