// INQUIRY data (SPC-4 6.6) and the VPD pages a thin-provisioned block device reports.

import {
  compareAndWriteBlocksMax,
  transferBytesMax,
  unmapBlocksMax,
  unmapDescriptorsMax,
  writeSameBlocksMax,
} from '../limits';
import type { LuIdentity, Nexus } from './types';
import { thirdPartyCopyVpdBody } from './xcopy';

export const supportedVpdPages = [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2] as const;

function ascii(s: string, length: number): Buffer {
  return Buffer.from(s.padEnd(length, ' ').slice(0, length), 'ascii');
}

export function standardInquiry(id: LuIdentity): Buffer {
  const d = Buffer.alloc(66);
  d[0] = 0x00; // peripheral qualifier 0, direct access block device
  d[1] = 0x00; // not removable
  d[2] = 0x06; // SPC-4
  d[3] = 0x12; // HiSup, response data format 2
  d[4] = d.length - 5;
  d[5] = 0x10 | 0x08; // TPGS 01b: implicit ALUA (alua.ts); 3PC: EXTENDED COPY
  d[6] = 0x00;
  d[7] = 0x02; // CmdQue
  ascii(id.vendor, 8).copy(d, 8);
  ascii(id.product, 16).copy(d, 16);
  ascii(id.revision, 4).copy(d, 32);
  // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
  [0x00a0, 0x0960, 0x0460, 0x04c0].forEach((v, i) => d.writeUInt16BE(v, 58 + 2 * i));
  return d;
}

function vpdPage(code: number, body: Buffer): Buffer {
  const d = Buffer.alloc(4 + body.length);
  d[1] = code;
  d.writeUInt16BE(body.length, 2);
  body.copy(d, 4);
  return d;
}

function designator(codeSet: number, piv: boolean, association: number, type: number, id: Buffer, protocol = 0): Buffer {
  const d = Buffer.alloc(4 + id.length);
  d[0] = (protocol << 4) | codeSet;
  d[1] = (piv ? 0x80 : 0) | (association << 4) | type;
  d[3] = id.length;
  id.copy(d, 4);
  return d;
}

/** NAA 6 (IEEE registered extended): 4-bit NAA, 24-bit OUI, 36-bit vendor id + 64-bit extension from the volume id. */
export function naaIdentifier(volumeId: string): Buffer {
  const id = Buffer.alloc(16);
  const oui = 0x000000; // locally administered; no OUI registered yet
  const hex = volumeId.padStart(16, '0').slice(-16);
  id[0] = 0x60 | ((oui >> 20) & 0x0f);
  id[1] = (oui >> 12) & 0xff;
  id[2] = (oui >> 4) & 0xff;
  id[3] = ((oui & 0x0f) << 4) | 0x0e; // vendor specific id: "peersan" marker nibble then the volume id
  Buffer.from('50', 'hex').copy(id, 4); // 'P'
  Buffer.from('53414e', 'hex').copy(id, 5); // 'SAN'
  Buffer.from(hex, 'hex').copy(id, 8);
  return id;
}

function nullPadded(s: string): Buffer {
  const raw = Buffer.from(s, 'utf8');
  const length = (raw.length + 1 + 3) & ~3;
  const b = Buffer.alloc(length);
  raw.copy(b);
  return b;
}

export interface BlockGeometry {
  grainBlocks: number;
  blockBytes: number;
}

export function vpd(code: number, id: LuIdentity, nexus: Nexus, targetName: string, g: BlockGeometry): Buffer | undefined {
  switch (code) {
    case 0x00:
      return vpdPage(0x00, Buffer.from(supportedVpdPages));
    case 0x80:
      return vpdPage(0x80, Buffer.from(id.volumeId, 'ascii'));
    case 0x83: {
      const rtp = Buffer.alloc(4);
      rtp.writeUInt16BE(nexus.relativeTargetPort, 2);
      const tpg = Buffer.alloc(4);
      tpg.writeUInt16BE(nexus.relativeTargetPort, 2); // each peer is its own target port group
      const t10 = Buffer.concat([ascii(id.vendor, 8), Buffer.from(id.volumeId, 'ascii')]);
      return vpdPage(0x83, Buffer.concat([
        designator(1, false, 0, 3, naaIdentifier(id.volumeId)),
        designator(2, false, 0, 1, t10),
        designator(1, true, 1, 4, rtp, 5),
        designator(1, true, 1, 5, tpg, 5),
        designator(3, true, 1, 8, nullPadded(nexus.targetPort), 5),
        designator(3, true, 2, 8, nullPadded(targetName), 5),
      ]));
    }
    case 0x8f:
      return vpdPage(0x8f, thirdPartyCopyVpdBody());
    case 0xb0: {
      const b = Buffer.alloc(0x3c);
      b[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
      b[1] = compareAndWriteBlocksMax;
      b.writeUInt16BE(1, 2); // optimal transfer length granularity
      b.writeUInt32BE(Math.floor(transferBytesMax / g.blockBytes), 4);
      b.writeUInt32BE(Math.floor((1024 * 1024) / g.blockBytes), 8); // optimal transfer length
      b.writeUInt32BE(0, 12); // max prefetch
      b.writeUInt32BE(unmapBlocksMax, 16);
      b.writeUInt32BE(unmapDescriptorsMax, 20);
      b.writeUInt32BE(g.grainBlocks, 24); // optimal unmap granularity
      b.writeUInt32BE(0x80000000, 28); // UGAVALID, alignment 0
      b.writeBigUInt64BE(BigInt(writeSameBlocksMax), 32);
      return vpdPage(0xb0, b);
    }
    case 0xb1: {
      const b = Buffer.alloc(0x3c);
      b.writeUInt16BE(1, 0); // non-rotating medium
      return vpdPage(0xb1, b);
    }
    case 0xb2: {
      const b = Buffer.alloc(4);
      b[0] = 0; // threshold exponent
      b[1] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU, LBPWS, LBPWS10, LBPRZ
      b[2] = 0x02; // provisioning type: thin
      return vpdPage(0xb2, b);
    }
    default:
      return undefined;
  }
}
