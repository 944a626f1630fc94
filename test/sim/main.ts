// `npm run sim -- --seeds N [--first S] [--seed S] [--steps K] [--replicas R] [--control NAME] [--latent-errors] [--trace]`
//
// Runs simulated groups (run.ts), one per seed, on every core (a worker process per core, each
// taking every k-th seed), and prints what went wrong with the seed that replays it. The last
// lines are the fault counts and `seeds N, violations V`. `--seed S` runs one seed and prints
// its trace when it finds a violation (or always, with --trace): the same seed prints the
// same trace. `--control NAME` runs a negative control (controls.ts): a protocol variant with a
// known bug that the simulator must catch; its violations are the expected outcome. `--replicas R`
// gives every run's volume R copies per page (default: drawn from the seed, run.ts drawReplicas).
// `--latent-errors` draws latent sector errors among the faults (opt-in: run.ts says why).

import { fork } from 'node:child_process';
import { cpus } from 'node:os';
import { controls } from './controls';
import { simulate, type SimResult } from './run';

interface Args {
  seeds: number;
  first: number;
  seed?: number;
  steps?: number;
  replicas?: number;
  /** Draw latent sector errors among the faults (run.ts SimOptions.latentErrors). */
  latentErrors?: boolean;
  control?: string;
  trace: boolean;
  worker?: { index: number; of: number };
}

