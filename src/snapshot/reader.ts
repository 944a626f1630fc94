// A snapshot as a read-only block device (the snapshot target's backend): each range is read
// from the peer that holds that page's layer of the snapshot (the owner at the cut, or, for
// a page that was moving, the source or the destination by piece; records.ts), locally from
// this peer's store or forwarded with the snapshot's layer number in the frame.

import { ErrorKind, errorKindOf, PeersanError } from '../errors';
import { BlockOp, decodeExtents, replyError, ReplyStatus } from '../routing/frame';
import type { BlockSender } from '../routing/router';
import type { RouteTable } from '../routing/table';
import { ReadOnlyBackend } from '../store/decorator';
import type { BlockBackend, LbaExtent } from '../store/types';
import { routesAtCut, snapshotHolders, type MovingAtCut, type SnapshotRecord } from './records';

export interface SnapshotReaderOptions {
  self: string;
  record: SnapshotRecord;
  grainBlocks: number;
  /** This peer's layer of the snapshot (undefined: this peer holds none of it). */
  local(): BlockBackend | undefined;
  link(peerId: string): BlockSender;
}

export class SnapshotReader extends ReadOnlyBackend {
  readonly blockBytes: number;
  readonly blockCount: number;
  readonly grainBlocks: number;
  private readonly o: SnapshotReaderOptions;
  private readonly routes: RouteTable;
  private readonly moving: Map<number, MovingAtCut>;
  protected readonly what: string;

  constructor(opts: SnapshotReaderOptions) {
    super();
    this.o = opts;
    this.what = `snapshot ${opts.record.volume}.${opts.record.name}`;
    this.blockBytes = opts.record.blockBytes;
    this.blockCount = opts.record.sizeBytes / opts.record.blockBytes;
    this.grainBlocks = opts.grainBlocks;
    this.routes = routesAtCut(opts.record);
    this.moving = new Map(opts.record.moving.map((m) => [m.page, m]));
  }

  /** [lba, blocks, holders] runs of the range, each within one page and one set of holders. */
  private runs(lba: number, blocks: number): { lba: number; blocks: number; holders: string[]; offset: number }[] {
    const out = [];
    for (let at = lba; at < lba + blocks; ) {
      const page = Math.floor(at / this.o.record.pageBlocks);
      const { holders, blocks: n } = snapshotHolders(this.o.record, page, at, this.routes, this.moving);
      const take = Math.min(n, lba + blocks - at);
      out.push({ lba: at, blocks: take, holders, offset: at - lba });
      at += take;
    }
    return out;
  }

  /** From the first holder that answers: one that is unreachable (or lost its layer) gives way to the next copy. */
  private async fetchAny(holders: string[], op: typeof BlockOp.read | typeof BlockOp.lbaStatus, lba: number, blocks: number): Promise<Buffer | LbaExtent[]> {
    for (let i = 0; ; i++) {
      try {
        return await this.fetch(holders[i], op, lba, blocks);
      } catch (err) {
        const kind = errorKindOf(err, false);
        if (i + 1 >= holders.length || (kind !== ErrorKind.unavailable && kind !== ErrorKind.timedOut)) throw err;
      }
    }
  }

  private async fetch(owner: string, op: typeof BlockOp.read | typeof BlockOp.lbaStatus, lba: number, blocks: number): Promise<Buffer | LbaExtent[]> {
    if (owner === this.o.self) {
      const local = this.o.local();
      if (!local) throw new PeersanError(`this peer holds no layer of snapshot ${this.o.record.name}`);
      return op === BlockOp.read ? local.read(lba, blocks) : local.lbaStatus(lba, blocks);
    }
    const reply = await this.o.link(owner).send({ op, fua: false, volumeId: this.o.record.volumeId, lba, blocks, routeVersion: 0, compareBytes: 0, layer: this.o.record.seq });
    if (reply.status !== ReplyStatus.ok) throw replyError(owner, reply);
    if (op === BlockOp.lbaStatus) return decodeExtents(reply.payload) ?? [];
    return reply.payload ?? Buffer.alloc(0);
  }

  async read(lba: number, blocks: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(blocks * this.blockBytes);
    await Promise.all(
      this.runs(lba, blocks).map(async (r) => {
        const data = (await this.fetchAny(r.holders, BlockOp.read, r.lba, r.blocks)) as Buffer;
        if (data.length !== r.blocks * this.blockBytes) throw new PeersanError(`a peer returned a short read of snapshot ${this.o.record.name}`);
        data.copy(out, r.offset * this.blockBytes);
      }),
    );
    return out;
  }

  /** The first run's extents (SBC lets GET LBA STATUS answer a prefix). */
  async lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    const [first] = this.runs(lba, Math.max(1, Math.min(blocksMax, this.blockCount - lba)));
    return (await this.fetchAny(first.holders, BlockOp.lbaStatus, first.lba, first.blocks)) as LbaExtent[];
  }
}
