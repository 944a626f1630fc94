// Leases between peers (DESIGN.md 10, invariants 4 and 5). Every peer renews with every other
// peer each leasePingMs (message `lease`); the answering peer, the grantor, records when it last
// granted, and the asking peer holds a lease from it until (its time of sending) + leaseMs. A
// primary serves a read only while it holds a lease from every other in-sync copy of the page;
// a copy takes over from a primary only once it has granted that primary nothing for leaseMs +
// leaseDriftMarginMs (limits.ts states the clock assumption). So the old primary's lease from
// the new one ran out before the new one serves.
//
// A lease is per pair of peers, not per page: after a copy took a page over, the old primary
// must not read that page on the strength of a renewal granted later. Two rules see to it:
// - A copy takes over only from a peer it has granted nothing for leaseMs + margin, so that
//   peer's lease from it LAPSED first; and a renewal answered after a lapse counts only once
//   the asker re-read every route record from the catalog (after the answer came, so after any
//   takeover's CAS: the grantor grants nothing while one is in flight). This holds whatever the
//   grantor remembers (it may have restarted since).
// - Faster, and without the catalog: a grantor that took pages over from a peer (takeovers)
//   tells it in every answer, with the new routes, until the peer acknowledges; the peer learns
//   them BEFORE it counts the renewal. Order at the grantor: fence() before the takeover's CAS,
//   no grant to that peer while a CAS is in flight (its outcome is unknown), fenced() after.
//
// LeaseBook is the pure state (fed events and the monotonic time); Leases drives it: the pings
// on the Env's timers, the message handler, and the timers that tell failover of a silence.

import type { Logger } from 'pino';
import type { Env, TimerHandle } from '../env/env';
import { InvalidArgumentError } from '../errors';
import { leaseCallMsMax, leaseDriftMarginMs, leaseMs, leasePingMs, leaseTakeoversPerAnswerMax, silenceRefireMsMax } from '../limits';
import type { Route } from '../routing/table';
import { checkLease, checkLeaseAnswer, type LeaseAnswer, type Takeover } from './messages';

export interface LeaseTiming {
  leaseMs: number;
  marginMs: number;
}

interface Pinged {
  /** Monotonic time the renewal in flight was sent, if one is. */
  inFlightSinceMs?: number;
  /** The lease this peer granted us runs until then (our clock). */
  validUntilMs: number;
  /** Last answer from the peer (alive as far as we can tell). */
  heardMs: number;
  /** Highest takeover seq learned from the peer (sent back as `ack`). */
  ack: number;
}

interface Granted {
  /** Last time we granted the peer a lease (our clock). */
  lastGrantMs: number;
  /** Last renewal from the peer, granted or not (it is alive and reaches us). */
  lastRenewalMs: number;
  /** Takeovers from the peer it has not acknowledged, by `volumeId/page`. */
  takeovers: Map<string, Takeover>;
  /** Takeovers whose CAS is in flight: no grant to the peer meanwhile. */
  pending: Set<string>;
}

/** The lease state of one peer towards every other: pure, fed the monotonic time. */
export class LeaseBook {
  private readonly pinged = new Map<string, Pinged>();
  private readonly granted = new Map<string, Granted>();
  private seq = 0;

  /** `startMs`: a peer that just started counts as having granted everyone a lease then (it may have, before it stopped). */
  constructor(
    peers: readonly string[],
    startMs: number,
    readonly timing: LeaseTiming = { leaseMs, marginMs: leaseDriftMarginMs },
  ) {
    for (const p of peers) this.add(p, startMs);
  }

  // ---- asking side ---------------------------------------------------------------------------

  /** A renewal to `to` may go now (none in flight); it is recorded as sent at `nowMs`. Returns the ack to send, or undefined. */
  send(to: string, nowMs: number): number | undefined {
    const p = this.pingedBy(to);
    if (p.inFlightSinceMs !== undefined) return undefined;
    p.inFlightSinceMs = nowMs;
    return p.ack;
  }

  /**
   * The answer to the renewal sent at `sentAtMs` arrived, and its takeovers were learned (the
   * caller learns them first): the lease runs until sentAtMs + leaseMs if granted.
   */
  answered(from: string, sentAtMs: number, answer: LeaseAnswer, nowMs: number): void {
    const p = this.pingedBy(from);
    if (p.inFlightSinceMs === sentAtMs) p.inFlightSinceMs = undefined;
    p.heardMs = nowMs;
    for (const t of answer.takeovers) p.ack = Math.max(p.ack, t.seq);
    if (answer.granted) p.validUntilMs = Math.max(p.validUntilMs, sentAtMs + this.timing.leaseMs);
  }

