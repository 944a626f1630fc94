// The replicated layer of a volume on one peer (DESIGN.md 10; the contracts between the parts
// of src/replication in hooks.ts). It sits on the owner's side of the data path,
// above the pages this peer holds (MovableVolume, src/server/data-path.ts says why there), and
// splits each request by page:
//
// - a page with one copy, or one this peer does not own with one copy: straight down, in the
//   caller's own step (an unreplicated volume pays nothing);
// - a replicated page this peer does not own: PageMovedError (the router follows it to the
//   primary, which replicates), also in a move's commit window;
// - a read of a page this peer is primary of: the guard (leases, reconcile: failover.ts) runs it;
// - a change (write, unmap, compare-and-write) of such a page, in this order:
//   1. the guard lets it run (not while the page is being reconciled);
//   2. the range lock (range-lock.ts) on its blocks, held until every copy has answered, so
//      overlapping changes reach every copy in this primary's order;
//   3. the activity log has the page, durably (tracker.beforeChange), before anything changes;
//   4. it gets the page's next number (recent.ts) and is recorded recent here;
//   5. applied here AND sent, numbered and tagged with the epoch, to every other in-sync copy
//      and every copy resyncing from us, in parallel (a compare-and-write compares here first,
//      under the lock, and replicates only the write; a miscompare stands once the guard finds
//      the leases valid after it, as for a read, the route unchanged since the compare);
//   6. waits for the in-sync copies, each at most replicaAckMsMax from the send: one that fails
//      or does not answer is CASed out of the in-sync set (epoch + 1) BEFORE the change is
//      acknowledged; one that answers MOVED with a newer epoch makes us re-read the route and
//      send again at the new epoch to the in-sync copies that do not have it yet, or give up
//      with PageMovedError when this peer is not the primary any more;
//   7. tracker.changed marks its grains dirty for stale copies and for copies that missed it;
//   8. the lock is released, and the number counts as acknowledged (the mark sent with later
//      changes moves past it, and copies forget its grains).
//
// A change another peer forwarded here carries the route version its sender routed it by
// (WriteOptions.routeVersion). Once it holds its range (after the guard's, the lock's and the
// activity log's waits: the guard holds a page for up to failoverWaitMsMax, longer than the
// sender's link waits) it is applied only if the page's route is still no newer; else it is
// answered MOVED, unapplied. The sender may have given up on it meanwhile (its link's deadline,
// this peer's silence: router.ts) and run it again at another primary, which acknowledged it;
// applied now, after the page came back here, it would overwrite later acknowledged writes on
// every copy (simulator, seed 2824 with a timing variant: a forwarded write held here 4 s while
// the page stepped out after a restart, failed over to another copy and was switched back). A
// sender still waiting learns the route from the answer and sends again.
//
// On a copy, a replica frame (ReplicaReceiver) is applied only at the copy's own epoch of the
// page: a newer one makes it re-read the route first, an older one is refused at once with
// MOVED and the route it knows (fencing: an old primary gets no acknowledgement from a copy
// that knows the new epoch). It takes the same range lock, checks again after every wait, and
// records the grains recent in the step it checks, so a newer epoch's reconcile sees them and
// its writes land after it.

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { sleep, within, type Env } from '../env/env';
import { ClosedError, ConflictError, errorKindOf, ErrorKind, InvalidArgumentError, PeersanError, PeerUnavailableError } from '../errors';
import { divergedKeepMs, dropRetryMsMax, dropRetryMsMin, goneAckMsMax, leaseReadRunsMax, replicaAckMsMax, routeRetriesMax } from '../limits';
import { BlockOp, replyError, ReplyStatus, type BlockReply, type BlockRequest } from '../routing/frame';
import { PageMovedError } from '../routing/moved';
import type { BlockSender } from '../routing/router';
import { copiesOf, initialRouteVersion, inSyncOf, type PagePart, type Route, type RouteTable } from '../routing/table';
import { StampsInFlight } from '../snapshot/gate';
import { BackendDecorator } from '../store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';
import type { ChangeTracker, PrimaryGuard, ReplicaPort } from './hooks';
import { RangeLock } from './range-lock';
import { ReadRepair, type ReadRepairHooks } from './read-repair';
import { RecentChanges } from './recent';

/** What the layer needs of the peer beyond the data path: the catalog and the other parts of src/replication. */
export interface ReplicationWiring {
  /** The volume's catalog record as it is now (a drop's CAS names it; its replicas say whether copies can be unknown). */
  volume(): VolumeRecord | undefined;
  catalog: Pick<Catalog, 'casRoute'>;
  tracker: ChangeTracker;
  guard: PrimaryGuard;
  log: Logger;
  /** Read errors here served from another copy (counted, told), and a copy that cannot be repaired handed over. */
  readRepair?: ReadRepairHooks;
  /**
   * The peer is leaving the group (a graceful stop: member state leaving or removed), or nothing
   * came from it for a lease and its margin (leases.ts unheard: stopped, hung, cut off): a copy
   * there that does not take a change within goneAckMsMax is dropped, not after replicaAckMsMax
   * (its process may be gone, its stream reconnecting). Absent: none is.
   */
  gone?(peer: string): boolean;
}

