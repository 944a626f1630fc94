// Peer-to-peer RPC authentication (DESIGN.md 8): every PeerService call carries the caller's
// peer id, a millisecond stamp and HMAC-SHA256(cluster secret, "id|stamp"). The secret never
// crosses the wire; a stamp older than peerAuthSkewMsMax is refused, and so is any id that is
// not a member of the group. A process without the secret cannot read or write pages.

import { createHmac, timingSafeEqual } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { peerAuthSkewMsMax } from '../limits';

const idKey = 'x-peersan-peer';
const stampKey = 'x-peersan-stamp';
const macKey = 'x-peersan-mac';

function mac(secret: string, peerId: string, stamp: string): Buffer {
  return createHmac('sha256', secret).update(`${peerId}|${stamp}`).digest();
}

export function peerAuthMetadata(secret: string, peerId: string, nowMs = Date.now()): grpc.Metadata {
  const md = new grpc.Metadata();
  const stamp = String(nowMs);
  md.set(idKey, peerId);
  md.set(stampKey, stamp);
  md.set(macKey, mac(secret, peerId, stamp).toString('hex'));
  return md;
}

/** The calling peer's id, or undefined when the call is not from a member holding the secret. */
export function verifyPeerAuth(md: grpc.Metadata, secret: string, members: readonly string[], nowMs = Date.now()): string | undefined {
  const [peerId, stamp, given] = [idKey, stampKey, macKey].map((k) => String(md.get(k)[0] ?? ''));
  if (!peerId || !members.includes(peerId) || !/^\d{1,15}$/.test(stamp)) return undefined;
  if (Math.abs(nowMs - Number(stamp)) > peerAuthSkewMsMax) return undefined;
  const want = mac(secret, peerId, stamp);
  const got = Buffer.from(given, 'hex');
  return got.length === want.length && timingSafeEqual(got, want) ? peerId : undefined;
}
