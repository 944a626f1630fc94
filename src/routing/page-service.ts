// The owner's side of forwarding: answers block frames that other peers send on their data
// streams (data-stream.ts) out of the volume's served path (src/server/data-path.ts). It decodes and bounds requests; it does not check
// ownership: the served store does, once (src/migration/movable.ts), and a page this peer does
// not own comes back as PageMovedError, answered MOVED with the route we know, which the sender
// follows. A sender that knows a newer route version than we do makes us re-read the route
// from the catalog first (our watch may lag), so that check decides by it. The data path
// never waits on the catalog otherwise. A replica frame (a page's primary's change to this
// peer's copy) goes to the volume's replicated layer instead, which checks the epoch in its
// place (src/replication/replicated.ts); an older epoch is answered MOVED the same way. So does
// a replica read (a primary whose store failed a read, asking an in-sync copy for the blocks).
//
// The sender may be buggy or hostile. frame.ts checks what a frame means alone; here every
// request is checked against the volume (range, blocks × block size within the bounds of
// src/limits.ts) BEFORE the store is asked, so that no request can make a reply too big for
// a frame. A request that fails, in the checks or in the store, is answered with a failed
// reply carrying the error's kind (src/errors.ts); it never takes the stream or the process. A
// frame that cannot be decoded closes its stream (that one connection) only.

import type { Logger } from 'pino';
import { errorKindOf, ErrorKind } from '../errors';
import { LogLimiter } from '../log';
import { lbaStatusPagesMax, peerReadBytesMax, peerRequestsInFlightMax, peerStreamBytesInFlightMax, peerStreamRepliesQueuedBytesMax, peerUnmapBlocksMax } from '../limits';
import type { HybridClock } from '../snapshot/hlc';
import type { BlockBackend, WriteOptions } from '../store/types';
import { FrameBatcher, writeChunks, type FrameCodec } from './batch';
import type { DataStream } from './data-stream';
import { PageMovedError } from './moved';
import { BlockOp, decodeRequest, encodeExtents, encodeReplyInto, failure, replyFrameBytes, ReplyStatus, type BlockOpCode, type BlockReply, type BlockRequest } from './frame';
import { initialRouteVersion, type Route, type RouteTable } from './table';

export interface ServedVolume {
  table: RouteTable;
  /** This peer's pages of the volume, moves included (src/migration/movable.ts); PageMovedError for a page it does not own. */
  store: BlockBackend;
  /** The local store itself: what a move's staging traffic reads and writes. */
  raw: BlockBackend;
  /**
   * A page's primary's changes to this peer's copy, and its reads of a range its own store
   * failed (src/replication/replicated.ts): PageMovedError for an older epoch.
   */
  replica: { receive(req: BlockRequest, opts: WriteOptions): Promise<void>; read(req: BlockRequest): Promise<Buffer> };
  /** True while this peer is the destination of a move of the page (or owns it). */
  receiving(page: number): boolean;
  /** This peer's layer of the volume's snapshot `seq` (read-only), if it holds one. */
  snapshot(seq: number): BlockBackend | undefined;
  /** Re-read the page's route from the catalog into `table` (what `store` checks ownership by). */
  refresh(page: number): Promise<Route>;
}

export interface PageServiceOptions {
  self: string;
  volume(volumeId: string): ServedVolume | undefined;
  /** This peer's hybrid clock: forwarded writes' stamps push it forward. */
  clock?: HybridClock;
  log: Logger;
  /**
   * This start's token (PageStore.nextStartToken; 0: none), answered in the ok replies to staging
   * and replica requests: a move's source sees that this peer restarted between two chunks of a
   * piece (move-machine.ts), a resync between two sends of a run (resync.ts sendRun).
   */
  startToken?: number;
}

const replyCodec: FrameCodec<BlockReply> = { frameBytes: replyFrameBytes, data: (r) => r.payload, encodeInto: encodeReplyInto };

/** Ops that change blocks: a system error in them is a write failure (errors.ts errorKindOf). */
function changes(op: BlockOpCode): boolean {
  return op === BlockOp.write || op === BlockOp.unmap || op === BlockOp.compareAndWrite || op === BlockOp.flush;
}

export class PageService {
  private readonly o: PageServiceOptions;
  /** Open streams: each ends once its requests in flight are answered (at shutdown); resolves when closed. */
  private readonly streams = new Map<() => void, Promise<void>>();
  /** Peers can repeat bad frames and failing requests at will: one line per kind per window. */
  private readonly logLimiter = new LogLimiter();

  /** This start's token (PageServiceOptions.startToken). */
  private readonly startToken: number;

