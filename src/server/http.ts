// The HTTP side of one peer (on `peer.http`): the console's static files, its JSON API
// (http-api.ts, onto the same AdminApi as the gRPC AdminService), a server-sent event stream
// for live refresh, /metrics and /healthz.
//
// Access: every /api request needs `Authorization: Bearer <admin token>` (401 otherwise, reads
// included). The page itself and its scripts hold no data and are served without the token.
// /healthz and /metrics need no token, so load balancers and Prometheus scrapers work
// unconfigured; neither carries a secret (metrics name peers, volumes and operations only).
// The token travels in a header, never in a cookie or URL, so another site cannot make a
// browser act with it.

import { readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { extname, join } from 'node:path';
import type { Logger } from 'pino';
import { LogLimiter } from '../log';
import { PeersanError, UnauthorizedError } from '../errors';
import { consoleRefreshMs, consoleStreamClientsMax, httpBodyBytesMax, httpRequestMsMax } from '../limits';
import { tokenEquals } from './admin';
import { splitHostPort } from './config';
import { groupChanges, snapshotOf, type EventLog, type GroupSnapshot, type PeerEvent } from './events';
import { consoleState, handleApi, httpStatusOf, isExpectedRefusal, type ApiContext, type ConsoleAdminApi } from './http-api';
import type { PeerMetrics } from './metrics';

/** console/ at the repository root: ../../console from dist/server/ (and from src/server/ under tests). */
export const consoleDirDefault = join(__dirname, '..', '..', 'console');

const contentTypes: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
};

const securityHeaders = {
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  // Everything comes from this peer: no CDN, no inline script.
  'Content-Security-Policy': "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
};

/** A stream client whose unsent data passes this is too slow and is dropped. */
const streamQueuedBytesMax = 1024 * 1024;

export interface HttpConsoleOptions {
  /** host:port to listen on. */
  address: string;
  self: string;
  adminToken: string;
  api: ConsoleAdminApi;
  events: EventLog;
  metrics: PeerMetrics;
  log: Logger;
  consoleDir?: string;
}

class TooLargeError extends PeersanError {
  constructor() {
    super(`request body larger than ${httpBodyBytesMax} bytes`, 'PEERSAN_ERR_TOO_LARGE');
  }
}

export class HttpConsole {
  private readonly o: HttpConsoleOptions;
  private readonly log: Logger;
  private readonly server: Server;
  private readonly ctx: ApiContext;
  private readonly assets: Map<string, string>;
  private readonly consoleDir: string;
  private readonly streams = new Set<ServerResponse>();
  /** Every warning a client can cause at will goes through here (issue 15 item 10). */
  private readonly limiter = new LogLimiter();
  private ticker: NodeJS.Timeout | undefined;
  private ticking = false;
  private lastGroup: GroupSnapshot | undefined;
  private closing: Promise<void> | undefined;

  private constructor(opts: HttpConsoleOptions) {
    this.o = opts;
    this.log = opts.log.child({ component: 'http' });
    this.consoleDir = opts.consoleDir ?? consoleDirDefault;
    this.assets = listAssets(this.consoleDir, this.log);
    this.ctx = { api: opts.api, self: opts.self, events: opts.events, hostIo: () => opts.metrics.totals };
    this.server = createServer((req, res) => void this.serve(req, res));
    this.server.requestTimeout = httpRequestMsMax;
    this.server.headersTimeout = Math.min(httpRequestMsMax, 20_000);
    this.server.on('clientError', (_err, socket) => socket.destroy());
  }

  static async start(opts: HttpConsoleOptions): Promise<HttpConsole> {
    const c = new HttpConsole(opts);
    const { host, port } = splitHostPort(opts.address, 'http');
    await new Promise<void>((resolve, reject) => {
      c.server.once('error', (err) => reject(new PeersanError(`cannot listen on ${opts.address} (http): ${err.message}`)));
      c.server.listen(port, host, () => resolve());
    });
    c.server.on('error', (err) => c.log.error({ err }, 'http server error'));
    return c;
  }

