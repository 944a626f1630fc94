// The TargetDirectory the portal serves: one target per catalog volume, LUN 0 a
// BlockLogicalUnit over the volume's store. Kept in step with the catalog by its watch; a
// target is visible only once its store volume is open.

import type { Logger } from 'pino';
import type { Catalog, VolumeRecord } from '../cluster/catalog';
import { targetNameFor, type TargetDirectory, type TargetInfo } from '../iscsi/target';
import { BlockLogicalUnit } from '../scsi/device';
import type { PageStore, StoreVolume } from '../store/page-store';

export const productRevision = '0.1';

interface Entry {
  record: VolumeRecord;
  volume: StoreVolume;
  lu: BlockLogicalUnit;
  target: TargetInfo;
}

export class VolumeTargets implements TargetDirectory {
  readonly portalGroupTag = 1;
  readonly portalAddresses: readonly string[];
  private readonly entries = new Map<string, Entry>();
  private readonly byTargetName = new Map<string, Entry>();
  private readonly store: PageStore;
  private readonly log: Logger;
  /** Serialises changes per volume so create/resize/delete apply in catalog order. */
  private chain: Promise<void> = Promise.resolve();

  constructor(opts: { store: PageStore; portalAddress: string; log: Logger }) {
    this.store = opts.store;
    this.portalAddresses = [opts.portalAddress];
    this.log = opts.log;
  }

  /** Follow the catalog: open new volumes, resize, delete. Resolves when the current ones are open. */
  async follow(catalog: Catalog): Promise<void> {
    catalog.onVolumeChange((name, record) => void this.apply(name, record));
    for (const v of catalog.listVolumes()) await this.apply(v.name, v);
  }

  /** Apply one catalog change; the returned promise resolves once the target reflects it. */
  apply(name: string, record: VolumeRecord | undefined): Promise<void> {
    this.chain = this.chain.then(() => this.applyNow(name, record)).catch((err) => this.log.error({ err, volume: name }, 'applying a volume change failed'));
    return this.chain;
  }

  private async applyNow(name: string, record: VolumeRecord | undefined): Promise<void> {
    const entry = this.entries.get(name);
    if (!record) {
      if (!entry) return;
      this.entries.delete(name);
      this.byTargetName.delete(entry.target.name);
      await this.store.deleteVolume(entry.record.id);
      this.log.info({ volume: name }, 'volume deleted');
      return;
    }
    if (entry && entry.record.id === record.id) {
      const blockCount = record.sizeBytes / record.blockBytes;
      if (blockCount !== entry.volume.blockCount) {
        await entry.volume.resize(blockCount);
        entry.lu.capacityChanged();
        this.log.info({ volume: name, sizeBytes: record.sizeBytes }, 'volume resized');
      }
      entry.record = record;
      entry.target = this.targetInfo(record, entry.lu);
      this.byTargetName.set(entry.target.name, entry);
      return;
    }
    const volume = await this.store.openVolume(record.id, { blockBytes: record.blockBytes, blockCount: record.sizeBytes / record.blockBytes });
    const lu = new BlockLogicalUnit({
      lun: 0,
      identity: { volumeId: record.id, volumeName: name, vendor: 'PEERSAN', product: 'peersan volume', revision: productRevision, readOnly: false },
      backend: volume,
      targetName: targetNameFor(name),
      log: this.log,
    });
    const created: Entry = { record, volume, lu, target: this.targetInfo(record, lu) };
    this.entries.set(name, created);
    this.byTargetName.set(created.target.name, created);
  }

  private targetInfo(record: VolumeRecord, lu: BlockLogicalUnit): TargetInfo {
    return {
      name: targetNameFor(record.name),
      allow: record.allow,
      chap: record.chap,
      luns: new Map([[0, lu]]),
    };
  }

  find(targetName: string): TargetInfo | undefined {
    return this.byTargetName.get(targetName)?.target;
  }

  visibleTo(initiatorName: string): TargetInfo[] {
    return [...this.byTargetName.values()]
      .map((e) => e.target)
      .filter((t) => t.allow.length === 0 || t.allow.includes(initiatorName))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  allocatedBytes(volumeName: string): number {
    return this.entries.get(volumeName)?.volume.allocatedBytes() ?? 0;
  }
}
