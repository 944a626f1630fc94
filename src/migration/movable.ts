// A peer's pages of one volume as the router and the page service see them: the local store,
// plus the pages this peer is moving away (DESIGN.md 4). Every peer's I/O for a page goes to
// its owner, so the owner S of a moving page is the one place that decides, piece by piece
// (pieces.ts), whether a request is served from S, forwarded to the destination D, or
// written to both. Host I/O holds a piece shared; the copier and every state change hold it
// exclusively, so a piece's state never changes under a request.
//
// Every request first checks that this peer still owns the pages it touches (or is moving
// them away): the one ownership check of the data path (src/server/data-path.ts says why one
// suffices). A request routed here by a stale route, or just before a move committed, gets
// PageMovedError (the page service answers MOVED, our own router re-routes) instead of
// reaching a page this peer has given away.

import { ErrorKind, PeersanError, RemoteFailureError } from '../errors';
import { BlockOp, decodeExtents, replyError, ReplyStatus, type BlockOpCode, type BlockReply } from '../routing/frame';
import { PageMovedError } from '../routing/moved';
import type { BlockSender } from '../routing/router';
import type { RouteTable } from '../routing/table';
import { BackendDecorator } from '../store/decorator';
import { SharedLock } from '../store/shared-lock';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';
import { homeOf, segmentsOf, transitReadsFromDest, type MoveCursor, type Segment } from './pieces';

export interface OutgoingMove {
  readonly page: number;
  readonly to: string;
  readonly pageLba: number;
  readonly pieceBlocks: number;
  readonly cursor: MoveCursor;
  readonly locks: SharedLock[];
  /** A dual write could not reach D: the piece in transit must be copied again before it is done. */
  transitDirty: boolean;
}

export interface MovableVolumeOptions {
  self: string;
  volumeId: string;
  table: RouteTable;
  /** The local store volume. */
  raw: BlockBackend;
  link(peerId: string): BlockSender;
}

type Part = { page: number; lba: number; blocks: number; offsetBlocks: number };

export class MovableVolume extends BackendDecorator {
  readonly raw: BlockBackend;
  /** Pages this peer is moving away, by page. */
  readonly moves = new Map<number, OutgoingMove>();
  private readonly o: MovableVolumeOptions;
  /** Requests in flight per page that bypass the move machinery (pages not moving when they started). */
  private readonly active = new Map<number, number>();
  private readonly drainWaiters = new Map<number, (() => void)[]>();

  constructor(opts: MovableVolumeOptions) {
    super(opts.raw);
    this.o = opts;
    this.raw = opts.raw;
  }

  // ---- the move machinery's side ------------------------------------------------------------

  /** Start routing the page's I/O through its pieces; resolves when earlier requests have finished. */
  async begin(move: OutgoingMove): Promise<void> {
    if (this.moves.has(move.page)) throw new PeersanError(`page ${move.page} is already moving`);
    this.moves.set(move.page, move);
    if ((this.active.get(move.page) ?? 0) > 0) await new Promise<void>((r) => this.waiters(move.page).push(r));
  }

  /** Stop: the page is served by its route again (this peer's store, or MOVED if it committed away). */
  end(page: number): void {
    this.moves.delete(page);
  }

  /**
   * Send a staging request to the destination of a move; non-ok answers throw with the
   * destination's kind (a destination that is down is unavailable, not a bug: the host hears
   * ABORTED COMMAND or BUSY through every hop, src/scsi/sense.ts).
   */
  async toDest(to: string, op: BlockOpCode, lba: number, blocks: number, fua: boolean, data?: Buffer, stamp?: number): Promise<BlockReply> {
    const reply = await this.o.link(to).send({ op, fua, staging: true, volumeId: this.o.volumeId, lba, blocks, routeVersion: 0, compareBytes: 0, stamp, data });
    if (reply.status === ReplyStatus.moved) {
      // D is not receiving the page (any more); its route is learned if newer than ours (the page
      // has another primary: the move hears it lost). Transient either way.
      this.o.table.learn(reply.detail, { owner: reply.owner, version: reply.version });
      throw new RemoteFailureError(to, ErrorKind.busy, `peer ${to} is not receiving page ${reply.detail} (it knows ${reply.owner} as its primary at epoch ${reply.version})`);
    }
    if (reply.status !== ReplyStatus.ok) throw replyError(to, reply);
    return reply;
  }

  // ---- BlockBackend ---------------------------------------------------------------------------

  read(lba: number, blocks: number): Promise<Buffer> {
    if (!this.touchesMove(lba, blocks)) return this.pass(lba, blocks, () => this.raw.read(lba, blocks));
    return this.readSplit(lba, blocks, false);
  }

  async write(lba: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    const blocks = data.length / this.blockBytes;
    if (!this.touchesMove(lba, blocks)) return this.pass(lba, blocks, () => this.raw.write(lba, data, opts));
    await this.eachPart(lba, blocks, (p) => this.writePart(p, data.subarray(p.offsetBlocks * this.blockBytes, (p.offsetBlocks + p.blocks) * this.blockBytes), opts, false));
  }

