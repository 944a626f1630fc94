// Peer frames for the fuzz suite: an authenticated block data stream opened the way a peer's
// link opens it (src/routing/link.ts, data-stream.ts), and well-formed request frames (src/routing/
// frame.ts) for the cases to mutate. How a stream is authenticated is in helpers/data-stream.ts
// alone: when the peer authentication scheme changes, only it changes.

import { BlockOp, encodeRequest, requestHeaderBytes, type BlockRequest } from '../../src/routing/frame';
import { batchOf, openRawStream } from './data-stream';
import type { Rng } from './fuzz-rng';

export { batchOf };

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

/** A data stream to `address`, authenticated as member `asPeer` of the group. */
export function openBlockStream(address: string, secret: string, asPeer: string): BlockStream {
  const raw = openRawStream(address, secret, asPeer);
  return {
    get replyFrames() {
      return raw.frames.length;
    },
    get ended() {
      return raw.ended;
    },
    write: (batch) => raw.write(batch),
    settle: async (n, timeoutMs) => {
      const deadline = Date.now() + timeoutMs;
      while (raw.frames.length < n && !raw.ended && Date.now() < deadline) await raw.next(deadline - Date.now());
    },
    close: () => raw.close(),
  };
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
