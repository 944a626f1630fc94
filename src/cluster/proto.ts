// proto/peersan.proto, loaded once at run time for AdminService and PeerService.

import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { InvalidArgumentError } from '../errors';
import { peerRequestVolumesMax, snapshotIdBytesMax, volumeNameBytesMax } from '../limits';
import type { PlannedMove } from '../loadmon/balancer';

const protoPath = join(__dirname, '..', '..', 'proto', 'peersan.proto');
let loaded: grpc.GrpcObject | undefined;

export function proto(): grpc.GrpcObject {
  if (!loaded) {
    const def = protoLoader.loadSync(protoPath, { keepCase: false, longs: Number, defaults: true, enums: String });
    loaded = grpc.loadPackageDefinition(def).peersan as grpc.GrpcObject;
  }
  return loaded;
}

// ---- PeerService messages as they arrive ---------------------------------------------------
// proto-loader (keepCase false, longs as Number, defaults filled in) hands a handler these
// shapes; protobuf guarantees the types, not the values. Another peer may be buggy or hostile,
// so each handler checks its request with the check* functions below before use: strings
// bounded and of the expected form, numbers whole and in range, lists bounded. A bad request
// is refused with InvalidArgumentError (gRPC INVALID_ARGUMENT), never half-used.

export interface UnitAttentionMessage {
  nexusKey: string;
  asc: number;
}
export interface ReservationNoticeMessage {
  volumeId: string;
  version: number;
  unitAttentions: UnitAttentionMessage[];
}
export interface MovePageRequestMessage {
  volume: string;
  page: number;
  to: string;
}
export interface MovePrepareRequestMessage {
  volumeId: string;
  page: number;
  from: string;
  fresh: boolean;
}
export interface MoveFinishRequestMessage {
  volumeId: string;
  page: number;
  committed: boolean;
  version: number;
  from?: string;
}
export interface SnapshotLayerMessage {
  volumeId: string;
  seq: number;
}
export interface SnapshotPrepareRequestMessage {
  snapshotId: string;
  volumeIds: string[];
  mode: string;
  layers: SnapshotLayerMessage[];
}
export interface SnapshotTakeRequestMessage {
  snapshotId: string;
  layers: SnapshotLayerMessage[];
  cut: number;
}
export interface SnapshotReleaseRequestMessage {
  snapshotId: string;
  abort: boolean;
  finish: boolean;
}
export interface PlannedMoveListMessage {
  moves: PlannedMove[];
}
export interface MoveSessionRequestMessage {
  session: string;
  to: string;
  on: string;
}

function refuse(what: string, why: string): never {
  throw new InvalidArgumentError(`peer request: ${what} ${why}`);
}

/** A string of at most `bytesMax` UTF-8 bytes (and of `form`, when given). */
export function checkString(s: unknown, what: string, bytesMax: number, form?: RegExp): string {
  if (typeof s !== 'string') refuse(what, 'is not a string');
  if (Buffer.byteLength(s, 'utf8') > bytesMax) refuse(what, `is longer than ${bytesMax} bytes`);
  if (form && !form.test(s)) refuse(what, `is not of the form ${form.source}`);
  return s;
}

/** A whole number in [0, max]. */
export function checkUint(n: unknown, what: string, max: number): number {
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0 || n > max) refuse(what, `is not a whole number from 0 to ${max}`);
  return n;
}

/** At most `max` items, each checked by `check`. */
export function checkList<T>(list: unknown, what: string, max: number, check: (item: unknown, what: string) => T): T[] {
  if (list === undefined || list === null) return [];
  if (!Array.isArray(list)) refuse(what, 'is not a list');
  if (list.length > max) refuse(what, `has more than ${max} items`);
  return list.map((item, i) => check(item, `${what}[${i}]`));
}

const volumeIdForm = /^[0-9a-f]{16}$/;
/** Peer ids as cluster.yaml allows them (src/server/config.ts). */
const peerIdForm = /^[a-z0-9][a-z0-9-]{0,31}$/;
const u32Max = 0xffff_ffff;

export const checkVolumeId = (s: unknown, what = 'volumeId'): string => checkString(s, what, 16, volumeIdForm);
export const checkPeerId = (s: unknown, what = 'peer'): string => checkString(s, what, 32, peerIdForm);
/** An optional peer id (empty: the callee chooses). */
export const checkPeerIdOrEmpty = (s: unknown, what = 'peer'): string => (s === '' ? '' : checkPeerId(s, what));
export const checkPage = (n: unknown, what = 'page'): number => checkUint(n, what, u32Max);
export const checkVolumeName = (s: unknown, what = 'volume'): string => checkString(s, what, volumeNameBytesMax);
export const checkSnapshotId = (s: unknown, what = 'snapshotId'): string => checkString(s, what, snapshotIdBytesMax);
/** iSCSI names are at most 223 bytes (RFC 7143 6.1). */
export const checkIscsiName = (s: unknown, what: string): string => checkString(s, what, 223);

function checkLayer(l: unknown, what: string): { volumeId: string; seq: number } {
  const m = l as SnapshotLayerMessage;
  return { volumeId: checkVolumeId(m?.volumeId, `${what}.volumeId`), seq: checkUint(m?.seq, `${what}.seq`, u32Max) };
}

export function checkLayers(list: unknown): { volumeId: string; seq: number }[] {
  return checkList(list, 'layers', peerRequestVolumesMax, checkLayer);
}

export function checkPlannedMove(p: unknown, what: string): PlannedMove {
  const m = p as PlannedMove;
  const load = m?.load;
  if (typeof load !== 'number' || !Number.isFinite(load)) refuse(`${what}.load`, 'is not a finite number');
  return { volumeId: checkVolumeId(m.volumeId, `${what}.volumeId`), volumeName: checkVolumeName(m.volumeName, `${what}.volumeName`), page: checkPage(m.page, `${what}.page`), from: checkPeerId(m.from, `${what}.from`), to: checkPeerId(m.to, `${what}.to`), load };
}
