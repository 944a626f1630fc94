// Snapshots as read-only iSCSI targets (iqn.2026-11.io.peersan:<volume>.<snapshot>, LUN 0)
// on every portal, kept in step with the catalog's snapshot records by their watch. A record
// that goes away (snapshot deleted, or a snapshot that aborted) makes this peer drop its layer
// of it; at start, layers with no record at all are dropped too (deleted while this peer was
// away).

import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import type { Catalog } from '../cluster/catalog';
import type { WatchEvent } from '../cluster/metastore';
import type { TargetInfo } from '../iscsi/target';
import type { BlockSender } from '../routing/router';
import { BlockLogicalUnit } from '../scsi/device';
import type { StoreVolume } from '../store/page-store';
import type { BlockBackend } from '../store/types';
import { SnapshotReader } from './reader';
import { decodeSnapshot, listSnapshotRecords, snapshotPrefix, type SnapshotRecord } from './records';

export interface SnapshotTargetsOptions {
  self: string;
  catalog: Catalog;
  /** The volume's store on this peer, if open. */
  stored(volumeId: string): StoreVolume | undefined;
  link(peerId: string): BlockSender;
  revision: string;
  log: Logger;
}

interface SnapshotEntry {
  record: SnapshotRecord;
  reader: SnapshotReader;
  target: TargetInfo;
}

export function snapshotTargetName(volume: string, snapshot: string): string {
  return `iqn.2026-11.io.peersan:${volume}.${snapshot}`;
}

export class SnapshotTargets {
  private readonly o: SnapshotTargetsOptions;
  private readonly byTarget = new Map<string, SnapshotEntry>();
  /** `volumeId/seq` of every snapshot record this peer has seen (any state). */
  private readonly known = new Map<string, SnapshotRecord>();
  private unwatch: (() => void) | undefined;

  constructor(opts: SnapshotTargetsOptions) {
    this.o = opts;
  }

  async follow(): Promise<void> {
    this.unwatch = await this.o.catalog.store.watch(snapshotPrefix, (ev) => this.onEvent(ev));
    for (const r of await listSnapshotRecords(this.o.catalog.store)) this.put(r);
    for (const v of this.o.catalog.listVolumes()) {
      const store = this.o.stored(v.id);
      if (!store) continue;
      for (const s of store.listSnapshots()) {
        if (this.known.has(`${v.id}/${s.id}`)) continue;
        await store.deleteSnapshot(s.id).catch((err: Error) => this.o.log.warn({ volume: v.name, layer: s.id, reason: err.message }, 'could not drop a stale snapshot layer'));
        this.o.log.info({ volume: v.name, layer: s.id }, 'dropped the layer of a snapshot deleted while this peer was away');
      }
    }
  }

  private onEvent(ev: WatchEvent): void {
    if (ev.type === 'put') return this.put(decodeSnapshot(ev.record.value));
    const [volumeId, name] = ev.key.slice(snapshotPrefix.length).split('/');
    const record = [...this.known.values()].find((r) => r.volumeId === volumeId && r.name === name);
    if (!record) return;
    this.known.delete(`${volumeId}/${record.seq}`);
    this.byTarget.delete(snapshotTargetName(record.volume, record.name));
    void this.o.stored(volumeId)?.deleteSnapshot(String(record.seq)).catch(() => undefined);
  }

  private put(r: SnapshotRecord): void {
    this.known.set(`${r.volumeId}/${r.seq}`, r);
    if (r.state !== 'ready') return;
    const name = snapshotTargetName(r.volume, r.name);
    const reader = new SnapshotReader({
      self: this.o.self, record: r, grainBlocks: this.o.stored(r.volumeId)?.grainBlocks ?? 128,
      local: () => this.layer(r.volumeId, r.seq), link: this.o.link,
    });
    const lu = new BlockLogicalUnit({
      lun: 0,
      identity: { volumeId: snapshotLuId(r), volumeName: `${r.volume}.${r.name}`, vendor: 'PEERSAN', product: 'peersan snapshot', revision: this.o.revision, readOnly: true },
      backend: reader,
      targetName: name,
      log: this.o.log,
    });
    const volume = this.o.catalog.volumeById(r.volumeId);
    this.byTarget.set(name, { record: r, reader, target: { name, allow: volume?.allow ?? [], chap: volume?.chap, luns: new Map([[0, lu]]) } });
  }

  /** This peer's layer of snapshot `seq` of the volume, as a read-only block device. */
  layer(volumeId: string, seq: number): BlockBackend | undefined {
    try {
      return this.o.stored(volumeId)?.snapshotView(String(seq));
    } catch {
      return undefined;
    }
  }

  /** The snapshot as a block device (tests, tooling). */
  reader(volume: string, name: string): BlockBackend | undefined {
    const e = this.byTarget.get(snapshotTargetName(volume, name));
    return e?.reader;
  }

  find(targetName: string): TargetInfo | undefined {
    return this.byTarget.get(targetName)?.target;
  }

  all(): TargetInfo[] {
    return [...this.byTarget.values()].map((e) => e.target);
  }

  close(): void {
    this.unwatch?.();
  }
}

/** A stable 16-hex-digit identifier for the snapshot's logical unit (its NAA designator). */
function snapshotLuId(r: SnapshotRecord): string {
  return createHash('sha256').update(`${r.volumeId}/${r.seq}`).digest().subarray(0, 8).toString('hex');
}
