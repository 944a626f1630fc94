import t from 'tap';
import pino from 'pino';
import { Writable } from 'node:stream';
import { LogLimiter } from '../src/log';

t.test('a repeated warning is logged once per window, then with the count suppressed', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({ write(chunk, _enc, cb) { lines.push(JSON.parse(String(chunk))); cb(); } });
  const log = pino({ level: 'info' }, sink);
  let now = 1_000;
  const limiter = new LogLimiter({ windowMs: 10_000, nowMs: () => now });
  for (let i = 0; i < 1000; i++) limiter.warn(log, 'refused', { remote: 'x' }, 'refused a connection');
  t.equal(limiter.warn(log, 'other', {}, 'another kind'), true, 'another key has its own window');
  now += 10_001;
  t.equal(limiter.warn(log, 'refused', { remote: 'y' }, 'refused a connection'), true);
  await new Promise((r) => setImmediate(r));
  const refused = lines.filter((l) => l.msg === 'refused a connection');
  t.equal(refused.length, 2, '1001 warnings in two windows make two lines');
  t.equal(refused[0].suppressed, undefined);
  t.equal(refused[1].suppressed, 999, 'the second line counts those suppressed');
});
