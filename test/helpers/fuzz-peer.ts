// Peer frames for the fuzz suite: an authenticated PeerData.Blocks stream opened the way a
// peer's link opens it (src/routing/link.ts), and well-formed request frames (src/routing/
// frame.ts) for the cases to mutate. How a stream is authenticated is in `openBlockStream`
// alone: when the peer authentication scheme changes (TLS, per-call nonces), only it changes.

import * as grpc from '@grpc/grpc-js';
import { peerAuthMetadata } from '../../src/cluster/peer-auth';
import { splitBatch } from '../../src/routing/batch';
import { peerChannelOptions, peerDataService } from '../../src/routing/link';
import { BlockOp, encodeRequest, requestHeaderBytes, type BlockRequest } from '../../src/routing/frame';
import type { Rng } from './fuzz-rng';

const PeerDataClient = grpc.makeGenericClientConstructor(peerDataService, 'PeerData');

export interface BlockStream {
  /** Send one batch (bytes as given: a case may send a malformed one). */
  write(batch: Buffer): void;
  /** Reply frames received so far. */
  replyFrames: number;
  /** Why the stream ended, once it has (a refused frame ends it; that is allowed). */
  ended: string | undefined;
  /** Wait until `n` reply frames arrived or the stream ended, at most `timeoutMs`. */
  settle(n: number, timeoutMs: number): Promise<void>;
  close(): void;
}

/** A PeerData.Blocks stream to `address`, authenticated as member `asPeer` of the group. */
export function openBlockStream(address: string, secret: string, asPeer: string): BlockStream {
  const client = new PeerDataClient(address, grpc.credentials.createInsecure(), peerChannelOptions);
  const call = (client as unknown as { blocks(md: grpc.Metadata): grpc.ClientDuplexStream<Buffer, Buffer> }).blocks(peerAuthMetadata(secret, asPeer, peerDataService.blocks.path));
  let wake: (() => void) | undefined;
  const s: BlockStream = {
    replyFrames: 0,
    ended: undefined,
    write: (batch) => {
      if (!s.ended) call.write(batch);
    },
    settle: async (n, timeoutMs) => {
      const deadline = Date.now() + timeoutMs;
      while (s.replyFrames < n && !s.ended && Date.now() < deadline) {
        await new Promise<void>((r) => {
          const timer = setTimeout(r, deadline - Date.now());
          wake = () => {
            clearTimeout(timer);
            r();
          };
        });
      }
    },
    close: () => {
      s.ended ??= 'closed';
      call.cancel();
      client.close();
    },
  };
  const end = (why: string): void => {
    s.ended ??= why;
    wake?.();
  };
  call.on('data', (b: Buffer) => {
    s.replyFrames += splitBatch(b)?.length ?? 1;
    wake?.();
  });
  call.on('error', (err: grpc.ServiceError) => end(err.details || err.message));
  call.on('end', () => end('ended'));
  return s;
}

/** Frames as a batch: [u32 length][frame] each (src/routing/batch.ts). */
export function batchOf(frames: Buffer[]): Buffer {
  return Buffer.concat(frames.flatMap((f) => {
    const n = Buffer.alloc(4);
    n.writeUInt32BE(f.length);
    return [n, f];
  }));
}

/**
 * A request frame for `volumeId`: a read, write, unmap, compare-and-write, flush or lbaStatus
 * within or around the volume, its data drawn from `alphabet` (the volume's data stays
 * recognisable), then, often, its header mutated.
 */
export function randomRequestFrame(rng: Rng, volumeId: string, volumeBlocks: number, alphabet: readonly number[]): Buffer {
  const op = rng.pick(Object.values(BlockOp));
  // 32768 blocks of 512 bytes: 16 MiB, more than one frame may carry back (issue 15 item 7).
  const blocks = rng.pick([1, 8, 256, rng.range(1, 64), 32768, 32768, rng.range(1, 40000), 0]);
  const lba = rng.pick([0, rng.int(volumeBlocks), volumeBlocks - 1, volumeBlocks - blocks, rng.int(volumeBlocks) & ~8191]);
  const hasData = op === BlockOp.write || op === BlockOp.compareAndWrite;
  const dataBytes = hasData ? Math.min(blocks, 2048) * 512 * (op === BlockOp.compareAndWrite ? 2 : 1) : 0;
  const req: BlockRequest = {
    id: rng.u32(), op, fua: rng.chance(0.3), volumeId: rng.chance(0.9) ? volumeId : rng.bytes(8).toString('hex'),
    lba: Math.max(0, lba), blocks, routeVersion: rng.pick([0, 1, rng.u32()]), compareBytes: op === BlockOp.compareAndWrite ? dataBytes / 2 : 0,
    staging: rng.chance(0.1), layer: rng.chance(0.1) ? rng.u32Edge() : 0, stamp: rng.chance(0.2) ? rng.int(2 ** 40) : 0,
    data: dataBytes > 0 ? rng.bytesFrom(dataBytes, alphabet) : undefined,
  };
  const frame = encodeRequest(req);
  if (rng.chance(0.4)) return frame;
  // Header only: the data stays from the alphabet.
  const header = rng.mutate(frame.subarray(0, requestHeaderBytes));
  return Buffer.concat([header, frame.subarray(requestHeaderBytes)]);
}