export interface ReplicatedVolumeOptions extends ReplicationWiring {
  self: string;
  volumeId: string;
  /** The volume's routes (the catalog's in-memory copy); refresh() updates this very table. */
  table: RouteTable;
  /** This peer's pages below the layer, moves included (MovableVolume): what the primary applies changes to and reads. */
  local: BlockBackend;
  /** What a secondary applies replica changes to: the stamp log over the store (no ownership check: it is not the owner). */
  copy: BlockBackend;
  link(peerId: string): BlockSender;
  /** Re-read the page's route from the catalog into `table`. */
  refresh(page: number): Promise<Route>;
  env: Env;
}

/**
 * CAS `peers` out of the page's in-sync set (they stay copies, and catch up by resync), epoch + 1,
 * from `route`, which must still be current: ConflictError otherwise (the caller re-reads the
 * route and decides again).
 */
export function dropFromInSync(catalog: Pick<Catalog, 'casRoute'>, volume: VolumeRecord, page: number, route: Route, peers: readonly string[]): Promise<Route> {
  if (peers.includes(route.owner)) throw new Error('assertion failed: a primary drops other copies, never itself');
  return catalog.casRoute(volume, page, route, (now) => ({ owner: now.owner, copies: [...copiesOf(now)], inSync: inSyncOf(now).filter((p) => !peers.includes(p)) }));
}

/** One change of one page, as the primary applies it here and sends it to the other copies. */
interface Change {
  op: 'write' | 'unmap';
  lba: number;
  blocks: number;
  data: Buffer | undefined;
  opts: WriteOptions;
}

/** A copy's answer to a change. */
type Delivery = { kind: 'ok' } | { kind: 'moved'; version: number } | { kind: 'failed'; reason: string };

/** Where a change's replication stands: the route it is at now, and the copies that did not apply it. */
interface Sent {
  route: Route;
  missed: string[];
  /** The in-sync copies that applied the change (this peer first). */
  applied: Set<string>;
}

/** How long a copy that refused a change for a transient reason is left before it is asked again. */
const transientRetryMs = 50;

export class ReplicatedVolume extends BackendDecorator implements ReplicaPort {
  /** The copy's side: replica frames from the page service. */
  readonly receiver: ReplicaReceiver;
  readonly local: BlockBackend;
  private readonly o: ReplicatedVolumeOptions;
  private readonly locks = new RangeLock();
  private readonly recent = new RecentChanges();
  private readonly repair: ReadRepair;
  /** page → the version at which the catalog said the page has one copy although the volume asks for more (not re-read). */
  private readonly confirmed = new Map<number, number>();
  /** Stamps of the replicated changes this peer is primary of, until each copy applied them or was dropped. */
  private readonly replicating = new StampsInFlight();
  /** page → the copies dropLater still tries to drop (each may lack a change of the page), one entry per try. */
  private readonly undropped = new Map<number, string[]>();
  /** page → the copies a change cut short by a takeover may differ on from the new primary, and until when (monotonic ms) they are named (divergedCopies). */
  private readonly diverged = new Map<number, { peers: string[]; untilMs: number }>();

  constructor(opts: ReplicatedVolumeOptions) {
    super(opts.local);
    this.o = opts;
    this.local = opts.local;
    this.receiver = new ReplicaReceiver({ ...opts, locks: this.locks, recent: this.recent });
    this.repair = new ReadRepair({ ...opts, locks: this.locks, hooks: opts.readRepair, settled: (page, lba, blocks) => this.settled(page, lba, blocks) });
    // A page that has another primary now (a takeover while this peer was cut off, a handover) is
    // that primary's to reconcile, pending changes and all: not only when a request of ours hears
    // it (PageMovedError). A failed change left pending here would otherwise keep the page
    // unsettled for good once the role comes back, and every resync of it refused (simulator,
    // seed 29932). The table lives as long as the volume on this peer, as does this layer.
    opts.table.onLearn((page, route) => {
      if (route.owner !== opts.self) this.recent.release(page);
    });
  }

  // ---- ReplicaPort ----------------------------------------------------------------------------

  recentGrains(page: number): number[] {
    return this.recent.grains(page);
  }

  exclusive<T>(page: number, lba: number, blocks: number, fn: () => Promise<T>): Promise<T> {
    return this.locks.run(page, lba, blocks, fn);
  }

  async send(peer: string, route: Route, op: 'write' | 'unmap', lba: number, blocks: number, data: Buffer | undefined, fua: boolean): Promise<number> {
    const reply = await this.o.link(peer).send(this.frame({ op, lba, blocks, data, opts: { fua } }, route.version, 0, 0));
    if (reply.status === ReplyStatus.moved) throw new PageMovedError(this.o.table.pageOf(lba), { owner: reply.owner, version: reply.version });
    if (reply.status !== ReplyStatus.ok) throw replyError(peer, reply);
    return reply.version;
  }

  /**
   * A change of the page failed here and is not settled (dropLater, unapplied): the in-sync
   * copies may differ on its grains until it is. Under exclusive() over the whole page nothing
   * else is pending, so this is exactly "every in-sync copy holds every change" failing.
   */
  unsettled(page: number): boolean {
    return this.recent.unsettled(page);
  }

