// Recent events of one peer for the console: a bounded ring (the oldest fall out first) that
// anyone in the peer may add to (volume changes, peers seen up or down, sessions; page moves,
// redirects and snapshots when those features land) and that the event stream follows.
// Pure: the clock is injected, nothing here touches a socket.

import { assert } from '../errors';

export type EventKind =
  | 'volume-created' | 'volume-deleted' | 'volume-resized' | 'volume-access'
  | 'peer-up' | 'peer-down' | 'session-login' | 'session-logout'
  | 'page-moved' | 'migration' | 'redirect' | 'snapshot' | 'rebalance' | 'replication' | 'member';

export interface PeerEvent {
  /** Increasing per peer from 1: a client that saw seq n asks for what came after n. */
  seq: number;
  atMs: number;
  kind: EventKind;
  /** One line a person reads. */
  message: string;
  volume?: string;
  peer?: string;
}

export type EventListener = (e: PeerEvent) => void;

export class EventLog {
  private readonly ring: PeerEvent[] = [];
  private readonly listeners = new Set<EventListener>();
  private seq = 0;

  constructor(private readonly capacity: number, private readonly now: () => number = Date.now) {
    assert(capacity >= 1, 'event log capacity');
  }

  add(kind: EventKind, message: string, fields: { volume?: string; peer?: string } = {}): PeerEvent {
    const e: PeerEvent = { seq: ++this.seq, atMs: this.now(), kind, message, ...fields };
    this.ring.push(e);
    if (this.ring.length > this.capacity) this.ring.shift();
    for (const l of this.listeners) l(e);
    return e;
  }

  /** Events with seq > afterSeq, oldest first (at most the ring's capacity). */
  since(afterSeq = 0): PeerEvent[] {
    const first = this.ring.findIndex((e) => e.seq > afterSeq);
    return first < 0 ? [] : this.ring.slice(first);
  }

  subscribe(listener: EventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

/** What the peer last saw of the group, to turn two status snapshots into events. */
export interface GroupSnapshot {
  peersUp: Map<string, boolean>;
  /** "peer/tsih" → "initiator → target" for normal sessions. */
  sessions: Map<string, string>;
}

export interface StatusForEvents {
  peers: { id: string; up: boolean; sessions: { tsih: number; initiatorName: string; targetName: string; sessionType: string }[] }[];
}

export function snapshotOf(status: StatusForEvents): GroupSnapshot {
  const peersUp = new Map<string, boolean>();
  const sessions = new Map<string, string>();
  for (const p of status.peers) {
    peersUp.set(p.id, p.up);
    for (const s of p.sessions) if (s.sessionType === 'Normal') sessions.set(`${p.id}/${s.tsih}`, `${s.initiatorName} → ${s.targetName}`);
  }
  return { peersUp, sessions };
}

/**
 * The events between two snapshots: peers that went down or came back, sessions that logged
 * in or out. The sessions of a peer that went down are not reported as logouts (we cannot
 * know; its up/down event says it).
 */
export function groupChanges(before: GroupSnapshot, after: GroupSnapshot): { kind: EventKind; message: string; peer: string }[] {
  const out: { kind: EventKind; message: string; peer: string }[] = [];
  for (const [id, up] of after.peersUp) {
    const was = before.peersUp.get(id);
    if (was === undefined || was === up) continue;
    out.push({ kind: up ? 'peer-up' : 'peer-down', message: up ? `peer ${id} answers again` : `peer ${id} does not answer`, peer: id });
  }
  const peerOf = (key: string): string => key.slice(0, key.indexOf('/'));
  for (const [key, what] of after.sessions) {
    if (!before.sessions.has(key)) out.push({ kind: 'session-login', message: `login through ${peerOf(key)}: ${what}`, peer: peerOf(key) });
  }
  for (const [key, what] of before.sessions) {
    const peer = peerOf(key);
    if (!after.sessions.has(key) && after.peersUp.get(peer)) out.push({ kind: 'session-logout', message: `logout from ${peer}: ${what}`, peer });
  }
  return out;
}

/** What an event says of a member record's change (`peersan peer …`, a start, a stop): who asked, too. */
export interface MemberShape {
  id: string;
  state: string;
  changedBy: string;
}

/**
 * The line the console shows for a member record that changed (members.ts onChange), or nothing
 * when its state did not change (new addresses at a restart, say). Every peer says it from its
 * own watch: the group's start-ups and shutdowns are announced everywhere (DESIGN.md 11).
 */
export function memberChangeText(now: MemberShape | undefined, before: MemberShape | undefined): string | undefined {
  if (!now) return before ? `peer ${before.id} forgotten by the catalog` : undefined;
  if (before?.state === now.state) return undefined;
  const asked = ` (${now.changedBy})`;
  if (!before) return now.state === 'joining' ? `peer ${now.id} joins the group${asked}` : `peer ${now.id} is in the group, ${now.state}${asked}`;
  switch (now.state) {
    case 'up':
      return before.state === 'draining' ? `peer ${now.id} undrained: up again${asked}` : before.state === 'leaving' ? `peer ${now.id} is back${asked}` : `peer ${now.id} joined: up${asked}`;
    case 'draining':
      return `peer ${now.id} draining: its copies and sessions move to the other peers${asked}`;
    case 'leaving':
      return `peer ${now.id} leaving: handing its primary roles over and stopping${asked}`;
    case 'removed':
      return `peer ${now.id} removed from the group${asked}`;
    default:
      return `peer ${now.id} is ${now.state}${asked}`;
  }
}

interface VolumeShape {
  id: string;
  sizeBytes: number;
  allow: string[];
  chap?: { user: string; mutualUser?: string };
}

/**
 * A catalog volume listener that turns record changes into events: created, deleted,
 * resized, access changed. `known` are the volumes already there (no event for them).
 * Access events say what changed, never a secret.
 */
export function volumeEvents(log: EventLog, known: (VolumeShape & { name: string })[], formatBytes: (n: number) => string): (name: string, record: VolumeShape | undefined) => void {
  const last = new Map<string, VolumeShape>(known.map((v) => [v.name, v]));
  return (name, record) => {
    const before = last.get(name);
    if (record) last.set(name, record);
    else last.delete(name);
    if (!record) {
      if (before) log.add('volume-deleted', `volume ${name} deleted`, { volume: name });
      return;
    }
    if (!before || before.id !== record.id) {
      log.add('volume-created', `volume ${name} created (${formatBytes(record.sizeBytes)})`, { volume: name });
      return;
    }
    if (before.sizeBytes !== record.sizeBytes) {
      log.add('volume-resized', `volume ${name} resized ${formatBytes(before.sizeBytes)} → ${formatBytes(record.sizeBytes)}`, { volume: name });
    }
    const access = (v: VolumeShape): string => JSON.stringify([v.allow, v.chap?.user ?? null, v.chap?.mutualUser ?? null]);
    if (access(before) !== access(record)) {
      const chap = record.chap ? `CHAP user ${record.chap.user}${record.chap.mutualUser ? ', mutual' : ''}` : 'no CHAP';
      log.add('volume-access', `volume ${name} access: ${record.allow.length ? record.allow.join(', ') : 'any initiator'}; ${chap}`, { volume: name });
    }
  };
}