  /** The renewal sent at `sentAtMs` failed (no answer, or its takeovers could not be learned). */
  failed(to: string, sentAtMs: number): void {
    const p = this.pingedBy(to);
    if (p.inFlightSinceMs === sentAtMs) p.inFlightSinceMs = undefined;
  }

  /** We hold a lease from `peer` now. */
  valid(peer: string, nowMs: number): boolean {
    return this.pingedBy(peer).validUntilMs > nowMs;
  }

  /** `peer` answered a renewal recently (we take it for alive). */
  alive(peer: string, nowMs: number): boolean {
    return nowMs - this.pingedBy(peer).heardMs <= this.timing.leaseMs;
  }

  // ---- granting side -------------------------------------------------------------------------

  /**
   * A renewal from `from` that has learned takeovers up to `ack`: granted (recorded at nowMs)
   * unless a takeover from it is in flight or more are unlearned than one answer carries.
   */
  grant(from: string, ack: number, nowMs: number): LeaseAnswer {
    const g = this.grantedTo(from);
    for (const [key, t] of g.takeovers) if (t.seq <= ack) g.takeovers.delete(key);
    const takeovers = [...g.takeovers.values()].slice(0, leaseTakeoversPerAnswerMax);
    const granted = g.pending.size === 0 && takeovers.length === g.takeovers.size;
    if (granted) g.lastGrantMs = nowMs;
    g.lastRenewalMs = nowMs;
    return { granted, takeovers };
  }

  /** We granted `peer` nothing for leaseMs + margin: its leases from us have run out. */
  silent(peer: string, nowMs: number): boolean {
    return nowMs > this.silentAtMs(peer);
  }

  /** When `peer` becomes silent unless it renews before. */
  silentAtMs(peer: string): number {
    return this.grantedTo(peer).lastGrantMs + this.timing.leaseMs + this.timing.marginMs;
  }

  /**
   * Nothing came from `peer` for leaseMs + margin: no renewal (granted or not), no answer to
   * ours. Not a lease rule (silent() is): a router waiting for it as a page's primary stops
   * waiting then, as the takeover is due about then anyway. A peer that still renews while we
   * refuse it (takeovers it has not learned) is not unheard.
   */
  unheard(peer: string, nowMs: number): boolean {
    return nowMs > this.unheardAtMs(peer);
  }

  /** When `peer` becomes unheard unless something comes from it before. */
  unheardAtMs(peer: string): number {
    return Math.max(this.grantedTo(peer).lastRenewalMs, this.pingedBy(peer).heardMs) + this.timing.leaseMs + this.timing.marginMs;
  }

  /** Before a takeover's CAS of the page from `peer`: no grant to it until fenced(). */
  fence(peer: string, volumeId: string, page: number): void {
    this.grantedTo(peer).pending.add(`${volumeId}/${page}`);
  }

  /** The CAS is over: `peer` learns `route` (undefined: outcome unknown, it reads the catalog) before its next grant. */
  fenced(peer: string, volumeId: string, page: number, route: Route | undefined): void {
    const g = this.grantedTo(peer);
    const key = `${volumeId}/${page}`;
    g.pending.delete(key);
    g.takeovers.delete(key);
    g.takeovers.set(key, { seq: ++this.seq, volumeId, page, ...(route ? { route } : {}) });
  }

  /** A peer that joined the group: it counts as having granted everyone a lease now (as at a start). */
  add(peer: string, nowMs: number): void {
    if (this.pinged.has(peer)) return;
    this.pinged.set(peer, { validUntilMs: 0, heardMs: -Infinity, ack: 0 });
    this.granted.set(peer, { lastGrantMs: nowMs, lastRenewalMs: nowMs, takeovers: new Map(), pending: new Set() });
  }

  private pingedBy(peer: string): Pinged {
    const p = this.pinged.get(peer);
    if (!p) throw new Error(`assertion failed: ${peer} is not a peer of the group`);
    return p;
  }

  private grantedTo(peer: string): Granted {
    const g = this.granted.get(peer);
    if (!g) throw new Error(`assertion failed: ${peer} is not a peer of the group`);
    return g;
  }
}

