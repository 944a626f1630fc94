// The cluster catalog's storage (DESIGN.md 3): versioned records, compare-and-swap on the
// version, prefix listing and watches. Two backends share this interface: `embedded`
// (LevelDB inside one process) and, with the peer group, `etcd`. The data path never waits
// on it: peers keep in-memory copies fed by watch().

export interface MetaRecord {
  key: string;
  value: Buffer;
  /** Bumped by every successful put; 0 = absent (use as `expectedVersion` to create). */
  version: number;
}

export type WatchEvent = { type: 'put'; record: MetaRecord } | { type: 'delete'; key: string };

export interface MetaStore {
  get(key: string): Promise<MetaRecord | undefined>;
  list(prefix: string): Promise<MetaRecord[]>;
  /** Write if the current version equals `expectedVersion` (0: must not exist); else ConflictError. */
  put(key: string, value: Buffer, expectedVersion: number): Promise<MetaRecord>;
  /** Delete if the current version equals `expectedVersion`; else ConflictError. */
  delete(key: string, expectedVersion: number): Promise<void>;
  /**
   * Events for keys under `prefix`, in commit order, for every change committed after the
   * returned promise resolves. Resolves to unsubscribe.
   */
  watch(prefix: string, onEvent: (ev: WatchEvent) => void): Promise<() => void>;
  close(): Promise<void>;
}
