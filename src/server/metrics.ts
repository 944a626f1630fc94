// Prometheus metrics of one peer (prom-client). `peersan demo` runs several peers in one
// process, so each peer has its own Registry (never prom-client's global one), labelled
// peer="<id>". Host I/O is measured where the host's command arrives, by a BlockBackend
// decorator around the volume's router; routing, sessions and capacity are read when
// /metrics is scraped. Features that land later register their own metrics through
// counter()/gauge()/histogram(). No label or value ever carries a secret.

import { performance } from 'node:perf_hooks';
import { Counter, Gauge, Histogram, Registry, type CounterConfiguration, type GaugeConfiguration, type HistogramConfiguration } from 'prom-client';
import type { SessionInfo } from '../iscsi/portal';
import type { RoutingCounters } from '../routing/router';
import { BackendDecorator, whenSettled } from '../store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';

export type HostOp = 'read' | 'write' | 'unmap' | 'compare_and_write' | 'flush';
const hostOps: readonly HostOp[] = ['read', 'write', 'unmap', 'compare_and_write', 'flush'];

/** 100 µs … 5 s: a local cached read is at the bottom, a forwarded write to a slow peer near the top. */
const latencyBucketsSeconds = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

export interface MetricSources {
  peer: string;
  routing: RoutingCounters;
  sessions(): SessionInfo[];
  /** Bytes of page data this peer holds, per volume name. */
  volumeAllocatedBytes(): Map<string, number>;
}

/** Running totals of host I/O received by this peer (what the console turns into rates). */
export interface HostIoTotals {
  ops: number;
  bytes: number;
  readOps: number;
  writeOps: number;
}

/**
 * One volume's figures for one op, as plain numbers: the data path only adds to them (a
 * prom-client labelled child hashes its labels on every call, ~1 µs per I/O for three
 * metrics); they become samples when /metrics is scraped.
 */
interface OpStats {
  ops: number;
  bytes: number;
  errors: number;
  seconds: number;
  /** Observations per bucket of latencyBucketsSeconds (not cumulative), the last one +Inf. */
  buckets: number[];
}

type Labelled = [Record<string, string>, number][];

export class PeerMetrics {
  readonly registry = new Registry();
  readonly totals: HostIoTotals = { ops: 0, bytes: 0, readOps: 0, writeOps: 0 };
  private readonly byVolume = new Map<string, Map<HostOp, OpStats>>();

  constructor(src: MetricSources) {
    this.registry.setDefaultLabels({ peer: src.peer });
    const labelNames = ['volume', 'op'];
    this.followCounter('peersan_host_io_total', 'Host SCSI block operations received by this peer, per volume', labelNames, () => this.each((s) => s.ops));
    this.followCounter('peersan_host_io_bytes_total', 'Bytes moved by host block operations received by this peer (unmap counts the bytes released)', labelNames, () => this.each((s) => s.bytes));
    this.followCounter('peersan_host_io_errors_total', 'Host block operations that failed (the host saw a SCSI error)', labelNames, () => this.each((s) => s.errors));
    this.registry.registerMetric(this.latencyHistogram() as never);
    this.followCounter('peersan_routed_runs_total', 'Block runs served from this peer\'s store (local) or forwarded to their owner', ['path'], () => [[{ path: 'local' }, src.routing.localRuns], [{ path: 'forwarded' }, src.routing.forwardedRuns]]);
    this.followCounter('peersan_moved_retries_total', 'Forwarded runs retried because the owner answered MOVED (stale route)', [], () => [[{}, src.routing.movedRetries]]);
    this.gauge({
      name: 'peersan_sessions', help: 'iSCSI sessions logged in to this peer', labelNames: ['type'],
      collect() {
        const all = src.sessions();
        this.set({ type: 'normal' }, all.filter((s) => s.sessionType === 'Normal').length);
        this.set({ type: 'discovery' }, all.filter((s) => s.sessionType === 'Discovery').length);
      },
    });
    this.gauge({
      name: 'peersan_volume_allocated_bytes', help: 'Bytes of the volume\'s pages held on this peer', labelNames: ['volume'],
      collect() {
        this.reset();
        for (const [volume, bytes] of src.volumeAllocatedBytes()) this.set({ volume }, bytes);
      },
    });
  }

  /** Register a counter in this peer's registry (for features that add their own metrics). */
  counter<T extends string>(config: Omit<CounterConfiguration<T>, 'registers'>): Counter<T> {
    return new Counter({ ...config, registers: [this.registry] });
  }
  gauge<T extends string>(config: Omit<GaugeConfiguration<T>, 'registers'>): Gauge<T> {
    return new Gauge({ ...config, registers: [this.registry] });
  }
  histogram<T extends string>(config: Omit<HistogramConfiguration<T>, 'registers'>): Histogram<T> {
    return new Histogram({ ...config, registers: [this.registry] });
  }

