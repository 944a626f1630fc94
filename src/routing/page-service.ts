// The owner's side of forwarding: answers block frames from other peers out of the local
// store, after checking that this peer owns every page the request touches. A sender that
// knows a newer route version than we do makes us re-read the route from the catalog first
// (our watch may lag); if we still do not own the page we answer MOVED with the route we
// know, and the sender follows it. The data path never waits on the catalog otherwise.

import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { peerRequestsInFlightMax } from '../limits';
import type { HybridClock } from '../snapshot/hlc';
import type { BlockBackend, WriteOptions } from '../store/types';
import { FrameBatcher, splitBatch } from './batch';
import { PageMovedError } from './moved';
import { BlockOp, decodeRequest, encodeExtents, encodeReplyInto, replyFrameBytes, ReplyStatus, type BlockReply, type BlockRequest } from './frame';
import type { Route, RouteTable } from './table';

export interface ServedVolume {
  table: RouteTable;
  /** This peer's pages of the volume, moves included (src/migration/movable.ts). */
  store: BlockBackend;
  /** The local store itself: what a move's staging traffic reads and writes. */
  raw: BlockBackend;
  /** True while this peer is the destination of a move of the page (or owns it). */
  receiving(page: number): boolean;
  /** This peer's layer of the volume's snapshot `seq` (read-only), if it holds one. */
  snapshot(seq: number): BlockBackend | undefined;
  refresh(page: number): Promise<Route>;
}

export interface PageServiceOptions {
  self: string;
  volume(volumeId: string): ServedVolume | undefined;
  /** This peer's hybrid clock: forwarded writes' stamps push it forward. */
  clock?: HybridClock;
  log: Logger;
}

const replyCodec = { frameBytes: replyFrameBytes, encodeInto: encodeReplyInto };

/**
 * End a stream with an error status the sender sees (its link then fails what it has
 * outstanding and opens a new stream). grpc-js sends the status from the stream's 'error'
 * handler; call.destroy() would drop the stream without telling the sender, whose requests
 * would then each wait for their deadline.
 */
function refuse(call: grpc.ServerDuplexStream<Buffer, Buffer>, details: string): void {
  call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details });
}

export class PageService {
  private readonly o: PageServiceOptions;
  /** Open streams: each ends once its requests in flight are answered (at shutdown). */
  private readonly streams = new Set<() => void>();

  constructor(opts: PageServiceOptions) {
    this.o = opts;
  }

