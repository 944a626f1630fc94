// The block data stream (src/routing/data-stream.ts): the rpc port's handshake against hostile
// clients: a gRPC call and a data stream share the port; garbage, a wrong MAC, a replayed hello,
// a stranger, a slow or missing hello, an oversized hello, too many half-open sockets: each is
// refused or closed within the bound, and the port keeps serving.

import * as net from 'node:net';
import t from 'tap';
import * as grpc from '@grpc/grpc-js';
import { peerAuthFields, peerDataMethod, type PeerAuthFields } from '../src/cluster/peer-auth';
import { PeerAuthenticator } from '../src/cluster/peer-rpc';
import { PeerUnavailableError } from '../src/errors';
import { peerConnectMsMax, peerHandshakeMsMax, peerHandshakesMax } from '../src/limits';
import { silentLogger } from '../src/log';
import { dataPreamble, dialDataStream, RpcListener } from '../src/routing/data-stream';

const echo = {
  echo: { path: '/t.T/Echo', requestStream: false, responseStream: false, requestSerialize: (b: Buffer) => b, requestDeserialize: (b: Buffer) => b, responseSerialize: (b: Buffer) => b, responseDeserialize: (b: Buffer) => b, originalName: 'Echo' },
};

/** An rpc port as a peer has it (plain): a gRPC echo service and data streams authenticated for members p1, p2. */
async function port(t: Tap): Promise<{ address: string; served: string[] }> {
  const server = new grpc.Server();
  server.addService(echo, { echo: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => cb(null, Buffer.concat([Buffer.from('echo:'), call.request])) });
  const injector = server.createConnectionInjector(grpc.ServerCredentials.createInsecure());
  const authenticator = new PeerAuthenticator({ secret: 's', members: ['p1', 'p2'], self: 'p1', tls: false }, silentLogger());
  const served: string[] = [];
  const listener = new RpcListener({
    authenticate: authenticator.hello,
    serve: ({ socket }, peerId) => {
      served.push(peerId);
      socket.on('error', () => undefined);
    },
    other: (socket) => injector.injectConnection(socket),
    log: silentLogger(),
  });
  await listener.listen('127.0.0.1', 0, '127.0.0.1:0');
  t.teardown(() => {
    listener.destroy();
    server.forceShutdown();
  });
  return { address: `127.0.0.1:${listener.port}`, served };
}

type Tap = Parameters<Parameters<typeof t.test>[1]>[0];

function dial(address: string, hello: () => PeerAuthFields): Promise<string> {
  return dialDataStream({ peerId: 'p1', address, hello, timeoutMs: peerConnectMsMax }).then(
    (d) => {
      d.socket.destroy();
      return 'ok';
    },
    (err: unknown) => (err instanceof PeerUnavailableError && err.unsent ? err.message : `not a PeerUnavailableError: ${String(err)}`),
  );
}

/** How long until the port closes a raw connection that sends `bytes` (and then nothing), or 'open' after `waitMs`. */
function closedAfter(address: string, bytes: Buffer, waitMs: number): Promise<number | 'open'> {
  const [host, p] = address.split(':');
  return new Promise((resolve) => {
    const startedMs = performance.now();
    const s = net.connect(Number(p), host, () => s.write(bytes));
    s.on('error', () => undefined);
    s.on('data', () => undefined);
    s.on('close', () => {
      clearTimeout(timer);
      resolve(performance.now() - startedMs);
    });
    const timer = setTimeout(() => {
      s.destroy();
      resolve('open');
    }, waitMs);
  });
}

