// The bytes of command data one peer holds for its hosts, shared by every session of the
// portal: write buffers being gathered, and read data until it has left for the socket. A
// session takes bytes for a command before it runs it and gives them back when they are gone;
// one that cannot take them waits in line, and is woken in the order it started waiting when
// bytes come back (a command needing many bytes is not passed over forever by small ones).

export interface BudgetWaiter {
  /** Bytes were released: try again (synchronously; may take, or wait in line again). */
  wake(): void;
}

export class ByteBudget {
  readonly bytesMax: number;
  private used = 0;
  /** The line, in the order its waiters came (a Set keeps insertion order; leaving is O(1) on the hot path). */
  private readonly waiters = new Set<BudgetWaiter>();

  constructor(bytesMax: number) {
    this.bytesMax = bytesMax;
  }

  get usedBytes(): number {
    return this.used;
  }

  /**
   * Take `bytes` if they fit and no one waits ahead of `waiter`; otherwise `waiter` waits in
   * line (once) and is woken when bytes are released.
   */
  tryTake(bytes: number, waiter: BudgetWaiter): boolean {
    const head = this.head();
    if ((head !== undefined && head !== waiter) || this.used + bytes > this.bytesMax) {
      this.waiters.add(waiter);
      return false;
    }
    this.waiters.delete(waiter);
    this.used += bytes;
    return true;
  }

  release(bytes: number): void {
    this.used -= bytes;
    if (this.used < 0) throw new Error(`ByteBudget: released more than taken (${this.used})`);
    this.wakeWaiters();
  }

  /** A waiter that no longer wants anything (its session ended, or it has nothing left to ask). */
  leave(waiter: BudgetWaiter): void {
    const wasHead = this.head() === waiter;
    this.waiters.delete(waiter);
    if (wasHead) this.wakeWaiters();
  }

  private head(): BudgetWaiter | undefined {
    return this.waiters.size === 0 ? undefined : this.waiters.values().next().value;
  }

  /** Wake waiters in order while the first one is served (it leaves the line by taking). */
  private wakeWaiters(): void {
    for (let head = this.head(); head; head = this.head()) {
      head.wake();
      if (this.head() === head) return;
    }
  }
}
