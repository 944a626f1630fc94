// Argument checks shared by the admin commands (main.ts) and the serving ones (serve.ts).

import { wholeNumber } from '../server/admin-input';

export function parseCount(value: string, what: string): number {
  return wholeNumber(value, what, 65535, 1);
}