  /** A counter whose values live elsewhere as plain running totals, read at scrape time. */
  followCounter(name: string, help: string, labelNames: string[], read: () => Labelled): void {
    this.counter({
      name, help, labelNames,
      collect() {
        this.reset();
        for (const [labels, n] of read()) this.inc(labels, n);
      },
    });
  }

  private each(pick: (s: OpStats) => number): Labelled {
    const out: Labelled = [];
    for (const [volume, ops] of this.byVolume) for (const [op, s] of ops) out.push([{ volume, op }, pick(s)]);
    return out;
  }

  /** The latency histogram in the shape prom-client's registry formats (cumulative buckets). */
  private latencyHistogram(): object {
    const name = 'peersan_host_io_seconds';
    return {
      name, type: 'histogram', aggregator: 'sum',
      help: 'Latency of host block operations at the receiving peer, local or forwarded',
      get: () => {
        const values: { metricName: string; labels: Record<string, string | number>; value: number }[] = [];
        for (const [volume, ops] of this.byVolume) {
          for (const [op, s] of ops) {
            let cumulative = 0;
            s.buckets.forEach((n, i) => {
              cumulative += n;
              values.push({ metricName: `${name}_bucket`, labels: { le: i < latencyBucketsSeconds.length ? latencyBucketsSeconds[i] : '+Inf', volume, op }, value: cumulative });
            });
            values.push({ metricName: `${name}_sum`, labels: { volume, op }, value: s.seconds });
            values.push({ metricName: `${name}_count`, labels: { volume, op }, value: cumulative });
          }
        }
        return { name, help: 'Latency of host block operations at the receiving peer, local or forwarded', type: 'histogram', values, aggregator: 'sum' };
      },
    };
  }

  /** The volume's backend as the SCSI layer should see it: every operation counted and timed. */
  meter(volume: string, backend: BlockBackend): BlockBackend {
    return new MeteredBackend(backend, this, this.statsOf(volume));
  }

  /** A deleted volume's series disappear from /metrics. */
  forgetVolume(volume: string): void {
    this.byVolume.delete(volume);
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  private statsOf(volume: string): Map<HostOp, OpStats> {
    let m = this.byVolume.get(volume);
    if (!m) {
      m = new Map(hostOps.map((op) => [op, { ops: 0, bytes: 0, errors: 0, seconds: 0, buckets: new Array<number>(latencyBucketsSeconds.length + 1).fill(0) }]));
      this.byVolume.set(volume, m);
    }
    return m;
  }

  /** Called by MeteredBackend once an operation has settled. */
  record(s: OpStats, op: HostOp, bytes: number, startedMs: number, ok: boolean): void {
    const seconds = (performance.now() - startedMs) / 1000;
    let i = 0;
    while (i < latencyBucketsSeconds.length && seconds > latencyBucketsSeconds[i]) i++;
    s.buckets[i]++;
    s.seconds += seconds;
    if (!ok) {
      s.errors++;
      return;
    }
    s.ops++;
    s.bytes += bytes;
    this.totals.ops++;
    this.totals.bytes += bytes;
    if (op === 'read') this.totals.readOps++;
    if (op === 'write' || op === 'compare_and_write') this.totals.writeOps++;
  }
}

class MeteredBackend extends BackendDecorator {
  constructor(inner: BlockBackend, private readonly metrics: PeerMetrics, private readonly meters: Map<HostOp, OpStats>) {
    super(inner);
  }

  private track<T>(op: HostOp, bytes: number, run: () => Promise<T>): Promise<T> {
    const m = this.meters.get(op)!;
    const startedMs = performance.now();
    return whenSettled(run, (ok) => this.metrics.record(m, op, bytes, startedMs, ok));
  }

  read(lba: number, blocks: number): Promise<Buffer> {
    return this.track('read', blocks * this.inner.blockBytes, () => this.inner.read(lba, blocks));
  }
  write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    return this.track('write', data.length, () => this.inner.write(lba, data, opts));
  }
  unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void> {
    return this.track('unmap', blocks * this.inner.blockBytes, () => this.inner.unmap(lba, blocks, opts));
  }
  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult> {
    return this.track('compare_and_write', data.length, () => this.inner.compareAndWrite(lba, compare, data, opts));
  }
  flush(): Promise<void> {
    return this.track('flush', 0, () => this.inner.flush());
  }
  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.inner.lbaStatus(lba, blocksMax);
  }
}
