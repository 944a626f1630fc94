// The simulated group's membership (DESIGN.md 11): one object every simulated peer shares, in
// the place of the catalog's `members/<id>` records and the watch that feeds each peer's copy
// (src/cluster/members.ts Members). A change is seen by every peer at once, as if the watch were
// instant: the simulator tests what the protocols do with a membership change (copies leave a
// draining peer, a new member fills), not how fast the records travel; the real records, their
// CAS and their watch are tested on a real group (test/membership-processes.test.ts).
//
// The administrator (run.ts) changes states: a spare joins (joining, then up once it serves, as
// src/server/membership.ts does at a start), a peer drains and is undrained. Every record is kept
// with the true times it was a member, so the checks can ask who was a member when.

import { MemberBook, type MemberRecord, type MemberState } from '../../src/cluster/members';

export class SimMembers extends MemberBook {
  /** True time each peer became a member (registered: joining or up), for memberAt. */
  private readonly since = new Map<string, number>();
  private nextTag = 1;

  /** `founders`: members from the start, up (the group's cluster.yaml); `now`: the true clock. */
  constructor(founders: readonly string[], private readonly now: () => number) {
    super();
    for (const id of founders) this.register(id, 'up', id);
  }

  /** A peer the group does not know registers (joining, or up for a founder); its tag is new. */
  register(id: string, state: MemberState, by: string): MemberRecord {
    if (this.get(id)) throw new Error(`assertion failed: ${id} registers twice`);
    const at = this.now();
    const r: MemberRecord = { id, iscsi: `sim:${id}`, rpc: `sim:${id}`, http: `sim:${id}`, state, capacity: 1, tag: this.nextTag++, joinedAtMs: at, changedBy: by, changedAtMs: at, version: 1 };
    this.since.set(id, at);
    this.put(id, r);
    return r;
  }

  setState(id: string, state: MemberState, by: string): MemberRecord {
    const now = this.get(id);
    if (!now) throw new Error(`assertion failed: no member ${id}`);
    const next = { ...now, state, changedBy: by, changedAtMs: this.now(), version: now.version + 1 };
    this.put(id, next);
    return next;
  }

  /** Was `id` a member (registered, not removed: the simulator removes nobody) at true time `atMs`? */
  memberAt(id: string, atMs: number): boolean {
    const since = this.since.get(id);
    return since !== undefined && since <= atMs && this.get(id)?.state !== 'removed';
  }
}