  /**
   * Resolves once no replicated change stamped before `t` is in flight here (its copies settled:
   * each applied it, or was dropped from the in-sync set). A timestamp snapshot waits for this
   * before FINISH (src/snapshot/service.ts): a change whose host peer is gone is waited for by
   * no gate, and a copy it has not reached yet would freeze without it (seed 128).
   */
  changesBefore(t: number): Promise<void> {
    return this.replicating.before(t);
  }

  /**
   * The copies still in a page's in-sync set that may lack a change this peer applied as its
   * primary: their drop could not be made (the catalog out of reach) and dropLater tries again.
   * A change counts as settled for changesBefore once its drop is pending, so a snapshot taken
   * meanwhile leaves these copies out of the page's holders (service.ts; seed 138: a
   * compare-and-write stamped before T failed on a copy, the drop waited for the catalog, the
   * copy was counted as a holder and froze without it).
   */
  undroppedCopies(): { page: number; peer: string }[] {
    return [...this.undropped].flatMap(([page, peers]) => [...new Set(peers)].map((peer) => ({ page, peer })));
  }

  /**
   * The copies of pages this peer lost in the middle of a change (another peer took the page over
   * and will reconcile its copies to its own content): each copy but the new primary may hold the
   * change while the new primary does not, or the reverse, so their layers of a snapshot frozen
   * before the reconcile may differ. A timestamp snapshot whose TAKE(T) waited here for such a
   * change stamped before T leaves them out of the page's holders (service.ts; they take the new
   * primary's layer afterwards). The new primary itself names them only from its takeover on
   * (failover.ts unreconciledCopies), and it may have sealed before that (simulator, seed 98534:
   * a compare-and-write reached one secondary and not the other, which took the page over after
   * its TAKE(T); the first secondary froze the write in its layer, the new primary did not).
   * Named for divergedKeepMs after the change failed.
   */
  divergedCopies(): { page: number; peer: string }[] {
    const nowMs = this.o.env.clock.monotonicMs();
    for (const [page, d] of this.diverged) if (d.untilMs <= nowMs) this.diverged.delete(page);
    return [...this.diverged].flatMap(([page, d]) => d.peers.map((peer) => ({ page, peer })));
  }

  /** A change of the page sent to `route`'s copies ended with the page another's (`owner`): see divergedCopies. */
  private lostMidChange(page: number, route: Route, owner: string): void {
    const peers = new Set([...copiesOf(route), ...(this.diverged.get(page)?.peers ?? [])]);
    peers.delete(owner);
    this.diverged.set(page, { peers: [...peers], untilMs: this.o.env.clock.monotonicMs() + divergedKeepMs });
  }

  /** No change of a grain of [lba, lba + blocks) of the page is above the acknowledged mark (pending here, or not pruned yet). */
  private settled(page: number, lba: number, blocks: number): boolean {
    const [first, last] = grainsOf(this.o.table, this.local.grainBlocks, page, lba, blocks);
    return !this.recent.grains(page).some((g) => g >= first && g <= last);
  }

  // ---- BlockBackend ---------------------------------------------------------------------------

  read(lba: number, blocks: number): Promise<Buffer> {
    if (this.straight(lba, blocks)) return this.inner.read(lba, blocks);
    return this.readPages(lba, blocks);
  }

  write(lba: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    const blocks = data.length / this.blockBytes;
    if (this.straight(lba, blocks)) return this.inner.write(lba, data, opts);
    const bs = this.blockBytes;
    return this.eachPage(lba, blocks, (p) => this.change(p.page, { op: 'write', lba: p.lba, blocks: p.blocks, data: data.subarray(p.offsetBlocks * bs, (p.offsetBlocks + p.blocks) * bs), opts }));
  }