function parse(argv: string[]): Args {
  const a: Args = { seeds: 100, first: 1, trace: false };
  for (let i = 0; i < argv.length; i++) {
    const v = (): number => {
      const n = Number(argv[++i]);
      if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${argv[i - 1]} takes a whole number, not ${argv[i]}`);
      return n;
    };
    switch (argv[i]) {
      case '--seeds': a.seeds = v(); break;
      case '--first': a.first = v(); break;
      case '--seed': a.seed = v(); break;
      case '--steps': a.steps = v(); break;
      case '--replicas': a.replicas = v(); break;
      case '--control': a.control = argv[++i]; break;
      case '--trace': a.trace = true; break;
      case '--latent-errors': a.latentErrors = true; break;
      case '--worker': a.worker = { index: v(), of: v() }; break;
      default: throw new Error(`unknown option ${argv[i]} (--seeds N, --first S, --seed S, --steps K, --replicas R, --control NAME, --latent-errors, --trace)`);
    }
  }
  if (a.replicas !== undefined && (a.replicas < 1 || a.replicas > 3)) throw new Error(`--replicas takes 1 to 3, not ${a.replicas}`);
  if (a.control !== undefined && !controls.has(a.control)) throw new Error(`no control "${a.control}"; controls: ${[...controls.keys()].join(', ')}`);
  return a;
}

/** What a worker sends back per seed: the counts, and the whole report of a failing seed. */
interface SeedReport {
  seed: number;
  faults: SimResult['faults'];
  membership: SimResult['membership'];
  violations: number;
  text?: string;
}

async function runSeed(a: Args, seed: number, withTrace: boolean): Promise<SeedReport> {
  const control = a.control === undefined ? undefined : controls.get(a.control)!;
  const replicas = a.replicas ?? control?.replicas;
  const r = await simulateOrFail({
    seed, keepTrace: withTrace,
    ...(a.steps === undefined ? {} : { stepsMax: a.steps }),
    ...(replicas === undefined ? {} : { replicas }),
    ...(control ? { protocols: control.protocols } : {}),
    ...(a.latentErrors ? { latentErrors: true } : {}),
  });
  const report: SeedReport = { seed, faults: r.faults, membership: r.membership, violations: r.violations.length };
  const flags = `${a.replicas === undefined ? '' : ` --replicas ${a.replicas}`}${a.control === undefined ? '' : ` --control ${a.control}`}${a.latentErrors ? ' --latent-errors' : ''}`;
  if (r.violations.length > 0 || withTrace) report.text = describe(r, withTrace, flags);
  return report;
}

/** A run that throws is a failure of the seed (a bug of the simulator or of the code it runs), reported like a violation. */
async function simulateOrFail(o: Parameters<typeof simulate>[0]): Promise<SimResult> {
  try {
    return await simulate(o);
  } catch (err) {
    const none = { crashes: 0, longKills: 0, isolations: 0, partitions: 0, drops: 0, reorders: 0, duplicates: 0, diskStalls: 0, latentErrors: 0, skews: 0 };
    return { seed: o.seed, violations: [{ invariant: 'simulator-error' as never, opId: 0, message: (err as Error).stack ?? String(err) }], trace: [], story: [], faults: none, steps: 0, ops: 0, moves: { committed: 0, cancelled: 0 }, snapshots: 0, replicas: o.replicas ?? 0, membership: { joins: 0, drains: 0, undrains: 0 } };
  }
}

/** The seed's report: its violations, then the trace up to the first of them. */
function describe(r: SimResult, full: boolean, flags: string): string {
  const m = r.membership;
  const out = [`seed ${r.seed}: ${r.violations.length} violation(s); ${r.replicas} ${r.replicas === 1 ? 'copy' : 'copies'} per page, ${r.ops} host commands, ${r.moves.committed} moves committed, ${r.moves.cancelled} cancelled, ${r.snapshots} snapshots, ${m.joins} joins, ${m.drains} drains, ${m.undrains} undrains, ${r.steps} steps`];
  for (const v of r.violations.slice(0, 10)) out.push(`  ${v.invariant}: ${v.message}`);
  if (r.violations.length > 10) out.push(`  … and ${r.violations.length - 10} more`);
  if (r.story.length > 0) {
    out.push(`  the first wrong answer, with every command that touched its block:`);
    for (const l of r.story) out.push(`    ${l}`);
  }
  if (r.trace.length > 0) {
    // The events up to the answer of the first command found wrong (or to the first violation found at the end).
    const v = r.violations[0];
    const answered = v && v.opId > 0 ? r.trace.findIndex((l) => l.endsWith(`(#${v.opId})`)) : -1;
    const first = answered >= 0 ? answered : r.trace.findIndex((l) => l.startsWith('VIOLATION'));
    const upTo = full || first < 0 ? r.trace.length : first + 1;
    const from = full ? 0 : Math.max(0, upTo - 400);
    out.push(`  trace${from > 0 ? ` (the last ${upTo - from} events before the violation)` : ''}:`);
    for (const l of r.trace.slice(from, upTo)) out.push(`    ${l}`);
  }
  out.push(`  replay: npm run sim -- --seed ${r.seed}${flags}${r.violations.length > 0 ? '' : ' --trace'}`);
  return out.join('\n');
}

const faultLines: [keyof SimResult['faults'], string][] = [
  ['crashes', 'crashes'], ['longKills', 'long kills'], ['isolations', 'isolations'], ['partitions', 'partitions'], ['drops', 'drops'], ['reorders', 'reorders'],
  ['duplicates', 'duplicates'], ['diskStalls', 'disk stalls'], ['latentErrors', 'latent sector errors'], ['skews', 'skews'],
];

async function main(): Promise<void> {
  const a = parse(process.argv.slice(2));
  if (a.worker) {
    for (let seed = a.first + a.worker.index; seed < a.first + a.seeds; seed += a.worker.of) process.send!(await runSeed(a, seed, false));
    return;
  }
  if (a.seed !== undefined) {
    const r = await runSeed(a, a.seed, a.trace);
    if (r.text) console.log(r.text);
    printTotals([r], 1, a.control);
    process.exitCode = a.control === undefined && r.violations > 0 ? 1 : 0;
    return;
  }
  const workers = Math.max(1, Math.min(cpus().length, a.seeds));
  const reports: SeedReport[] = [];
  await Promise.all(Array.from({ length: workers }, (_, index) => new Promise<void>((resolve, reject) => {
    const args = ['--worker', String(index), String(workers), '--seeds', String(a.seeds), '--first', String(a.first), ...(a.steps === undefined ? [] : ['--steps', String(a.steps)]), ...(a.replicas === undefined ? [] : ['--replicas', String(a.replicas)]), ...(a.control === undefined ? [] : ['--control', a.control]), ...(a.latentErrors ? ['--latent-errors'] : [])];
    const child = fork(__filename, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    child.on('message', (r: SeedReport) => {
      reports.push(r);
      if (r.text) console.log(r.text);
    });
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`simulator worker ${index} exited with ${code}`))));
  })));
  const caught = reports.filter((r) => r.violations > 0).sort((x, y) => x.seed - y.seed);
  if (a.control !== undefined) console.log(caught.length > 0 ? `control ${a.control}: caught by seed ${caught[0].seed} (${caught.length} of ${reports.length} seeds)` : `control ${a.control}: NOT caught in ${reports.length} seeds`);
  printTotals(reports, a.seeds, a.control);
  process.exitCode = (a.control === undefined ? caught.length > 0 : caught.length === 0) ? 1 : 0;
}

function printTotals(reports: SeedReport[], seeds: number, control: string | undefined): void {
  for (const [key, label] of faultLines) console.log(`${label} ${reports.reduce((n, r) => n + r.faults[key], 0)}`);
  for (const key of ['joins', 'drains', 'undrains'] as const) console.log(`${key} ${reports.reduce((n, r) => n + r.membership[key], 0)}`);
  const violations = reports.reduce((n, r) => n + r.violations, 0);
  console.log(`seeds ${seeds}, violations ${violations}${control === undefined ? '' : ` (control ${control})`}`);
}

main().catch((err: Error) => {
  console.error(`sim: ${err.message}`);
  process.exitCode = 2;
});
