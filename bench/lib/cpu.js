// CPU per operation, from /proc (issue 19: "CPU microseconds per operation, all threads of the
// peers involved, next to IOPS"). Shared by bench/vs-tgt.js and bench/replication.js.
//
// /proc/PID/stat's utime and stime (fields 14 and 15) are the process's totals: the kernel sums
// them over every thread of the thread group, live and exited (Node's libuv pool, V8's GC and
// compiler threads, tgtd's backing-store workers). test/bench-cpu.test.ts checks this: a worker
// thread's spin shows in its process's figure. Processes the measured pid forks are counted as
// well (its descendants at each sample, from /proc/PID/task/TID/children); one that both starts
// and ends between two samples would be missed (neither tgtd nor peersan forks per request).
//
// The client (iscsi-perf, qemu-img, qemu-io) is a child of the bench that exits before its figure
// is read: its CPU is this process's cutime + cstime (fields 16 and 17, children waited for),
// sampled around the figure like the rest and printed for context, never in the ratio.
'use strict';

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');

/** Clock ticks per second of utime/stime (getconf CLK_TCK; 100 on every Linux seen so far). */
const ticksPerSec = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
const usPerTick = 1e6 / ticksPerSec;

/**
 * The numbers of one /proc/PID/stat line: utime+stime (own, all threads) and cutime+cstime
 * (children waited for), in ticks. The command name (field 2) may hold spaces and ')': the
 * fields are counted from the last ')'.
 */
function parseStat(line) {
  const f = line.slice(line.lastIndexOf(')') + 2).split(' ');
  // f[0] is field 3 (state): field n is f[n - 3].
  return { ticks: Number(f[11]) + Number(f[12]), childTicks: Number(f[13]) + Number(f[14]) };
}

function readStat(pid) {
  try {
    return parseStat(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return null; // gone: counts as nothing from here on
  }
}

/** `pid` and every process below it, now. */
function processTree(pid) {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    let tids = [];
    try {
      tids = fs.readdirSync(`/proc/${out[i]}/task`);
    } catch {
      continue;
    }
    for (const tid of tids) {
      try {
        for (const c of fs.readFileSync(`/proc/${out[i]}/task/${tid}/children`, 'utf8').split(' ')) if (c) out.push(Number(c));
      } catch {
        // thread ended meanwhile
      }
    }
  }
  return out;
}

/** CPU µs so far of each named process (its whole tree), and of this bench's waited-for children. */
function sample(processes) {
  const perProcess = {};
  for (const [name, pid] of Object.entries(processes)) {
    let ticks = 0;
    for (const p of processTree(pid)) ticks += readStat(p)?.ticks ?? 0;
    perProcess[name] = ticks * usPerTick;
  }
  return { perProcess, clientUs: readStat(process.pid).childTicks * usPerTick };
}

/**
 * CPU between two samples, for `ops` operations: µs per op of all the named processes together
 * (the figure), per process, and the client's (for context).
 */
function usage(before, after, ops) {
  const perProcessUs = {};
  let totalUs = 0;
  for (const name of Object.keys(after.perProcess)) {
    perProcessUs[name] = after.perProcess[name] - before.perProcess[name];
    totalUs += perProcessUs[name];
  }
  const perOp = (us) => Math.round((us / ops) * 10) / 10;
  const perProcessUsPerOp = Object.fromEntries(Object.entries(perProcessUs).map(([k, us]) => [k, perOp(us)]));
  return { ops, usPerOp: perOp(totalUs), perProcessUsPerOp, clientUsPerOp: perOp(after.clientUs - before.clientUs) };
}

/**
 * Run `measure()` (one figure: it resolves to { ops, ... }) between two samples of `processes`
 * ({ name: pid }); its result with `cpu` added (see usage()).
 */
async function withCpu(processes, measure) {
  const before = sample(processes);
  const r = await measure();
  const after = sample(processes);
  if (!(r.ops > 0)) throw new Error('a figure measured with CPU needs its operation count (ops)');
  return { ...r, cpu: usage(before, after, r.ops) };
}

module.exports = { ticksPerSec, parseStat, processTree, sample, usage, withCpu };
