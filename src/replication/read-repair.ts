// Read repair (DESIGN.md 10; issue 17: "a read error on the primary is served from another
// in-sync copy, and the bad copy repaired"). A page's primary reads its own store; when that
// read fails with a media error, in this order:
//
//   1. the range is widened to whole grains (within the page): the repair rewrites whole grains,
//      since a partial write of a grain shared with a snapshot is copied on write from the very
//      blocks that fail here. Its range lock (range-lock.ts) is taken: no change of it runs here, so
//      none is on its way to the copies either: every in-sync copy holds exactly the changes
//      this primary acknowledged for them, and the repair below cannot overwrite a newer write;
//   2. the route is read again (a change failed meanwhile may have dropped copies, epoch + 1);
//      not ours any more: PageMovedError, the router follows it to the new primary. A change of
//      the blocks' grains not known acknowledged everywhere (one that failed here and is not
//      settled: the copies may differ on it; or one of a neighbour in the same grain) makes the
//      copies no source: the host gets the original error;
//   3. the other in-sync copies are asked in turn for the blocks (a replica read at the epoch):
//      a copy serves them from its own store only when it is an in-sync secondary at exactly
//      that epoch and its copy is trusted (not stepping out as suspect after a restart); it
//      refuses otherwise (ReplicaReceiver.read). None serves: the host gets the original error;
//   4. this peer's copy is repaired: each grain of the range whose local read still fails is
//      rewritten with the copy's blocks (not every grain: a thin page would gain mapped
//      zeros). A rewrite that fails (the disk cannot write there either) leaves this peer's
//      copy bad: the primary hands the page over (ReadRepairHooks.stepDown), and the host still
//      gets the copy's data;
//   5. the lock is released and the host answered (the blocks it asked for).
//
// Which errors count: a read the store itself failed (ErrorKind.storeRead: EIO, a bad sector,
// a checksum the store rejects, src/errors.ts). Not a fence or ownership error (PageMovedError),
// not a closing volume, not a timeout or a peer's failure of the whole request: those say
// nothing about this copy's blocks, and another copy would not answer them better.

import type { Logger } from 'pino';
import { within, type Env } from '../env/env';
import { errorKindOf, ErrorKind } from '../errors';
import { peerReadBytesMax, replicaAckMsMax } from '../limits';
import { BlockOp, ReplyStatus } from '../routing/frame';
import { PageMovedError } from '../routing/moved';
import type { BlockSender } from '../routing/router';
import { inSyncOf, type Route, type RouteTable } from '../routing/table';
import type { BlockBackend } from '../store/types';
import type { RangeLock } from './range-lock';

/** How a read that failed here ended (the counter's label). */
export type ReadRepairResult = 'repaired' | 'unrepaired' | 'unserved';

export interface ReadRepairDetail {
  /** The copy that served the blocks (absent: none could). */
  from?: string;
  /** The blocks read. */
  blocks: number;
  /** The blocks rewritten here (repaired). */
  rewrittenBlocks?: number;
  /** The local read's error. */
  reason: string;
}

/** What the peer around the replicated layer does with read repairs (composePeer wires them). */
export interface ReadRepairHooks {
  /** A read of `page` failed here with a media error, and how it ended. */
  done(volumeId: string, page: number, result: ReadRepairResult, detail: ReadRepairDetail): void;
  /**
   * This peer's copy of the page could not be rewritten: it must not stay the page's primary
   * (its copy is the truth for resync and reconcile). Hand the page over to an in-sync copy,
   * this copy resyncing whole. Best effort, in the background.
   */
  stepDown(volumeId: string, page: number, route: Route): Promise<void>;
  /** This peer's copy of the page may lack writes it acknowledged (stepping out as suspect after a restart): no source for a read. */
  untrusted(volumeId: string, page: number): boolean;
}

export interface ReadRepairOptions {
  self: string;
  volumeId: string;
  table: RouteTable;
  /** This peer's pages below the replicated layer (what the primary reads and repairs). */
  local: BlockBackend;
  /** The replicated layer's range locks (the same ones its changes take). */
  locks: RangeLock;
  /** False while a change of a grain of the blocks is not known acknowledged on every in-sync copy (recent.ts). */
  settled(page: number, lba: number, blocks: number): boolean;
  link(peerId: string): BlockSender;
  env: Env;
  log: Logger;
  hooks: ReadRepairHooks | undefined;
}

/** A media error of this peer's store: what another copy can answer instead. */
export function isMediaError(err: unknown): boolean {
  return errorKindOf(err, false) === ErrorKind.storeRead;
}

export class ReadRepair {
  constructor(private readonly o: ReadRepairOptions) {}

  /** [lba, lba + blocks) of `page`, this peer its primary: from the local store, else (a media error) as the head comment says. */
  read(page: number, lba: number, blocks: number): Promise<Buffer> {
    return this.o.local.read(lba, blocks).catch(async (err: unknown) => {
      if (!isMediaError(err)) throw err;
      const whole = this.wholeGrains(page, lba, blocks);
      const data = await this.o.locks.run(page, whole.lba, whole.blocks, () => this.recover(page, whole.lba, whole.blocks, err));
      const bs = this.o.local.blockBytes;
      return data.subarray((lba - whole.lba) * bs, (lba - whole.lba + blocks) * bs);
    });
  }

