// Host balancing (DESIGN.md 5): where a host should be logged in. Pure: a load view and the
// clock come in, decisions come out; the portal, the peer RPCs and the timers are wired in
// host-balance-service.ts.
//
// One rule decides both the login redirect and the async-logout move, so that they agree:
// every peer gets a score (sessions, plus IOPS and bytes/s converted into "session
// equivalents", minus a bonus for owning the host's volume's pages); a host belongs on the
// peer with the lowest score (ties: lowest peer id). A peer redirects a login only when that
// best peer's score is at least `marginSessions` lower than its own. Why no loops: the peer
// a host is sent to is the minimum of the same scores, so with the same view it finds no
// peer lower than itself by any margin and accepts. Views differ a little between peers
// (each counts its own sessions live, the others' from a poll up to a second old), so two
// more guards close the gap: a peer that redirected (initiator, ISID) accepts the next login
// of that initiator port within `redirectMemoryMs` (it came back: the other peer disagreed or
// was unreachable), and a planned move (admin or overload) is announced to every peer first,
// so the destination accepts and every other portal sends the host there.
//
// A multipath host (one that has sessions to the target through other peers too, each path a
// target port group of its own: src/scsi/alua.ts) is never redirected nor moved: its paths
// are its own choice and ALUA states steer its I/O; moving a path onto a peer it already uses
// would leave it without one when that peer dies. Who else a host reaches the target through is
// read from the sessions the peers gossip (src/loadmon): a session is listed once it has sent a
// command, up to a tick late, so the very first logins of a host that logs in through every
// portal at once are placed by the usual rule (which, on an even group, accepts them). A moved
// host's next login is sent on to its destination even while the gossip still lists the session
// it just left: only a path it already has on the destination would keep it (see onLogin).
//
// libiscsi re-logs in to the portal it was first given (not the one it was redirected to),
// with a NEW random ISID after an async logout; so planned moves are keyed by (initiator
// name, target name), not by ISID.

/** One peer as the balancer sees it. */
export interface PeerLoad {
  peerId: string;
  /** "host:port" of its iSCSI portal. */
  iscsiAddress: string;
  /** Its target portal group tag (1-based place in the group): sent with TargetAddress. */
  portalGroupTag: number;
  up: boolean;
  /** Normal (not discovery) sessions logged in, including logins accepted and not finished yet. */
  sessions: number;
  iops: number;
  bytesPerSec: number;
}

/** The group's load as one peer knows it. Swappable: a poll of Status now, the gossip monitor later. */
export interface LoadView {
  peers(nowMs: number): PeerLoad[];
}

export interface HostBalanceSettings {
  /** Redirect a login when the best peer's score is at least this much lower than ours. */
  marginSessions: number;
  /** Move a logged-in host (async logout) when the gap is at least this (≥ 2: a move must narrow it). */
  moveMarginSessions: number;
  /** IOPS and bytes/s that weigh as much as one session. */
  iopsPerSession: number;
  bytesPerSecPerSession: number;
  /** Score bonus for a peer owning all of the volume's pages (scaled by its share). */
  localityBonusSessions: number;
  /** How long a redirect is remembered (accept that initiator port's next login). */
  redirectMemoryMs: number;
  /** How long a planned move waits for the host to log in again. */
  planMs: number;
  /** Time to logout (AsyncEvent 1 Parameter3), seconds. */
  logoutSeconds: number;
  /** Automatic moves: at most one per this interval per peer; a session is not asked twice within the cool-down; young sessions are left alone. */
  moveIntervalMs: number;
  sessionCooldownMs: number;
  sessionMinAgeMs: number;
  /** Whether this peer moves logged-in hosts by itself (the admin move works either way). */
  autoMove: boolean;
}

