// The admin operations on snapshots: take (one volume or a consistency group), list, delete,
// restore a volume from one, clone one into a new volume, and schedule them. Taking and deleting
// are the snapshot service's protocols; restore and clone copy the snapshot's data through the
// routers (so into the pages wherever they live now) and are refused or announced to the hosts:
// a restore changes the data under them.

import type { Logger } from 'pino';
import { formatBytes, type Catalog } from '../cluster/catalog';
import type { GroupStatus } from '../cluster/group-status';
import type { VolumeAdmin, VolumeView } from '../cluster/volume-admin';
import type { Env } from '../env/env';
import { InvalidArgumentError, NotFoundError, PeersanError } from '../errors';
import { targetNameFor } from '../iscsi/target';
import { everyNexus } from '../scsi/reservations';
import { Asc } from '../scsi/sense';
import type { VolumeTargets } from '../server/targets';
import type { BlockBackend } from '../store/types';
import { copyInto } from './copy';
import { listSnapshotRecords, type SnapshotMode } from './records';
import { parseEvery, removeSchedule, setSchedule } from './schedule';
import { viewOf, type SnapshotService, type SnapshotView } from './service';

export interface SnapshotAdmin {
  /** One snapshot of each volume, all at one consistent cut (a consistency group when several). */
  createSnapshots(volumes: string[], opts: { name?: string; mode?: SnapshotMode; group?: string }): Promise<SnapshotView[]>;
  /** The console's form: one volume. */
  createSnapshot(volume: string, opts: { name?: string; mode?: SnapshotMode }): Promise<SnapshotView>;
  listSnapshots(volume: string): Promise<SnapshotView[]>;
  deleteSnapshot(volume: string, name: string): Promise<void>;
  /**
   * Roll the volume back to the snapshot: its data is copied over the live volume through the
   * routers (wherever pages live now), then every host path gets a unit attention (29/00).
   * Refused while hosts are logged in, unless forced (they see the data change under them).
   */
  restoreSnapshot(volume: string, name: string, force: boolean): Promise<{ copiedBytes: number; unmappedBytes: number }>;
  /** A new writable volume holding the snapshot's data (copied; thin: unwritten blocks stay unallocated). */
  cloneSnapshot(volume: string, name: string, newName: string): Promise<VolumeView>;
  /** every: a period ("1h", "30m", …) or "off". */
  scheduleSnapshots(volume: string, every: string, keep: number): Promise<{ volume: string; everyMs: number; keep: number }>;
}

export interface SnapshotAdminOptions {
  self: string;
  env: Env;
  catalog: Catalog;
  snapshots: Pick<SnapshotService, 'create' | 'delete'>;
  /** Readers of the snapshots' data (snapshot/targets.ts). */
  reader(volume: string, name: string): BlockBackend | undefined;
  targets: Pick<VolumeTargets, 'routerFor' | 'reservationsOf'>;
  volumes: Pick<VolumeAdmin, 'createVolume' | 'getVolume'>;
  group: Pick<GroupStatus, 'sessions'>;
  /** Something the console's events show. */
  event(message: string, volume: string): void;
  log: Logger;
}

export function snapshotAdmin(o: SnapshotAdminOptions): SnapshotAdmin {
  const { self, catalog, targets } = o;
  const snapshotReader = (volume: string, name: string): BlockBackend => {
    const v = catalog.require(volume);
    const reader = o.reader(v.name, name);
    if (!reader) throw new NotFoundError(`volume ${volume} has no snapshot named ${name}`);
    return reader;
  };
  const routerOf = (volume: string) => {
    const router = targets.routerFor(volume);
    if (!router) throw new PeersanError(`volume ${volume} is not open on ${self} yet`);
    return router;
  };
  return {
    createSnapshots: (volumes, opts) => o.snapshots.create(volumes, opts),
    createSnapshot: async (volume, opts) => (await o.snapshots.create([volume], opts))[0],
    async listSnapshots(volume) {
      const v = catalog.require(volume);
      return (await listSnapshotRecords(catalog.store, v.id)).map(viewOf).sort((a, b) => a.seq - b.seq);
    },
    deleteSnapshot: (volume, name) => o.snapshots.delete(volume, name),
    async restoreSnapshot(volume, name, force) {
      const reader = snapshotReader(volume, name);
      const v = catalog.require(volume);
      const sessions = (await o.group.sessions()).filter((x) => x.session.targetName === targetNameFor(v.name));
      if (sessions.length > 0 && !force) throw new InvalidArgumentError(`volume ${volume} has ${sessions.length} session(s) logged in; log them out first or use --force`);
      const router = routerOf(v.name);
      const t0 = o.env.clock.monotonicMs();
      const done = await copyInto(reader, router);
      await router.flush();
      await targets.reservationsOf(v.id)?.announce([[everyNexus, Asc.powerOnReset]]);
      o.event(`volume ${volume} restored from snapshot ${name} (${formatBytes(done.copiedBytes)} copied in ${Math.round(o.env.clock.monotonicMs() - t0)} ms)`, volume);
      o.log.info({ volume, name, ...done }, 'volume restored from a snapshot');
      return done;
    },
    async cloneSnapshot(volume, name, newName) {
      const reader = snapshotReader(volume, name);
      const v = catalog.require(volume);
      const record = await o.volumes.createVolume({ name: newName, size: String(reader.blockCount * reader.blockBytes), blockBytes: reader.blockBytes, peers: v.peers, allow: v.allow, chap: v.chap });
      const router = routerOf(newName);
      const done = await copyInto(reader, router);
      await router.flush();
      o.event(`volume ${newName} cloned from snapshot ${name} of ${volume} (${formatBytes(done.copiedBytes)} copied)`, newName);
      return o.volumes.getVolume(record.name);
    },
    async scheduleSnapshots(volume, every, keep) {
      const v = catalog.require(volume);
      if (every === 'off') {
        if (!(await removeSchedule(catalog.store, v.id))) throw new NotFoundError(`volume ${volume} has no snapshot schedule`);
        return { volume, everyMs: 0, keep: 0 };
      }
      const r = await setSchedule(catalog.store, { volumeId: v.id, volume: v.name, everyMs: parseEvery(every), keep }, o.env.clock.nowMs());
      return { volume, everyMs: r.everyMs, keep: r.keep };
    },
  };
}