  unmap(lba: number, blocks: number, opts: WriteOptions = {}): Promise<void> {
    if (this.straight(lba, blocks)) return this.inner.unmap(lba, blocks, opts);
    return this.eachPage(lba, blocks, (p) => this.change(p.page, { op: 'unmap', lba: p.lba, blocks: p.blocks, data: undefined, opts }));
  }

  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions = {}): Promise<CompareAndWriteResult> {
    const blocks = data.length / this.blockBytes;
    if (this.straight(lba, blocks)) return this.inner.compareAndWrite(lba, compare, data, opts);
    const page = this.o.table.pageOf(lba);
    if (this.o.table.pageOf(lba + blocks - 1) !== page) return this.compareThenWrite(lba, compare, data, opts);
    const change: Change = { op: 'write', lba, blocks, data, opts };
    return this.onPage(
      page,
      false,
      () => this.inner.compareAndWrite(lba, compare, data, opts),
      () => this.compareReplicated(page, compare, change),
    );
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    const blocks = Math.min(blocksMax, this.blockCount - lba);
    if (blocks <= 0 || this.straight(lba, blocks)) return this.inner.lbaStatus(lba, blocksMax);
    // A replicated page answers for itself alone (the answer may stop short: SBC allows it).
    const page = this.o.table.pageOf(lba);
    const inPage = Math.min(blocks, (page + 1) * this.o.table.pageBlocks - lba);
    const status = (): Promise<LbaExtent[]> => this.inner.lbaStatus(lba, inPage);
    return this.onPage(page, true, status, status);
  }

  // ---- per page -------------------------------------------------------------------------------

  /** True when every touched page goes straight down: one copy known (or not ours with one copy: MovableVolume decides). */
  private straight(lba: number, blocks: number): boolean {
    const { table } = this.o;
    for (let page = table.pageOf(lba), last = table.pageOf(lba + blocks - 1); page <= last; page++) {
      const route = table.route(page);
      if (route.copies ? route.copies.length > 1 : this.copiesUnknown(page, route)) return false;
    }
    return true;
  }

  /** A route without copies past the placement rule, of a volume that asks for more than one: a MOVED answer's, to be read whole. */
  private copiesUnknown(page: number, route: Route): boolean {
    return route.version > initialRouteVersion && this.confirmed.get(page) !== route.version && (this.o.volume()?.replicas ?? 1) > 1;
  }

  private eachPage(lba: number, blocks: number, fn: (p: PagePart) => Promise<void>): Promise<void> {
    return Promise.all(this.o.table.split(lba, blocks).map(fn)).then(() => undefined);
  }

  private readPages(lba: number, blocks: number): Promise<Buffer> {
    // A media error of this peer's store on a replicated page is served from another copy (read-repair.ts).
    const readPart = (p: PagePart): Promise<Buffer> =>
      this.onPage(
        p.page,
        true,
        () => this.inner.read(p.lba, p.blocks),
        () => this.repair.read(p.page, p.lba, p.blocks),
      );
    const parts = this.o.table.split(lba, blocks);
    // One page (nearly every read): its buffer as it is. Copied into a buffer of the same size,
    // a replicated 128 KiB read cost 36 % more CPU than an unreplicated one (11 % without).
    if (parts.length === 1) return readPart(parts[0]);
    const bs = this.blockBytes;
    const out = Buffer.allocUnsafe(blocks * bs);
    return Promise.all(parts.map(async (p) => void (await readPart(p)).copy(out, p.offsetBlocks * bs))).then(() => out);
  }

  /**
   * Run `replicated` under the guard when this peer is the primary of a page with more than one
   * copy, `single` when the page has one; PageMovedError when another peer is its primary.
   */
  private onPage<T>(page: number, read: boolean, single: () => Promise<T>, replicated: () => Promise<T>): Promise<T> {
    const route = this.o.table.route(page);
    if (route.copies ? route.copies.length === 1 : !this.copiesUnknown(page, route)) return single();
    return this.ownRoute(page).then((own) => (copiesOf(own).length === 1 ? single() : this.o.guard.run(this.o.volumeId, page, own, read, replicated)));
  }

  /** The page's whole route (read from the catalog when its copies are unknown); PageMovedError unless this peer is its primary. */
  private async ownRoute(page: number): Promise<Route> {
    let route = this.o.table.route(page);
    if (!route.copies && this.copiesUnknown(page, route)) {
      route = await this.o.refresh(page);
      if (!route.copies) this.confirmed.set(page, route.version);
    }
    if (route.owner !== this.o.self) throw new PageMovedError(page, route);
    return route;
  }

  /** The page's route as the catalog has it now; PageMovedError unless this peer is its primary. */
  private async currentOwn(page: number): Promise<Route> {
    const route = await this.o.refresh(page);
    if (route.owner !== this.o.self) throw new PageMovedError(page, route);
    return route;
  }

  private change(page: number, c: Change): Promise<void> {
    const apply = (): Promise<void> => this.apply(c);
    return this.onPage(page, false, apply, () => this.replicating.during(c.opts.stamp, () => this.locks.run(page, c.lba, c.blocks, () => this.changeLocked(page, c))));
  }

  private apply(c: Change): Promise<void> {
    return c.op === 'write' ? this.inner.write(c.lba, c.data!, c.opts) : this.inner.unmap(c.lba, c.blocks, c.opts);
  }

  /**
   * A compare-and-write of one page this peer is the primary of. A match is fenced by its write,
   * as any change. A MISCOMPARE replicates nothing, so no copy fences a primary that lost the
   * page, and it would answer from blocks a new primary has overwritten (seed 1683): it stands
   * only once the guard finds this peer's leases valid after the compare, as after a read (no
   * copy took over before then), with the page's route still at the version it compared under.
   * A primary cut off while it compared may have lost the page and been given it back before its
   * leases came back (a takeover, then a handover back to it: seed 37724); its copy as it compared
   * it lacked what the other primary wrote meanwhile. Then it compares again (a MISCOMPARE wrote
   * nothing), at most leaseReadRunsMax times. Checked after the range lock is released: a
   * reconcile of the page, which the guard waits for, needs that lock.
   */
  private async compareReplicated(page: number, compare: Buffer, c: Change): Promise<CompareAndWriteResult> {
    for (let runs = 1; ; runs++) {
      const { result, comparedAt } = await this.replicating.during(c.opts.stamp, () => this.locks.run(page, c.lba, c.blocks, () => this.compareLocked(page, compare, c)));
      if (result.ok) return result;
      const leasedAt = await this.o.guard.run(this.o.volumeId, page, this.o.table.route(page), true, async () => this.o.table.route(page).version);
      if (leasedAt === comparedAt) return result;
      if (runs >= leaseReadRunsMax) throw new PeerUnavailableError(this.o.self, `page ${page}: its route kept changing while a COMPARE AND WRITE compared`, false, { transient: true });
    }
  }

  /** A compare-and-write of one page, its range locked: compared here, then the write replicated; with the route version it compared under. */
  private async compareLocked(page: number, compare: Buffer, c: Change): Promise<{ result: CompareAndWriteResult; comparedAt: number }> {
    const route = await this.ownRoute(page);
    notStale(page, route, c.opts);
    const at = firstDifference(await this.inner.read(c.lba, c.blocks), compare);
    if (at !== undefined) return { result: { ok: false, miscompareOffsetBytes: at }, comparedAt: route.version };
    await this.changeLocked(page, c, true);
    return { result: { ok: true }, comparedAt: route.version };
  }

  /** The non-atomic fallback for a COMPARE AND WRITE across a page boundary (as the router's across owners). */
  private async compareThenWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions): Promise<CompareAndWriteResult> {
    const blocks = data.length / this.blockBytes;
    const current = await this.read(lba, blocks);
    // A forward routed by an older route of a page: MOVED now, before anything is compared or
    // written (after the read's waits for the pages' guards).
    for (const p of this.o.table.split(lba, blocks)) notStale(p.page, await this.ownRoute(p.page), opts);
    const at = firstDifference(current, compare);
    if (at !== undefined) return { ok: false, miscompareOffsetBytes: at };
    try {
      await this.write(lba, data, opts);
    } catch (err) {
      // One page may be written already: the router must not send the command again (the new
      // primary would compare against this write and answer MISCOMPARE).
      if (!(err instanceof PageMovedError)) throw err;
      throw new PeersanError(`a compare-and-write across pages may have been partly applied before a page's route changed (${err.message}): not run again`, 'PEERSAN_ERR_IN_DOUBT', { cause: err, kind: ErrorKind.unavailable });
    }
    return { ok: true };
  }

  /**
   * Steps 3 to 8 of the head comment; the caller holds the change's range. `compared`: the
   * write of a compare-and-write, which must never run twice: once it may have been applied
   * (here or on a copy), losing the page answers an error, not MOVED (the router would send
   * the command again to the new primary, which holds the write and answers MISCOMPARE).
   */
  private async changeLocked(page: number, c: Change, compared = false): Promise<void> {
    const before = this.o.tracker.beforeChange(this.o.volumeId, page);
    if (before) await before;
    const route = await this.ownRoute(page);
    // A compare-and-write's write was checked before its compare (compareLocked).
    if (!compared) notStale(page, route, c.opts);
    if (copiesOf(route).length === 1) return this.apply(c);
    const [firstGrain, lastGrain] = grainsOf(this.o.table, this.grainBlocks, page, c.lba, c.blocks);
    const { seq, ackedThrough } = this.recent.begin(page, firstGrain, lastGrain);
    const sent: Sent = { route, missed: [], applied: new Set([this.o.self]) };
    let ok = false;
    try {
      // Every copy has answered (or been dropped) before the lock is released, even when the local apply failed.
      const [local, copies] = await Promise.allSettled([this.apply(c), this.toCopies(page, c, seq, ackedThrough, sent)]);
      if (local.status === 'rejected') {
        if (!(local.reason instanceof PageMovedError)) ok = await this.unapplied(page, c, seq, sent);
        throw local.reason;
      }
      this.o.tracker.changed(this.o.volumeId, page, sent.route, c.lba, c.blocks, sent.missed);
      if (copies.status === 'rejected') {
        // Applied here, and an in-sync copy may not have it (a drop that could not be made): it must still leave.
        if (!(copies.reason instanceof PageMovedError)) this.dropLater(page, seq, inSyncOf(sent.route).filter((p) => !sent.applied.has(p)));
        throw copies.reason;
      }
      ok = true;
    } catch (err) {
      if (!(err instanceof PageMovedError)) throw err;
      this.recent.release(page);
      this.lostMidChange(page, sent.route, err.route.owner);
      if (!compared) throw err;
      throw new PeersanError(`a compare-and-write of page ${page} may have been applied before its primary changed (${err.message}): not run again`, 'PEERSAN_ERR_IN_DOUBT', { cause: err, kind: ErrorKind.unavailable });
    } finally {
      this.recent.end(page, seq, ok);
    }
  }

  /**
   * Copies that may lack change `seq` stay in the in-sync set when their drop could not be made
   * (the catalog out of reach): left so, they would differ from this peer for good once they are
   * reachable again (later changes reach them, this one never; only a new primary reconciles).
   * So the drop is tried again, with backoff, until it is made (they resync what they lack: this
   * peer keeps the change's grains recent meanwhile, the drop marks them dirty) or the page is
   * not ours any more (its new primary reconciles the change, pending here).
   */
  private dropLater(page: number, seq: number, peers: string[]): void {
    const { timers } = this.o.env;
    const retry = async (delayMs: number): Promise<void> => {
      // Unref'd: a process that stops does not wait for the next try (up to dropRetryMsMax away) to exit.
      await new Promise<void>((resolve) => timers.setTimeout(resolve, delayMs).unref());
      try {
        await this.dropCopies(page, await this.currentOwn(page), peers, 'a change they may lack failed');
      } catch (err) {
        if (err instanceof PageMovedError) this.recent.release(page);
        else if (!(err instanceof ClosedError)) return retry(Math.min(2 * delayMs, dropRetryMsMax));
        return this.dropped(page, peers);
      }
      this.dropped(page, peers);
      this.recent.end(page, seq, true);
    };
    if (peers.length === 0) return;
    this.undropped.set(page, [...(this.undropped.get(page) ?? []), ...peers]);
    void retry(dropRetryMsMin);
  }

  /** dropLater's try for `peers` ended (dropped, or the page is not ours to drop from any more). */
  private dropped(page: number, peers: string[]): void {
    const left = [...(this.undropped.get(page) ?? [])];
    for (const p of peers) {
      const at = left.indexOf(p);
      if (at >= 0) left.splice(at, 1);
    }
    if (left.length > 0) this.undropped.set(page, left);
    else this.undropped.delete(page);
  }

  /**
   * The change failed here after it went to the copies (a store error, a move's destination out
   * of reach): copies that applied it hold what this peer, the page's truth, does not. Left so,
   * they would stay different for as long as this peer stays primary (only a new primary
   * reconciles). So every copy it went to leaves the in-sync set (those that missed it are out
   * already) with the change's grains dirty, and resyncs this peer's content. True when done:
   * no other in-sync copy is left holding the change, so its number may count as settled.
   * Still under the change's range lock: no later change overtakes the drop.
   */
  private async unapplied(page: number, c: Change, seq: number, sent: Sent): Promise<boolean> {
    const others = inSyncOf(sent.route).filter((p) => p !== this.o.self);
    const reached = [...others, ...this.o.tracker.resyncing(this.o.volumeId, page)].filter((p) => p !== this.o.self && !sent.missed.includes(p));
    this.o.tracker.changed(this.o.volumeId, page, sent.route, c.lba, c.blocks, [...sent.missed, ...reached]);
    try {
      if (others.length > 0) sent.route = await this.dropCopies(page, sent.route, others, 'the change failed on the primary after the copies applied it');
    } catch (err) {
      // Not dropped now: later (the change stays pending meanwhile, its grains recent on every copy).
      if (!(err instanceof PageMovedError)) this.dropLater(page, seq, others);
      return false;
    }
    return true;
  }

  /**
   * Send a numbered change to every other in-sync copy (waiting for each, step 6) and to the
   * copies resyncing from us (best effort). `sent` follows the route as copies are dropped or a
   * newer epoch is learned; its `missed` gathers the copies that did not apply the change.
   */
  protected async toCopies(page: number, c: Change, seq: number, ackedThrough: number, sent: Sent): Promise<void> {
    const { self, volumeId } = this.o;
    const deadlineMs = this.o.env.clock.monotonicMs() + replicaAckMsMax;
    const resyncing = this.o.tracker.resyncing(volumeId, page).filter((p) => p !== self && !inSyncOf(sent.route).includes(p));
    // A resyncing copy that applies a change keeps its grain clean (resync.ts changed): the run
    // that brings it back never sends that grain again. So it applies the change durably (FUA):
    // had it crashed with the change only in its cache and restarted, the run could admit it in
    // sync before its new full ask arrived, without the change (simulator, seed 141356). Only
    // pages being resynced pay the sync.
    const bestEffort = Promise.all(
      resyncing.map(async (p) => {
        if ((await this.deliver(p, { ...this.frame(c, sent.route.version, seq, ackedThrough), fua: true }, deadlineMs)).kind !== 'ok') sent.missed.push(p);
      }),
    );
    try {
      await this.toInSync(page, c, seq, ackedThrough, sent);
    } finally {
      await bestEffort;
    }
  }

  /**
   * Step 6 for the in-sync copies: each applied the change, or is out of the in-sync set, when
   * this resolves. Each round (a first send, or a send again at a newer epoch) gives the copies
   * replicaAckMsMax: a catalog read between rounds does not eat a copy's time.
   */
  private async toInSync(page: number, c: Change, seq: number, ackedThrough: number, sent: Sent): Promise<void> {
    const { applied } = sent;
    for (let tries = 0; ; tries++) {
      const epoch = sent.route.version;
      const deadlineMs = this.o.env.clock.monotonicMs() + replicaAckMsMax;
      const targets = inSyncOf(sent.route).filter((p) => !applied.has(p));
      const answers = await Promise.all(targets.map((p) => this.deliver(p, this.frame(c, epoch, seq, ackedThrough), deadlineMs)));
      const { failed, reasons, newer } = sortAnswers(targets, answers, epoch, applied);
      if (failed.length > 0) {
        sent.missed.push(...failed);
        sent.route = await this.dropCopies(page, sent.route, failed, reasons.join('; '));
      }
      if (!newer) return;
      if (tries >= routeRetriesMax) throw new PageMovedError(page, sent.route);
      sent.route = await this.currentOwn(page);
    }
  }

  /**
   * One copy's answer, by `deadlineMs` (monotonic). A transient refusal (a copy that has not
   * opened the volume yet, a full stream, a catalog behind ours, a stream being reconnected) is
   * asked again meanwhile: back-pressure must not cost a copy its place in the in-sync set.
   */
  private async deliver(peer: string, req: Omit<BlockRequest, 'id'>, deadlineMs: number): Promise<Delivery> {
    const { clock, timers } = this.o.env;
    const gone = this.o.gone?.(peer) ?? false;
    if (gone) deadlineMs = Math.min(deadlineMs, clock.monotonicMs() + goneAckMsMax);
    for (;;) {
      const leftMs = deadlineMs - clock.monotonicMs();
      if (leftMs <= 0) return { kind: 'failed', reason: gone ? `${peer} is leaving or silent and did not answer within ${goneAckMsMax} ms` : `no answer within ${replicaAckMsMax} ms` };
      const answer = await this.ask(peer, req, leftMs);
      if (answer !== 'again') return answer;
      await sleep(timers, Math.min(transientRetryMs, leftMs));
    }
  }

  /** One try of deliver(): the answer, or 'again' for a transient refusal. */
  private async ask(peer: string, req: Omit<BlockRequest, 'id'>, leftMs: number): Promise<Delivery | 'again'> {
    let reply: BlockReply | undefined;
    try {
      reply = await within(this.o.env.timers, this.o.link(peer).send(req), leftMs);
    } catch (err) {
      return errorKindOf(err, true) === ErrorKind.busy ? 'again' : { kind: 'failed', reason: err instanceof Error ? err.message : String(err) };
    }
    if (!reply) return { kind: 'failed', reason: `no answer within ${Math.round(leftMs)} ms` };
    if (reply.status === ReplyStatus.ok) return { kind: 'ok' };
    if (reply.status === ReplyStatus.moved) return { kind: 'moved', version: reply.version };
    if (reply.status === ReplyStatus.noVolume || (reply.status === ReplyStatus.failed && reply.detail === ErrorKind.busy)) return 'again';
    return { kind: 'failed', reason: replyError(peer, reply).message };
  }

  /**
   * CAS the copies that did not acknowledge out of the in-sync set, from `route`; a route changed
   * meanwhile is re-read and the drop decided again (they may be out already). The change must
   * not be acknowledged without them otherwise: a drop that cannot be made fails it.
   */
  private async dropCopies(page: number, route: Route, peers: string[], reason: string): Promise<Route> {
    const volume = this.o.volume();
    if (!volume) throw new ClosedError(`volume ${this.o.volumeId} is gone`);
    for (let tries = 0; ; tries++) {
      const still = peers.filter((p) => inSyncOf(route).includes(p));
      if (still.length === 0) return route;
      try {
        const next = await dropFromInSync(this.o.catalog, volume, page, route, still);
        this.o.log.warn({ volume: volume.name, page, dropped: still, epoch: next.version, reason }, 'copies did not acknowledge a change: dropped from the in-sync set');
        return next;
      } catch (err) {
        if (!(err instanceof ConflictError) || tries >= routeRetriesMax) {
          throw new PeerUnavailableError(still.join(','), `did not acknowledge a change of page ${page} (${reason}) and could not be dropped from its in-sync set`, true, { cause: err });
        }
      }
      route = await this.currentOwn(page);
    }
  }

  private frame(c: Change, epoch: number, seq: number, ackedThrough: number): Omit<BlockRequest, 'id'> {
    return {
      op: c.op === 'write' ? BlockOp.write : BlockOp.unmap,
      fua: c.opts.fua === true,
      replica: true,
      volumeId: this.o.volumeId,
      lba: c.lba,
      blocks: c.blocks,
      routeVersion: epoch,
      compareBytes: 0,
      stamp: c.opts.stamp ?? 0,
      seq,
      ackedThrough,
      data: c.data,
    };
  }
}