export const defaultHostBalanceSettings: Readonly<HostBalanceSettings> = {
  // Below whole sessions so that a small locality difference (an odd page count striped
  // over the peers) does not hide a whole session's difference.
  marginSessions: 0.75,
  moveMarginSessions: 1.75,
  iopsPerSession: 2_000,
  bytesPerSecPerSession: 64 * 1024 * 1024,
  localityBonusSessions: 1,
  redirectMemoryMs: 10_000,
  planMs: 15_000,
  logoutSeconds: 5,
  moveIntervalMs: 10_000,
  sessionCooldownMs: 60_000,
  sessionMinAgeMs: 30_000,
  autoMove: true,
};

/** A login as the portal sees it at its first PDU. */
export interface LoginAttempt {
  initiatorName: string;
  /** ISID, hex. */
  isid: string;
  targetName: string;
  sessionType: 'Discovery' | 'Normal';
  /** The initiator port holds a reservation registration through this peer: keep it here unless a move was planned. */
  pinned?: boolean;
  /** The initiator has sessions to this target through other peers: a multipath host, never redirected. */
  multipath?: boolean;
  /** The other peers those sessions are on, as gossiped (see onLogin: a planned login); unknown: any path counts as one on the destination. */
  otherPaths?: readonly string[];
}

/** A host session another peer reports (the load monitor's gossip, src/loadmon/view.ts HostLoadView). */
export interface ReportedSession {
  peer: string;
  /** "<InitiatorName>,i,0x<ISID>". */
  initiatorPort: string;
  targetName: string;
  ended: boolean;
}

/** The other peers through which the initiator (any of its ports) has live sessions to the target: a multipath host when any. */
export function otherPaths(sessions: readonly ReportedSession[], selfId: string, initiatorName: string, targetName: string): string[] {
  const mine = sessions.filter((x) => x.peer !== selfId && !x.ended && x.targetName === targetName && x.initiatorPort.startsWith(`${initiatorName},i,`));
  return [...new Set(mine.map((x) => x.peer))].sort();
}

/** Share (0..1) of the volume's pages each peer owns, when known. */
export type PageShares = ReadonlyMap<string, number>;

export interface Placement {
  best: PeerLoad;
  self: PeerLoad;
  /** score(self) - score(best), in session equivalents. */
  gap: number;
}

/**
 * Lower is better. Locality counts only above a fair share: a volume striped evenly over n
 * peers gives nobody a bonus; a peer holding all of it gets the whole bonus.
 */
export function peerScore(p: PeerLoad, s: HostBalanceSettings, shares?: PageShares): number {
  const load = p.sessions + p.iops / s.iopsPerSession + p.bytesPerSec / s.bytesPerSecPerSession;
  if (!shares || shares.size < 2) return load;
  const fair = 1 / shares.size;
  const excess = Math.min(1, Math.max(0, ((shares.get(p.peerId) ?? 0) - fair) / (1 - fair)));
  return load - s.localityBonusSessions * excess;
}

/**
 * The best place for a host among the up peers (self counts as up), and how much better it
 * is than self. Deterministic: equal scores go to the lowest peer id.
 */
export function place(view: PeerLoad[], selfId: string, s: HostBalanceSettings, shares?: PageShares): Placement | undefined {
  const self = view.find((p) => p.peerId === selfId);
  if (!self) return undefined;
  // Self always counts (it is answering); others only when up and reachable by address.
  const eligible = view.filter((p) => p.peerId === selfId || (p.up && p.iscsiAddress !== ''));
  const ranked = eligible.map((p) => ({ p, score: peerScore(p, s, shares) }));
  ranked.sort((a, b) => a.score - b.score || (a.p.peerId < b.p.peerId ? -1 : a.p.peerId > b.p.peerId ? 1 : 0));
  return { best: ranked[0].p, self, gap: peerScore(self, s, shares) - ranked[0].score };
}

/** The pure login rule: the peer to redirect to, or undefined to accept here. */
export function loginTarget(view: PeerLoad[], selfId: string, login: LoginAttempt, s: HostBalanceSettings, shares?: PageShares): PeerLoad | undefined {
  if (login.sessionType === 'Discovery') return undefined;
  const p = place(view, selfId, s, shares);
  if (!p || p.best.peerId === selfId) return undefined;
  return p.gap >= s.marginSessions ? p.best : undefined;
}

