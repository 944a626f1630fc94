// Numbers an operator or a client hands to the admin path, checked where they enter: the CLI's
// arguments, the AdminClient's requests (before a uint32 field of proto/peersan.proto could
// truncate 4294967297 into 1) and the console's JSON API. Written numbers are decimal digits
// only: "1e3", "0x10", "1.5", "-1" and "" are refused, not read as something else.

import { InvalidArgumentError } from '../errors';
import { wireUint32Max } from '../limits';

/** `text` as a whole number in [min, max]; anything else is an InvalidArgumentError naming `what`. */
export function wholeNumber(text: string, what: string, max: number, min = 0): number {
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new InvalidArgumentError(`${what} must be a whole number from ${min} to ${max}, got "${text}"`);
  return n;
}

/** A page number as written by a person or in a URL (the owner checks it against the volume's pages). */
export function pageNumber(text: string): number {
  return wholeNumber(text, 'page', wireUint32Max);
}

/** A number about to travel in a uint32 field: refused when the field could not carry it. */
export function wireUint32(n: number, what: string): number {
  if (!Number.isInteger(n) || n < 0 || n > wireUint32Max) throw new InvalidArgumentError(`${what} must be a whole number from 0 to ${wireUint32Max}, got ${n}`);
  return n;
}