export interface ReplicaReceiverOptions {
  self: string;
  volumeId: string;
  table: RouteTable;
  refresh(page: number): Promise<Route>;
  /** The stamp log over this peer's store. */
  copy: BlockBackend;
  tracker: ChangeTracker;
  locks: RangeLock;
  recent: RecentChanges;
  readRepair?: Pick<ReadRepairHooks, 'untrusted'>;
}

/** A secondary's side of replication: applies its primary's changes (see the head comment). */
export class ReplicaReceiver {
  constructor(private readonly o: ReplicaReceiverOptions) {}

  /**
   * Apply a replica change: a write or an unmap within one page (the page service checked its
   * range and lengths against the volume). PageMovedError when the sender's epoch is older than
   * ours; errors of the busy kind while our catalog lags the sender's epoch.
   */
  async receive(req: BlockRequest, opts: WriteOptions): Promise<void> {
    const { table } = this.o;
    const page = table.pageOf(req.lba);
    if (table.pageOf(req.lba + req.blocks - 1) !== page || (req.op !== BlockOp.write && req.op !== BlockOp.unmap)) {
      throw new InvalidArgumentError('a replica change is a write or an unmap within one page');
    }
    // An older epoch is refused at once, not behind a lock that a newer primary's change may hold.
    await this.catchUp(page, req.routeVersion);
    this.check(page, req.routeVersion);
    await this.o.locks.run(page, req.lba, req.blocks, () => this.applyLocked(page, req, opts));
  }

