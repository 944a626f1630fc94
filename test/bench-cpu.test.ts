// bench/lib/cpu.js, the CPU-per-operation sampler of the benches: the /proc/PID/stat fields it
// reads, that a process's figure includes all its threads, and the µs/op arithmetic.
import t from 'tap';
import { Worker } from 'node:worker_threads';
import * as cpuLib from '../bench/lib/cpu.js';

const cpu = cpuLib as unknown as {
  ticksPerSec: number;
  parseStat(line: string): { ticks: number; childTicks: number };
  sample(p: Record<string, number>): { perProcess: Record<string, number>; clientUs: number };
  usage(b: unknown, a: unknown, ops: number): { usPerOp: number; perProcessUsPerOp: Record<string, number>; clientUsPerOp: number };
  withCpu(p: Record<string, number>, m: () => Promise<{ ops: number }>): Promise<{ ops: number; cpu: { usPerOp: number } }>;
};

t.test('parseStat: utime+stime and cutime+cstime, counted from the last ")" of the command name', async (t) => {
  // Fields 14..17 = 7 11 13 17; a command name with a space and ") " inside.
  const line = '4242 (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 11 13 17 20 0 3 0 1 2 3';
  t.same(cpu.parseStat(line), { ticks: 18, childTicks: 30 });
});

t.test('usage: µs per op over all processes, per process, and the client apart', async (t) => {
  const before = { perProcess: { a: 1000, b: 500 }, clientUs: 0 };
  const after = { perProcess: { a: 3000, b: 1500 }, clientUs: 400 };
  const u = cpu.usage(before, after, 100);
  t.equal(u.usPerOp, 30);
  t.same(u.perProcessUsPerOp, { a: 20, b: 10 });
  t.equal(u.clientUsPerOp, 4);
});

t.test("a process's figure includes its threads: a worker's 300 ms of CPU show", async (t) => {
  t.ok(cpu.ticksPerSec > 0);
  const spinMs = 300;
  const before = cpu.sample({ me: process.pid });
  // The worker spins until its own thread has used spinMs of CPU (/proc/thread-self: a fixed
  // amount of work however loaded the machine is) while the main thread waits, idle.
  const spin = `
    const fs = require('node:fs');
    const ms = () => { const f = fs.readFileSync('/proc/thread-self/stat', 'utf8').split(') ')[1].split(' '); return (Number(f[11]) + Number(f[12])) * 1000 / ${cpu.ticksPerSec}; };
    const end = ms() + ${spinMs};
    for (let x = 0; ms() < end; ) for (let i = 0; i < 1e6; i++) x += i;`;
  await new Promise((resolve, reject) => {
    const w = new Worker(spin, { eval: true });
    w.on('exit', resolve);
    w.on('error', reject);
  });
  const after = cpu.sample({ me: process.pid });
  const us = after.perProcess.me - before.perProcess.me;
  t.ok(us >= spinMs * 1000, `the process counted ${us / 1000} ms, its worker thread used ${spinMs} ms`);
});

t.test('withCpu: a figure without its operation count is refused', async (t) => {
  await t.rejects(cpu.withCpu({ me: process.pid }, async () => ({ ops: 0 })), /operation count/);
  const r = await cpu.withCpu({ me: process.pid }, async () => ({ ops: 10 }));
  t.ok(r.cpu.usPerOp >= 0);
});
