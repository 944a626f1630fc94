// The router (DESIGN.md 2): a BlockBackend for one volume on one peer. A request is cut into
// runs of consecutive pages with the same owner; runs this peer owns go straight to the
// local store (no RPC), the others are forwarded to their owner, all runs in parallel. An
// owner that no longer owns a page answers MOVED {owner, version}: the router learns the
// newer route and re-runs just that part, in one loop bounded by routeRetriesMax (each());
// hosts never see it, unless the route stays in flux past the bound (BUSY). The router only
// picks owners from its table: ownership is checked by the owner's store (src/server/data-path.ts).
//
// A replicated page whose primary cannot be reached (DESIGN.md 10): the router asks its other
// in-sync copies in order to take over (message `promote`, src/replication/failover.ts) and
// waits for a newer route of the page (an answer, or the catalog watch through table.onLearn)
// at most failoverWaitMsMax, then runs the part again in the same loop, under the same bound:
// the host's command waits through a failover instead of failing. If no copy can be reached
// either, this peer is the one cut off, and the error goes up at once. A primary that is silent
// rather than dead (a cut cable, a hung process: no connection reset) is not waited for until
// peerRequestMsMax: once nothing came from it for leaseMs + margin (no lease renewal, no answer:
// `silence`), a forward to it of a page with another in-sync copy is given up (or not sent at
// all), and the takeover asked for then. The copies that can take over wait out about the same
// silence (failover.ts): asking sooner would gain nothing.
//
// COMPARE AND WRITE is atomic when its blocks have one owner (the owner's store runs it
// under its lock). One that straddles a page boundary between two owners is carried out as
// compare-then-write and is not atomic against a concurrent writer of the same blocks.

import { ErrorKind, PeersanError, PeerUnavailableError, RemoteFailureError } from '../errors';
import { sleep, type Env } from '../env/env';
import { failoverWaitMsMax, flushTakeoverRecheckMs, routeRetriesMax, volumeOpenWaitMsMax } from '../limits';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';
import { BlockOp, decodeExtents, replyError, ReplyStatus, type BlockOpCode, type BlockReply, type BlockRequest } from './frame';
import { PageMovedError } from './moved';
import type { ReadBuffers } from './read-buffers';
import { copiesOf, inSyncOf, type Route, type RouteTable } from './table';

export interface RoutingCounters {
  localRuns: number;
  forwardedRuns: number;
  movedRetries: number;
}

export function newRoutingCounters(): RoutingCounters {
  return { localRuns: 0, forwardedRuns: 0, movedRetries: 0 };
}

/** What the router needs of the link to another peer. */
export interface BlockSender {
  send(req: Omit<BlockRequest, 'id'>): Promise<BlockReply>;
}

/**
 * Which peers are silent: nothing came from them (no lease renewal, no answer to ours) for
 * leaseMs + margin (src/replication/leases.ts, which implements it).
 */
export interface PeerSilence {
  unheard(peer: string): boolean;
  /** `listener(peer)` when `peer` becomes unheard; returns the unsubscribe. */
  onUnheard(listener: (peer: string) => void): () => void;
}

/**
 * `send()`, given up as soon as `peer` becomes unheard, and not run at all for a peer unheard
 * already (PeerUnavailableError, `unsent` then): waiting for a silent primary's answer until the
 * link's deadline only delays the takeover its silence calls for.
 */
function unlessSilent<T>(silence: PeerSilence, peer: string, send: () => Promise<T>): Promise<T> {
  if (silence.unheard(peer)) return Promise.reject(new PeerUnavailableError(peer, 'silent past its lease: not sent', false, { unsent: true }));
  return new Promise((resolve, reject) => {
    const off = silence.onUnheard((p) => {
      if (p !== peer) return;
      off();
      // The link keeps the request until its own deadline: an answer after this one goes nowhere.
      reject(new PeerUnavailableError(peer, 'fell silent past its lease: given up', true));
    });
    send().then(
      (value) => (off(), resolve(value)),
      (err: unknown) => (off(), reject(err)),
    );
  });
}

