// Host balancing wired to one peer: the portal's login redirect hook, the periodic overload
// check that asks a session to log out (AsyncEvent 1), and the admin "move this session"
// operation. Decisions are host-balance.ts's; this file only gathers inputs and carries out.
//
// A move, in order: (1) the plan {initiator, target → destination} goes to EVERY peer and
// is awaited (bounded), because libiscsi logs in again to the portal it was first given,
// which may be any peer; (2) only then the AsyncEvent 1 goes out; (3) the session is served
// normally until the host's Logout, whose answer waits for the commands in flight
// (session.ts); (4) the host's next login, wherever it lands, is redirected to the
// destination, which accepts it.

import type { Logger } from 'pino';
import type { Env, TimerHandle } from '../env/env';
import { InvalidArgumentError, NotFoundError } from '../errors';
import type { Portal, SessionInfo } from '../iscsi/portal';
import {
  defaultHostBalanceSettings,
  HostBalancer,
  otherPaths,
  place,
  sessionPortKey,
  type HostBalanceSettings,
  type LoadView,
  type MovePlan,
  type PageShares,
  type PeerLoad,
  type ReportedSession,
} from './host-balance';

export interface MovedSession {
  tsih: number;
  initiatorName: string;
  targetName: string;
  from: string;
  to: string;
}

export interface HostBalanceServiceOptions {
  selfId: string;
  settings?: Partial<HostBalanceSettings>;
  view: LoadView;
  portal(): Portal;
  /** The initiator port holds a PR registration or a reservation on that target through this peer. */
  pinned(initiatorName: string, isid: string, targetName: string): boolean;
  /** The host sessions the peers report (the load monitor's gossip): a multipath host's other paths; default: none known. */
  reportedSessions?(): readonly ReportedSession[];
  /** Share of the target's volume pages per peer (locality), when known. */
  shares?(targetName: string): PageShares | undefined;
  /** Deliver a plan to every other peer; resolves when they answered or timed out. */
  broadcastPlan(plan: MovePlan): Promise<void>;
  /** Something the console's events show (a redirect, a host asked to move). */
  event?(message: string, target: string): void;
  log: Logger;
  /** How often the overload check runs. */
  checkMs?: number;
  /**
   * Clock and the check timer. Plans, session ages and move spacing run on the wall clock
   * (`nowMs`): HostBalancer's "last move" starts at 0, which only the wall clock puts far enough
   * in the past for the first move to be allowed at once.
   */
  env: Env;
}

export class HostBalanceService {
  readonly balancer: HostBalancer;
  readonly settings: HostBalanceSettings;
  private readonly o: HostBalanceServiceOptions;
  private readonly log: Logger;
  private readonly startedAtMs = new Map<number, number>();
  private timer: TimerHandle | undefined;
  private moving = false;
  /** Counters for status and tests. */
  readonly counters = { redirects: 0, plannedRedirects: 0, logoutRequests: 0 };

  constructor(opts: HostBalanceServiceOptions) {
    this.o = opts;
    this.settings = { ...defaultHostBalanceSettings, ...opts.settings };
    this.balancer = new HostBalancer(opts.selfId, this.settings);
    this.log = opts.log.child({ component: 'host-balance' });
  }

  private now(): number {
    return this.o.env.clock.nowMs();
  }

  start(): void {
    if (this.timer) return;
    const check = (): void => void this.check().catch((err: Error) => this.log.warn({ reason: err.message }, 'overload check failed'));
    this.timer = this.o.env.timers.setInterval(check, this.o.checkMs ?? 2_000).unref();
  }

  stop(): void {
    this.o.env.timers.clearInterval(this.timer);
    this.timer = undefined;
  }

  private view(): PeerLoad[] {
    const now = this.now();
    return this.balancer.adjusted(this.o.view.peers(now), now);
  }

  /** The portal's redirectFor hook: "host:port,tpgt" to send the login there, or undefined. */
  redirectFor(initiatorName: string, targetName: string, isid: string): string | undefined {
    const view = this.view();
    const otherPaths = this.otherPathsNow()(initiatorName, targetName);
    const login = { initiatorName, isid, targetName, sessionType: 'Normal' as const, pinned: this.o.pinned(initiatorName, isid, targetName), multipath: otherPaths.length > 0, otherPaths };
    const decision = this.balancer.onLogin(view, login, this.now(), this.o.shares?.(targetName));
    if (decision.kind === 'accept') {
      const level = decision.reason === 'best' ? 'debug' : 'info';
      this.log[level]({ initiator: initiatorName, isid, reason: decision.reason, view: view.map((p) => `${p.peerId}:${p.up ? p.sessions : 'down'}`).join(' ') }, 'login accepted');
      if (decision.reason === 'planned-here') {
        // The moved host arrived: the plan is done everywhere (a zero-life plan cancels it).
        void this.o.broadcastPlan({ initiatorName, targetName, to: this.o.selfId, untilMs: this.now() });
      }
      return undefined;
    }
    if (decision.reason === 'planned') this.counters.plannedRedirects++;
    else this.counters.redirects++;
    this.log.info({ initiator: initiatorName, isid, target: targetName, to: decision.to.peerId, reason: decision.reason }, 'login redirected');
    this.o.event?.(`login of ${initiatorName} to ${targetName} redirected to ${decision.to.peerId} (${decision.reason})`, targetName);
    return `${decision.to.iscsiAddress},${decision.to.portalGroupTag}`;
  }