  /**
   * The blocks of a primary's replica read (its own store failed them, read-repair.ts), from
   * this copy's store: only while this peer is an in-sync secondary of the page at exactly the
   * sender's epoch, its copy trusted. Under the range lock, so no replica change of the blocks
   * is half applied here; checked again once it is held.
   */
  async read(req: BlockRequest): Promise<Buffer> {
    const { table } = this.o;
    const page = table.pageOf(req.lba);
    if (table.pageOf(req.lba + req.blocks - 1) !== page) throw new InvalidArgumentError('a replica read is within one page');
    await this.catchUp(page, req.routeVersion);
    this.servable(page, req.routeVersion);
    return this.o.locks.run(page, req.lba, req.blocks, () => {
      this.servable(page, req.routeVersion);
      return this.o.copy.read(req.lba, req.blocks);
    });
  }

  /** check(), and this copy holds every change acknowledged at the epoch (in sync, trusted). */
  private servable(page: number, epoch: number): void {
    const route = this.check(page, epoch);
    if (!inSyncOf(route).includes(this.o.self)) throw new ConflictError(`peer ${this.o.self} is not an in-sync copy of page ${page} at epoch ${epoch}`);
    if (this.o.readRepair?.untrusted(this.o.volumeId, page)) throw new ConflictError(`peer ${this.o.self}'s copy of page ${page} may lack writes (it restarted): not a source for reads`);
  }