export interface VolumeRouterOptions {
  self: string;
  volumeId: string;
  table: RouteTable;
  /** This peer's store volume (its pages of the volume). */
  local: BlockBackend;
  link(peerId: string): BlockSender;
  /** Read the page's route from the catalog (used when an answer contradicts our table). */
  refresh(page: number): Promise<Route>;
  counters: RoutingCounters;
  /** Clock and timers of the wait for a peer that does not know the volume yet, and for a new primary. */
  env: Env;
  /**
   * Ask `peer` (an in-sync copy) to take the page over from its unreachable primary
   * (src/replication/failover.ts); resolves to the route it answers. Absent: no failover.
   */
  promote?(peer: string, page: number, route: Route): Promise<Route>;
  /**
   * How many pages of the volume `peer` (an in-sync copy) holds whose primary is still `primary`
   * (src/replication/failover.ts ledBy): a flush `primary` did not answer waits for none. Absent:
   * it waits until the table names no such primary.
   */
  ledBy?(peer: string, primary: string): Promise<number>;
  /** Silent peers: a forward to one, of a page another in-sync copy can take over, is given up. Absent: waited for until the link's deadline. */
  silence?: PeerSilence;
  /** The traffic matrix (src/loadmon/monitor.ts): each run of a host request as first routed, local or forwarded. Absent: not metered. */
  arrived?(lba: number, blocks: number, local: boolean, bytes: number): void;
  /** The peer's reused receive buffers: a read forwarded to one owner hands its reply's buffer to its caller alone (read-buffers.ts). Absent: none reused. */
  readBuffers?: ReadBuffers;
}

interface Run {
  lba: number;
  blocks: number;
  offsetBlocks: number;
  owner: string;
  /** The highest route version among the run's pages (what the owner checks against). */
  version: number;
}

/** Local extents lists are merged across runs; GET LBA STATUS need not cover the whole range. */
const lbaStatusPagesMax = 64;

export class VolumeRouter implements BlockBackend {
  private readonly o: VolumeRouterOptions;

  constructor(opts: VolumeRouterOptions) {
    this.o = opts;
  }

  get blockBytes(): number {
    return this.o.local.blockBytes;
  }
  get blockCount(): number {
    return this.o.local.blockCount;
  }
  get grainBlocks(): number {
    return this.o.local.grainBlocks;
  }

  async read(lba: number, blocks: number): Promise<Buffer> {
    let runs = this.runsOf(lba, blocks, 0);
    this.arrive(runs, this.blockBytes);
    let tries = 0;
    if (runs.length === 1) {
      // One owner (the common case): its first try without the loop's closures.
      const run = runs[0];
      try {
        if (run.owner === this.o.self) {
          this.o.counters.localRuns++;
          return await this.o.local.read(lba, blocks);
        }
        const reply = await this.forwardOnce(run, BlockOp.read, false);
        if (this.answered(run, reply)) {
          // The reply's data goes to this read's caller and nowhere else: a host read may give its buffer back once sent.
          const data = this.readData(run, this.payload(reply));
          this.o.readBuffers?.handOver(data);
          return data;
        }
      } catch (err) {
        tries = await this.followMoved(err, tries, run);
        runs = this.runsOf(lba, blocks, 0);
      }
    }
    let whole: Buffer | undefined;
    await this.each(
      runs,
      async (run) => {
        const data = this.readData(run, run.owner === this.o.self ? await this.o.local.read(run.lba, run.blocks) : this.payload(await this.forward(run, BlockOp.read, false)));
        if (run.blocks === blocks) whole = data;
        else data.copy((whole ??= Buffer.allocUnsafe(blocks * this.blockBytes)), run.offsetBlocks * this.blockBytes);
      },
      tries,
    );
    return whole!;
  }

  private readData(run: Run, data: Buffer): Buffer {
    if (data.length !== run.blocks * this.blockBytes) throw new PeersanError(`peer ${run.owner} returned ${data.length} bytes for ${run.blocks} blocks`);
    return data;
  }

