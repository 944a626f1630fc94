// The block data stream between two peers (issue 19): a plain TCP connection (TLS inside it when
// the group has `cluster.tls`) on the peer's rpc port, beside gRPC, carrying the frames of
// frame.ts as [u32 length][frame] back to back: the batch format of batch.ts, with no gRPC or
// HTTP/2 framing around it. grpc-js copied every message on send and again on receive (it
// concatenates HTTP/2's 16 KiB frames), which cost a forwarded 128 KiB read most of its speed.
//
// One port, two protocols: RpcListener accepts every connection and reads its first bytes. The
// 8-byte preamble dataPreamble makes it a data stream; anything else (an HTTP/2 preface, a TLS
// ClientHello, both of which differ from it within its first 3 bytes) goes back to the socket
// unread and the socket to gRPC (grpc-js createConnectionInjector), which does its own TLS.
//
// A data stream's handshake, in this order, all within peerHandshakeMsMax of the accept:
//   1. client: the preamble; server: the preamble back ("go on"). The client sends nothing
//      more until then, so no TLS record can arrive mixed with the preamble's bytes.
//   2. with `cluster.tls`: TLS (mutual: the client must present a certificate from the cluster
//      CA; the client checks the server's names the peer it called).
//   3. client: a hello frame with the peer-auth fields made for peerDataMethod (peer-auth.ts:
//      member, stamp, MAC, nonce, the same NonceLedger as gRPC calls); with TLS the client's
//      certificate must name the peer the hello claims. server: a frame "ok", or
//      "refused: <reason>" and the end of the connection. The client sends no request before
//      the answer, so anything after the hello is a protocol error.
// Then the client sends request frames and the server reply frames (link.ts, page-service.ts).
// Probes of the port are hostile until proven otherwise: at most peerHandshakesMax sockets may be
// in steps 1-3 at once, a hello is at most peerHelloBytesMax, and any violation closes that one
// connection (rate-limited log), never the process.
//
// Received bytes are cut into frames by FrameReader (frame-reader.ts, pure); a plain stream's
// client reads in place (InPlaceReads, see dialDataStream).

import * as net from 'node:net';
import * as tls from 'node:tls';
import type { Logger } from 'pino';
import type { PeerAuthFields, PeerAuthVerdict } from '../cluster/peer-auth';
import type { DataTlsServer } from '../cluster/peer-tls';
import { PeersanError, PeerUnavailableError } from '../errors';
import { FrameReader, InPlaceReads } from './frame-reader';
import { LogLimiter } from '../log';
import { peerFrameBytesMax, peerHandshakeMsMax, peerHandshakesMax, peerHelloBytesMax, peerKeepAliveMs } from '../limits';

/** What a data stream's client sends first, and the server sends back to say "go on". */
export const dataPreamble = Buffer.from('PSDATA1\n', 'latin1');
const lengthBytes = 4;
const okAnswer = 'ok';

/** `payload` as one frame: [u32 length][payload]. */
export function frameOf(payload: Buffer): Buffer {
  const b = Buffer.allocUnsafe(lengthBytes + payload.length);
  b.writeUInt32BE(payload.length, 0);
  payload.copy(b, lengthBytes);
  return b;
}

/** A hello's payload: the peer-auth fields, one per line. */
export function encodeHello(f: PeerAuthFields): Buffer {
  return Buffer.from(`${f.peerId}\n${f.stamp}\n${f.nonce}\n${f.mac}`, 'utf8');
}

/** The fields of a hello (checked by verifyPeerAuthFields, not here), or undefined when it does not have four. */
export function decodeHello(b: Buffer): PeerAuthFields | undefined {
  const parts = b.toString('utf8').split('\n');
  if (parts.length !== 4) return undefined;
  const [peerId, stamp, nonce, mac] = parts;
  return { peerId, stamp, nonce, mac };
}

/** "host:port" or "[v6]:port" → its parts (the address was checked as config or came from a peer record). */
function hostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(address.slice(i + 1)) };
}

function tuneSocket(socket: net.Socket): void {
  // A batch is one write; Nagle would hold a lone request back for the previous one's ACK.
  socket.setNoDelay(true);
  socket.setKeepAlive(true, peerKeepAliveMs);
}

