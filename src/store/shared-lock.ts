/**
 * Shared vs exclusive access: the store's volumes (reads and writes share, unmap and
 * compare-and-write are exclusive) and a migrating page's pieces (host I/O shares, the
 * copier and state changes are exclusive). A waiting exclusive holder blocks new shared
 * ones, so it is never starved.
 */
export class SharedLock {
  private shared = 0;
  private exclusive: Promise<void> | undefined;
  private sharedDrained: (() => void) | undefined;

  /** Shared holders right now (tests, drain checks). */
  get holders(): number {
    return this.shared;
  }

  /** Synchronous when nothing exclusive runs or waits (the common case): no promise, no hop. */
  acquireShared(): Promise<void> | undefined {
    if (!this.exclusive) {
      this.shared++;
      return undefined;
    }
    return this.acquireSharedSlow();
  }

  private async acquireSharedSlow(): Promise<void> {
    while (this.exclusive) await this.exclusive;
    this.shared++;
  }

  releaseShared(): void {
    this.shared--;
    if (this.shared === 0) this.sharedDrained?.();
  }

  async runExclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.exclusive) await this.exclusive;
    let done!: () => void;
    this.exclusive = new Promise((r) => (done = r));
    try {
      if (this.shared > 0) await new Promise<void>((r) => (this.sharedDrained = r));
      this.sharedDrained = undefined;
      return await fn();
    } finally {
      this.exclusive = undefined;
      done();
    }
  }
}