  async write(lba: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    const bs = this.blockBytes;
    let runs = this.runsOf(lba, data.length / bs, 0);
    this.arrive(runs, bs);
    let tries = 0;
    if (runs.length === 1) {
      // One owner (the common case): its first try without the loop's closures.
      const run = runs[0];
      try {
        if (run.owner === this.o.self) {
          this.o.counters.localRuns++;
          return await this.o.local.write(lba, data, opts);
        }
        if (this.answered(run, await this.forwardOnce(run, BlockOp.write, opts.fua === true, data, opts.stamp))) return;
      } catch (err) {
        tries = await this.followMoved(err, tries, run);
        runs = this.runsOf(lba, data.length / bs, 0);
      }
    }
    await this.each(
      runs,
      async (run) => {
        const part = data.subarray((run.lba - lba) * bs, (run.lba - lba + run.blocks) * bs);
        if (run.owner === this.o.self) return this.o.local.write(run.lba, part, opts);
        this.expectOk(await this.forward(run, BlockOp.write, opts.fua === true, part, opts.stamp));
      },
      tries,
    );
  }

  async unmap(lba: number, blocks: number, opts: WriteOptions = {}): Promise<void> {
    const runs = this.runsOf(lba, blocks, 0);
    this.arrive(runs, 0);
    await this.each(runs, async (run) => {
      if (run.owner === this.o.self) return this.o.local.unmap(run.lba, run.blocks, opts);
      this.expectOk(await this.forward(run, BlockOp.unmap, opts.fua === true, undefined, opts.stamp));
    });
  }

