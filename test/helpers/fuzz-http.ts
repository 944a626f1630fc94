// HTTP requests for the fuzz suite, written as raw bytes to the console/API port (so that a
// case can send what no HTTP client would: broken request lines, lying lengths, cut-off
// requests). Requests that carry the admin token never name the suite's own volumes, so a
// random DELETE cannot take away what the other checks read.

import { Socket } from 'node:net';
import type { Rng } from './fuzz-rng';

const methods = ['GET', 'POST', 'PUT', 'DELETE', 'HEAD', 'OPTIONS', 'PATCH', 'TRACE', 'CONNECT', 'G\0ET', 'get', ''];
const segments = ['status', 'events', 'recent', 'volumes', 'pagemap', 'heat', 'pages', 'move', 'snapshots', 'migrations', 'rebalancing', 'resize', 'access', 'metrics'];
const nasty = ['..', '%2e%2e', '%2f', '%00', '%', '%zz', '~', '\u00e9', 'x'.repeat(300), '4294967297', '1e3', '-1', '0x10', 'NaN', '{}', '%ff%fe'];
const bodies = ['{}', '{"name":"zz","size":"1M"}', '{"size":"9999999T"}', '{"to":"p9"}', '{"enabled":"yes"}', '[', '{"a":', 'null', '"x"', '{"name":{"$gt":""}}', '{"__proto__":{"x":1}}'];

function randomPath(rng: Rng): string {
  if (rng.chance(0.1)) return rng.pick(['/', '/metrics', '/index.html', '/../../etc/passwd', '/console/../../cluster.yaml', '*', 'http://x/api/status', '//api//status']);
  const parts = ['api'];
  const n = rng.range(0, 5);
  for (let i = 0; i < n; i++) parts.push(rng.chance(0.6) ? rng.pick(segments) : rng.chance(0.5) ? rng.pick(nasty) : `fz${rng.int(1000)}`);
  const query = rng.chance(0.2) ? `?after=${rng.pick(['0', '-1', '1e309', 'x', '9'.repeat(40)])}` : '';
  return '/' + parts.join('/') + query;
}

/** One request's bytes. */
export function randomHttpRequest(rng: Rng, token: string): Buffer {
  const method = rng.pick(methods);
  const body = rng.chance(0.5) ? (rng.chance(0.8) ? rng.pick(bodies) : rng.bytes(rng.range(1, 512)).toString('latin1')) : '';
  const lines = [`${method} ${randomPath(rng)} ${rng.chance(0.95) ? 'HTTP/1.1' : rng.pick(['HTTP/9.9', 'HTTP/1.0', ''])}`, 'Host: 127.0.0.1'];
  if (rng.chance(0.7)) lines.push(`Authorization: ${rng.chance(0.8) ? `Bearer ${token}` : rng.pick(['Bearer ', 'Basic x', `Bearer ${token}x`, 'Bearer ' + 'a'.repeat(5000)])}`);
  if (body || rng.chance(0.1)) {
    const length = rng.chance(0.8) ? Buffer.byteLength(body, 'latin1') : rng.pick([0, 1, 1e9, -1, 99999999999]);
    lines.push(rng.chance(0.9) ? `Content-Length: ${length}` : 'Transfer-Encoding: chunked');
    lines.push(`Content-Type: ${rng.pick(['application/json', 'text/plain', 'multipart/form-data; boundary=x'])}`);
  }
  if (rng.chance(0.1)) lines.push(`X-Junk: ${'y'.repeat(rng.range(1, 20000))}`);
  lines.push('Connection: close');
  const bytes = Buffer.from(`${lines.join('\r\n')}\r\n\r\n${body}`, 'latin1');
  // A request cut off anywhere (the server must not wait for the rest forever, nor fail).
  return rng.chance(0.1) ? bytes.subarray(0, rng.int(bytes.length)) : bytes;
}

/** Send `bytes` to 127.0.0.1:`port` from `localAddress`, read for at most `timeoutMs`; the status code of the answer (0: none). */
export function sendHttp(port: number, bytes: Buffer, timeoutMs: number, localAddress: string): Promise<number> {
  return new Promise((resolve) => {
    const socket = new Socket();
    let got = '';
    const done = (): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(Number(/^HTTP\/1\.[01] (\d{3})/.exec(got)?.[1] ?? 0));
    };
    const timer = setTimeout(done, timeoutMs);
    socket.on('data', (d: Buffer) => {
      if (got.length < 64) got += d.toString('latin1');
    });
    socket.on('close', done);
    socket.on('error', done);
    socket.connect({ port, host: '127.0.0.1', localAddress }, () => socket.write(bytes));
  });
}
