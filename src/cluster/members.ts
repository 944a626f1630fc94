// The group's membership (DESIGN.md 11): the catalog is the membership. One record per peer,
// `members/<id>`, changed by compare-and-swap; every peer keeps the records in memory, fed by a
// watch, so a peer that registers itself is known to every other within the watch's delay, and
// nobody restarts for it.
//
// States: joining (registered, not serving yet) → up → draining (nothing new placed there, its
// copies moved away) or leaving (a graceful stop: roles handed over) → up again (undrain, or a
// restart), or → removed (kept as a record, so its tag is never given to another peer).
//
// Tags: a member's portal group tag and relative target port id (iSCSI, SPC-4), assigned once at
// registration from the group record's counter and never reused, so every peer reports the same
// number for a port whichever cluster.yaml it read.
//
// The founding peers: the peer that creates the group (the first ever to start on this catalog)
// registers every peer its cluster.yaml lists (up, tags in file order), so a group started from
// one file behaves as it did before membership was kept in the catalog. Later, a peer is a
// member only once it registered itself: an entry added to a file makes nobody a member.

import type { Env } from '../env/env';
import { ConflictError, InvalidArgumentError, NotFoundError } from '../errors';
import type { MetaRecord, MetaStore, WatchEvent } from './metastore';

export type MemberState = 'joining' | 'up' | 'draining' | 'leaving' | 'removed';
export const memberStates: readonly MemberState[] = ['joining', 'up', 'draining', 'leaving', 'removed'];

/** A peer's addresses as its cluster.yaml entry gives them. */
export interface MemberAddresses {
  id: string;
  iscsi: string;
  rpc: string;
  http: string;
  zone?: string;
  /** Relative capacity (cluster.yaml `capacity:`, default 1): the balancer fills peers in proportion. */
  capacity?: number;
}

export interface MemberRecord {
  id: string;
  iscsi: string;
  rpc: string;
  http: string;
  zone?: string;
  state: MemberState;
  /** Relative capacity: the balancer aims at stored copies in proportion to it (default 1). */
  capacity: number;
  /** Portal group tag and relative target port id: stable, never reused. */
  tag: number;
  joinedAtMs: number;
  /** The last state change: who asked ("p2", "admin", "p1 (SIGTERM)") and when (wall clock). */
  changedBy: string;
  changedAtMs: number;
  /** Random at each start of the peer: two processes with one id tell themselves apart. */
  incarnation?: string;
  version: number;
}

/** What most of a peer needs of the membership: who is in the group now. */
export interface MembersView {
  /** Every member not removed, by tag (the group's peers: gossip, leases, snapshots, status). */
  ids(): readonly string[];
  /** Members that may receive new data: up (not joining, draining, leaving or removed). */
  placeable(): readonly string[];
  get(id: string): MemberRecord | undefined;
}

/** A fixed group (tests, the simulator): every peer up, tags in order. */
export function fixedMembers(ids: readonly string[], addresses?: (id: string) => Partial<MemberAddresses>): MembersView {
  const records = new Map(ids.map((id, i): [string, MemberRecord] => [id, {
    id, iscsi: '', rpc: '', http: '', ...addresses?.(id), state: 'up', capacity: addresses?.(id).capacity ?? 1, tag: i + 1, joinedAtMs: 0, changedBy: id, changedAtMs: 0, version: 1,
  }]));
  return { ids: () => ids, placeable: () => ids, get: (id) => records.get(id) };
}

const memberPrefix = 'members/';
/** The group's own record: its id (written into every data directory) and the next tag. */
const groupKey = 'group';

export interface GroupRecord {
  /** Random at the group's creation: a data directory names the group it belongs to. */
  id: string;
  nextTag: number;
}

export type MemberChange = (id: string, now: MemberRecord | undefined, before: MemberRecord | undefined) => void;

/**
 * The records of a group in memory and who listens to their changes: what the catalog's
 * membership (Members) and the simulator's shared one (test/sim/members.ts) have in common.
 * The lists are kept sorted as records change: the data path and peer authentication ask often.
 */
export class MemberBook implements MembersView {
  private readonly records = new Map<string, MemberRecord>();
  private readonly listeners = new Set<MemberChange>();
  private sortedIds: string[] = [];
  private sortedPlaceable: string[] = [];

  ids(): readonly string[] {
    return this.sortedIds;
  }

  placeable(): readonly string[] {
    return this.sortedPlaceable;
  }

  get(id: string): MemberRecord | undefined {
    return this.records.get(id);
  }

  /** Every record, removed ones too, by tag. */
  all(): MemberRecord[] {
    return [...this.records.values()].sort((a, b) => a.tag - b.tag);
  }

  /** Called for every change of a record (registration, state, addresses); returns the unsubscribe. */
  onChange(fn: MemberChange): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Take a record (undefined: it is gone), then tell the listeners. */
  protected put(id: string, now: MemberRecord | undefined): void {
    const before = this.records.get(id);
    if (now) this.records.set(id, now);
    else this.records.delete(id);
    const live = this.all().filter((r) => r.state !== 'removed');
    this.sortedIds = live.map((r) => r.id);
    this.sortedPlaceable = live.filter((r) => r.state === 'up').map((r) => r.id);
    for (const l of [...this.listeners]) l(id, now, before);
  }

  protected forgetListeners(): void {
    this.listeners.clear();
  }
}

export class Members extends MemberBook {
  private unwatch: (() => void) | undefined;

  private constructor(private readonly store: MetaStore, private readonly env: Env) {
    super();
  }