  /** [lba, lba + blocks) widened to whole grains within the page (as it is, if that is more than one replica read carries). */
  private wholeGrains(page: number, lba: number, blocks: number): { lba: number; blocks: number } {
    const { grainBlocks, blockBytes, blockCount } = this.o.local;
    const pageStart = page * this.o.table.pageBlocks;
    const start = Math.max(pageStart, Math.floor(lba / grainBlocks) * grainBlocks);
    const end = Math.min(pageStart + this.o.table.pageBlocks, blockCount, Math.ceil((lba + blocks) / grainBlocks) * grainBlocks);
    return (end - start) * blockBytes > peerReadBytesMax ? { lba, blocks } : { lba: start, blocks: end - start };
  }

  /** Steps 2 to 4; the caller holds the range. */
  private async recover(page: number, lba: number, blocks: number, cause: unknown): Promise<Buffer> {
    const route = this.o.table.route(page);
    if (route.owner !== this.o.self) throw new PageMovedError(page, route);
    const reason = cause instanceof Error ? cause.message : String(cause);
    const served = this.o.settled(page, lba, blocks) ? await this.fromCopies(route, lba, blocks) : undefined;
    if (!served) {
      this.o.hooks?.done(this.o.volumeId, page, 'unserved', { blocks, reason });
      throw cause;
    }
    const rewritten = await this.repair(lba, served.data);
    if (rewritten === false) void this.stepDown(page, route);
    const detail = { from: served.from, blocks, reason, ...(rewritten === false ? {} : { rewrittenBlocks: rewritten }) };
    this.o.hooks?.done(this.o.volumeId, page, rewritten === false ? 'unrepaired' : 'repaired', detail);
    this.o.log.warn({ volume: this.o.volumeId, page, lba, ...detail }, rewritten === false ? 'read error served from another copy; this copy could not be rewritten' : 'read error served from another copy; this copy repaired');
    return served.data;
  }

  /** The blocks from the first other in-sync copy that serves them at the route's epoch. */
  private async fromCopies(route: Route, lba: number, blocks: number): Promise<{ from: string; data: Buffer } | undefined> {
    const bytes = blocks * this.o.local.blockBytes;
    for (const peer of inSyncOf(route).filter((p) => p !== this.o.self)) {
      const data = await this.ask(peer, route.version, lba, blocks);
      if (data?.length === bytes) return { from: peer, data };
    }
    return undefined;
  }

  /** One copy's blocks, or undefined: it refused (not in sync at the epoch, its own read failed), failed, or did not answer in time. */
  private async ask(peer: string, epoch: number, lba: number, blocks: number): Promise<Buffer | undefined> {
    const req = { op: BlockOp.read, fua: false, replica: true, volumeId: this.o.volumeId, lba, blocks, routeVersion: epoch, compareBytes: 0 };
    try {
      const reply = await within(this.o.env.timers, this.o.link(peer).send(req), replicaAckMsMax);
      if (reply?.status === ReplyStatus.ok) return reply.payload;
      this.o.log.info({ volume: this.o.volumeId, lba, blocks, peer, status: reply?.status ?? 'no answer', kind: reply?.detail }, 'a copy did not serve a read this copy failed');
    } catch (err) {
      this.o.log.info({ volume: this.o.volumeId, lba, blocks, peer, reason: (err as Error).message }, 'a copy did not serve a read this copy failed');
    }
    return undefined;
  }

  /**
   * Rewrite each grain of the range that still fails to read here with the copy's blocks: the
   * blocks rewritten, or false when a rewrite failed for this copy's own reason (the rest is
   * left as it is). A transient refusal (the volume closing) is no reason to step down: the
   * grain stays bad, and the next read repairs it.
   */
  private async repair(lba: number, data: Buffer): Promise<number | false> {
    const { local } = this.o;
    const bs = local.blockBytes;
    const end = lba + data.length / bs;
    let rewritten = 0;
    for (let at = lba; at < end; ) {
      const next = Math.min(end, (Math.floor(at / local.grainBlocks) + 1) * local.grainBlocks);
      if (!(await this.readable(at, next - at))) {
        try {
          await local.write(at, data.subarray((at - lba) * bs, (next - lba) * bs));
        } catch (err) {
          this.o.log.warn({ volume: this.o.volumeId, lba: at, blocks: next - at, reason: (err as Error).message }, 'could not rewrite blocks this copy failed to read');
          if (errorKindOf(err, true) === ErrorKind.busy) return rewritten;
          return false;
        }
        rewritten += next - at;
      }
      at = next;
    }
    return rewritten;
  }

  /** False when the blocks still fail to read here with a media error (another error says nothing of them: left as they are). */
  private readable(lba: number, blocks: number): Promise<boolean> {
    return this.o.local.read(lba, blocks).then(
      () => true,
      (err: unknown) => !isMediaError(err),
    );
  }

  private async stepDown(page: number, route: Route): Promise<void> {
    try {
      await this.o.hooks?.stepDown(this.o.volumeId, page, route);
    } catch (err) {
      this.o.log.warn({ volume: this.o.volumeId, page, reason: (err as Error).message }, 'could not hand over a page whose copy here cannot be rewritten');
    }
  }
}
