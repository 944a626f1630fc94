// The barrier of a barrier-mode snapshot (DESIGN.md 6) at one peer, for one volume: the
// host I/O that enters this peer for the volume passes a gate. PREPARE closes it: new
// requests wait, and close() resolves once the requests already inside (local or forwarded
// to their owners) have finished. TAKE freezes the layers and opens it again. The gate
// opens by itself after `holdMsMax`, so a coordinator that vanishes never stalls hosts.
//
// The gate is also where a host write gets its hybrid-clock stamp (timestamp-mode snapshots,
// hlc.ts): the stamp travels with the write to its owner, and the gate knows which stamps are
// still in flight, so a timestamp snapshot at T can wait for the writes stamped before T
// without holding anything.

import { PeersanError } from '../errors';
import type { Env, TimerHandle } from '../env/env';
import { BackendDecorator, whenSettled } from '../store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';
import type { HybridClock } from './hlc';

export class GateClosedTooLongError extends PeersanError {
  constructor(ms: number) {
    super(`requests did not drain within ${ms} ms`, 'PEERSAN_ERR_SNAPSHOT_DRAIN');
  }
}

/**
 * Hybrid-clock stamps of changes in flight (not answered yet), and waits for those stamped
 * before a cut T (timestamp snapshots). A sorted array rather than a Set: a Set that every
 * write adds to and deletes from keeps replacing its hash table, and V8 then carried each
 * write's objects into the old generation (forwarded 4 KiB writes: the portal peer promoted
 * 21 MB and ran 5 mark-compacts in a 60,000-write run; 6 MB and 3 with this).
 */
export class StampsInFlight {
  /** Ascending (the clock only goes forward, so a new stamp is nearly always appended). */
  private readonly stamps: number[] = [];
  private waiters: { below: number; resolve: () => void }[] = [];

  /** Resolves once nothing stamped before `t` is in flight (new ones are stamped later). */
  before(t: number): Promise<void> {
    if (!this.anyBelow(t)) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ below: t, resolve }));
  }

  /** Run `fn`, counted in flight under `stamp` until it settles (no stamp: not counted). */
  during<T>(stamp: number | undefined, fn: () => Promise<T>): Promise<T> {
    if (stamp === undefined) return fn();
    insertSorted(this.stamps, stamp);
    return whenSettled(fn, () => {
      removeSorted(this.stamps, stamp);
      if (this.waiters.length > 0) this.waiters = this.waiters.filter((w) => (this.anyBelow(w.below) ? true : (w.resolve(), false)));
    });
  }

  private anyBelow(t: number): boolean {
    return this.stamps.length > 0 && this.stamps[0] < t;
  }
}

export class VolumeGate extends BackendDecorator {
  private inFlight = 0;
  private closedBy: string | undefined;
  private reopened: Promise<void> | undefined;
  private open!: () => void;
  private drained: (() => void) | undefined;
  private autoOpen: TimerHandle | undefined;
  private closedAtMs = 0;
  /** Milliseconds hosts were held, summed over every close (metrics). */
  heldMsTotal = 0;

  /** Stamps of this peer's host writes of the volume not yet answered. */
  private readonly stamps = new StampsInFlight();

  constructor(inner: BlockBackend, private readonly env: Env, private readonly clock?: HybridClock) {
    super(inner);
  }

  /** Resolves once no host write stamped before `t` is in flight here (new ones are stamped later). */
  writesBefore(t: number): Promise<void> {
    return this.stamps.before(t);
  }

  /** A host write: stamped, and counted until it is answered. */
  private stamped<T>(opts: WriteOptions | undefined, run: (opts: WriteOptions | undefined) => Promise<T>): Promise<T> {
    if (!this.clock) return this.pass(() => run(opts));
    return this.pass(() => {
      const stamp = this.clock!.now();
      // Every WriteOptions field, written out: a spread copy plus a field ({ ...opts, stamp })
      // made V8 promote each copy to the old generation (a write loop through the gate ran
      // 3.6 times slower, with a mark-compact every 120 ms; see PeerLink's codec in link.ts).
      return this.stamps.during(stamp, () => run({ fua: opts?.fua, stamp }));
    });
  }

  get isClosed(): boolean {
    return this.closedBy !== undefined;
  }

  /**
   * Hold new requests; resolves when the requests inside have finished (rejects with
   * GateClosedTooLongError, gate open again, if they do not within `drainMsMax`). The gate
   * reopens by itself `holdMsMax` after closing.
   */
  async close(owner: string, drainMsMax: number, holdMsMax: number): Promise<void> {
    if (this.closedBy !== undefined) throw new PeersanError(`the volume is already held for snapshot ${this.closedBy}`, 'PEERSAN_ERR_CONFLICT');
    this.closedBy = owner;
    this.closedAtMs = this.env.clock.monotonicMs();
    this.reopened = new Promise((r) => (this.open = r));
    const { timers } = this.env;
    this.autoOpen = timers.setTimeout(() => this.release(owner), holdMsMax).unref();
    if (this.inFlight === 0) return;
    const drained = new Promise<void>((r) => (this.drained = r));
    let timer: TimerHandle | undefined;
    const late = new Promise<'late'>((r) => (timer = timers.setTimeout(() => r('late'), drainMsMax)));
    const outcome = await Promise.race([drained, late]);
    timers.clearTimeout(timer);
    this.drained = undefined;
    if (outcome === 'late') {
      this.release(owner);
      throw new GateClosedTooLongError(drainMsMax);
    }
  }

  /** Let held requests go (TAKE done, or abort). Returns how long hosts were held, in ms. */
  release(owner: string): number {
    if (this.closedBy !== owner) return 0;
    this.env.timers.clearTimeout(this.autoOpen);
    const held = this.env.clock.monotonicMs() - this.closedAtMs;
    this.heldMsTotal += held;
    this.closedBy = undefined;
    this.open();
    return held;
  }

  /** No promise of its own while the gate is open (the common case): one count up, one down. */
  private pass<T>(run: () => Promise<T>): Promise<T> {
    if (this.closedBy !== undefined) return this.passLater(run);
    this.inFlight++;
    return whenSettled(run, () => this.left());
  }

  private async passLater<T>(run: () => Promise<T>): Promise<T> {
    while (this.closedBy !== undefined) await this.reopened;
    return this.pass(run);
  }

  private left(): void {
    this.inFlight--;
    if (this.inFlight === 0) this.drained?.();
  }

  read(lba: number, blocks: number): Promise<Buffer> {
    return this.pass(() => this.inner.read(lba, blocks));
  }
  write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    return this.stamped(opts, (o) => this.inner.write(lba, data, o));
  }
  unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void> {
    return this.stamped(opts, (o) => this.inner.unmap(lba, blocks, o));
  }
  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult> {
    return this.stamped(opts, (o) => this.inner.compareAndWrite(lba, compare, data, o));
  }
  flush(): Promise<void> {
    return this.pass(() => this.inner.flush());
  }
  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.pass(() => this.inner.lbaStatus(lba, blocksMax));
  }
}

/** The first index of `xs` (ascending) whose value is not below `x`. */
function lowerBound(xs: readonly number[], x: number): number {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (xs[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export function insertSorted(xs: number[], x: number): void {
  if (xs.length === 0 || xs[xs.length - 1] <= x) xs.push(x);
  else xs.splice(lowerBound(xs, x), 0, x);
}

/** Remove one `x` from `xs` (ascending), if it is there. */
export function removeSorted(xs: number[], x: number): void {
  const i = lowerBound(xs, x);
  if (i < xs.length && xs[i] === x) xs.splice(i, 1);
}