export interface DialOptions {
  /** The peer called (errors name it; with TLS its certificate must name it: `tls` checks). */
  peerId: string;
  address: string;
  /** Fresh peer-auth fields for the hello (peer-auth.ts peerAuthFields for peerDataMethod). */
  hello(): PeerAuthFields;
  /** Mutual TLS options (peer-tls.ts peerTlsConnectOptions); absent: plain. */
  tls?: tls.ConnectionOptions;
  timeoutMs: number;
  /** Where the replies of a plain stream are received (read-buffers.ts take); default: fresh buffers. */
  frameBuffer?: (n: number) => Buffer;
}

/** An open, authenticated data stream: its socket (paused until receive). */
export interface DataStream {
  socket: net.Socket;
  /**
   * Hand on the stream's frames from now on, in order: each read's frames, or undefined once
   * the bytes are not frames (the stream is then unusable). Resumes the socket.
   */
  receive(onFrames: (frames: Buffer[] | undefined) => void): void;
  /** True while a frame (or its length) has begun and not ended: a stream closing now cut it. */
  readonly midFrame: boolean;
}

/** A data stream whose bytes come as 'data' events (accepted sockets; TLS). */
function chunkedStream(socket: net.Socket, frameBuffer?: (n: number) => Buffer): DataStream {
  const reader = new FrameReader(peerFrameBytesMax, frameBuffer);
  return {
    socket,
    receive(onFrames) {
      socket.on('data', (chunk: Buffer) => onFrames(reader.read(chunk)));
      socket.resume();
    },
    get midFrame() {
      return reader.midFrame;
    },
  };
}

/**
 * Open a data stream (the client side of the handshake above). Fails with PeerUnavailableError,
 * unsent, within `timeoutMs`: unreachable, the handshake broken or refused (not transient: a
 * refused hello will be refused again).
 *
 * A plain stream is read in place (frame-reader.ts InPlaceReads, through Node's `onread`): the
 * replies it carries, 128 KiB reads above all, are what a forwarding peer receives. A TLS
 * stream is read from 'data' events (`onread` does not apply to a TLS socket made over an open
 * one, as STARTTLS makes it).
 */
export function dialDataStream(o: DialOptions): Promise<DataStream> {
  return new Promise((resolve, reject) => {
    const inPlace = o.tls ? undefined : new InPlaceReads(new FrameReader(peerFrameBytesMax, o.frameBuffer));
    let onRead: (n: number, buf: Uint8Array) => void = () => undefined;
    const callback = (n: number, buf: Uint8Array): boolean => {
      onRead(n, buf);
      return true;
    };
    const raw = inPlace ? net.connect({ ...hostPort(o.address), onread: { buffer: () => inPlace.next(), callback } }) : net.connect(hostPort(o.address));
    let socket: net.Socket = raw;
    /** The handshake's bytes of `s`, as chunks of their own, to `fn` until the returned function is called. */
    const listen = (s: net.Socket, fn: (chunk: Buffer) => void): (() => void) => {
      if (inPlace && s === raw) {
        onRead = (n, buf) => fn(Buffer.from(buf.subarray(0, n)));
        return () => (onRead = () => undefined);
      }
      s.on('data', fn);
      return () => s.off('data', fn);
    };
    let settled = false;
    const fail = (why: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      raw.destroy();
      socket.destroy();
      reject(new PeerUnavailableError(o.peerId, why, false, { unsent: true }));
    };
    const timer = setTimeout(() => fail(`not reachable at ${o.address} within ${o.timeoutMs} ms`), o.timeoutMs);
    const onRawError = (err: Error): void => fail(`not reachable at ${o.address}: ${err.message}`);
    const onRawClose = (): void => fail(`${o.address} closed the data stream during its handshake`);
    const onTlsError = (err: Error): void => fail(`TLS with ${o.address}: ${err.message}`);
    raw.on('error', onRawError);
    raw.once('close', onRawClose);
    raw.once('connect', () => {
      tuneSocket(raw);
      raw.write(dataPreamble);
      readPreamble(raw, listen, () => (o.tls ? startTls() : sayHello()), fail);
    });
    const startTls = (): void => {
      socket = tls.connect({ ...o.tls, socket: raw });
      socket.on('error', onTlsError);
      socket.once('secureConnect', sayHello);
    };
    const sayHello = (): void => {
      const reader = new FrameReader(peerHelloBytesMax);
      const off = listen(socket, (chunk: Buffer): void => {
        const frames = reader.read(chunk);
        if (!frames) return fail(`${o.address} answered the hello with a malformed frame`);
        if (frames.length === 0) return;
        const answer = frames[0].toString('utf8');
        if (answer !== okAnswer) return fail(answer.startsWith('refused') ? answer : `${o.address} answered the hello with something else`);
        if (frames.length > 1 || reader.midFrame) return fail(`${o.address} sent frames before it was asked`);
        settled = true;
        clearTimeout(timer);
        off();
        socket.pause();
        raw.off('close', onRawClose);
        raw.off('error', onRawError);
        socket.off('error', onTlsError);
        // Under TLS the raw socket's errors end the TLS socket, which the caller watches.
        if (socket !== raw) raw.on('error', () => undefined);
        if (!inPlace) return resolve(chunkedStream(socket, o.frameBuffer));
        resolve({
          socket,
          receive(onFrames) {
            onRead = (n) => onFrames(inPlace.read(n));
            raw.resume();
          },
          get midFrame() {
            return inPlace.midFrame;
          },
        });
      });
      socket.resume();
      socket.write(frameOf(encodeHello(o.hello())));
    };
  });
}

