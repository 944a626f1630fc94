// A TCP proxy for network faults between real processes: each peer dials the others, and etcd,
// through a proxy of its own per destination (a per-peer cluster.yaml names them), so the test
// can cut one link, or isolate a peer from everyone, and heal it again, without any switch in
// src/. Everything is bounded (connections per proxy; bytes in flight by TCP backpressure, a
// paused socket stops reading) and closed by the test's teardown.
//
// A cut is a blackhole, as a pulled cable or a partition is: the connections stay open and carry
// nothing in either direction (no RST, so each side finds out by its own timeouts), and a new
// connection is accepted but not connected onward. A heal lets the bytes held back meanwhile go
// through (as TCP retransmits them) and connects the held connections onward. `reset` mode ends
// every connection through the link at the cut and refuses new ones (a peer's crash as its
// neighbours see it).

import { createServer, Socket, type Server } from 'node:net';

/** At most this many client connections per proxy; beyond it a new one is closed at once. */
export const proxyConnectionsMax = 256;

export type CutMode = 'blackhole' | 'reset';

/** One client connection and its onward connection (absent while held by a cut). */
interface Pair {
  client: Socket;
  server: Socket | undefined;
}

/** Forward `from` to `to` while `open()` says so, with backpressure; a paused socket keeps its bytes. */
function forward(from: Socket, to: Socket, open: () => boolean): void {
  from.on('data', (chunk: Buffer) => {
    if (!to.write(chunk)) from.pause();
  });
  to.on('drain', () => {
    if (open()) from.resume();
  });
}

export class TcpProxy {
  private readonly pairs = new Set<Pair>();
  private cutMode: CutMode | undefined;

  private constructor(
    private readonly server: Server,
    readonly port: number,
    private readonly targetPort: number,
    readonly name: string,
  ) {}

  /** Listen on 127.0.0.1 (a free port) and forward to 127.0.0.1:`targetPort`. */
  static start(targetPort: number, name = `→${targetPort}`): Promise<TcpProxy> {
    return new Promise((resolve, reject) => {
      const server = createServer();
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        const proxy = new TcpProxy(server, (server.address() as { port: number }).port, targetPort, name);
        server.on('connection', (c) => proxy.accept(c));
        resolve(proxy);
      });
    });
  }

  get isCut(): boolean {
    return this.cutMode !== undefined;
  }

  get connections(): number {
    return this.pairs.size;
  }

  private accept(client: Socket): void {
    if (this.pairs.size >= proxyConnectionsMax || this.cutMode === 'reset') {
      client.destroy();
      return;
    }
    const pair: Pair = { client, server: undefined };
    this.pairs.add(pair);
    client.on('error', () => undefined);
    client.on('close', () => this.drop(pair));
    client.pause();
    // Held (not connected onward) while the link is cut; the heal connects it.
    if (!this.cutMode) this.connect(pair);
  }

  private connect(pair: Pair): void {
    const server = new Socket();
    pair.server = server;
    server.on('error', () => undefined);
    server.on('close', () => this.drop(pair));
    server.pause();
    const open = () => this.cutMode === undefined;
    forward(pair.client, server, open);
    forward(server, pair.client, open);
    server.connect(this.targetPort, '127.0.0.1', () => {
      if (open()) this.flow(pair);
    });
  }

  private flow(pair: Pair): void {
    pair.client.resume();
    pair.server?.resume();
  }

  private drop(pair: Pair): void {
    if (!this.pairs.delete(pair)) return;
    pair.client.destroy();
    pair.server?.destroy();
  }

  /** Cut the link in both directions (see the header for the two modes). */
  cut(mode: CutMode = 'blackhole'): void {
    this.cutMode = mode;
    for (const pair of [...this.pairs]) {
      if (mode === 'reset') {
        pair.client.resetAndDestroy();
        this.drop(pair);
        continue;
      }
      pair.client.pause();
      pair.server?.pause();
    }
  }

  /** Let bytes through again: held connections are connected onward, paused ones resume. */
  heal(): void {
    this.cutMode = undefined;
    for (const pair of this.pairs) {
      if (pair.server) this.flow(pair);
      else this.connect(pair);
    }
  }

  /** Stop listening and end every connection through the proxy. */
  close(): Promise<void> {
    for (const pair of [...this.pairs]) this.drop(pair);
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** The name of the catalog (etcd) among a mesh's destinations. */
export const catalogLink = 'etcd';

/**
 * One proxy per ordered pair (from, to) of peers, and per peer to the catalog: `address(from,
 * to)` is the host:port `from` dials to reach `to`. `cut(a, b)` cuts the link both ways,
 * `isolate(a)` cuts `a` from every peer and from the catalog.
 */
export class ProxyMesh {
  private constructor(private readonly proxies: Map<string, TcpProxy>) {}

  /** `targets`: destination name (peer id, or `catalogLink`) → its real port on 127.0.0.1; `peers`: who dials. */
  static async start(peers: readonly string[], targets: ReadonlyMap<string, number>): Promise<ProxyMesh> {
    const proxies = new Map<string, TcpProxy>();
    for (const from of peers) {
      for (const [to, port] of targets) if (to !== from) proxies.set(key(from, to), await TcpProxy.start(port, `${from}→${to}`));
    }
    return new ProxyMesh(proxies);
  }

  proxy(from: string, to: string): TcpProxy {
    const p = this.proxies.get(key(from, to));
    if (!p) throw new Error(`no proxy from ${from} to ${to}`);
    return p;
  }

  address(from: string, to: string): string {
    return `127.0.0.1:${this.proxy(from, to).port}`;
  }

  /** Cut the link between `a` and `b` (a peer, or `catalogLink`) in both directions. */
  cut(a: string, b: string, mode: CutMode = 'blackhole'): void {
    for (const p of this.linkProxies(a, b)) p.cut(mode);
  }

  heal(a: string, b: string): void {
    for (const p of this.linkProxies(a, b)) p.heal();
  }

  /** Cut `a` off from every other peer and from the catalog. */
  isolate(a: string, mode: CutMode = 'blackhole'): void {
    for (const [k, p] of this.proxies) if (k.split('→').includes(a)) p.cut(mode);
  }

  healAll(): void {
    for (const p of this.proxies.values()) p.heal();
  }

  close(): Promise<void> {
    return Promise.all([...this.proxies.values()].map((p) => p.close())).then(() => undefined);
  }

  private linkProxies(a: string, b: string): TcpProxy[] {
    return [this.proxies.get(key(a, b)), this.proxies.get(key(b, a))].filter((p): p is TcpProxy => p !== undefined);
  }
}

function key(from: string, to: string): string {
  return `${from}→${to}`;
}
