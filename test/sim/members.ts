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

import type { MemberChange, MemberRecord, MemberState, MembersView } from '../../src/cluster/members';

export class SimMembers implements MembersView {
  private readonly records = new Map<string, MemberRecord>();
  /** True time each peer became a member (registered: joining or up), for memberAt. */
  private readonly since = new Map<string, number>();
  private readonly listeners = new Set<MemberChange>();
  private nextTag = 1;

  /** `founders`: members from the start, up (the group's cluster.yaml); `now`: the true clock. */
  constructor(founders: readonly string[], private readonly now: () => number) {
    for (const id of founders) this.register(id, 'up', id);
  }

  ids(): readonly string[] {
    return this.all().filter((r) => r.state !== 'removed').map((r) => r.id);
  }

  placeable(): readonly string[] {
    return this.all().filter((r) => r.state === 'up').map((r) => r.id);
  }

  get(id: string): MemberRecord | undefined {
    return this.records.get(id);
  }

  /** Every record, by tag. */
  all(): MemberRecord[] {
    return [...this.records.values()].sort((a, b) => a.tag - b.tag);
  }

  /** Called at every change, at once (what the watch tells Members.onChange listeners); returns the unsubscribe. */
  onChange(fn: MemberChange): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** A peer the group does not know registers (joining, or up for a founder); its tag is new. */
  register(id: string, state: MemberState, by: string): MemberRecord {
    if (this.records.has(id)) throw new Error(`assertion failed: ${id} registers twice`);
    const at = this.now();
    const r: MemberRecord = { id, iscsi: `sim:${id}`, rpc: `sim:${id}`, http: `sim:${id}`, state, capacity: 1, tag: this.nextTag++, joinedAtMs: at, changedBy: by, changedAtMs: at, version: 1 };
    this.records.set(id, r);
    this.since.set(id, at);
    this.tell(id, r, undefined);
    return r;
  }

  setState(id: string, state: MemberState, by: string): MemberRecord {
    const now = this.records.get(id);
    if (!now) throw new Error(`assertion failed: no member ${id}`);
    const next = { ...now, state, changedBy: by, changedAtMs: this.now(), version: now.version + 1 };
    this.records.set(id, next);
    this.tell(id, next, now);
    return next;
  }

  private tell(id: string, now: MemberRecord, before: MemberRecord | undefined): void {
    for (const l of [...this.listeners]) l(id, now, before);
  }

  /** Was `id` a member (registered, not removed: the simulator removes nobody) at true time `atMs`? */
  memberAt(id: string, atMs: number): boolean {
    const since = this.since.get(id);
    return since !== undefined && since <= atMs && this.records.get(id)?.state !== 'removed';
  }
}
