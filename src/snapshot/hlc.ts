// A hybrid logical clock for timestamp-mode snapshots (DESIGN.md 6).
//
// A stamp is one number: microseconds since the epoch, pushed forward by one for every stamp
// this clock hands out within the same microsecond and by every stamp it receives that is
// ahead of it. So stamps from one clock strictly increase, and a stamp issued after receiving
// another is larger than it (message causality). Numbers stay exact: microseconds since 1970
// are below 2^53 for another 250 years.
//
// Clock assumption (what makes a host's own causality hold): a host that sees write A
// acknowledged and then issues write B through another peer gives B a larger stamp only if
// the two peers' physical clocks differ by less than the time between A's stamp and B's
// arrival (at least one network round trip to the host). Peers on one machine share a clock;
// peers on several machines need NTP (or PTP) keeping them within that bound, a few hundred
// microseconds on a LAN. A write acknowledged before the snapshot command started is in the
// snapshot when the coordinator's clock is within the same bound.

import type { Clock } from '../env/env';

export class HybridClock {
  private last = 0;

  /** The physical part is the environment's wall clock in microseconds (`Clock.nowUs`). */
  constructor(private readonly clock: Clock) {}

  /** A fresh stamp, larger than every stamp this clock issued or received. */
  now(): number {
    const pt = this.clock.nowUs();
    this.last = pt > this.last ? pt : this.last + 1;
    return this.last;
  }

  /** Take in a stamp from another peer (a forwarded request, a snapshot message). */
  observe(stamp: number): void {
    if (stamp > this.last) this.last = stamp;
  }

  /** The latest stamp issued or received, without issuing one. */
  peek(): number {
    return Math.max(this.last, this.clock.nowUs());
  }
}
