// The sending side of forwarding against a real data stream on loopback (data-stream.ts): requests
// batched per task reach the owner and come back by id; a request nobody answers fails alone
// after its deadline (the link's one sweep timer); a broken stream fails everything outstanding
// on it; the next send reconnects.

import t from 'tap';
import { PeerUnavailableError } from '../src/errors';
import { BlockOp, decodeRequest, encodeReply, ReplyStatus } from '../src/routing/frame';
import { realEnv } from '../src/env/real';
import { PeerLink } from '../src/routing/link';
import { fixedMembers } from '../src/cluster/members';
import { GrpcTransport } from '../src/server/grpc-transport';
import { batchOf, fakeOwner } from './helpers/data-stream';

const volumeId = '0123456789abcdef';
const request = (lba: number) => ({ op: BlockOp.read, fua: false, volumeId, lba, blocks: 1, routeVersion: 0, compareBytes: 0 });
const hello = () => ({ peerId: 'p2', stamp: '0', nonce: '', mac: '' });

/** A fake owner: answers reads of even LBAs (payload = the LBA), never answers odd ones; `cut()` breaks its streams. */
async function owner(port = 0): Promise<{ address: string; batches: number[]; cut(): void; stop(): void }> {
  const batches: number[] = [];
  let turn: number[] | undefined;
  const o = await fakeOwner((f, socket) => {
    // Frames that arrive in one turn: one batch (one write) from the sender.
    if (!turn) {
      turn = [];
      setImmediate(() => {
        batches.push(turn!.length);
        turn = undefined;
      });
    }
    turn.push(1);
    const req = decodeRequest(f)!;
    if (req.lba % 2 === 0) socket.write(batchOf([encodeReply({ id: req.id, status: ReplyStatus.ok, owner: 'p1', version: 0, detail: 0, payload: Buffer.from(String(req.lba)) })]));
  }, port);
  return { address: o.address, batches, cut: () => o.sockets.forEach((s) => s.destroy()), stop: () => o.stop() };
}

t.test('replies by id, one batch per turn, a deadline per request, a broken stream fails what is outstanding', async (t) => {
  const o = await owner();
  t.teardown(() => o.stop());
  const link = new PeerLink({ peerId: 'p1', env: realEnv(), address: o.address, hello, requestMsMax: 300 });
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

t.test('an owner that is down: unreachable, unsent; back up: reached by the next send', async (t) => {
  const o = await owner();
  const address = o.address;
  o.stop();
  const link = new PeerLink({ peerId: 'p1', env: realEnv(), address, hello, requestMsMax: 300 });
  t.teardown(() => link.close());
  const err = await link.send(request(0)).then(() => undefined, (e: unknown) => e);
  t.ok(err instanceof PeerUnavailableError && err.unsent && /not reachable/.test(err.message), `refused connection: unsent, unavailable (${String(err)})`);
  const again = await owner(Number(address.split(':')[1]));
  t.teardown(() => again.stop());
  const startedMs = performance.now();
  t.equal((await link.send(request(2))).payload?.toString(), '2', 'the owner back: the next send reaches it');
  t.ok(performance.now() - startedMs < 1_000, 'within a second');
  link.close();
  const closed = await link.send(request(0)).then(() => undefined, (e: unknown) => e);
  t.ok(closed instanceof PeerUnavailableError && /link closed/.test(closed.message), 'a closed link sends nothing');
});

t.test('a closed transport opens no connection: a link asked for after close() (a task still running as the peer stops) sends nothing', async (t) => {
  const o = await fakeOwner(() => undefined);
  t.teardown(() => o.stop());
  // p1 and p3 both at the fake owner's address.
  const transport = new GrpcTransport({ self: 'p2', members: fixedMembers(['p1', 'p2', 'p3'], () => ({ rpc: o.address })), secret: 's', tls: undefined, env: realEnv() });
  const open = transport.blocks('p1').send(request(0)).then(() => undefined, (e: unknown) => e);
  for (let i = 0; i < 100 && o.sockets.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
  t.equal(o.sockets.length, 1, 'while open: the link to p1 reached the owner');
  transport.close();
  t.match(String(await open), /link closed/, 'what was in flight fails as the transport closes');
  // p3's link is asked for the first time after close.
  const err = await transport.blocks('p3').send(request(2)).then(() => undefined, (e: unknown) => e);
  t.ok(err instanceof PeerUnavailableError && err.unsent && /link closed/.test(err.message), `a new link after close sends nothing, unsent (${String(err)})`);
  await t.rejects(transport.calls('p3').status(500, false), /Channel has been shut down/, 'a new gRPC client after close is closed too (not dialed)');
  await new Promise((r) => setTimeout(r, 100));
  t.equal(o.sockets.length, 1, 'no connection reached the owner after close');
});
