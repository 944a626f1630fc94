// The group-wide switch for automatic balancing, kept in the catalog (key settings/balancer)
// so every peer sees `peersan rebalance --auto on|off` through its watch. Absent = on.
// (Per volume: VolumeRecord.autoBalance.)

import type { MetaStore } from '../cluster/metastore';
import { ConflictError } from '../errors';

const key = 'settings/balancer';

interface Settings {
  auto: boolean;
}

export class BalancerSwitch {
  private readonly meta: MetaStore;
  private settings: Settings = { auto: true };
  private version = 0;
  private unwatch: (() => void) | undefined;

  private constructor(meta: MetaStore) {
    this.meta = meta;
  }

  static async open(meta: MetaStore): Promise<BalancerSwitch> {
    const s = new BalancerSwitch(meta);
    // Watch first, then read: a change in between is seen twice, never missed.
    s.unwatch = await meta.watch(key, (ev) => {
      if (ev.type === 'delete' && ev.key === key) s.apply(undefined, 0);
      else if (ev.type === 'put' && ev.record.key === key) s.apply(ev.record.value, ev.record.version);
    });
    const r = await meta.get(key);
    if (r) s.apply(r.value, r.version);
    return s;
  }

  private apply(value: Buffer | undefined, version: number): void {
    if (value && version < this.version) return;
    this.version = version;
    this.settings = value ? { auto: (JSON.parse(value.toString()) as Partial<Settings>).auto !== false } : { auto: true };
  }

  get auto(): boolean {
    return this.settings.auto;
  }

  /** Set the switch (last writer wins: re-read and retry on a concurrent change). */
  async setAuto(auto: boolean): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const current = await this.meta.get(key);
      try {
        const r = await this.meta.put(key, Buffer.from(JSON.stringify({ auto })), current?.version ?? 0);
        this.apply(r.value, r.version);
        return;
      } catch (err) {
        if (!(err instanceof ConflictError) || attempt >= 4) throw err;
      }
    }
  }

  close(): void {
    this.unwatch?.();
  }
}
