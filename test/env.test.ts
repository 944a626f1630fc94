// The environment seam (src/env/): the deterministic ManualEnv that tests and the simulator
// drive, and the real one a peer runs on.

import t from 'tap';
import { sleep } from '../src/env/env';
import { ManualEnv, SeededRandom } from '../src/env/manual';
import { realEnv } from '../src/env/real';

t.test('timers fire only when time advances, in order of due time, ties in the order armed', async (t) => {
  const env = new ManualEnv();
  const fired: string[] = [];
  const at = (name: string) => () => fired.push(`${name}@${env.clock.monotonicMs()}`);
  env.timers.setTimeout(at('c'), 30);
  env.timers.setTimeout(at('a'), 10);
  env.timers.setTimeout(at('b1'), 20);
  env.timers.setTimeout(at('b2'), 20);
  env.timers.setTimeout(at('zero'), 0);
  t.same(fired, [], 'nothing fires before time moves');
  env.advance(0);
  t.same(fired, [], 'not even a 0 ms timer: it is due in 1 ms, as in Node');
  env.advance(20);
  t.same(fired, ['zero@1', 'a@10', 'b1@20', 'b2@20'], 'each fires at its due time, in order');
  t.equal(env.clock.monotonicMs(), 20);
  env.advance(9);
  t.same(fired.length, 4, 'c is not due at 29');
  env.advance(1);
  t.same(fired.at(-1), 'c@30');
  t.equal(env.timers.pending(), 0);
});

t.test('a cleared timer never fires; a timer armed while firing fires in the same advance when it falls due', async (t) => {
  const env = new ManualEnv();
  const fired: number[] = [];
  const gone = env.timers.setTimeout(() => fired.push(-1), 5);
  env.timers.setTimeout(() => env.timers.setTimeout(() => fired.push(env.clock.monotonicMs()), 5), 10);
  env.timers.clearTimeout(gone);
  env.timers.clearTimeout(gone);
  env.timers.clearTimeout(undefined);
  env.advance(100);
  t.same(fired, [15]);
});

t.test('an interval fires once per period until cleared, also from inside its own callback', async (t) => {
  const env = new ManualEnv();
  const fired: number[] = [];
  const h = env.timers.setInterval(() => {
    fired.push(env.clock.monotonicMs());
    if (fired.length === 3) env.timers.clearInterval(h);
  }, 10).unref();
  env.advance(25);
  t.same(fired, [10, 20]);
  env.advance(100);
  t.same(fired, [10, 20, 30]);
  t.equal(env.timers.pending(), 0);
});

t.test('run() lets async code woken by a timer arm the next one before time moves on', async (t) => {
  const env = new ManualEnv();
  const woke: number[] = [];
  void (async () => {
    for (let i = 0; i < 3; i++) {
      await sleep(env.timers, 10);
      woke.push(env.clock.monotonicMs());
    }
  })();
  await env.run(100);
  t.same(woke, [10, 20, 30]);
  t.equal(env.clock.monotonicMs(), 100);
});

t.test('the wall clock follows monotonic time from a fixed origin, plus the skew set', async (t) => {
  const env = new ManualEnv({ wallOriginMs: 1_000_000 });
  env.advance(1.5);
  t.equal(env.clock.nowMs(), 1_000_001, 'whole milliseconds, like Date.now');
  t.equal(env.clock.nowUs(), 1_000_001_500);
  env.clock.skewMs = -2;
  t.equal(env.clock.nowMs(), 999_999);
  t.equal(env.clock.monotonicMs(), 1.5, 'skew moves the wall clock only');
  t.throws(() => env.clock.set(1), /time goes back/);
});

t.test('the seeded random replays from its seed and stays in range', async (t) => {
  const draw = (seed: number) => {
    const r = new SeededRandom(seed);
    return [r.float(), r.int(1000), r.int(2 ** 32), r.bytes(8).toString('hex')];
  };
  t.same(draw(7), draw(7), 'same seed, same draws');
  t.not(JSON.stringify(draw(7)), JSON.stringify(draw(8)), 'another seed, other draws');
  const r = new SeededRandom(42);
  const seen = new Set<number>();
  const outside: number[] = [];
  for (let i = 0; i < 10_000; i++) {
    const f = r.float();
    if (!(f >= 0 && f < 1)) outside.push(f);
    seen.add(r.int(10));
  }
  t.same(outside, [], 'float() in [0, 1)');
  t.same([...seen].sort(), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'int(10) draws every value');
  t.throws(() => r.int(0), RangeError);
});

t.test('the real environment: clocks agree with Node, timers fire and can be cleared', async (t) => {
  const env = realEnv();
  t.ok(Math.abs(env.clock.nowMs() - Date.now()) <= 1);
  t.ok(Math.abs(env.clock.nowUs() / 1000 - Date.now()) < 50);
  const t0 = env.clock.monotonicMs();
  await sleep(env.timers, 5);
  t.ok(env.clock.monotonicMs() - t0 >= 4);
  let fired = false;
  env.timers.clearTimeout(env.timers.setTimeout(() => (fired = true), 1).unref());
  await sleep(env.timers, 5);
  t.notOk(fired);
  t.equal(env.random.bytes(4).length, 4);
  t.ok(env.random.int(3) < 3);
});