/** A move planned for a host: wherever it logs in next (within the plan's life), it goes to `to`. */
export interface MovePlan {
  initiatorName: string;
  targetName: string;
  to: string;
  untilMs: number;
}

/** A session this peer could ask to move. */
export interface MovableSession {
  tsih: number;
  initiatorName: string;
  isid: string;
  targetName: string;
  startedAtMs: number;
  /** Holds a persistent reservation registration or a RESERVE through this peer: left alone. */
  pinned: boolean;
  /** Its initiator has sessions to the target through other peers (multipath): left alone. */
  multipath: boolean;
}

export type LoginDecision =
  | { kind: 'accept'; reason: 'discovery' | 'best' | 'came-back' | 'planned-here' | 'pinned' | 'multipath' | 'no-view' }
  | { kind: 'redirect'; to: PeerLoad; reason: 'balance' | 'planned' };

const key = (...parts: string[]): string => parts.join('\u0000');

/** How the balancer names an initiator port logged in to a target (match logins with sessions). */
export const sessionPortKey = (initiatorName: string, isid: string, targetName: string): string => key(initiatorName, isid, targetName);

/**
 * One peer's host-balancing state: recent redirects and accepted logins (so that a burst of
 * logins spreads before the polled view catches up), planned moves, and the rate limits of
 * automatic moves. Time comes in as nowMs; nothing here does I/O.
 */
export class HostBalancer {
  private readonly redirected = new Map<string, { to: string; atMs: number }>();
  /** Logins accepted here whose session has not started yet (initiator port → time). */
  private readonly accepted = new Map<string, number>();
  /** Redirects sent, by destination: counted on that peer until its polled view catches up. */
  private readonly inbound: { to: string; atMs: number }[] = [];
  private readonly plans = new Map<string, MovePlan>();
  private readonly asked = new Map<number, number>();
  private lastMoveMs = -Infinity;

  constructor(
    readonly selfId: string,
    readonly settings: HostBalanceSettings,
  ) {}

  /**
   * The view adjusted by what only this peer knows yet: logins it accepted that have not
   * become sessions yet, redirects it sent recently.
   */
  adjusted(view: PeerLoad[], nowMs: number): PeerLoad[] {
    this.expire(nowMs);
    return view.map((p) => {
      const extra = p.peerId === this.selfId ? this.accepted.size : this.inbound.filter((r) => r.to === p.peerId).length;
      return extra ? { ...p, sessions: p.sessions + extra } : p;
    });
  }

  onLogin(view: PeerLoad[], login: LoginAttempt, nowMs: number, shares?: PageShares): LoginDecision {
    this.expire(nowMs);
    if (login.sessionType === 'Discovery') return { kind: 'accept', reason: 'discovery' };
    const port = sessionPortKey(login.initiatorName, login.isid, login.targetName);
    const plan = this.plans.get(key(login.initiatorName, login.targetName));
    if (plan) {
      this.plans.delete(key(login.initiatorName, login.targetName));
      const to = view.find((p) => p.peerId === plan.to);
      if (plan.to === this.selfId) return this.accept(port, nowMs, 'planned-here');
      // Plans are made only for hosts with one path (move and pickMove refuse multipath ones). A
      // moved host logs in again at once, while the gossip still lists the session it just left
      // (on the peer that asked it to leave, never the plan's destination): that stale path must
      // not keep it here. Only a path it already has on the destination stops the move.
      const pathOnDestination = login.otherPaths ? login.otherPaths.includes(plan.to) : login.multipath === true;
      if (to && to.up && !pathOnDestination) return this.redirect(port, to, nowMs, 'planned');
    }
    if (this.redirected.has(port)) {
      // It came back: the other peer sent it here again or could not be reached. Stay.
      this.redirected.delete(port);
      return this.accept(port, nowMs, 'came-back');
    }
    if (login.pinned) return this.accept(port, nowMs, 'pinned');
    if (login.multipath) return this.accept(port, nowMs, 'multipath');
    if (!view.some((p) => p.peerId === this.selfId)) return this.accept(port, nowMs, 'no-view');
    const to = loginTarget(view, this.selfId, login, this.settings, shares);
    return to ? this.redirect(port, to, nowMs, 'balance') : this.accept(port, nowMs, 'best');
  }