  get address(): { host: string; port: number } {
    const a = this.server.address();
    return a && typeof a === 'object' ? { host: a.address, port: a.port } : splitHostPort(this.o.address, 'http');
  }

  /** Ends the event streams and open connections. Idempotent. */
  close(): Promise<void> {
    if (!this.closing) {
      this.closing = new Promise<void>((resolve) => {
        this.stopTicker();
        for (const s of this.streams) s.end();
        this.streams.clear();
        this.server.close(() => resolve());
        this.server.closeAllConnections();
      });
    }
    return this.closing;
  }

  private async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const url = new URL(req.url ?? '/', 'http://peer');
      const path = url.pathname;
      if (path === '/healthz') return this.send(res, 200, `ok ${this.o.self}\n`, 'text/plain; charset=utf-8');
      if (path === '/metrics') return this.send(res, 200, await this.o.metrics.text(), this.o.metrics.contentType);
      if (path === '/api' || path.startsWith('/api/')) return await this.serveApi(req, res, url);
      return await this.serveAsset(req, res, path);
    } catch (err) {
      // A client that went away mid-request (closed before its announced body) is no failure
      // of ours and can be repeated at will: no log line beyond debug, nothing to answer.
      if ((err as NodeJS.ErrnoException).code === 'ECONNRESET') {
        this.log.debug({ url: req.url, reason: err instanceof Error ? err.message : String(err) }, 'http client went away');
        return;
      }
      const status = httpStatusOf(err);
      if (status >= 500) this.logFailure(err, 'http request failed', { url: req.url });
      this.json(res, status, { error: err instanceof Error ? err.message : String(err) });
    }
  }

  /**
   * A request that ended in a 5xx, in the log at most once per kind per window (with the
   * count suppressed): a refusal we meant (too many streams, not available) as its message
   * only; anything else with its stack, as it may be a bug of ours.
   */
  private logFailure(err: unknown, msg: string, obj: Record<string, unknown>): void {
    if (isExpectedRefusal(err)) this.limiter.warn(this.log, `${msg}/${err.code}`, { ...obj, code: err.code, reason: err.message }, msg);
    else this.limiter.log(this.log, 'error', msg, { ...obj, err }, msg);
  }

  private async serveApi(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    if (!tokenEquals(bearer(req), this.o.adminToken)) {
      res.setHeader('WWW-Authenticate', 'Bearer');
      throw new UnauthorizedError('admin token missing or wrong (send Authorization: Bearer <token>; it is cluster.adminToken in cluster.yaml)');
    }
    const parts = url.pathname.slice('/api/'.length).split('/').filter(Boolean).map(decodePart);
    const method = req.method ?? 'GET';
    if (method === 'GET' && parts.length === 1 && parts[0] === 'events') return this.openStream(req, res, url);
    const body = method === 'GET' || method === 'HEAD' ? undefined : await readJson(req);
    const reply = await handleApi(this.ctx, { method, parts, query: url.searchParams, body });
    if (reply.err) this.logFailure(reply.err, 'admin request failed', { method, url: req.url });
    this.json(res, reply.status, reply.body);
  }

  private async serveAsset(req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
    if (req.method !== 'GET' && req.method !== 'HEAD') return this.json(res, 405, { error: `${req.method} is not allowed on ${path}` });
    const name = path === '/' ? 'index.html' : path.slice(1);
    const type = this.assets.get(name);
    if (!type) return this.json(res, 404, { error: `no such page ${path}` });
    const data = await readFile(join(this.consoleDir, name));
    res.writeHead(200, { 'Content-Type': type, 'Content-Length': data.length, 'Cache-Control': 'no-cache', ...securityHeaders });
    res.end(req.method === 'HEAD' ? undefined : data);
  }

  private send(res: ServerResponse, status: number, body: string, type: string): void {
    res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store', ...securityHeaders });
    res.end(body);
  }

  private json(res: ServerResponse, status: number, body: unknown): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    this.send(res, status, JSON.stringify(body), 'application/json; charset=utf-8');
  }

  // ---- event stream: `state` every consoleRefreshMs, `event` as they happen ---------------

  private async openStream(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    if (this.streams.size >= consoleStreamClientsMax) {
      throw new PeersanError(`too many console streams open on this peer (${consoleStreamClientsMax}); close a tab or poll /api/status`, 'PEERSAN_ERR_BUSY');
    }
    res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-store', Connection: 'keep-alive', ...securityHeaders });
    this.streams.add(res);
    const after = Number(req.headers['last-event-id'] ?? url.searchParams.get('after') ?? 0) || 0;
    for (const e of this.o.events.since(after)) this.push(res, eventFrame(e));
    const unsubscribe = this.o.events.subscribe((e) => this.push(res, eventFrame(e)));
    res.on('close', () => {
      unsubscribe();
      this.streams.delete(res);
      if (this.streams.size === 0) this.stopTicker();
    });
    this.startTicker();
    await this.tick(res);
  }

  private push(res: ServerResponse, frame: string): void {
    if (res.writableEnded || res.destroyed) return;
    if (res.writableLength > streamQueuedBytesMax) {
      this.limiter.warn(this.log, 'slow-stream', {}, 'dropping a console stream that does not keep up');
      res.destroy();
      return;
    }
    res.write(frame);
  }

  private startTicker(): void {
    if (this.ticker) return;
    this.ticker = setInterval(() => void this.tick(), consoleRefreshMs);
    this.ticker.unref();
  }

  private stopTicker(): void {
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = undefined;
  }

  /**
   * One state for every stream (or just `only`, a stream that just opened). The group seen
   * now against the group seen last time gives the peer up/down and session events.
   */
  private async tick(only?: ServerResponse): Promise<void> {
    if (this.ticking && !only) return;
    if (!only) this.ticking = true;
    try {
      const state = await consoleState(this.ctx);
      const group = snapshotOf(state);
      if (this.lastGroup) for (const c of groupChanges(this.lastGroup, group)) this.o.events.add(c.kind, c.message, { peer: c.peer });
      this.lastGroup = group;
      const frame = `event: state\ndata: ${JSON.stringify(state)}\n\n`;
      for (const s of only ? [only] : this.streams) this.push(s, frame);
    } catch (err) {
      this.limiter.warn(this.log, 'console-state', { reason: err instanceof Error ? err.message : String(err) }, 'console state failed');
    } finally {
      if (!only) this.ticking = false;
    }
  }
}

