// Block-range locks per page (DESIGN.md 10, invariant 3 of src/replication): a page's primary
// holds the range of a change from before it applies the change locally until every copy has
// answered, so a second change of overlapping blocks is applied on every copy after the first,
// in the primary's order. A copy holds the range while it applies a replica change, so a newer
// epoch's reconcile write of the same blocks lands after it. Resync and reconcile take ranges
// the same way (ReplicaPort.exclusive).
//
// Fair by arrival: a request waits for every earlier request on the page whose range overlaps
// its own, and for nothing else, so a request is never overtaken by a later overlapping one and
// waits form no cycle (each waits only for earlier ones). Disjoint ranges never wait.

import { whenSettled } from '../store/decorator';

interface Holder {
  lba: number;
  end: number;
  /** Resolves when the holder releases. */
  released: Promise<void>;
}

export class RangeLock {
  /** page → holders and waiters, in arrival order; a page with none has no entry. */
  private readonly pages = new Map<number, Holder[]>();

  /** Holders and waiters on the page right now (tests). */
  queued(page: number): number {
    return this.pages.get(page)?.length ?? 0;
  }

  /**
   * Run `fn` while this request holds [lba, lba + blocks) of `page` alone. `fn` is called in the
   * caller's own step when nothing earlier overlaps (the common case: no promise hop).
   */
  run<T>(page: number, lba: number, blocks: number, fn: () => Promise<T>): Promise<T> {
    if (blocks <= 0) throw new Error('assertion failed: a locked range has blocks');
    const queue = this.queueOf(page);
    const end = lba + blocks;
    const earlier = queue.filter((h) => h.lba < end && lba < h.end).map((h) => h.released);
    let release!: () => void;
    const holder: Holder = { lba, end, released: new Promise<void>((r) => (release = r)) };
    queue.push(holder);
    const leave = (): void => {
      queue.splice(queue.indexOf(holder), 1);
      if (queue.length === 0) this.pages.delete(page);
      release();
    };
    if (earlier.length === 0) return whenSettled(fn, leave);
    return whenSettled(() => Promise.all(earlier).then(fn), leave);
  }

  private queueOf(page: number): Holder[] {
    let q = this.pages.get(page);
    if (!q) this.pages.set(page, (q = []));
    return q;
  }
}
