// Raw block data streams for tests (src/routing/data-stream.ts): one opened as a peer would,
// whose bytes the test writes as it likes (a hostile peer), and a fake owner on a real
// RpcListener whose answers the test decides. How a stream is opened and authenticated is here
// alone: the fuzz and hostile-frame suites follow it.

import type * as net from 'node:net';
import type { ConnectionOptions } from 'node:tls';
import { peerAuthFields, peerDataMethod } from '../../src/cluster/peer-auth';
import { dialDataStream, RpcListener, type DataStream } from '../../src/routing/data-stream';
import { FrameReader } from '../../src/routing/frame-reader';
import { peerFrameBytesMax } from '../../src/limits';
import { silentLogger } from '../../src/log';

export interface RawStream {
  /** Write bytes as given (a case may send a malformed batch); queued until the stream is open. */
  write(bytes: Buffer): void;
  /** Frames received so far (each a whole frame, the length prefix removed). */
  frames: Buffer[];
  /** Why the stream ended, once it has. */
  ended: string | undefined;
  /** Resolves with why the stream ended. */
  closed: Promise<string>;
  /** Resolves once a frame arrives or the stream ends (or `timeoutMs`). */
  next(timeoutMs: number): Promise<void>;
  close(): void;
}

/** A data stream to `address`, authenticated as member `asPeer` (the handshake as link.ts makes it). */
export function openRawStream(address: string, secret: string, asPeer: string, tls?: ConnectionOptions): RawStream {
  let wake: (() => void) | undefined;
  let endClosed!: (why: string) => void;
  const opened: Promise<DataStream | undefined> = dialDataStream({ peerId: 'owner', address, hello: () => peerAuthFields(secret, asPeer, peerDataMethod), tls, timeoutMs: 2_000 }).then(
    (d) => d,
    (err: Error) => {
      end(`refused: ${err.message}`);
      return undefined;
    },
  );
  const end = (why: string): void => {
    s.ended ??= why;
    endClosed(s.ended);
    wake?.();
  };
  const s: RawStream = {
    frames: [],
    ended: undefined,
    closed: new Promise<string>((r) => (endClosed = r)),
    write: (bytes) => void opened.then((d) => d && !d.socket.destroyed && d.socket.write(bytes)),
    next: (timeoutMs) =>
      new Promise<void>((r) => {
        if (s.ended) return r();
        const timer = setTimeout(r, timeoutMs);
        wake = () => {
          clearTimeout(timer);
          r();
        };
      }),
    close: () => {
      end('closed');
      void opened.then((d) => d?.socket.destroy());
    },
  };
  void opened.then((d) => {
    if (!d) return;
    d.socket.on('error', (err) => end(err.message));
    d.socket.on('close', () => end('closed by the owner'));
    d.receive((frames) => {
      if (!frames) return end('malformed reply');
      s.frames.push(...frames);
      wake?.();
    });
  });
  return s;
}

/** [u32 length][frame] for each frame. */
export function batchOf(frames: Buffer[]): Buffer {
  return Buffer.concat(
    frames.flatMap((f) => {
      const head = Buffer.alloc(4);
      head.writeUInt32BE(f.length, 0);
      return [head, f];
    }),
  );
}

/** A fake owner: every authenticated stream's frames go to `onFrame(frame, socket)`; anything else than a data stream is closed. */
export async function fakeOwner(onFrame: (frame: Buffer, socket: net.Socket) => void, port = 0): Promise<{ address: string; sockets: net.Socket[]; stop(): void }> {
  const sockets: net.Socket[] = [];
  const listener = new RpcListener({
    authenticate: (hello) => ({ ok: true, peerId: hello.peerId }),
    serve: ({ socket }) => {
      sockets.push(socket);
      const reader = new FrameReader(peerFrameBytesMax);
      socket.on('data', (chunk: Buffer) => {
        for (const f of reader.read(chunk) ?? []) onFrame(f, socket);
      });
      socket.on('error', () => undefined);
      socket.resume();
    },
    other: (socket) => socket.destroy(),
    log: silentLogger(),
  });
  await listener.listen('127.0.0.1', port, `127.0.0.1:${port}`);
  return { address: `127.0.0.1:${listener.port}`, sockets, stop: () => listener.destroy() };
}
