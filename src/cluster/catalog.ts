// Typed cluster catalog over a MetaStore: volume records with their validation. Keeps an
// in-memory copy fed by the watch, so lookups on the data path never wait on storage.

import { randomBytes } from 'node:crypto';
import { AlreadyExistsError, ConflictError, InvalidArgumentError, NotFoundError } from '../errors';
import { blockBytesAllowed, volumeBytesMax, volumeNameBytesMax } from '../limits';
import type { MetaStore } from './metastore';

export interface ChapSettings {
  user: string;
  secret: string;
  mutualUser?: string;
  mutualSecret?: string;
}

export interface VolumeRecord {
  name: string;
  /** 16 hex digits, random at creation and stable: the SCSI NAA identifier and serial. */
  id: string;
  sizeBytes: number;
  blockBytes: number;
  allow: string[];
  chap?: ChapSettings;
  createdAtMs: number;
  version: number;
}

export interface CreateVolumeInput {
  name: string;
  size: string | number;
  blockBytes?: number;
  allow?: string[];
  chap?: ChapSettings;
}

const volumePrefix = 'volumes/';
const volumeNamePattern = /^[a-z0-9][a-z0-9-]*$/;
const iqnPattern = /^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:.+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$/;
const units: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** "1G", "512M", "10GiB", "1T", "4096" → bytes (binary units). */
export function parseSize(size: string | number): number {
  if (typeof size === 'number') return size;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$/.exec(size);
  if (!m) throw new InvalidArgumentError(`cannot read size "${size}" (use e.g. 10G, 512M, 1T or a byte count)`);
  return Math.round(Number(m[1]) * units[m[2].toLowerCase()]);
}

export function formatBytes(n: number): string {
  const steps = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < steps.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${steps[i]}`;
}

export function validateVolumeName(name: string): void {
  if (!name || name.length > volumeNameBytesMax || !volumeNamePattern.test(name)) {
    throw new InvalidArgumentError(`bad volume name "${name}": use 1-${volumeNameBytesMax} of a-z, 0-9 and '-', starting with a letter or digit`);
  }
}

function validateChap(chap: ChapSettings): void {
  // RFC 7143 12.1.3: CHAP secrets of at least 12 bytes; initiators like open-iscsi cap them at 16.
  const check = (what: string, secret: string): void => {
    if (secret.length < 12 || secret.length > 16) throw new InvalidArgumentError(`${what} must be 12 to 16 characters (RFC 7143), got ${secret.length}`);
  };
  if (!chap.user) throw new InvalidArgumentError('CHAP needs a user name');
  check('CHAP secret', chap.secret);
  if (chap.mutualUser !== undefined || chap.mutualSecret !== undefined) {
    if (!chap.mutualUser || !chap.mutualSecret) throw new InvalidArgumentError('mutual CHAP needs both a user and a secret');
    check('mutual CHAP secret', chap.mutualSecret);
    if (chap.mutualSecret === chap.secret) throw new InvalidArgumentError('mutual CHAP secret must differ from the CHAP secret');
  }
}

function validateSize(sizeBytes: number, blockBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new InvalidArgumentError('size must be positive');
  if (sizeBytes % blockBytes !== 0) throw new InvalidArgumentError(`size must be a multiple of the block size (${blockBytes})`);
  if (sizeBytes > volumeBytesMax) throw new InvalidArgumentError(`size above the ${formatBytes(volumeBytesMax)} limit`);
}

export class Catalog {
  private readonly store: MetaStore;
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly listeners = new Set<(name: string, record: VolumeRecord | undefined) => void>();
  private unwatch: (() => void) | undefined;

  private constructor(store: MetaStore) {
    this.store = store;
  }

  static async open(store: MetaStore): Promise<Catalog> {
    const c = new Catalog(store);
    // Watch first, then list: a change between the two is seen twice (harmless), never missed.
    c.unwatch = await store.watch(volumePrefix, (ev) => {
      const name = (ev.type === 'put' ? ev.record.key : ev.key).slice(volumePrefix.length);
      const record = ev.type === 'put' ? decodeVolume(ev.record.value, ev.record.version) : undefined;
      if (record) c.volumes.set(name, record);
      else c.volumes.delete(name);
      for (const l of c.listeners) l(name, record);
    });
    for (const r of await store.list(volumePrefix)) {
      const v = decodeVolume(r.value, r.version);
      c.volumes.set(v.name, v);
    }
    return c;
  }

  /** Called after every committed change (record undefined: deleted). */
  onVolumeChange(listener: (name: string, record: VolumeRecord | undefined) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  volume(name: string): VolumeRecord | undefined {
    return this.volumes.get(name);
  }

  listVolumes(): VolumeRecord[] {
    return [...this.volumes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  async createVolume(input: CreateVolumeInput): Promise<VolumeRecord> {
    validateVolumeName(input.name);
    const blockBytes = input.blockBytes || 512;
    if (!blockBytesAllowed.includes(blockBytes)) throw new InvalidArgumentError(`block size must be 512 or 4096, got ${blockBytes}`);
    const sizeBytes = parseSize(input.size);
    validateSize(sizeBytes, blockBytes);
    const allow = [...new Set(input.allow ?? [])];
    for (const iqn of allow) {
      if (!iqnPattern.test(iqn)) throw new InvalidArgumentError(`"${iqn}" is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui. or naa.)`);
    }
    if (input.chap) validateChap(input.chap);
    const record: Omit<VolumeRecord, 'version'> = {
      name: input.name, id: randomBytes(8).toString('hex'), sizeBytes, blockBytes, allow,
      chap: input.chap, createdAtMs: Date.now(),
    };
    try {
      const r = await this.store.put(volumePrefix + input.name, encodeVolume(record), 0);
      return { ...record, version: r.version };
    } catch (err) {
      if (err instanceof ConflictError) throw new AlreadyExistsError(`volume ${input.name} already exists`);
      throw err;
    }
  }

  async resizeVolume(name: string, size: string | number): Promise<VolumeRecord> {
    const current = this.require(name);
    const sizeBytes = parseSize(size);
    validateSize(sizeBytes, current.blockBytes);
    if (sizeBytes < current.sizeBytes) throw new InvalidArgumentError(`shrinking is not supported (${formatBytes(current.sizeBytes)} → ${formatBytes(sizeBytes)}): it would destroy data`);
    const { version: _v, ...rest } = current;
    const next = { ...rest, sizeBytes };
    const r = await this.store.put(volumePrefix + name, encodeVolume(next), current.version);
    return { ...next, version: r.version };
  }

  async deleteVolume(name: string): Promise<VolumeRecord> {
    const current = this.require(name);
    await this.store.delete(volumePrefix + name, current.version);
    return current;
  }

  require(name: string): VolumeRecord {
    const v = this.volumes.get(name);
    if (!v) throw new NotFoundError(`no volume named ${name}`);
    return v;
  }

  close(): void {
    this.unwatch?.();
    this.listeners.clear();
  }
}

function encodeVolume(v: Omit<VolumeRecord, 'version'>): Buffer {
  return Buffer.from(JSON.stringify(v));
}

function decodeVolume(b: Buffer, version: number): VolumeRecord {
  return { ...(JSON.parse(b.toString()) as Omit<VolumeRecord, 'version'>), version };
}
