// Metering decorators, the recording points of the load monitor:
// - MeteredBackend wraps the owner's store volume (the BlockBackend the router serves local
//   pages from and the page service serves forwarded requests from), so every request this
//   peer serves as page owner is counted per page, per volume and for the peer.
// - MeteredLogicalUnit wraps a target's logical unit, so every command a host session sends
//   to this peer's portal is counted per session (the command's Nexus names the session).
// Both pass results and errors through untouched; a failed request still counts (it took time),
// and so does one the store refuses MOVED (the ownership check sits below the meter,
// src/server/data-path.ts): once per stale route, and the balancer weighs a page's load
// by its current owner anyway.

import type { LogicalUnit, Nexus, ScsiCommand, ScsiResult } from '../scsi/types';
import { BackendDecorator } from '../store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../store/types';
import type { LoadMonitor, VolumeMeter } from './monitor';

export class MeteredBackend extends BackendDecorator {
  private readonly meter: VolumeMeter;

  constructor(inner: BlockBackend, meter: VolumeMeter) {
    super(inner);
    this.meter = meter;
  }

  async read(lba: number, blocks: number): Promise<Buffer> {
    const start = this.meter.begin(lba, blocks);
    let bytes = 0;
    try {
      const data = await this.inner.read(lba, blocks);
      bytes = data.length;
      return data;
    } finally {
      this.meter.end(lba, blocks, start, bytes);
    }
  }

  async write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    const blocks = data.length / this.inner.blockBytes;
    const start = this.meter.begin(lba, blocks);
    try {
      await this.inner.write(lba, data, opts);
    } finally {
      this.meter.end(lba, blocks, start, data.length);
    }
  }

  async unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void> {
    const start = this.meter.begin(lba, blocks);
    try {
      await this.inner.unmap(lba, blocks, opts);
    } finally {
      this.meter.end(lba, blocks, start, 0);
    }
  }

  async compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult> {
    const blocks = data.length / this.inner.blockBytes;
    const start = this.meter.begin(lba, blocks);
    try {
      return await this.inner.compareAndWrite(lba, compare, data, opts);
    } finally {
      this.meter.end(lba, blocks, start, compare.length + data.length);
    }
  }

  // Not page operations: a flush covers the whole volume and GET LBA STATUS only reads
  // metadata; neither says anything about which page to move.
  flush(): Promise<void> {
    return this.inner.flush();
  }

  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.inner.lbaStatus(lba, blocksMax);
  }
}

export class MeteredLogicalUnit implements LogicalUnit {
  private readonly inner: LogicalUnit;
  private readonly monitor: LoadMonitor;

  constructor(inner: LogicalUnit, monitor: LoadMonitor) {
    this.inner = inner;
    this.monitor = monitor;
  }

  get lun(): number {
    return this.inner.lun;
  }

  async execute(cmd: ScsiCommand): Promise<ScsiResult> {
    const start = this.monitor.hostBegin(cmd.nexus);
    let bytes = cmd.dataOut?.length ?? 0;
    try {
      const result = await this.inner.execute(cmd);
      bytes += result.dataIn?.length ?? 0;
      return result;
    } finally {
      this.monitor.hostEnd(cmd.nexus, start, bytes);
    }
  }

  reset(by: Nexus): void | Promise<void> {
    return this.inner.reset(by);
  }

  nexusLost(nexus: Nexus): void | Promise<void> {
    this.monitor.hostEnded(nexus);
    return this.inner.nexusLost(nexus);
  }
}