  static async open(store: MetaStore, env: Env): Promise<Members> {
    const m = new Members(store, env);
    // Watch first, then list: a change between the two is seen twice (harmless), never missed.
    m.unwatch = await store.watch(memberPrefix, (ev) => m.onEvent(ev));
    for (const r of await store.list(memberPrefix)) m.onEvent({ type: 'put', record: r });
    return m;
  }

  close(): void {
    this.unwatch?.();
    this.forgetListeners();
  }

  private onEvent(ev: WatchEvent): void {
    const id = (ev.type === 'put' ? ev.record.key : ev.key).slice(memberPrefix.length);
    const before = this.get(id);
    const now = ev.type === 'put' ? decodeMember(ev.record) : undefined;
    // Our own write applied at once (apply) may come again, older, from the watch.
    if (now && before && now.version < before.version) return;
    this.put(id, now);
  }

  /**
   * The group's record. The first peer ever to start makes it, and registers `founders` (its
   * cluster.yaml's peers: up, tags 1..n in file order); every later start finds it.
   */
  async group(founders: readonly MemberAddresses[] = [], by = ''): Promise<GroupRecord> {
    for (;;) {
      const r = await this.store.get(groupKey);
      if (r) return JSON.parse(r.value.toString()) as GroupRecord;
      const made: GroupRecord = { id: this.env.random.bytes(8).toString('hex'), nextTag: founders.length + 1 };
      try {
        await this.store.put(groupKey, Buffer.from(JSON.stringify(made)), 0);
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
        continue;
      }
      for (const [i, p] of founders.entries()) {
        await this.create(p, 'up', by, undefined, i + 1).catch((err) => {
          if (!(err instanceof ConflictError)) throw err;
        });
      }
      return made;
    }
  }

  /** A new tag, never given before (compare-and-swap on the group record). */
  private async takeTag(): Promise<number> {
    for (;;) {
      const r = await this.store.get(groupKey);
      if (!r) throw new Error('assertion failed: a tag is taken once the group exists');
      const g = JSON.parse(r.value.toString()) as GroupRecord;
      try {
        await this.store.put(groupKey, Buffer.from(JSON.stringify({ ...g, nextTag: g.nextTag + 1 })), r.version);
        return g.nextTag;
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
      }
    }
  }

  /**
   * This peer at its start: its record is created (joining) when the catalog does not know it,
   * and its addresses, capacity and incarnation brought up to date when it does. Refused for a
   * removed peer: its id is not given again.
   */
  async registerSelf(self: MemberAddresses, incarnation: string): Promise<MemberRecord> {
    for (;;) {
      const r = await this.store.get(memberPrefix + self.id);
      if (!r) {
        try {
          return await this.create(self, 'joining', self.id, incarnation);
        } catch (err) {
          if (!(err instanceof ConflictError)) throw err;
          continue;
        }
      }
      const now = decodeMember(r);
      if (now.state === 'removed') {
        throw new InvalidArgumentError(`peer ${self.id} was removed from the group (by ${now.changedBy}, ${new Date(now.changedAtMs).toISOString()}); start it with a new id`);
      }
      const next: MemberRecord = { ...now, iscsi: self.iscsi, rpc: self.rpc, http: self.http, capacity: self.capacity ?? now.capacity, incarnation };
      if (self.zone) next.zone = self.zone;
      try {
        return this.apply(await this.store.put(r.key, encodeMember(next), r.version));
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
      }
    }
  }

  private async create(p: MemberAddresses, state: MemberState, by: string, incarnation?: string, founderTag?: number): Promise<MemberRecord> {
    const tag = founderTag ?? (await this.takeTag());
    const nowMs = this.env.clock.nowMs();
    const record: MemberRecord = {
      id: p.id, iscsi: p.iscsi, rpc: p.rpc, http: p.http, ...(p.zone ? { zone: p.zone } : {}), state, capacity: p.capacity ?? 1, tag,
      joinedAtMs: nowMs, changedBy: by, changedAtMs: nowMs, ...(incarnation ? { incarnation } : {}), version: 0,
    };
    return this.apply(await this.store.put(memberPrefix + p.id, encodeMember(record), 0));
  }

  /**
   * Change a member's state by compare-and-swap, if `allowed(current)` says so (it throws its
   * own refusal). Returns the record as written.
   */
  async setState(id: string, state: MemberState, by: string, allowed?: (now: MemberRecord) => void): Promise<MemberRecord> {
    for (;;) {
      const r = await this.store.get(memberPrefix + id);
      if (!r) throw new NotFoundError(`no peer "${id}" in the group (members: ${this.ids().join(', ') || 'none'})`);
      const now = decodeMember(r);
      allowed?.(now);
      if (now.state === state) return this.apply(r);
      const next: MemberRecord = { ...now, state, changedBy: by, changedAtMs: this.env.clock.nowMs() };
      try {
        return this.apply(await this.store.put(r.key, encodeMember(next), r.version));
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
      }
    }
  }

  /** Apply a record this peer wrote now (the watch brings it too, maybe later). */
  private apply(r: MetaRecord): MemberRecord {
    this.onEvent({ type: 'put', record: r });
    return this.get(decodeMember(r).id)!;
  }
}

function encodeMember(m: MemberRecord): Buffer {
  const { version: _version, ...rest } = m;
  return Buffer.from(JSON.stringify(rest));
}

function decodeMember(r: MetaRecord): MemberRecord {
  return { ...(JSON.parse(r.value.toString()) as Omit<MemberRecord, 'version'>), version: r.version };
}