  /** Our route of the page, re-read when the sender knows a newer epoch or our route lacks its copies. */
  private async catchUp(page: number, epoch: number): Promise<void> {
    const route = this.o.table.route(page);
    if (epoch > route.version || (!route.copies && route.version > initialRouteVersion)) await this.o.refresh(page);
  }

  /** Invariant 2: the change's epoch is our epoch of the page, and this peer a copy other than the primary in it. */
  private check(page: number, epoch: number): Route {
    const { self, table } = this.o;
    const route = table.route(page);
    if (route.version > epoch) throw new PageMovedError(page, route);
    if (route.version < epoch) throw new PeersanError(`peer ${self} knows page ${page} at epoch ${route.version}, below the sender's ${epoch}`, 'PEERSAN_ERR_EPOCH_BEHIND', { kind: ErrorKind.busy });
    if (route.owner === self || !copiesOf(route).includes(self)) throw new InvalidArgumentError(`peer ${self} holds no secondary copy of page ${page} at epoch ${epoch}`);
    return route;
  }

  private async applyLocked(page: number, req: BlockRequest, opts: WriteOptions): Promise<void> {
    const before = this.o.tracker.beforeChange(this.o.volumeId, page);
    if (before) await before;
    // Checked again after the waits, and recorded recent in the same step, before it is applied.
    const route = this.check(page, req.routeVersion);
    if (req.seq) {
      const [firstGrain, lastGrain] = grainsOf(this.o.table, this.o.copy.grainBlocks, page, req.lba, req.blocks);
      this.o.recent.received(page, firstGrain, lastGrain, req.seq, req.ackedThrough ?? 0);
    }
    if (req.op === BlockOp.write) await this.o.copy.write(req.lba, req.data!, opts);
    else await this.o.copy.unmap(req.lba, req.blocks, opts);
    this.o.tracker.changed(this.o.volumeId, page, route, req.lba, req.blocks, []);
  }
}