/** Read exactly the preamble from `socket` (the server's "go on"), then pause it. */
function readPreamble(socket: net.Socket, listen: (s: net.Socket, fn: (chunk: Buffer) => void) => () => void, then: () => void, fail: (why: string) => void): void {
  let got: Buffer = Buffer.alloc(0);
  const off = listen(socket, (chunk: Buffer): void => {
    got = Buffer.concat([got, chunk]);
    if (got.length < dataPreamble.length) return;
    off();
    socket.pause();
    if (got.length !== dataPreamble.length || !got.equals(dataPreamble)) return fail('the peer at this address does not speak the data stream protocol');
    then();
  });
}

export interface RpcListenerOptions {
  /** Server TLS (peer-tls.ts peerTlsServerOptions); absent: plain. */
  tls?: DataTlsServer;
  /**
   * Checks a hello (peer-rpc.ts PeerAuthenticator): `certified` is the peer id of the client's
   * verified certificate under TLS. Logs its own refusals.
   */
  authenticate(hello: PeerAuthFields, certified: string | undefined, from: string): PeerAuthVerdict;
  /** An authenticated data stream from peer `peerId` (page-service.ts serveStream). */
  serve(stream: DataStream, peerId: string): void;
  /** A connection that is not a data stream: gRPC's (its first bytes are back in the socket). */
  other(socket: net.Socket): void;
  log: Logger;
}

/** The rpc port: gRPC and data streams on one listener (see the top of this file). */
export class RpcListener {
  private readonly server: net.Server;
  /** Every open connection, to end them all at a forced shutdown. */
  private readonly sockets = new Set<net.Socket>();
  private handshaking = 0;
  private readonly limiter = new LogLimiter();

  constructor(private readonly o: RpcListenerOptions) {
    this.server = net.createServer((socket) => this.accept(socket));
  }

