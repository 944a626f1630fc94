// Reservations of a volume shared by every peer of the group (issue: "persistent reservations
// must hold across paths through different peers"). The state is one catalog record per
// volume. A change reads the record, applies the SCSI logic to a fresh copy, and writes it
// back by compare-and-swap (retrying on a conflict); THEN every other peer is told the new
// version and the unit attentions it raised, and the command completes only after they
// answered (or timed out, for a peer that is down and will read the catalog when it starts).
// So once a PERSISTENT RESERVE OUT has completed on one path, every path sees it.

import { Mutex } from 'async-mutex';
import { ConflictError } from '../errors';
import { Reservations, type ReservationKeeper, type ReservationState, type UnitAttentionSink } from '../scsi/reservations';
import { reservationPrefix } from './catalog';
import type { MetaStore } from './metastore';

export type UnitAttentionList = [nexusKey: string, asc: number][];

export interface ReservationNotice {
  volumeId: string;
  version: number;
  unitAttentions: UnitAttentionList;
}

const empty: ReservationState = { generation: 0, registrations: [], type: 0 };
const changeAttemptsMax = 16;

export class SharedReservationKeeper implements ReservationKeeper {
  readonly current = new Reservations(() => undefined);
  private sink: UnitAttentionSink = () => undefined;
  private version = 0;
  private readonly mutex = new Mutex();
  private readonly key: string;

  constructor(
    private readonly opts: {
      volumeId: string;
      meta: MetaStore;
      /** Tell every other peer; resolves when they answered or timed out. */
      notify: (notice: ReservationNotice) => Promise<void>;
    },
  ) {
    this.key = reservationPrefix + opts.volumeId;
  }

  attach(sink: UnitAttentionSink): void {
    this.sink = sink;
  }

  /** Read the catalog's state (at start, and when told of a newer version). */
  async reload(): Promise<void> {
    const r = await this.opts.meta.get(this.key);
    this.take(r ? (JSON.parse(r.value.toString()) as ReservationState) : empty, r?.version ?? 0);
  }

  change<T>(fn: (r: Reservations) => T): Promise<T> {
    return this.mutex.runExclusive(async () => {
      for (let attempt = 0; ; attempt++) {
        const record = await this.opts.meta.get(this.key);
        const before = record ? (JSON.parse(record.value.toString()) as ReservationState) : empty;
        const raised: UnitAttentionList = [];
        const copy = new Reservations((k, asc) => raised.push([k, asc]));
        copy.load(before);
        const value = fn(copy);
        const after = copy.state();
        if (JSON.stringify(after) === JSON.stringify(before)) {
          this.take(before, record?.version ?? 0);
          return value;
        }
        try {
          const written = await this.opts.meta.put(this.key, Buffer.from(JSON.stringify(after)), record?.version ?? 0);
          this.take(after, written.version);
          for (const [k, asc] of raised) this.sink(k, asc);
          await this.opts.notify({ volumeId: this.opts.volumeId, version: written.version, unitAttentions: raised });
          return value;
        } catch (err) {
          if (!(err instanceof ConflictError) || attempt >= changeAttemptsMax) throw err;
        }
      }
    });
  }

  async announce(unitAttentions: UnitAttentionList): Promise<void> {
    for (const [k, asc] of unitAttentions) this.sink(k, asc);
    await this.opts.notify({ volumeId: this.opts.volumeId, version: this.version, unitAttentions });
  }

  /** Another peer changed the state: catch up, then deliver its unit attentions to our nexuses. */
  async noticed(notice: ReservationNotice): Promise<void> {
    if (notice.version > this.version) await this.reload();
    for (const [k, asc] of notice.unitAttentions) this.sink(k, asc);
  }

  /** The catalog watch saw a change (covers peers that missed a notice). */
  watched(state: ReservationState | undefined, version: number): void {
    if (state === undefined) this.version = 0;
    this.take(state ?? empty, version);
  }

  private take(state: ReservationState, version: number): void {
    if (version < this.version) return;
    this.current.load(state);
    this.version = version;
  }
}