function eventFrame(e: PeerEvent): string {
  return `id: ${e.seq}\nevent: event\ndata: ${JSON.stringify(e)}\n\n`;
}

function bearer(req: IncomingMessage): string {
  const h = req.headers.authorization ?? '';
  return h.startsWith('Bearer ') ? h.slice('Bearer '.length) : '';
}

function decodePart(p: string): string {
  try {
    return decodeURIComponent(p);
  } catch {
    return p;
  }
}

/** The request's JSON body, at most httpBodyBytesMax bytes; no body → undefined. */
function readJson(req: IncomingMessage): Promise<unknown> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > httpBodyBytesMax) return Promise.reject(new TooLargeError());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    req.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (bytes > httpBodyBytesMax) {
        req.removeAllListeners('data');
        req.resume();
        reject(new TooLargeError());
        return;
      }
      chunks.push(chunk);
    });
    req.on('error', reject);
    req.on('end', () => {
      if (bytes > httpBodyBytesMax) return;
      const text = Buffer.concat(chunks).toString('utf8').trim();
      if (!text) return resolve(undefined);
      try {
        resolve(JSON.parse(text));
      } catch {
        reject(new PeersanError('the request body is not valid JSON', 'PEERSAN_ERR_INVALID_ARGUMENT'));
      }
    });
  });
}

/** The console's files (plain names only; nothing outside the folder is ever served). */
function listAssets(dir: string, log: Logger): Map<string, string> {
  const assets = new Map<string, string>();
  let names: string[] = [];
  try {
    names = readdirSync(dir);
  } catch {
    log.warn({ dir }, 'console files not found: / will answer 404 (the API, /metrics and /healthz still work)');
  }
  for (const name of names) {
    const type = contentTypes[extname(name)];
    if (type && /^[a-z0-9][a-z0-9._-]*$/i.test(name)) assets.set(name, type);
  }
  return assets;
}
