// Headless Chromium (Debian package chromium) driven by playwright-core, for the console tests:
// one page, its script errors collected, closed and its profile removed by the teardown.

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type Page } from 'playwright-core';

export const chromiumPath = '/usr/bin/chromium';

/** Why a browser test cannot run here, or false. */
export const browserMissing = existsSync(chromiumPath) ? false : `${chromiumPath} missing (Debian package chromium)`;

export async function openBrowserPage(t: { teardown(fn: () => unknown): void }): Promise<{ page: Page; pageErrors: string[] }> {
  const profile = mkdtempSync(join(tmpdir(), 'peersan-chromium-'));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  t.teardown(async () => {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  });
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.setDefaultTimeout(30_000);
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('dialog', (d) => void d.accept());
  return { page, pageErrors };
}

/** Open the console at `url` with the admin token; resolves once the peers table is live. */
export async function openConsole(page: Page, url: string, token: string): Promise<void> {
  await page.goto(`${url}/`);
  await page.waitForSelector('#token-dialog[open]');
  await page.fill('#token-input', token);
  await page.click('#token-form button');
  await page.waitForSelector('#peers tbody tr[data-peer]');
  await page.waitForSelector('#live.on');
}