  /** Listen on `host:port`; fails with `cannot listen on ADDR: …`. */
  listen(host: string, port: number, address: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(new PeersanError(`cannot listen on ${address}: ${err.message}`));
      this.server.once('error', onError);
      this.server.listen(port, host, () => {
        this.server.off('error', onError);
        resolve();
      });
    });
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Accept no more connections (the open ones are ended by their owners: gRPC, the page service). */
  close(): void {
    this.server.close();
  }

  /** End every connection at once (a forced shutdown). */
  destroy(): void {
    this.server.close();
    for (const s of this.sockets) s.destroy();
  }

  private accept(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
    // A socket's errors end in its 'close'; never unhandled.
    socket.on('error', () => undefined);
    const from = `${socket.remoteAddress}:${socket.remotePort}`;
    if (this.handshaking >= peerHandshakesMax) {
      this.limiter.warn(this.o.log, 'handshakes-full', { from, max: peerHandshakesMax }, 'too many connections on the rpc port still in their handshake; closing a new one');
      socket.destroy();
      return;
    }
    this.handshaking++;
    let counted = true;
    const done = (): void => {
      if (!counted) return;
      counted = false;
      this.handshaking--;
      clearTimeout(timer);
    };
    const timer = setTimeout(() => {
      this.limiter.warn(this.o.log, 'handshake-slow', { from }, `a connection on the rpc port did not finish its handshake within ${peerHandshakeMsMax} ms; closing it`);
      done();
      socket.destroy();
    }, peerHandshakeMsMax);
    socket.once('close', done);
    this.sniff(socket, from, done);
  }

  /** A data stream's preamble, or anything else for gRPC (put back into the socket unread). */
  private sniff(socket: net.Socket, from: string, done: () => void): void {
    let got: Buffer = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      got = got.length === 0 ? chunk : Buffer.concat([got, chunk]);
      const n = Math.min(got.length, dataPreamble.length);
      const isData = got.subarray(0, n).equals(dataPreamble.subarray(0, n));
      if (isData && got.length < dataPreamble.length) return;
      socket.off('data', onData);
      socket.pause();
      if (!isData) {
        done();
        socket.unshift(got);
        this.o.other(socket);
        return;
      }
      // The client waits for our preamble before sending more (step 1).
      if (got.length > dataPreamble.length) return this.refuse(socket, from, 'bytes after the preamble before it was answered');
      tuneSocket(socket);
      socket.write(dataPreamble);
      const serverTls = this.o.tls;
      if (!serverTls) return this.hello(socket, from, undefined, done);
      const secure = new tls.TLSSocket(socket, { ...serverTls.options, isServer: true, requestCert: true, rejectUnauthorized: true });
      secure.on('error', (err) => {
        this.limiter.warn(this.o.log, 'data-tls', { from, reason: err.message }, 'a data stream failed its TLS handshake; closing it');
        socket.destroy();
      });
      secure.once('secure', () => {
        // A server TLSSocket made by hand does not check the client's certificate (only a
        // tls.Server's connections are): one not from the cluster CA is refused here.
        const certified = serverTls.certifiedPeerId(secure.getPeerX509Certificate());
        if (certified === undefined) return this.refuse(secure, from, 'no client certificate from the cluster CA');
        this.hello(secure, from, certified, done);
      });
    };
    socket.on('data', onData);
  }

  /** Step 3: read the hello on `stream` (the socket, or TLS over it), answer, hand the stream on. */
  private hello(stream: net.Socket, from: string, certified: string | undefined, done: () => void): void {
    const reader = new FrameReader(peerHelloBytesMax);
    const onData = (chunk: Buffer): void => {
      const frames = reader.read(chunk);
      if (frames?.length === 0) return;
      stream.off('data', onData);
      stream.pause();
      const fields = frames?.length === 1 && !reader.midFrame ? decodeHello(frames[0]) : undefined;
      if (!fields) return this.refuse(stream, from, 'a malformed hello');
      const verdict = this.o.authenticate(fields, certified, from);
      if (!verdict.ok) return this.answer(stream, `refused: ${verdict.why}`);
      done();
      stream.write(frameOf(Buffer.from(okAnswer)));
      this.o.serve(chunkedStream(stream), verdict.peerId);
    };
    stream.on('data', onData);
    stream.resume();
  }

  /** A protocol violation: logged (rate-limited) and answered; the handshake timer closes what the client leaves open. */
  private refuse(stream: net.Socket, from: string, what: string): void {
    this.limiter.warn(this.o.log, `data-protocol:${what}`, { from }, `${what} on a data stream; closing it`);
    this.answer(stream, `refused: ${what}`);
  }

  private answer(stream: net.Socket, text: string): void {
    stream.end(frameOf(Buffer.from(text.slice(0, peerHelloBytesMax - 1), 'utf8')));
  }
}