export interface LeasesOptions {
  self: string;
  /** Every peer of the group now, this one included (members join while it runs). */
  groupPeers(): readonly string[];
  env: Env;
  log: Logger;
  /** Send a replication message (kind `lease`), bounded by timeoutMs; its answer's body. */
  call(peer: string, kind: string, body: Record<string, unknown>, timeoutMs: number): Promise<Record<string, unknown>>;
  /** Learn a page's route taken over by another peer (no route: read it from the catalog); rejects if it could not. */
  learn(takeover: Takeover): Promise<void>;
  /** Re-read every route record from the catalog (Catalog.fetchRoutes); rejects if it could not. */
  refreshRoutes(): Promise<void>;
}

/** The driver: renewals on the Env's timers, the `lease` handler, silence timers. */
export class Leases {
  readonly book: LeaseBook;
  /** The other peers, as far as this peer has taken them in (sync: members that joined since). */
  private readonly others: string[] = [];
  private ticker: TimerHandle | undefined;
  private readonly silenceTimers = new Map<string, TimerHandle>();
  /** Silence timers fired in a row per peer: each waits twice as long as the one before (a long absence costs few scans). */
  private readonly silentFires = new Map<string, number>();
  private readonly silenceListeners = new Set<(peer: string) => void>();
  private readonly unheardTimers = new Map<string, TimerHandle>();
  private readonly unheardListeners = new Set<(peer: string) => void>();
  private readonly renewalWaiters = new Map<string, Set<() => void>>();
  /** The route refresh in flight, and the one queued to start after it (see refreshedAfterNow). */
  private refreshing: Promise<void> | undefined;
  private refreshNext: Promise<void> | undefined;
  private closed = false;

  constructor(private readonly o: LeasesOptions) {
    this.book = new LeaseBook([], o.env.clock.monotonicMs());
    this.sync();
  }

  /** Take in the members that joined: leases with them, and their silence watched once started. */
  private sync(): void {
    for (const p of this.o.groupPeers()) {
      if (p === this.o.self || this.others.includes(p)) continue;
      this.others.push(p);
      this.book.add(p, this.now());
      if (this.ticker) {
        this.armSilence(p);
        this.armUnheard(p);
      }
    }
  }

  /** Start renewing, and watching for silent peers. */
  start(): void {
    this.ticker = this.o.env.timers.setInterval(() => this.renewAll(), leasePingMs).unref();
    for (const p of this.others) {
      this.armSilence(p);
      this.armUnheard(p);
    }
    this.renewAll();
  }

  close(): void {
    this.closed = true;
    this.o.env.timers.clearInterval(this.ticker);
    for (const t of [...this.silenceTimers.values(), ...this.unheardTimers.values()]) this.o.env.timers.clearTimeout(t);
    for (const waiters of this.renewalWaiters.values()) for (const w of waiters) w();
  }

  now(): number {
    return this.o.env.clock.monotonicMs();
  }

  /** The other members of the group now (not removed). */
  otherPeers(): string[] {
    this.sync();
    const members = this.o.groupPeers();
    return this.others.filter((p) => members.includes(p));
  }

  valid(peer: string): boolean {
    return this.book.valid(peer, this.now());
  }

  alive(peer: string): boolean {
    return this.book.alive(peer, this.now());
  }

  /** Nothing came from `peer` (another peer of the group) for leaseMs + margin (LeaseBook.unheard): routers stop waiting for it as a primary. */
  unheard(peer: string): boolean {
    return this.others.includes(peer) && this.book.unheard(peer, this.now());
  }

  /** `listener(peer)` once `peer` is unheard (again after each time something came from it). */
  onUnheard(listener: (peer: string) => void): () => void {
    this.unheardListeners.add(listener);
    return () => this.unheardListeners.delete(listener);
  }

  /**
   * `listener(peer)` when we have granted `peer` nothing for leaseMs + margin, and again while it
   * stays so (after leasePingMs, then twice as long each time, up to silenceRefireMsMax).
   */
  onSilent(listener: (peer: string) => void): () => void {
    this.silenceListeners.add(listener);
    return () => this.silenceListeners.delete(listener);
  }