  /** Who else a host reaches a target through, by the sessions the peers report now (read once per decision). */
  private otherPathsNow(): (initiatorName: string, targetName: string) => string[] {
    const reported = this.o.reportedSessions?.() ?? [];
    return (initiatorName, targetName) => otherPaths(reported, this.o.selfId, initiatorName, targetName);
  }

  /** The portal's sessionStarted hook. */
  sessionStarted(info: SessionInfo): void {
    this.balancer.sessionStarted(sessionPortKey(info.initiatorName, info.isid, info.targetName));
    this.startedAtMs.set(info.tsih, this.now());
    // Forget start times of sessions that are gone (bounded by the session limit).
    if (this.startedAtMs.size > 64) {
      const live = new Set(this.o.portal().sessions().map((s) => s.tsih));
      for (const tsih of this.startedAtMs.keys()) if (!live.has(tsih)) this.startedAtMs.delete(tsih);
    }
  }

  /** A plan from another peer (or this one): send that host to `to` at its next login here. */
  plan(p: MovePlan): void {
    if (p.untilMs <= this.now()) this.balancer.cancelPlan(p.initiatorName, p.targetName);
    else this.balancer.plan(p);
  }

  /**
   * Ask sessions on this peer to move: `selector` is a TSIH (decimal or 0x hex) or an
   * initiator name (every session of it); `to` a peer id, or empty for the best other peer.
   */
  async move(selector: string, to: string): Promise<MovedSession[]> {
    const sessions = this.select(selector);
    if (sessions.length === 0) return [];
    const view = this.view();
    const dest = to ? view.find((p) => p.peerId === to) : this.bestOther(view);
    if (!dest) throw new InvalidArgumentError(to ? `no peer ${to} in this group` : 'no other peer is up to move to');
    if (dest.peerId === this.o.selfId) throw new InvalidArgumentError(`the session is already on ${to}`);
    if (!dest.up) throw new InvalidArgumentError(`peer ${dest.peerId} is not up (as seen from ${this.o.selfId})`);
    const pathsOf = this.otherPathsNow();
    for (const s of sessions) {
      const paths = pathsOf(s.initiatorName, s.targetName);
      if (paths.length > 0) throw new InvalidArgumentError(`${s.initiatorName} is a multipath host of ${s.targetName} (sessions through ${paths.join(', ')} too): ALUA steers it, its sessions are not moved`);
    }
    const moved: MovedSession[] = [];
    for (const s of sessions) {
      await this.ask(s, dest.peerId);
      moved.push({ tsih: s.tsih, initiatorName: s.initiatorName, targetName: s.targetName, from: this.o.selfId, to: dest.peerId });
    }
    return moved;
  }

  private select(selector: string): SessionInfo[] {
    const normal = this.o.portal().sessions().filter((s) => s.sessionType === 'Normal');
    const tsih = /^(0x[0-9a-f]+|[0-9]+)$/i.test(selector) ? Number(selector) : undefined;
    return normal.filter((s) => (tsih !== undefined ? s.tsih === tsih : s.initiatorName === selector));
  }

  private bestOther(view: PeerLoad[]): PeerLoad | undefined {
    const others = view.filter((p) => p.peerId !== this.o.selfId && p.up);
    if (others.length === 0) return undefined;
    // The placement among the others alone: pretend self is absent by ranking the rest.
    const first = others[0];
    return place(others, first.peerId, this.settings)?.best;
  }

  /** Plan everywhere first, then AsyncEvent 1 (see the top of the file for why this order). */
  private async ask(s: SessionInfo, to: string): Promise<void> {
    const plan: MovePlan = { initiatorName: s.initiatorName, targetName: s.targetName, to, untilMs: this.now() + this.settings.planMs };
    this.balancer.plan(plan);
    await this.o.broadcastPlan(plan);
    this.balancer.noteAsked(s.tsih, this.now());
    if (!this.o.portal().requestLogoutOf(s.tsih, this.settings.logoutSeconds)) {
      throw new NotFoundError(`session ${s.tsih} ended before it could be asked to move`);
    }
    this.counters.logoutRequests++;
    this.log.info({ tsih: s.tsih, initiator: s.initiatorName, target: s.targetName, to, seconds: this.settings.logoutSeconds }, 'asked a session to log out (AsyncEvent 1) to move it');
    this.o.event?.(`asked ${s.initiatorName} (session ${s.tsih}) to log out and move to ${to}`, s.targetName);
  }

  /** The periodic overload check: at most one automatic move in flight. */
  async check(): Promise<MovedSession | undefined> {
    if (this.moving) return undefined;
    const now = this.now();
    const sessions = this.o.portal().sessions().filter((s) => s.sessionType === 'Normal');
    const pathsOf = this.otherPathsNow();
    const movable = sessions.map((s) => ({
      tsih: s.tsih, initiatorName: s.initiatorName, isid: s.isid, targetName: s.targetName,
      // A session that started before this service saw it counts as old.
      startedAtMs: this.startedAtMs.get(s.tsih) ?? 0,
      pinned: this.o.pinned(s.initiatorName, s.isid, s.targetName),
      multipath: pathsOf(s.initiatorName, s.targetName).length > 0,
    }));
    const pick = this.balancer.pickMove(this.view(), movable, now);
    if (!pick) return undefined;
    this.moving = true;
    try {
      const info = sessions.find((s) => s.tsih === pick.session.tsih)!;
      await this.ask(info, pick.to.peerId);
      return { tsih: info.tsih, initiatorName: info.initiatorName, targetName: info.targetName, from: this.o.selfId, to: pick.to.peerId };
    } finally {
      this.moving = false;
    }
  }
}