  handle(req: BlockRequest): Promise<BlockReply> {
    // The common case, a host request for pages we own by a route the sender also knows,
    // goes straight to the store: no catalog look-up, no extra promise.
    try {
      const v = this.o.volume(req.volumeId);
      if (v && !req.layer && !req.staging && req.op !== BlockOp.flush && this.inRange(v, req) && this.ownsAll(v, req)) return this.serve(req, v.store);
      return this.handleSlowly(req, v);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private inRange(v: ServedVolume, req: BlockRequest): boolean {
    return req.blocks > 0 && req.lba + req.blocks <= v.store.blockCount;
  }

  /** True when our table says we own every page the request touches, at least at the sender's version. */
  private ownsAll(v: ServedVolume, req: BlockRequest): boolean {
    for (let page = v.table.pageOf(req.lba), last = v.table.pageOf(req.lba + req.blocks - 1); page <= last; page++) {
      const route = v.table.route(page);
      if (route.owner !== this.o.self || req.routeVersion > route.version) return false;
    }
    return true;
  }

  /** Run on the store; a page that moved under us (src/migration) is answered MOVED. */
  private serve(req: BlockRequest, store: BlockBackend): Promise<BlockReply> {
    return this.run(req, store).catch((err: unknown) => {
      if (!(err instanceof PageMovedError)) throw err;
      return this.reply(req, ReplyStatus.moved, { owner: err.route.owner, version: err.route.version, detail: err.page });
    });
  }

  private reply(req: BlockRequest, status: number, extra?: Partial<BlockReply>): BlockReply {
    const r: BlockReply = { id: req.id, status, owner: this.o.self, version: 0, detail: 0 };
    return extra ? Object.assign(r, extra) : r;
  }

  private async handleSlowly(req: BlockRequest, v: ServedVolume | undefined): Promise<BlockReply> {
    const reply = (status: number, extra?: Partial<BlockReply>): BlockReply => this.reply(req, status, extra);
    if (!v) return reply(ReplyStatus.noVolume);
    if (req.op === BlockOp.flush) {
      await (req.staging ? v.raw : v.store).flush();
      return reply(ReplyStatus.ok);
    }
    if (!this.inRange(v, req)) return reply(ReplyStatus.failed, { payload: Buffer.from('range outside the volume') });
    let store = v.store;
    if (req.layer) {
      // A snapshot read: served from the layer frozen here at the cut, whoever owns the page now.
      const layer = v.snapshot(req.layer);
      if (!layer) return reply(ReplyStatus.failed, { payload: Buffer.from(`peer ${this.o.self} holds no snapshot ${req.layer} of the volume`) });
      if (req.op !== BlockOp.read && req.op !== BlockOp.lbaStatus) return reply(ReplyStatus.failed, { payload: Buffer.from('a snapshot is read-only') });
      return this.run(req, layer);
    }
    if (req.staging) {
      // A move's source copying, dual-writing or forwarding: only for a page we are receiving.
      for (let page = v.table.pageOf(req.lba), last = v.table.pageOf(req.lba + req.blocks - 1); page <= last; page++) {
        if (!v.receiving(page)) return reply(ReplyStatus.failed, { payload: Buffer.from(`peer ${this.o.self} is not receiving page ${page}`) });
      }
      store = v.raw;
    } else {
      const moved = await this.notMine(v, req);
      if (moved) return reply(ReplyStatus.moved, { owner: moved.route.owner, version: moved.route.version, detail: moved.page });
    }
    return this.serve(req, store);
  }

  /** A forwarded write's options; its stamp moves this peer's clock forward (src/snapshot/hlc.ts). */
  private writeOptions(req: BlockRequest): WriteOptions {
    if (!req.stamp) return { fua: req.fua };
    this.o.clock?.observe(req.stamp);
    return { fua: req.fua, stamp: req.stamp };
  }

  private async run(req: BlockRequest, store: BlockBackend): Promise<BlockReply> {
    const reply = (status: number, extra?: Partial<BlockReply>): BlockReply => this.reply(req, status, extra);
    const bs = store.blockBytes;
    switch (req.op) {
      case BlockOp.read:
        return reply(ReplyStatus.ok, { payload: await store.read(req.lba, req.blocks) });
      case BlockOp.write:
        if (req.data?.length !== req.blocks * bs) return reply(ReplyStatus.failed, { payload: Buffer.from('write data length does not match blocks') });
        await store.write(req.lba, req.data, this.writeOptions(req));
        return reply(ReplyStatus.ok);
      case BlockOp.unmap:
        await store.unmap(req.lba, req.blocks, this.writeOptions(req));
        return reply(ReplyStatus.ok);
      case BlockOp.compareAndWrite: {
        if (req.data?.length !== 2 * req.blocks * bs || req.compareBytes !== req.blocks * bs) return reply(ReplyStatus.failed, { payload: Buffer.from('compare and write lengths do not match blocks') });
        const r = await store.compareAndWrite(req.lba, req.data.subarray(0, req.compareBytes), req.data.subarray(req.compareBytes), this.writeOptions(req));
        return r.ok ? reply(ReplyStatus.ok) : reply(ReplyStatus.miscompare, { detail: r.miscompareOffsetBytes });
      }
      case BlockOp.lbaStatus:
        return reply(ReplyStatus.ok, { payload: encodeExtents(await store.lbaStatus(req.lba, req.blocks)) });
      default:
        return reply(ReplyStatus.failed, { payload: Buffer.from('unknown op') });
    }
  }

  /** The first touched page we do not own (after a catalog re-read if the sender knows newer). */
  private async notMine(v: ServedVolume, req: BlockRequest): Promise<{ page: number; route: Route } | undefined> {
    const first = v.table.pageOf(req.lba);
    const last = v.table.pageOf(req.lba + req.blocks - 1);
    for (let page = first; page <= last; page++) {
      let route = v.table.route(page);
      if (req.routeVersion > route.version) route = await v.refresh(page);
      if (route.owner !== this.o.self) return { page, route };
    }
    return undefined;
  }

  /** Serve one PeerData.Blocks stream: requests run concurrently, replies go back as they finish. */
  serveStream(call: grpc.ServerDuplexStream<Buffer, Buffer>): void {
    let inFlight = 0;
    let paused = false;
    let ended = false;
    const endCall = (): void => {
      if (call.writableEnded) return;
      batcher.flush();
      call.end();
    };
    const finish = (): void => {
      ended = true;
      if (inFlight === 0) endCall();
    };
    this.streams.add(finish);
    call.on('close', () => this.streams.delete(finish));
    const batcher = new FrameBatcher<BlockReply>(replyCodec, (batch) => {
      if (!call.destroyed && call.writable) call.write(batch);
    });
    const done = (reply: BlockReply): void => {
      inFlight--;
      if (paused && inFlight < peerRequestsInFlightMax / 2) {
        paused = false;
        call.resume();
      }
      batcher.push(reply);
      // Replies wait for the end of the turn to share a batch, unless none are left to wait for.
      if (inFlight === 0) batcher.flushAfterTask();
      if (ended && inFlight === 0) endCall();
    };
    const onFrame = (frame: Buffer): boolean => {
      const req = decodeRequest(frame);
      if (!req) {
        this.o.log.warn('malformed block frame from a peer; closing its stream');
        refuse(call, 'malformed frame');
        return false;
      }
      inFlight++;
      if (inFlight >= peerRequestsInFlightMax && !paused) {
        paused = true;
        call.pause();
      }
      this.handle(req).then(done, (err: Error) => {
        this.o.log.error({ err, op: req.op, volume: req.volumeId }, 'forwarded request failed in the store');
        done({ id: req.id, status: ReplyStatus.failed, owner: this.o.self, version: 0, detail: 0, payload: Buffer.from(err.message) });
      });
      return true;
    };
    call.on('data', (batch: Buffer) => {
      const frames = splitBatch(batch);
      if (!frames) {
        this.o.log.warn('malformed block batch from a peer; closing its stream');
        refuse(call, 'malformed batch');
        return;
      }
      for (const frame of frames) if (!onFrame(frame)) return;
    });
    call.on('end', finish);
    call.on('error', () => this.streams.delete(finish));
  }

  /**
   * Shutdown: end every open stream once the requests it carries are answered. Senders keep
   * their streams open for good, so without this a graceful gRPC shutdown would wait for ever.
   */
  endStreams(): void {
    for (const finish of this.streams) finish();
    this.streams.clear();
  }
}