  /** Resolves true once we hold a lease from `peer`, false if none came within `ms`. */
  awaitLease(peer: string, ms: number): Promise<boolean> {
    if (this.valid(peer)) return Promise.resolve(true);
    return new Promise((resolve) => {
      let waiters = this.renewalWaiters.get(peer);
      if (!waiters) this.renewalWaiters.set(peer, (waiters = new Set()));
      const done = (): void => {
        waiters.delete(done);
        this.o.env.timers.clearTimeout(timer);
        resolve(this.valid(peer));
      };
      const timer = this.o.env.timers.setTimeout(done, ms);
      waiters.add(done);
    });
  }

  /** The `lease` message from `from`. */
  handle(from: string, body: Record<string, unknown>): LeaseAnswer {
    if (!this.others.includes(from)) this.sync();
    if (!this.others.includes(from)) throw new InvalidArgumentError(`lease: ${from} is not another peer of the group`);
    const answer = this.book.grant(from, checkLease(body).ack, this.now());
    this.armUnheard(from);
    if (answer.granted) {
      this.silentFires.delete(from);
      this.armSilence(from);
    }
    return answer;
  }

  private renewAll(): void {
    if (this.closed) return;
    this.sync();
    // Members removed since are left out (their book entries stay: nothing more comes from them).
    const members = this.o.groupPeers();
    for (const p of this.others) if (members.includes(p)) void this.renew(p);
  }

  private async renew(peer: string): Promise<void> {
    const sentAtMs = this.now();
    const ack = this.book.send(peer, sentAtMs);
    if (ack === undefined) return;
    try {
      const answer = checkLeaseAnswer(await this.o.call(peer, 'lease', { ack }, leaseCallMsMax));
      // The routes first: once the lease counts, this peer must know the pages it lost.
      const lapsed = !this.book.valid(peer, this.now());
      await Promise.all(answer.takeovers.map((t) => this.o.learn(t)));
      if (lapsed && answer.granted) await this.refreshedAfterNow();
      this.book.answered(peer, sentAtMs, answer, this.now());
      this.armUnheard(peer);
    } catch {
      this.book.failed(peer, sentAtMs);
      return;
    }
    for (const w of [...(this.renewalWaiters.get(peer) ?? [])]) w();
  }

  /**
   * A route refresh that starts now or later (one already in flight may have read the catalog
   * before the answer that asks for it): renewals that lapse together share one.
   */
  private refreshedAfterNow(): Promise<void> {
    if (!this.refreshing) {
      const p = this.o.refreshRoutes().finally(() => {
        if (this.refreshing === p) this.refreshing = undefined;
      });
      this.refreshing = p;
      return p;
    }
    this.refreshNext ??= this.refreshing.catch(() => undefined).then(() => {
      this.refreshNext = undefined;
      return this.refreshedAfterNow();
    });
    return this.refreshNext;
  }

  /** (Re)arm the timer that fires when `peer` falls silent. */
  private armSilence(peer: string): void {
    if (this.closed) return;
    this.o.env.timers.clearTimeout(this.silenceTimers.get(peer));
    const refireMs = Math.min(silenceRefireMsMax, leasePingMs * 2 ** (this.silentFires.get(peer) ?? 0));
    const ms = Math.max(refireMs, this.book.silentAtMs(peer) - this.now() + 1);
    this.silenceTimers.set(peer, this.o.env.timers.setTimeout(() => this.silenceDue(peer), ms).unref());
  }

  /** (Re)arm the timer that fires when `peer` becomes unheard: once, until something comes from it again. */
  private armUnheard(peer: string): void {
    if (this.closed) return;
    this.o.env.timers.clearTimeout(this.unheardTimers.get(peer));
    const due = (): void => {
      if (this.closed) return;
      // Node's timers run on the loop's cached clock, which lags the monotonic one after a long
      // task: a timer may fire a little early by it. Not unheard yet: armed again for the rest.
      if (!this.book.unheard(peer, this.now())) return this.armUnheard(peer);
      for (const l of [...this.unheardListeners]) l(peer);
    };
    this.unheardTimers.set(peer, this.o.env.timers.setTimeout(due, this.book.unheardAtMs(peer) - this.now() + 1).unref());
  }

  private silenceDue(peer: string): void {
    if (this.closed) return;
    if (this.book.silent(peer, this.now())) {
      this.silentFires.set(peer, (this.silentFires.get(peer) ?? 0) + 1);
      for (const l of this.silenceListeners) l(peer);
      this.o.log.debug({ peer }, 'peer silent past its lease');
    }
    this.armSilence(peer);
  }
}