  constructor(opts: PageServiceOptions) {
    this.o = opts;
    this.startToken = opts.startToken ?? 0;
  }

  handle(req: BlockRequest, v = this.o.volume(req.volumeId)): Promise<BlockReply> {
    // The common case, a host request by routes no newer than ours, goes straight to the
    // store (which checks ownership): no catalog look-up, no extra promise.
    try {
      if (!v || req.op === BlockOp.flush) return this.handleSlowly(req, v, undefined);
      const refused = this.refusal(v, req);
      if (!req.layer && !req.staging && !req.replica && refused === undefined && !this.senderAhead(v, req)) return this.serve(req, v.store);
      return this.handleSlowly(req, v, refused);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * Why a request (not a flush) cannot be served on this volume, or undefined. Checked before
   * anything else looks at its range: a peer's blocks count is any u32.
   */
  private refusal(v: ServedVolume, req: BlockRequest): string | undefined {
    const { blockCount, blockBytes } = v.store;
    // lba is a safe integer (frame.ts) and blocks < 2^32, so the sum is exact.
    if (req.blocks === 0 || req.lba + req.blocks > blockCount) return `range ${req.lba}+${req.blocks} outside the volume of ${blockCount} blocks`;
    switch (req.op) {
      case BlockOp.read:
        return req.blocks * blockBytes > peerReadBytesMax ? `a read of ${req.blocks} blocks is more than ${peerReadBytesMax} bytes` : undefined;
      case BlockOp.write:
        return req.data?.length !== req.blocks * blockBytes ? 'write data length does not match blocks' : undefined;
      case BlockOp.compareAndWrite:
        return req.compareBytes !== req.blocks * blockBytes ? 'compare and write lengths do not match blocks' : undefined;
      case BlockOp.unmap:
        return req.blocks > peerUnmapBlocksMax ? `an unmap of ${req.blocks} blocks is more than ${peerUnmapBlocksMax}` : undefined;
      case BlockOp.lbaStatus:
        return req.blocks > lbaStatusPagesMax * v.table.pageBlocks ? `an LBA status of ${req.blocks} blocks is more than ${lbaStatusPagesMax} pages` : undefined;
      default:
        return `op ${req.op} has no range`;
    }
  }

  /** True when the sender routed by a newer version of a touched page than our table holds. */
  private senderAhead(v: ServedVolume, req: BlockRequest): boolean {
    // Every route is at least at the initial version: pages that never moved need no look.
    if (req.routeVersion <= initialRouteVersion) return false;
    for (let page = v.table.pageOf(req.lba), last = v.table.pageOf(req.lba + req.blocks - 1); page <= last; page++) {
      if (req.routeVersion > v.table.route(page).version) return true;
    }
    return false;
  }

  /** Run on the store; a page this peer does not own (the store's check, src/migration/movable.ts) is answered MOVED. */
  private serve(req: BlockRequest, store: BlockBackend): Promise<BlockReply> {
    return this.movedAnswered(req, this.run(req, store));
  }

  /** `answer`, or MOVED with the route PageMovedError carries. */
  private movedAnswered(req: BlockRequest, answer: Promise<BlockReply>): Promise<BlockReply> {
    return answer.catch((err: unknown) => {
      if (!(err instanceof PageMovedError)) throw err;
      return this.reply(req, ReplyStatus.moved, { owner: err.route.owner, version: err.route.version, detail: err.page });
    });
  }

  private reply(req: BlockRequest, status: number, extra?: Partial<BlockReply>): BlockReply {
    const r: BlockReply = { id: req.id, status, owner: this.o.self, version: 0, detail: 0 };
    return extra ? Object.assign(r, extra) : r;
  }

  /** `refused`: refusal(v, req), already asked by handle() (not for a flush, which has no range). */
  private async handleSlowly(req: BlockRequest, v: ServedVolume | undefined, refused: string | undefined): Promise<BlockReply> {
    const reply = (status: number, extra?: Partial<BlockReply>): BlockReply => this.reply(req, status, extra);
    if (!v) return reply(ReplyStatus.noVolume);
    if (req.op === BlockOp.flush) {
      await (req.staging || req.replica ? v.raw : v.store).flush();
      return reply(ReplyStatus.ok);
    }
    if (refused !== undefined) return reply(ReplyStatus.failed, failure(ErrorKind.invalid, refused));
    // A page's primary's change to (or read of) our copy: the replicated layer checks the epoch (fencing).
    if (req.replica && req.op === BlockOp.read) return this.movedAnswered(req, v.replica.read(req).then((payload) => reply(ReplyStatus.ok, { payload, version: this.startToken })));
    if (req.replica) return this.movedAnswered(req, v.replica.receive(req, this.writeOptions(req)).then(() => reply(ReplyStatus.ok, { version: this.startToken })));
    if (req.layer) {
      // A snapshot read: served from the layer frozen here at the cut, whoever owns the page now.
      const layer = v.snapshot(req.layer);
      if (!layer) return reply(ReplyStatus.failed, failure(ErrorKind.unavailable, `peer ${this.o.self} holds no snapshot ${req.layer} of the volume`));
      if (req.op !== BlockOp.read && req.op !== BlockOp.lbaStatus) return reply(ReplyStatus.failed, failure(ErrorKind.readOnly, 'a snapshot is read-only'));
      return this.run(req, layer);
    }
    if (req.staging) {
      // A move's source copying, dual-writing or forwarding: only for a page we are receiving.
      // Not receiving it (any more) is a move ending or cancelled under the request: transient.
      // Refused, the answer says whom this peer knows as the page's primary: a source that lost
      // the page while cut off learns it here (src/migration/movable.ts toDest), as it may never
      // hear of it otherwise while its move keeps it busy.
      for (let page = v.table.pageOf(req.lba), last = v.table.pageOf(req.lba + req.blocks - 1); page <= last; page++) {
        if (!v.receiving(page)) {
          const route = v.table.route(page);
          return reply(ReplyStatus.moved, { owner: route.owner, version: route.version, detail: page });
        }
      }
      return this.serve(req, v.raw).then((r) => {
        if (r.status === ReplyStatus.ok) r.version = this.startToken;
        return r;
      });
    }
    await this.catchUp(v, req);
    return this.serve(req, v.store);
  }

  /**
   * A forwarded write's options; its stamp moves this peer's clock forward (src/snapshot/hlc.ts).
   * A host change (not a replica frame, not a move's staging) carries the sender's route version,
   * which the replicated layer checks when it applies the change.
   */
  private writeOptions(req: BlockRequest): WriteOptions {
    const opts: WriteOptions = req.replica || req.staging ? { fua: req.fua } : { fua: req.fua, routeVersion: req.routeVersion };
    if (!req.stamp) return opts;
    this.o.clock?.observe(req.stamp);
    opts.stamp = req.stamp;
    return opts;
  }

  /** Run a request that passed refusal() (its lengths match its blocks) on `store`. */
  private async run(req: BlockRequest, store: BlockBackend): Promise<BlockReply> {
    const reply = (status: number, extra?: Partial<BlockReply>): BlockReply => this.reply(req, status, extra);
    switch (req.op) {
      case BlockOp.read:
        return reply(ReplyStatus.ok, { payload: await store.read(req.lba, req.blocks) });
      case BlockOp.write:
        await store.write(req.lba, req.data!, this.writeOptions(req));
        return reply(ReplyStatus.ok);
      case BlockOp.unmap:
        await store.unmap(req.lba, req.blocks, this.writeOptions(req));
        return reply(ReplyStatus.ok);
      case BlockOp.compareAndWrite: {
        const r = await store.compareAndWrite(req.lba, req.data!.subarray(0, req.compareBytes), req.data!.subarray(req.compareBytes), this.writeOptions(req));
        return r.ok ? reply(ReplyStatus.ok) : reply(ReplyStatus.miscompare, { detail: r.miscompareOffsetBytes });
      }
      case BlockOp.lbaStatus:
        return reply(ReplyStatus.ok, { payload: encodeExtents(await store.lbaStatus(req.lba, req.blocks)) });
      default:
        return reply(ReplyStatus.failed, failure(ErrorKind.invalid, `op ${req.op} is not served here`));
    }
  }

  /** A request that failed in the store (or below it, on another peer): its kind goes back. */
  private failed(req: BlockRequest, err: unknown): BlockReply {
    const kind = errorKindOf(err, changes(req.op));
    const obj = { err, op: req.op, volume: req.volumeId, kind };
    if (kind === ErrorKind.other) this.logLimiter.log(this.o.log, 'error', `failed:${kind}`, obj, 'forwarded request failed');
    else this.logLimiter.warn(this.o.log, `failed:${kind}`, obj, 'forwarded request failed');
    return this.reply(req, ReplyStatus.failed, failure(kind, err instanceof Error ? err.message : String(err)));
  }

  /** Re-read from the catalog the touched pages' routes the sender knows newer than our table. */
  private async catchUp(v: ServedVolume, req: BlockRequest): Promise<void> {
    for (let page = v.table.pageOf(req.lba), last = v.table.pageOf(req.lba + req.blocks - 1); page <= last; page++) {
      if (req.routeVersion > v.table.route(page).version) await v.refresh(page);
    }
  }

  /**
   * Bytes a request holds on this peer while it runs: its frame (a view that keeps its whole
   * batch alive) and, for a read, the data read (bounded as refusal() bounds it).
   */
  private heldBytes(req: BlockRequest, v: ServedVolume | undefined, frame: Buffer): number {
    if (req.op !== BlockOp.read) return frame.length;
    const blockBytes = v?.store.blockBytes ?? 0;
    return frame.length + Math.min(req.blocks * blockBytes, peerReadBytesMax);
  }

  /**
   * Serve one data stream (authenticated, paused: data-stream.ts): requests run concurrently,
   * replies go back as they finish. Two bounds hold what one stream can make this peer keep:
   * reading pauses at peerRequestsInFlightMax requests (at most one received chunk's frames
   * more are taken), and while replies wait for the sender to read them; a request that would
   * take the stream's requests past peerStreamBytesInFlightMax bytes is answered BUSY at once,
   * without running (the host retries; one request always runs, so the largest one gets through).
   */
  serveStream(stream: DataStream): void {
    const { socket } = stream;
    const from = `${socket.remoteAddress}:${socket.remotePort}`;
    let inFlight = 0;
    let bytesInFlight = 0;
    let ended = false;
    const endStream = (): void => {
      if (socket.writableEnded) return;
      batcher.flush();
      socket.end();
    };
    const finish = (): void => {
      ended = true;
      if (inFlight === 0) endStream();
    };
    this.streams.set(finish, new Promise<void>((resolve) => socket.once('close', resolve)));
    socket.once('close', () => this.streams.delete(finish));
    // A stream's errors end in its 'close' (the sender's link fails what it had outstanding).
    socket.on('error', () => undefined);
    /**
     * Read while neither bound holds: requests in flight, replies the sender has not taken.
     * Past one, reading pauses; it resumes at half the requests, and once the queued replies
     * are all taken ('drain', which comes: a write past Node's mark returned false).
     */
    let untaken = false;
    const flow = (): void => {
      if (socket.writableLength > peerStreamRepliesQueuedBytesMax) untaken = true;
      if (inFlight >= peerRequestsInFlightMax || untaken) socket.pause();
      else if (inFlight < peerRequestsInFlightMax / 2) socket.resume();
    };
    socket.on('drain', () => {
      untaken = false;
      flow();
    });
    const batcher = new FrameBatcher<BlockReply>(replyCodec, (chunks) => {
      if (!socket.destroyed && socket.writable) writeChunks(socket, chunks);
    });
    const done = (reply: BlockReply, bytes: number): void => {
      inFlight--;
      bytesInFlight -= bytes;
      batcher.push(reply);
      // Replies wait for the end of the turn to share a batch, unless none are left to wait for.
      if (inFlight === 0) batcher.flushAfterTask();
      if (ended && inFlight === 0) endStream();
      flow();
    };
    const close = (what: string): void => {
      this.logLimiter.warn(this.o.log, what, { peer: from }, `${what} from a peer; closing its stream`);
      socket.destroy();
    };
    const onFrame = (frame: Buffer): boolean => {
      const req = decodeRequest(frame);
      if (!req) {
        close('malformed block frame');
        return false;
      }
      const v = this.o.volume(req.volumeId);
      const bytes = this.heldBytes(req, v, frame);
      if (inFlight > 0 && bytesInFlight + bytes > peerStreamBytesInFlightMax) {
        // Requests are in flight, so a done() will flush this reply (or the turn's end will).
        batcher.push(this.reply(req, ReplyStatus.failed, failure(ErrorKind.busy, `peer ${this.o.self} holds ${bytesInFlight} bytes of this stream's requests`)));
        return true;
      }
      inFlight++;
      bytesInFlight += bytes;
      this.handle(req, v).then(
        (reply) => done(reply, bytes),
        (err: unknown) => done(this.failed(req, err), bytes),
      );
      return true;
    };
    socket.on('end', () => {
      if (stream.midFrame) this.logLimiter.warn(this.o.log, 'cut frame', { peer: from }, 'a peer ended its data stream in the middle of a frame');
      finish();
    });
    stream.receive((frames) => {
      if (!frames) return close('malformed block frame length');
      for (const frame of frames) if (!onFrame(frame)) return;
      flow();
    });
  }

  /**
   * Shutdown: end every open stream once the requests it carries are answered (senders keep
   * their streams open for good); resolves when they are closed.
   */
  endStreams(): Promise<void> {
    const closed = [...this.streams.values()];
    for (const finish of this.streams.keys()) finish();
    return Promise.all(closed).then(() => undefined);
  }
}