  async unmap(lba: number, blocks: number, opts: WriteOptions = {}): Promise<void> {
    if (!this.touchesMove(lba, blocks)) return this.pass(lba, blocks, () => this.raw.unmap(lba, blocks, opts));
    await this.eachPart(lba, blocks, (p) => this.unmapPart(p, opts, false));
  }

  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts: WriteOptions = {}): Promise<CompareAndWriteResult> {
    const blocks = data.length / this.blockBytes;
    if (!this.touchesMove(lba, blocks)) return this.pass(lba, blocks, () => this.raw.compareAndWrite(lba, compare, data, opts));
    // Every I/O to a moving page passes through its piece locks here, so holding the touched
    // pieces exclusively makes compare-then-write atomic. (Blocks of a second, non-moving page
    // in the same command are covered by that page's own store only: not atomic across both.)
    const locks: SharedLock[] = [];
    for (const p of this.partsOf(lba, blocks)) {
      const move = this.moves.get(p.page);
      if (move) for (const s of segmentsOf(move.pageLba, move.pieceBlocks, p.lba, p.blocks)) locks.push(move.locks[s.piece]);
    }
    return exclusively(locks, async () => {
      const current = await this.readSplit(lba, blocks, true);
      if (!current.equals(compare)) {
        let i = 0;
        while (current[i] === compare[i]) i++;
        return { ok: false, miscompareOffsetBytes: i };
      }
      await this.eachPart(lba, blocks, (p) => this.writePart(p, data.subarray(p.offsetBlocks * this.blockBytes, (p.offsetBlocks + p.blocks) * this.blockBytes), opts, true));
      return { ok: true };
    });
  }

  /** Durable here and on the destination of every page moving away (it holds their newest data). */
  async flush(): Promise<void> {
    const dests = new Set([...this.moves.values()].map((m) => m.to));
    await Promise.all([this.raw.flush(), ...[...dests].map((to) => this.toDest(to, BlockOp.flush, 0, 0, true))]);
  }

  async lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    const blocks = Math.min(blocksMax, this.blockCount - lba);
    if (blocks <= 0 || !this.touchesMove(lba, blocks)) return this.pass(lba, Math.max(blocks, 1), () => this.raw.lbaStatus(lba, blocksMax));
    const out: LbaExtent[][] = [];
    await this.eachPart(lba, blocks, async (p) => {
      const move = this.moves.get(p.page);
      if (!move) {
        out[p.offsetBlocks] = await this.counted(p.lba, p.blocks, () => this.raw.lbaStatus(p.lba, p.blocks));
        return;
      }
      await Promise.all(
        segmentsOf(move.pageLba, move.pieceBlocks, p.lba, p.blocks).map((s) =>
          this.onPiece(move, s, false, async (fromDest) => {
            out[p.offsetBlocks + s.offsetBlocks] = fromDest ? (decodeExtents((await this.toDest(move.to, BlockOp.lbaStatus, s.lba, s.blocks, false)).payload) ?? []) : await this.raw.lbaStatus(s.lba, s.blocks);
          }),
        ),
      );
    });
    return out.flat().filter((e) => e !== undefined);
  }

  // ---- dispatch -------------------------------------------------------------------------------

  private pageOf(lba: number): number {
    return this.o.table.pageOf(lba);
  }

  private touchesMove(lba: number, blocks: number): boolean {
    if (this.moves.size === 0) return false;
    for (let page = this.pageOf(lba), last = this.pageOf(lba + blocks - 1); page <= last; page++) if (this.moves.has(page)) return true;
    return false;
  }

  /**
   * The ownership check: why the page may not be served here, or undefined. Synchronous, so
   * the caller counts the request in (or takes its piece lock's turn) before a commit can run.
   */
  protected notOwned(page: number): PageMovedError | undefined {
    const route = this.o.table.route(page);
    return route.owner !== this.o.self && !this.moves.has(page) ? new PageMovedError(page, route) : undefined;
  }

  /** A request on pages not moving: checked, then straight to the store (counted). */
  private pass<T>(lba: number, blocks: number, op: () => Promise<T>): Promise<T> {
    for (let page = this.pageOf(lba), last = this.pageOf(lba + blocks - 1); page <= last; page++) {
      const moved = this.notOwned(page);
      if (moved) return Promise.reject(moved);
    }
    return this.counted(lba, blocks, op);
  }

  /** A part of a request eachPart() checked, on a page not moving: counted so a move starting now waits for it. */
  private async counted<T>(lba: number, blocks: number, op: () => Promise<T>): Promise<T> {
    const first = this.pageOf(lba);
    const last = this.pageOf(lba + blocks - 1);
    for (let page = first; page <= last; page++) this.active.set(page, (this.active.get(page) ?? 0) + 1);
    try {
      return await op();
    } finally {
      for (let page = first; page <= last; page++) {
        const n = (this.active.get(page) ?? 1) - 1;
        if (n > 0) this.active.set(page, n);
        else {
          this.active.delete(page);
          for (const w of this.drainWaiters.get(page)?.splice(0) ?? []) w();
          this.drainWaiters.delete(page);
        }
      }
    }
  }

  private waiters(page: number): (() => void)[] {
    let w = this.drainWaiters.get(page);
    if (!w) this.drainWaiters.set(page, (w = []));
    return w;
  }

  private partsOf(lba: number, blocks: number): Part[] {
    return this.o.table.split(lba, blocks);
  }

  /** Every page checked first (a request is refused whole, before any part runs), then `fn` on each part. */
  private async eachPart(lba: number, blocks: number, fn: (p: Part) => Promise<void>): Promise<void> {
    const parts = this.partsOf(lba, blocks);
    for (const p of parts) {
      const moved = this.notOwned(p.page);
      if (moved) throw moved;
    }
    await Promise.all(parts.map(fn));
  }

  /** Run `fn` for a segment of a moving page under its piece lock (unless the caller holds it). */
  private async onPiece<T>(move: OutgoingMove, s: Segment, locked: boolean, fn: (fromDest: boolean, home: ReturnType<typeof homeOf>) => Promise<T>): Promise<T> {
    const lock = move.locks[s.piece];
    if (!locked) {
      const wait = lock.acquireShared();
      if (wait) await wait;
    }
    try {
      const home = homeOf(move.cursor, s.piece);
      const fromDest = home === 'dest' || (home === 'transit' && transitReadsFromDest(move.cursor));
      return await fn(fromDest, home);
    } finally {
      if (!locked) lock.releaseShared();
    }
  }

  private async readSplit(lba: number, blocks: number, locked: boolean): Promise<Buffer> {
    const bs = this.blockBytes;
    const out = Buffer.allocUnsafe(blocks * bs);
    await this.eachPart(lba, blocks, async (p) => {
      const move = this.moves.get(p.page);
      if (!move) {
        (await this.counted(p.lba, p.blocks, () => this.raw.read(p.lba, p.blocks))).copy(out, p.offsetBlocks * bs);
        return;
      }
      await Promise.all(
        segmentsOf(move.pageLba, move.pieceBlocks, p.lba, p.blocks).map((s) =>
          this.onPiece(move, s, locked, async (fromDest) => {
            const data = fromDest ? (await this.toDest(move.to, BlockOp.read, s.lba, s.blocks, false)).payload : await this.raw.read(s.lba, s.blocks);
            if (data?.length !== s.blocks * bs) throw new PeersanError(`peer ${move.to} returned a short read during a move`);
            data.copy(out, (p.offsetBlocks + s.offsetBlocks) * bs);
          }),
        ),
      );
    });
    return out;
  }

  private async writePart(p: Part, data: Buffer, opts: WriteOptions, locked: boolean): Promise<void> {
    const move = this.moves.get(p.page);
    if (!move) return this.counted(p.lba, p.blocks, () => this.raw.write(p.lba, data, opts));
    const bs = this.blockBytes;
    await Promise.all(
      segmentsOf(move.pageLba, move.pieceBlocks, p.lba, p.blocks).map((s) =>
        this.onPiece(move, s, locked, (_fromDest, home) => {
          const part = data.subarray(s.offsetBlocks * bs, (s.offsetBlocks + s.blocks) * bs);
          return this.toHomes(move, home, () => this.raw.write(s.lba, part, opts), () => this.toDest(move.to, BlockOp.write, s.lba, s.blocks, opts.fua === true, part, opts.stamp));
        }),
      ),
    );
  }

  private async unmapPart(p: Part, opts: WriteOptions, locked: boolean): Promise<void> {
    const move = this.moves.get(p.page);
    if (!move) return this.counted(p.lba, p.blocks, () => this.raw.unmap(p.lba, p.blocks, opts));
    await Promise.all(
      segmentsOf(move.pageLba, move.pieceBlocks, p.lba, p.blocks).map((s) =>
        this.onPiece(move, s, locked, (_fromDest, home) =>
          this.toHomes(move, home, () => this.raw.unmap(s.lba, s.blocks, opts), () => this.toDest(move.to, BlockOp.unmap, s.lba, s.blocks, opts.fua === true, undefined, opts.stamp)),
        ),
      ),
    );
  }

  /**
   * A change to a segment: to S, to D, or to both while its piece is in transit. When moving
   * forward S holds the truth for the piece in transit, so a dual write D misses is still
   * acknowledged and the piece is marked for another copy; when copying back, D holds it.
   */
  protected async toHomes(move: OutgoingMove, home: ReturnType<typeof homeOf>, local: () => Promise<void>, remote: () => Promise<unknown>): Promise<void> {
    if (home === 'source') return local();
    if (home === 'dest') {
      await remote();
      return;
    }
    const forward = !transitReadsFromDest(move.cursor);
    await Promise.all([
      local(),
      remote().catch((err: unknown) => {
        if (!forward) throw err;
        move.transitDirty = true;
      }),
    ]);
  }
}

/** Hold every lock exclusively (in the given order) while `fn` runs. */
function exclusively<T>(locks: SharedLock[], fn: () => Promise<T>): Promise<T> {
  if (locks.length === 0) return fn();
  const [first, ...rest] = locks;
  return first.runExclusive(() => exclusively(rest, fn));
}
