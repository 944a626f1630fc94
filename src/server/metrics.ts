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

interface OpMeters {
  ops: Counter.Internal;
  bytes: Counter.Internal;
  errors: Counter.Internal;
  seconds: Histogram.Internal<'volume' | 'op'>;
}

export class PeerMetrics {
  readonly registry = new Registry();
  readonly totals: HostIoTotals = { ops: 0, bytes: 0, readOps: 0, writeOps: 0 };
  private readonly ops: Counter<'volume' | 'op'>;
  private readonly bytes: Counter<'volume' | 'op'>;
  private readonly errors: Counter<'volume' | 'op'>;
  private readonly seconds: Histogram<'volume' | 'op'>;
  private readonly byVolume = new Map<string, Map<HostOp, OpMeters>>();

  constructor(src: MetricSources) {
    this.registry.setDefaultLabels({ peer: src.peer });
    const labelNames = ['volume', 'op'] as const;
    this.ops = this.counter({ name: 'peersan_host_io_total', help: 'Host SCSI block operations received by this peer, per volume', labelNames });
    this.bytes = this.counter({ name: 'peersan_host_io_bytes_total', help: 'Bytes moved by host block operations received by this peer (unmap counts the bytes released)', labelNames });
    this.errors = this.counter({ name: 'peersan_host_io_errors_total', help: 'Host block operations that failed (the host saw a SCSI error)', labelNames });
    this.seconds = this.histogram({ name: 'peersan_host_io_seconds', help: 'Latency of host block operations at the receiving peer, local or forwarded', labelNames, buckets: latencyBucketsSeconds });
    this.followCounter('peersan_routed_runs_total', 'Block runs served from this peer\'s store (local) or forwarded to their owner', 'path', () => [['local', src.routing.localRuns], ['forwarded', src.routing.forwardedRuns]]);
    this.followCounter('peersan_moved_retries_total', 'Forwarded runs retried because the owner answered MOVED (stale route)', undefined, () => [['', src.routing.movedRetries]]);
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
  private followCounter(name: string, help: string, label: string | undefined, read: () => [string, number][]): void {
    this.counter({
      name, help, labelNames: label ? [label] : [],
      collect() {
        this.reset();
        for (const [value, n] of read()) {
          if (label) this.inc({ [label]: value }, n);
          else this.inc(n);
        }
      },
    });
  }

  /** The volume's backend as the SCSI layer should see it: every operation counted and timed. */
  meter(volume: string, backend: BlockBackend): BlockBackend {
    return new MeteredBackend(backend, this, this.metersOf(volume));
  }

  /** A deleted volume's series disappear from /metrics. */
  forgetVolume(volume: string): void {
    if (!this.byVolume.delete(volume)) return;
    for (const op of hostOps) {
      for (const m of [this.ops, this.bytes, this.errors, this.seconds]) m.remove({ volume, op });
    }
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  private metersOf(volume: string): Map<HostOp, OpMeters> {
    let m = this.byVolume.get(volume);
    if (!m) {
      m = new Map(hostOps.map((op) => [op, {
        ops: this.ops.labels({ volume, op }), bytes: this.bytes.labels({ volume, op }),
        errors: this.errors.labels({ volume, op }), seconds: this.seconds.labels({ volume, op }),
      }]));
      this.byVolume.set(volume, m);
    }
    return m;
  }

  /** Called by MeteredBackend once an operation has settled. */
  record(m: OpMeters, op: HostOp, bytes: number, startedMs: number, ok: boolean): void {
    m.seconds.observe((performance.now() - startedMs) / 1000);
    if (!ok) {
      m.errors.inc();
      return;
    }
    m.ops.inc();
    if (bytes > 0) m.bytes.inc(bytes);
    this.totals.ops++;
    this.totals.bytes += bytes;
    if (op === 'read') this.totals.readOps++;
    if (op === 'write' || op === 'compare_and_write') this.totals.writeOps++;
  }
}

class MeteredBackend implements BlockBackend {
  constructor(private readonly inner: BlockBackend, private readonly metrics: PeerMetrics, private readonly meters: Map<HostOp, OpMeters>) {}

  get blockBytes(): number {
    return this.inner.blockBytes;
  }
  get blockCount(): number {
    return this.inner.blockCount;
  }
  get grainBlocks(): number {
    return this.inner.grainBlocks;
  }

  private track<T>(op: HostOp, bytes: number, run: () => Promise<T>): Promise<T> {
    const m = this.meters.get(op)!;
    const startedMs = performance.now();
    let p: Promise<T>;
    try {
      p = run();
    } catch (err) {
      p = Promise.reject(err);
    }
    return p.then(
      (v) => {
        this.metrics.record(m, op, bytes, startedMs, true);
        return v;
      },
      (err: unknown) => {
        this.metrics.record(m, op, bytes, startedMs, false);
        throw err;
      },
    );
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