  async compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions = {}): Promise<CompareAndWriteResult> {
    const blocks = data.length / this.blockBytes;
    const runs = this.runsOf(lba, blocks, 0);
    this.arrive(runs, 2 * this.blockBytes);
    let result: CompareAndWriteResult | undefined;
    if (runs.length === 1) {
      // No failover retry once sent: a COMPARE AND WRITE the unreachable owner may have applied
      // (and replicated) must not run again at a new primary, which would answer MISCOMPARE for
      // the first attempt's own data. The host hears the error (the outcome is unknown) instead.
      // One that never reached the owner (refused) waits for the new primary as any command.
      await this.each(runs, async (run) => {
        // A route learned from MOVED cut the blocks in two: every part ends here, the fallback below runs.
        if (run.blocks !== blocks) return;
        if (run.owner === this.o.self) {
          result = await this.o.local.compareAndWrite(lba, compare, data, opts);
          return;
        }
        const reply = await this.forward(run, BlockOp.compareAndWrite, opts.fua === true, Buffer.concat([compare, data]), opts.stamp, compare.length);
        if (reply.status === ReplyStatus.miscompare) {
          result = { ok: false, miscompareOffsetBytes: reply.detail };
          return;
        }
        this.expectOk(reply);
        result = { ok: true };
      }, 0, true);
    }
    return result ?? this.compareThenWrite(lba, compare, data, opts);
  }

  /** The non-atomic fallback for a COMPARE AND WRITE whose blocks have two owners. */
  private async compareThenWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions): Promise<CompareAndWriteResult> {
    const current = await this.read(lba, data.length / this.blockBytes);
    if (!current.equals(compare)) {
      let i = 0;
      while (current[i] === compare[i]) i++;
      return { ok: false, miscompareOffsetBytes: i };
    }
    await this.write(lba, data, opts);
    return { ok: true };
  }

  /**
   * Make everything acknowledged so far durable on every peer that may hold pages of the volume:
   * every copy of every page. A secondary out of reach is no failure when every page it may hold
   * in sync has another in-sync copy that flushed: an acknowledged change is on every in-sync
   * copy, so it is durable there; the one out of reach loses its copy's in-sync place (or, if it
   * crashed, steps out of the pages its activity log names) before it can serve them again. And
   * a peer syncs its store before it becomes a page's primary: by a takeover (failover.ts
   * takeOver), a role switch (migrator.ts switchRole) or a move's commit (its destination
   * flushes as it confirms). A flush never skips a primary, so a primary holds every flushed
   * write durably whichever copies leave the in-sync set later (simulator seed 128201: a
   * secondary the flush skipped took the page over, was left its only copy, and lost power).
   *
   * A primary out of reach is waited for like a write's: the flush answers once each page with
   * data it was primary of has a new one (failoverWaitMsMax at most; primariesReplaced). Else a
   * crashed primary's copy, which lost what the others made durable, could come back as the
   * page's only in-sync copy: when its secondary crashed too before taking over, the secondary
   * steps out at its restart (a suspect copy that is not the primary leaves the in-sync set) and
   * the primary keeps the page (simulator seed 3858: a flushed COMPARE AND WRITE read back as
   * zeros).
   */
  async flush(): Promise<void> {
    const routes = this.routeClasses();
    const peers = new Set<string>(this.o.table.peers);
    for (const r of routes) for (const p of copiesOf(r)) peers.add(p);
    const unreachable = new Map<string, PeerUnavailableError>();
    // A peer whose every in-sync page has another in-sync copy is not waited for past its lease
    // (sendTo's give-up): a dead one would cost each flush the link's connect or request deadline.
    const alone = new Set<string>();
    for (const r of routes) if (inSyncOf(r).length === 1) alone.add(inSyncOf(r)[0]);
    await Promise.all(
      [...peers].map(async (peer) => {
        if (peer === this.o.self) return this.o.local.flush();
        try {
          this.expectOk(await this.send(peer, { op: BlockOp.flush, fua: true, volumeId: this.o.volumeId, lba: 0, blocks: 0, routeVersion: 0, compareBytes: 0 }, !alone.has(peer)));
        } catch (err) {
          if (!(err instanceof PeerUnavailableError)) throw err;
          unreachable.set(peer, err);
        }
      }),
    );
    if (unreachable.size === 0) return;
    await this.primariesReplaced(new Set([...peers].filter((p) => !unreachable.has(p))), unreachable);
  }

  /** The distinct routes (the placement classes and the changed pages): as many as peers plus changed pages, whatever the volume's size. */
  private routeClasses(): Route[] {
    return this.o.table.classes(this.o.table.pageCount(this.blockCount)).map((c) => c.route);
  }

  /**
   * Wait until no page holding data has a primary that did not flush while another of its
   * in-sync copies did (`flushed`): the takeovers the primary's silence brings
   * (src/replication/failover.ts silentPeer takes over the pages a copy holds; a page no copy
   * holds has no acknowledged write, and is taken over only when a host asks for it). Asked of
   * one copy that flushed per route (ledBy), or without ledBy read from the table, every
   * flushTakeoverRecheckMs. At most failoverWaitMsMax, then the primary's error. Fails at once
   * when a page has no in-sync copy that flushed (at first, or as its route changed meanwhile).
   */
  private async primariesReplaced(flushed: ReadonlySet<string>, unreachable: ReadonlyMap<string, PeerUnavailableError>): Promise<void> {
    const { clock, timers } = this.o.env;
    const deadlineMs = clock.monotonicMs() + failoverWaitMsMax;
    const failure = (peer: string): PeerUnavailableError => unreachable.get(peer) ?? new PeerUnavailableError(peer, 'did not flush', false);
    for (;;) {
      // Per route, its first in-sync copy that flushed (every in-sync copy holds the same pages); each pair asked once.
      const asks = new Map<string, [primary: string, peer: string]>();
      for (const r of this.routeClasses()) {
        const inSync = inSyncOf(r);
        const copy = inSync.find((p) => flushed.has(p));
        if (copy === undefined) {
          if (inSync.length > 0) throw failure(inSync[0]);
        } else if (!flushed.has(r.owner)) {
          asks.set(`${r.owner} ${copy}`, [r.owner, copy]);
        }
      }
      let waiting: string | undefined;
      for (const [primary, copy] of asks.values()) {
        // An ask that fails (the copy went too) is not known to find none: waited for.
        if (!this.o.ledBy || (await this.o.ledBy(copy, primary).catch(() => 1)) > 0) {
          waiting = primary;
          break;
        }
      }
      if (waiting === undefined) return;
      const leftMs = deadlineMs - clock.monotonicMs();
      if (leftMs <= 0) throw failure(waiting);
      await sleep(timers, Math.min(leftMs, flushTakeoverRecheckMs));
    }
  }

  /**
   * Extents from `lba` on. The answer may stop short of `blocksMax` (SBC allows it): at most
   * lbaStatusPagesMax pages, and only up to the first run whose owner cannot answer.
   */
  async lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    const pageBlocks = this.o.table.pageBlocks;
    const end = Math.min(lba + blocksMax, (this.o.table.pageOf(lba) + lbaStatusPagesMax) * pageBlocks, this.blockCount);
    const runs = this.runsOf(lba, end - lba, 0);
    // Keyed by first LBA: a run re-cut after MOVED still tiles the same range.
    const byLba = new Map<number, LbaExtent[]>();
    const failures: unknown[] = [];
    // Run by run through the MOVED loop (which also waits for a new primary of a replicated page
    // whose primary is out of reach), so one run's failure leaves the others' answers.
    await Promise.all(
      runs.map(async (first) => {
        try {
          await this.each([first], async (run) => {
            const extents = run.owner === this.o.self ? await this.o.local.lbaStatus(run.lba, run.blocks) : decodeExtents(this.payload(await this.forward(run, BlockOp.lbaStatus, false), true));
            if (!extents) throw new PeersanError(`peer ${run.owner} sent malformed LBA status`);
            byLba.set(run.lba, extents);
          });
        } catch (err) {
          failures.push(err);
        }
      }),
    );
    const answered: LbaExtent[] = [];
    for (let at = lba, extents = byLba.get(at); extents && at < end; extents = byLba.get(at)) {
      answered.push(...extents);
      at += extents.reduce((n, e) => n + e.blocks, 0);
    }
    if (answered.length === 0 && failures.length > 0) throw failures[0];
    return mergeExtents(answered);
  }

  // ---- runs, forwarding and MOVED ---------------------------------------------------------

  /** A host request's runs, as first routed, to the traffic matrix (retries after MOVED are not counted again). */
  private arrive(runs: readonly Run[], bytesPerBlock: number): void {
    const { arrived, self } = this.o;
    if (arrived) for (const r of runs) arrived(r.lba, r.blocks, r.owner === self, r.blocks * bytesPerBlock);
  }

  private runsOf(lba: number, blocks: number, offsetBlocks: number): Run[] {
    const runs: Run[] = [];
    for (const part of this.o.table.split(lba, blocks)) {
      const route = this.o.table.route(part.page);
      const last = runs[runs.length - 1];
      if (last && last.owner === route.owner) {
        last.blocks += part.blocks;
        last.version = Math.max(last.version, route.version);
      } else {
        runs.push({ lba: part.lba, blocks: part.blocks, offsetBlocks: offsetBlocks + part.offsetBlocks, owner: route.owner, version: route.version });
      }
    }
    return runs;
  }

  /**
   * The MOVED loop, the one every operation's retries go through. Round by round, `step` runs
   * on every run in parallel; a run that meets MOVED (PageMovedError from our own store, or an
   * owner's answer, forward()) has the route learned, and is re-cut by it and run again in the
   * next round. Runs that succeeded are done: a write part is never written twice. Rounds after
   * the first are bounded by routeRetriesMax (counted from `tries`, the rounds a caller's first
   * try used); past it the PageMovedError goes up, and the host hears BUSY (moved.ts).
   */
  private async each(runs: Run[], step: (run: Run) => Promise<void>, tries = 0, noFailover = false): Promise<void> {
    for (let round = runs, n = tries; round.length > 0; n++) {
      const moved: Run[] = [];
      const attempt = async (run: Run): Promise<void> => {
        if (run.owner === this.o.self) this.o.counters.localRuns++;
        try {
          await step(run);
        } catch (err) {
          await this.followMoved(err, n, run, noFailover);
          moved.push(run);
        }
      };
      if (round.length === 1) await attempt(round[0]);
      else await Promise.all(round.map(attempt));
      round = moved.flatMap((run) => this.runsOf(run.lba, run.blocks, run.offsetBlocks));
    }
  }

  /**
   * The loop's bound and its learning, in one place: `err` after `tries` retries is rethrown
   * unless, with retries left, it is a PageMovedError (its route is learned) or the run's owner
   * is unreachable and a new primary could be found (newPrimary); then the next try's count is
   * returned. `noFailover`: an unreachable owner's error goes up as it is unless the request
   * never reached it (else it may have been applied, and must not run twice).
   */
  private async followMoved(err: unknown, tries: number, run: Run, noFailover = false): Promise<number> {
    if (tries >= routeRetriesMax) throw err;
    if (err instanceof PageMovedError) {
      this.o.counters.movedRetries++;
      // An answer no newer than what we know means our own table is behind the catalog.
      if (!this.o.table.learn(err.page, err.route)) await this.o.refresh(err.page);
    } else if (noFailover && !(err instanceof PeerUnavailableError && err.unsent)) {
      // The takeover is still asked for (in the background): the host's next command finds the new primary.
      void this.newPrimary(run, err);
      throw err;
    } else if (!(await this.newPrimary(run, err))) {
      throw err;
    }
    return tries + 1;
  }

  /**
   * `err` says the run's owner cannot be reached: for each of the run's pages that has other
   * in-sync copies, ask them to take over and wait for a newer route; true at once for a page
   * whose route names another primary already. False when no page has one (unreplicated pages
   * fail as before), or when no copy of any could be reached either
   * (this peer is the one cut off: its host hears the error now, and can try another path).
   */
  private async newPrimary(run: Run, err: unknown): Promise<boolean> {
    if (!this.o.promote || !(err instanceof PeerUnavailableError) || err.peer !== run.owner || run.owner === this.o.self) return false;
    const { table } = this.o;
    const waits: Promise<boolean>[] = [];
    for (let page = table.pageOf(run.lba); page <= table.pageOf(run.lba + run.blocks - 1); page++) {
      const route = table.route(page);
      // The table learned another primary while the request waited (a takeover seen through the
      // catalog watch): the part runs again there, nothing to ask for.
      if (route.owner !== run.owner) {
        waits.push(Promise.resolve(true));
        continue;
      }
      const secondaries = inSyncOf(route).filter((p) => p !== route.owner);
      if (secondaries.length > 0) waits.push(this.newerRoute(page, route, secondaries));
    }
    return (await Promise.all(waits)).includes(true);
  }

  /**
   * Ask the first of `peers` to take the page over (the next one if it cannot be reached), and
   * wait (no polling) until the table holds a route newer than `route` (an answer, or the
   * catalog watch), or one answered that the primary is alive, or failoverWaitMsMax passed:
   * true. False at once when none of `peers` could be reached.
   */
  private newerRoute(page: number, route: Route, peers: readonly string[]): Promise<boolean> {
    const { table, env } = this.o;
    return new Promise((resolve) => {
      const done = (waited: boolean): void => {
        off();
        env.timers.clearTimeout(timer);
        resolve(waited);
      };
      const off = table.onLearn((p) => p === page && done(true));
      const timer = env.timers.setTimeout(() => done(true), failoverWaitMsMax);
      const ask = (i: number): void => {
        if (i >= peers.length) return done(false);
        this.o.promote!(peers[i], page, route).then((answered) => {
          table.learn(page, answered);
          done(true);
        }, () => ask(i + 1));
      };
      ask(0);
    });
  }

  private request(run: Run, op: BlockOpCode, fua: boolean, data?: Buffer, compareBytes = 0, stamp = 0): Omit<BlockRequest, 'id'> {
    return { op, fua, volumeId: this.o.volumeId, lba: run.lba, blocks: run.blocks, routeVersion: run.version, compareBytes, stamp, data };
  }

  /**
   * Send to a peer; a peer that does not know the volume yet (it opens new volumes when its
   * catalog watch fires, a moment after the creating peer) is asked again for a short while.
   */
  private async send(peer: string, req: Omit<BlockRequest, 'id'>, failover = false): Promise<BlockReply> {
    const { clock, timers } = this.o.env;
    const deadlineMs = clock.monotonicMs() + volumeOpenWaitMsMax;
    for (;;) {
      const reply = await this.sendTo(peer, req, failover);
      if (reply.status !== ReplyStatus.noVolume || clock.monotonicMs() >= deadlineMs) return reply;
      await sleep(timers, 50);
    }
  }

  /** Some page of the run has an in-sync copy besides its owner, which can take over from a silent owner. */
  private replicated(run: Run): boolean {
    const { table } = this.o;
    for (let page = table.pageOf(run.lba); page <= table.pageOf(run.lba + run.blocks - 1); page++) {
      if (inSyncOf(table.route(page)).length > 1) return true;
    }
    return false;
  }

  /** One send to `peer`; with `failover` (a copy can take over), given up when the peer falls silent (unlessSilent). */
  private sendTo(peer: string, req: Omit<BlockRequest, 'id'>, failover: boolean): Promise<BlockReply> {
    const { silence } = this.o;
    const send = (): Promise<BlockReply> => this.o.link(peer).send(req);
    return failover && silence ? unlessSilent(silence, peer, send) : send();
  }

  /** One send to the run's owner, whatever it answers (MOVED, no volume: the caller decides). */
  private forwardOnce(run: Run, op: BlockOpCode, fua: boolean, data?: Buffer, stamp?: number): Promise<BlockReply> {
    this.o.counters.forwardedRuns++;
    return this.sendTo(run.owner, this.request(run, op, fua, data, 0, stamp), this.replicated(run));
  }

  /** Send to the run's owner (waiting for one that has not opened the volume yet); MOVED throws PageMovedError. */
  private async forward(run: Run, op: BlockOpCode, fua: boolean, data?: Buffer, stamp?: number, compareBytes = 0): Promise<BlockReply> {
    this.o.counters.forwardedRuns++;
    const reply = await this.send(run.owner, this.request(run, op, fua, data, compareBytes, stamp), this.replicated(run));
    if (reply.status === ReplyStatus.moved) throw this.movedOf(run, reply);
    return reply;
  }

  /**
   * A MOVED answer as the error the retry loops take. The page must be one the run touches:
   * anything else is a broken (or hostile) owner's answer, and learning it would grow the table.
   */
  private movedOf(run: Run, reply: BlockReply): PageMovedError {
    const page = reply.detail;
    const first = this.o.table.pageOf(run.lba);
    if (page < first || page > this.o.table.pageOf(run.lba + run.blocks - 1) || reply.owner === '') {
      throw new RemoteFailureError(run.owner, ErrorKind.other, `MOVED names page ${page}, outside the request's pages from ${first}`);
    }
    return new PageMovedError(page, { owner: reply.owner, version: reply.version });
  }

  /**
   * A first try's answer: true when ok, false when the owner has not opened the volume yet
   * (the loop's forward() waits for it); MOVED throws PageMovedError, anything else its error.
   */
  private answered(run: Run, reply: BlockReply): boolean {
    if (reply.status === ReplyStatus.ok) return true;
    if (reply.status === ReplyStatus.noVolume) return false;
    if (reply.status === ReplyStatus.moved) throw this.movedOf(run, reply);
    throw replyError(reply.owner || '?', reply);
  }

  /** A non-ok answer as an error of the owner's kind (frame.ts replyError), so the host hears the owner's meaning. */
  private expectOk(reply: BlockReply): void {
    if (reply.status !== ReplyStatus.ok) throw replyError(reply.owner || '?', reply);
  }

  private payload(reply: BlockReply, allowEmpty = false): Buffer {
    this.expectOk(reply);
    if (!reply.payload && !allowEmpty) throw new PeersanError('forwarded read returned no data');
    return reply.payload ?? Buffer.alloc(0);
  }
}

function mergeExtents(extents: LbaExtent[]): LbaExtent[] {
  const out: LbaExtent[] = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last.mapped === e.mapped && last.lba + last.blocks === e.lba) last.blocks += e.blocks;
    else out.push({ ...e });
  }
  return out;
}
