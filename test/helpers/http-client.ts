// Small helpers for tests of a peer's HTTP side: JSON requests with or without the admin
// token, a reader for the event stream, and a checker of the Prometheus text format.

import { request } from 'node:http';

export interface HttpReply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json(): any;
}

/** One request to base (http://host:port), bounded in time. */
export function http(base: string, method: string, path: string, opts: { token?: string; body?: unknown; raw?: string | Buffer; timeoutMs?: number } = {}): Promise<HttpReply> {
  const url = new URL(path, base);
  const payload = opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body));
  const headers: Record<string, string | number> = {};
  if (opts.token !== undefined) headers.Authorization = `Bearer ${opts.token}`;
  if (payload !== undefined) {
    headers['Content-Type'] = 'application/json';
    headers['Content-Length'] = Buffer.byteLength(payload);
  }
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers, timeout: opts.timeoutMs ?? 15_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json: () => JSON.parse(text) });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out`)));
    req.on('error', reject);
    req.end(payload);
  });
}

/** Open /api/events and collect frames until `until` says stop (or the time bound passes). */
export function readStream(base: string, token: string, until: (frames: { event: string; data: any }[]) => boolean, timeoutMs = 20_000): Promise<{ event: string; data: any }[]> {
  return new Promise((resolve, reject) => {
    const frames: { event: string; data: any }[] = [];
    const req = request(new URL('/api/events', base), { headers: { Authorization: `Bearer ${token}` } }, (res) => {
      if (res.statusCode !== 200) {
        req.destroy();
        reject(new Error(`event stream answered ${res.statusCode}`));
        return;
      }
      let buffer = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        buffer += chunk;
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const event = /^event: (.*)$/m.exec(frame)?.[1] ?? 'message';
          const data = /^data: (.*)$/m.exec(frame)?.[1];
          if (data !== undefined) frames.push({ event, data: JSON.parse(data) });
        }
        if (until(frames)) {
          clearTimeout(timer);
          req.destroy();
          resolve(frames);
        }
      });
    });
    const timer = setTimeout(() => {
      req.destroy();
      reject(new Error(`event stream: condition not met within ${timeoutMs} ms (${frames.length} frames)`));
    }, timeoutMs);
    req.on('error', (err) => {
      if (!req.destroyed) reject(err);
    });
    req.end();
  });
}

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/**
 * Parse Prometheus text exposition format 0.0.4 strictly enough to catch a broken exporter:
 * every sample belongs to a family declared by # TYPE, names and labels are well formed,
 * values are numbers, histograms have ascending `le` buckets ending in +Inf whose count
 * equals _count. Throws with the offending line.
 */
export function parseExposition(text: string): { types: Map<string, string>; samples: Sample[] } {
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  const name = '[a-zA-Z_:][a-zA-Z0-9_:]*';
  const sampleRe = new RegExp(`^(${name})(?:\\{(.*)\\})?\\s+(\\S+)(?:\\s+(-?\\d+))?$`);
  const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)/y;
  for (const [i, line] of text.split('\n').entries()) {
    const where = `line ${i + 1}: ${line}`;
    if (line === '') continue;
    if (line.startsWith('#')) {
      const m = new RegExp(`^# (HELP|TYPE) (${name})(?: (.*))?$`).exec(line);
      if (!m) throw new Error(`bad comment, ${where}`);
      if (m[1] === 'TYPE') {
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3])) throw new Error(`bad type, ${where}`);
        if (types.has(m[2])) throw new Error(`family declared twice, ${where}`);
        types.set(m[2], m[3]);
      }
      continue;
    }
    const m = sampleRe.exec(line);
    if (!m) throw new Error(`bad sample, ${where}`);
    const labels: Record<string, string> = {};
    if (m[2]) {
      labelRe.lastIndex = 0;
      while (labelRe.lastIndex < m[2].length) {
        const l = labelRe.exec(m[2]);
        if (!l) throw new Error(`bad labels, ${where}`);
        if (l[1] in labels) throw new Error(`label twice, ${where}`);
        labels[l[1]] = l[2].replace(/\\n/g, '\n').replace(/\\"/g, '"').replace(/\\\\/g, '\\');
      }
    }
    const value = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : m[3] === 'NaN' ? NaN : Number(m[3]);
    if (!/^(NaN|[+-]Inf|[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)$/.test(m[3])) throw new Error(`bad value, ${where}`);
    const family = types.has(m[1]) ? m[1] : m[1].replace(/_(bucket|sum|count)$/, '');
    const type = types.get(family);
    if (!type) throw new Error(`sample without # TYPE, ${where}`);
    if (family !== m[1] && type !== 'histogram' && type !== 'summary') throw new Error(`suffix on a ${type}, ${where}`);
    if (type === 'counter' && value < 0) throw new Error(`negative counter, ${where}`);
    samples.push({ name: m[1], labels, value });
  }
  checkHistograms(types, samples);
  return { types, samples };
}

function checkHistograms(types: Map<string, string>, samples: Sample[]): void {
  for (const [family, type] of types) {
    if (type !== 'histogram') continue;
    const series = new Map<string, { les: number[]; counts: number[]; count?: number }>();
    for (const s of samples) {
      if (!s.name.startsWith(family + '_')) continue;
      const { le, ...rest } = s.labels;
      const key = JSON.stringify(Object.entries(rest).sort());
      const h = series.get(key) ?? { les: [], counts: [] };
      series.set(key, h);
      if (s.name === `${family}_bucket`) {
        if (le === undefined) throw new Error(`${family}_bucket without le`);
        h.les.push(le === '+Inf' ? Infinity : Number(le));
        h.counts.push(s.value);
      }
      if (s.name === `${family}_count`) h.count = s.value;
    }
    for (const [key, h] of series) {
      if (h.les[h.les.length - 1] !== Infinity) throw new Error(`${family}${key}: no +Inf bucket`);
      for (let i = 1; i < h.les.length; i++) {
        if (!(h.les[i] > h.les[i - 1]) || h.counts[i] < h.counts[i - 1]) throw new Error(`${family}${key}: buckets not ascending/cumulative`);
      }
      if (h.count !== h.counts[h.counts.length - 1]) throw new Error(`${family}${key}: _count ${h.count} differs from the +Inf bucket ${h.counts[h.counts.length - 1]}`);
    }
  }
}

/** The sum of a family's samples whose labels include `match`. */
export function total(samples: Sample[], name: string, match: Record<string, string> = {}): number {
  return samples.filter((s) => s.name === name && Object.entries(match).every(([k, v]) => s.labels[k] === v)).reduce((a, s) => a + s.value, 0);
}
