// The sending side of forwarding against a real gRPC server on loopback: requests batched per
// turn reach the owner and come back by id; a request nobody answers fails alone after its
// deadline (the link's one sweep timer); a broken stream fails everything outstanding on it.
// The owner ends a stream with an error status (call.emit('error', …), what page-service.ts
// does with a malformed batch): a bare call.destroy() never tells the client, whose stream
// then swallows every request until each one's deadline.

import t from 'tap';
import * as grpc from '@grpc/grpc-js';
import { PeerUnavailableError } from '../src/errors';
import { splitBatch } from '../src/routing/batch';
import { BlockOp, decodeRequest, encodeReply, ReplyStatus } from '../src/routing/frame';
import { realEnv } from '../src/env/real';
import { PeerLink, peerChannelOptions, peerDataService } from '../src/routing/link';

const volumeId = '0123456789abcdef';
const request = (lba: number) => ({ op: BlockOp.read, fua: false, volumeId, lba, blocks: 1, routeVersion: 0, compareBytes: 0 });

/** A batch of one reply frame: [u32 length][frame]. */
function oneFrameBatch(frame: Buffer): Buffer {
  const head = Buffer.alloc(4);
  head.writeUInt32BE(frame.length, 0);
  return Buffer.concat([head, frame]);
}

/** A fake owner: answers reads of even LBAs (payload = the LBA), never answers odd ones; `cut()` breaks its streams. */
async function owner(): Promise<{ address: string; batches: number[]; cut(): void; stop(): Promise<void> }> {
  const server = new grpc.Server(peerChannelOptions);
  const calls: grpc.ServerDuplexStream<Buffer, Buffer>[] = [];
  const batches: number[] = [];
  server.addService(peerDataService, {
    blocks(call: grpc.ServerDuplexStream<Buffer, Buffer>) {
      calls.push(call);
      call.on('data', (batch: Buffer) => {
        const frames = splitBatch(batch)!;
        batches.push(frames.length);
        for (const f of frames) {
          const req = decodeRequest(f)!;
          if (req.lba % 2 === 0) call.write(oneFrameBatch(encodeReply({ id: req.id, status: ReplyStatus.ok, owner: 'p1', version: 0, detail: 0, payload: Buffer.from(String(req.lba)) })));
        }
      });
      call.on('error', () => undefined);
    },
  });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  return {
    address: `127.0.0.1:${port}`,
    batches,
    cut: () => calls.forEach((c) => c.emit('error', { code: grpc.status.UNAVAILABLE, details: 'cut' })),
    stop: async () => server.forceShutdown(),
  };
}

t.test('replies by id, one batch per turn, a deadline per request, a broken stream fails what is outstanding', async (t) => {
  const o = await owner();
  t.teardown(() => o.stop());
  const link = new PeerLink({ peerId: 'p1', env: realEnv(), address: o.address, metadata: () => new grpc.Metadata(), requestMsMax: 300 });
  t.teardown(() => link.close());

  const first = await link.send(request(0));
  t.equal(first.payload?.toString(), '0', 'the first request opens the stream');
  const replies = await Promise.all([2, 4, 6, 8].map((lba) => link.send(request(lba))));
  t.same(replies.map((r) => r.payload?.toString()), ['2', '4', '6', '8'], 'each reply matched to its request by id');
  t.equal(o.batches[o.batches.length - 1], 4, 'the four requests of one turn travelled as one batch');

  const startedMs = performance.now();
  const unanswered = link.send(request(1));
  const answered = link.send(request(10));
  t.equal((await answered).payload?.toString(), '10', 'an unanswered request does not hold up the others');
  const err = await unanswered.then(() => undefined, (e: unknown) => e);
  t.ok(err instanceof PeerUnavailableError && /no answer in 300 ms/.test(err.message), 'the unanswered one fails with its deadline');
  const tookMs = performance.now() - startedMs;
  t.ok(tookMs >= 300 && tookMs < 5_000, `failed after its deadline, not long after (${Math.round(tookMs)} ms)`);
  t.equal(link.inFlight, 0);

  // Odd LBAs: never answered, so only the broken stream (not the deadline) can end these early.
  const outstanding = [3, 5].map((lba) => link.send(request(lba)).then(() => 'answered', (e: unknown) => (e instanceof PeerUnavailableError && !/no answer/.test(e.message) ? 'unavailable' : String(e))));
  await new Promise((r) => setTimeout(r, 50));
  o.cut();
  t.same(await Promise.all(outstanding), ['unavailable', 'unavailable'], 'a broken stream fails everything outstanding on it, before any deadline');
  t.equal((await link.send(request(12))).payload?.toString(), '12', 'the next request opens a new stream');
});