t.test('one port: gRPC and data streams; hostile handshakes refused or closed within the bound', async (t) => {
  const { address, served } = await port(t);
  const Client = grpc.makeGenericClientConstructor(echo, 'T');
  const client = new Client(address, grpc.credentials.createInsecure());
  t.teardown(() => client.close());
  const call = (): Promise<string> => new Promise((resolve, reject) => (client as unknown as { echo(b: Buffer, cb: (e: Error | null, r: Buffer) => void): void }).echo(Buffer.from('hi'), (e, r) => (e ? reject(e) : resolve(r.toString()))));
  t.equal(await call(), 'echo:hi', 'a gRPC call on the rpc port is served');

  t.equal(await dial(address, () => peerAuthFields('s', 'p2', peerDataMethod)), 'ok', 'a member with the secret opens a data stream');
  t.same(served, ['p2'], 'served as the peer its hello names');
  t.match(await dial(address, () => peerAuthFields('not-the-secret', 'p2', peerDataMethod)), /refused: wrong MAC/, 'a wrong MAC is refused with its reason');
  t.match(await dial(address, () => peerAuthFields('s', 'p2', '/peersan.PeerService/Status')), /refused: wrong MAC/, 'a hello made for another method is refused');
  const fixed = peerAuthFields('s', 'p2', peerDataMethod);
  t.equal(await dial(address, () => fixed), 'ok', 'a hello once');
  t.match(await dial(address, () => fixed), /refused: nonce already used/, 'the same hello replayed is refused');
  t.match(await dial(address, () => peerAuthFields('s', 'p9', peerDataMethod)), /refused: not a member/, 'a non-member is refused');
  t.match(await dial(address, () => ({ peerId: 'p2\nx', stamp: '1', nonce: 'n', mac: 'm' })), /refused: a malformed hello/, 'a hello of five lines is refused');

  const bound = peerHandshakeMsMax + 1_000;
  const silent = await closedAfter(address, Buffer.alloc(0), bound + 500);
  t.ok(silent !== 'open' && silent >= peerHandshakeMsMax - 100 && silent < bound, `a connection that sends nothing is closed at the bound (${String(silent)} ms)`);
  const noHello = await closedAfter(address, dataPreamble, bound + 500);
  t.ok(noHello !== 'open' && noHello < bound, `a preamble and no hello: closed within the bound (${String(noHello)} ms)`);
  const halfPreamble = await closedAfter(address, dataPreamble.subarray(0, 5), bound + 500);
  t.ok(halfPreamble !== 'open' && halfPreamble < bound, `half a preamble: closed within the bound (${String(halfPreamble)} ms)`);
  const huge = Buffer.alloc(4);
  huge.writeUInt32BE(1_000_000, 0);
  const oversized = await closedAfter(address, Buffer.concat([dataPreamble, huge]), bound + 500);
  t.ok(oversized !== 'open' && oversized < bound, `an oversized hello: closed (${String(oversized)} ms)`);
  const garbage = await closedAfter(address, Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), bound + 500);
  t.ok(garbage !== 'open' && garbage < bound, `garbage (not a data stream, not HTTP/2): gRPC closes it (${String(garbage)} ms)`);
  t.equal(await call(), 'echo:hi', 'gRPC still served');
  t.equal(await dial(address, () => peerAuthFields('s', 'p1', peerDataMethod)), 'ok', 'data streams still served');
});

t.test('sockets in their handshake are bounded: past the bound a new one is closed at once', async (t) => {
  const { address } = await port(t);
  const [host, p] = address.split(':');
  const idle: net.Socket[] = [];
  t.teardown(() => idle.forEach((s) => s.destroy()));
  for (let i = 0; i < peerHandshakesMax; i++) {
    const s = net.connect(Number(p), host);
    s.on('error', () => undefined);
    idle.push(s);
    await new Promise((r) => s.once('connect', r));
  }
  // The listener counts a socket once it accepted it: give it the turn to.
  await new Promise((r) => setTimeout(r, 100));
  const extra = await closedAfter(address, Buffer.alloc(0), 1_000);
  t.ok(extra !== 'open' && extra < 500, `one more is closed at once (${String(extra)} ms)`);
  idle.forEach((s) => s.destroy());
  await new Promise((r) => setTimeout(r, 100));
  t.equal(await dial(address, () => peerAuthFields('s', 'p2', peerDataMethod)), 'ok', 'once they are gone, data streams open again');
});