  /** The login of this initiator port became a session: the portal counts it from now on. */
  sessionStarted(port: string): void {
    this.accepted.delete(port);
  }

  /** Another peer (or this one) planned a move of this host: apply it at its next login here. */
  plan(p: MovePlan): void {
    this.plans.set(key(p.initiatorName, p.targetName), p);
  }

  cancelPlan(initiatorName: string, targetName: string): void {
    this.plans.delete(key(initiatorName, targetName));
  }

  /** Remember that this session was asked to log out (no second request within the cool-down). */
  noteAsked(tsih: number, nowMs: number): void {
    this.asked.set(tsih, nowMs);
    this.lastMoveMs = nowMs;
  }

  /**
   * The automatic move, if one is due: this peer stands out from the best peer by at least
   * moveMarginSessions, no automatic move happened within moveIntervalMs, and some session is
   * old enough, not asked within the cool-down, not pinned by a reservation and not one path of
   * a multipath host. The newest
   * such session goes (it has the least cached state at the host… and is the cheapest to redo).
   */
  pickMove(view: PeerLoad[], sessions: MovableSession[], nowMs: number): { session: MovableSession; to: PeerLoad } | undefined {
    this.expire(nowMs);
    if (!this.settings.autoMove) return undefined;
    if (nowMs - this.lastMoveMs < this.settings.moveIntervalMs) return undefined;
    const p = place(view, this.selfId, this.settings);
    if (!p || p.best.peerId === this.selfId || p.gap < this.settings.moveMarginSessions) return undefined;
    const candidates = sessions
      .filter((x) => !x.pinned && !x.multipath && nowMs - x.startedAtMs >= this.settings.sessionMinAgeMs)
      .filter((x) => nowMs - (this.asked.get(x.tsih) ?? -Infinity) >= this.settings.sessionCooldownMs)
      .sort((a, b) => b.startedAtMs - a.startedAtMs || a.tsih - b.tsih);
    return candidates.length ? { session: candidates[0], to: p.best } : undefined;
  }

  private accept(port: string, nowMs: number, reason: Extract<LoginDecision, { kind: 'accept' }>['reason']): LoginDecision {
    this.accepted.set(port, nowMs);
    return { kind: 'accept', reason };
  }

  private redirect(port: string, to: PeerLoad, nowMs: number, reason: 'balance' | 'planned'): LoginDecision {
    this.redirected.set(port, { to: to.peerId, atMs: nowMs });
    this.inbound.push({ to: to.peerId, atMs: nowMs });
    return { kind: 'redirect', to, reason };
  }

  /** Drop what is too old to matter; every table stays bounded by what a few seconds bring. */
  private expire(nowMs: number): void {
    const s = this.settings;
    for (const [k, v] of this.redirected) if (nowMs - v.atMs > s.redirectMemoryMs) this.redirected.delete(k);
    // A login takes well under this; a session that started is counted by the portal itself.
    for (const [k, at] of this.accepted) if (nowMs - at > acceptedCountMs) this.accepted.delete(k);
    while (this.inbound.length && nowMs - this.inbound[0].atMs > inboundCountMs) this.inbound.shift();
    for (const [k, p] of this.plans) if (nowMs > p.untilMs) this.plans.delete(k);
    for (const [k, at] of this.asked) if (nowMs - at > s.sessionCooldownMs) this.asked.delete(k);
  }
}

/** An accepted login counts on this peer until its session starts, at most this long. */
const acceptedCountMs = 5_000;
/** A redirect counts on its destination for this long: longer than a poll round plus a login. */
const inboundCountMs = 3_000;