/**
 * One round's answers: copies that applied the change join `applied`; `newer` when one knows a
 * newer epoch (we re-read the route and send again); the rest failed (an answer of an epoch not
 * above ours is as good as none), with why.
 */
function sortAnswers(targets: readonly string[], answers: readonly Delivery[], epoch: number, applied: Set<string>): { failed: string[]; reasons: string[]; newer: boolean } {
  const failed: string[] = [];
  const reasons: string[] = [];
  let newer = false;
  answers.forEach((a, i) => {
    if (a.kind === 'ok') applied.add(targets[i]);
    else if (a.kind === 'moved' && a.version > epoch) newer = true;
    else {
      failed.push(targets[i]);
      reasons.push(a.kind === 'failed' ? `${targets[i]}: ${a.reason}` : `${targets[i]}: MOVED at epoch ${a.version}, not above ${epoch}`);
    }
  });
  return { failed, reasons, newer };
}

/**
 * A forwarded change routed by an older route of the page than `route` (this primary's now) is
 * answered MOVED, unapplied: its sender may have run it again elsewhere (see the head comment).
 */
function notStale(page: number, route: Route, opts: WriteOptions): void {
  if (opts.routeVersion !== undefined && opts.routeVersion < route.version) throw new PageMovedError(page, route);
}

/** The first and last grain (indexes within the page) that [lba, lba + blocks) of `page` touches. */
function grainsOf(table: RouteTable, grainBlocks: number, page: number, lba: number, blocks: number): [number, number] {
  const first = page * table.pageBlocks;
  return [Math.floor((lba - first) / grainBlocks), Math.floor((lba + blocks - 1 - first) / grainBlocks)];
}

/** The byte offset of the first difference, or undefined when equal. */
function firstDifference(current: Buffer, compare: Buffer): number | undefined {
  if (current.equals(compare)) return undefined;
  let i = 0;
  while (current[i] === compare[i]) i++;
  return i;
}
