// Peer-to-peer RPC authentication (DESIGN.md 8). Every PeerService call (in its gRPC header)
// and every block data stream (in its hello, src/routing/data-stream.ts) carries the caller's peer id, a millisecond stamp, a random nonce and
// HMAC-SHA256(cluster secret, "peersan-peer-v2|method|id|stamp|nonce"). The secret never
// crosses the wire. The receiver checks, in this order:
//   1. the id is a member of the group and the fields are well formed;
//   2. the stamp is within peerAuthSkewMsMax of its clock;
//   3. the MAC is right for the method being called (a gRPC path, or peerDataMethod for a
//      data stream: a header captured from one method authorises no other, the method is
//      inside the MAC);
//   4. the nonce was not seen before (NonceLedger). Only a header that passed 1-3 may take a
//      place in the ledger, so a sender without the secret cannot fill it.
// A captured header is therefore good for nothing: replayed, its nonce is known; altered, its
// MAC fails; kept, it expires. This holds with and without TLS (peer-tls.ts); with TLS the
// caller's certificate must also name the id it claims (peer-rpc.ts).

import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { peerAuthNoncesMax, peerAuthSkewMsMax } from '../limits';

const idKey = 'x-peersan-peer';
const stampKey = 'x-peersan-stamp';
const nonceKey = 'x-peersan-nonce';
const macKey = 'x-peersan-mac';

function mac(secret: string, method: string, peerId: string, stamp: string, nonce: string): Buffer {
  return createHmac('sha256', secret).update(`peersan-peer-v2|${method}|${peerId}|${stamp}|${nonce}`).digest();
}

/** The method name a data stream's hello is made for (its MAC covers it, as a gRPC path for a call). */
export const peerDataMethod = 'peersan-data-stream-v1';

/** What authenticates one call or data stream, whatever carries it (a gRPC header, a hello frame). */
export interface PeerAuthFields {
  peerId: string;
  stamp: string;
  nonce: string;
  /** HMAC-SHA256, hex. */
  mac: string;
}

/** The fields for one call of `method` (a gRPC path such as "/peersan.PeerService/Status", or peerDataMethod). */
export function peerAuthFields(secret: string, peerId: string, method: string, nowMs = Date.now(), nonce = randomBytes(16).toString('hex')): PeerAuthFields {
  const stamp = String(nowMs);
  return { peerId, stamp, nonce, mac: mac(secret, method, peerId, stamp, nonce).toString('hex') };
}

/** The header for one call of `method` (its gRPC path, e.g. "/peersan.PeerService/Status"). */
export function peerAuthMetadata(secret: string, peerId: string, method: string, nowMs = Date.now(), nonce = randomBytes(16).toString('hex')): grpc.Metadata {
  const f = peerAuthFields(secret, peerId, method, nowMs, nonce);
  const md = new grpc.Metadata();
  md.set(idKey, f.peerId);
  md.set(stampKey, f.stamp);
  md.set(nonceKey, f.nonce);
  md.set(macKey, f.mac);
  return md;
}

/**
 * Nonces of accepted headers, each kept until no header carrying it could pass the stamp check
 * again (arrival + 2 × skew covers any stamp the check accepts). Arrival order is expiry order,
 * so pruning takes from the front. Full: the caller is refused rather than the ledger grown
 * (refusing calls for a while is better than accepting a replay).
 */
export class NonceLedger {
  private readonly expiresAtMs = new Map<string, number>();

  constructor(private readonly max = peerAuthNoncesMax) {}

  get size(): number {
    return this.expiresAtMs.size;
  }

  /** True (and the nonce remembered) when it was not seen before and there is room. */
  admit(nonce: string, nowMs: number): boolean {
    this.prune(nowMs);
    if (this.expiresAtMs.has(nonce) || this.expiresAtMs.size >= this.max) return false;
    this.expiresAtMs.set(nonce, nowMs + 2 * peerAuthSkewMsMax);
    return true;
  }

  private prune(nowMs: number): void {
    for (const [nonce, at] of this.expiresAtMs) {
      if (at > nowMs) return;
      this.expiresAtMs.delete(nonce);
    }
  }
}

/** Who may call: the group's members, as a list or asked one by one (the catalog's, which change). */
export type Members = readonly string[] | ((peerId: string) => boolean);

export type PeerAuthVerdict = { ok: true; peerId: string } | { ok: false; why: string };

/** Checks one call's header (see the order at the top of this file). */
export function verifyPeerAuth(
  md: grpc.Metadata,
  method: string,
  auth: { secret: string; members: Members; nonces: NonceLedger },
  nowMs = Date.now(),
): PeerAuthVerdict {
  return verifyPeerAuthFields(peerAuthFieldsOf(md), method, auth, nowMs);
}

/** The fields of a call's header (empty strings for missing ones: the checks refuse them). */
export function peerAuthFieldsOf(md: grpc.Metadata): PeerAuthFields {
  const [peerId, stamp, nonce, mac] = [idKey, stampKey, nonceKey, macKey].map((k) => String(md.get(k)[0] ?? ''));
  return { peerId, stamp, nonce, mac };
}

/** Checks one call's or data stream's fields (see the order at the top of this file). */
export function verifyPeerAuthFields(
  f: PeerAuthFields,
  method: string,
  auth: { secret: string; members: Members; nonces: NonceLedger },
  nowMs = Date.now(),
): PeerAuthVerdict {
  const { peerId, stamp, nonce, mac: given } = f;
  if (!peerId || !(typeof auth.members === 'function' ? auth.members(peerId) : auth.members.includes(peerId))) return { ok: false, why: 'not a member of this group' };
  if (!/^\d{1,15}$/.test(stamp) || !/^[0-9a-f]{32}$/.test(nonce) || !/^[0-9a-f]{64}$/.test(given)) return { ok: false, why: 'malformed peer authentication header' };
  if (Math.abs(nowMs - Number(stamp)) > peerAuthSkewMsMax) return { ok: false, why: `stamp more than ${peerAuthSkewMsMax / 1000} s from this peer's clock` };
  if (!timingSafeEqual(Buffer.from(given, 'hex'), mac(auth.secret, method, peerId, stamp, nonce))) return { ok: false, why: 'wrong MAC (another secret, or a header made for another method)' };
  if (!auth.nonces.admit(nonce, nowMs)) return { ok: false, why: 'nonce already used (a replayed header) or too many calls in the window' };
  return { ok: true, peerId };
}
