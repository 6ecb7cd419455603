// What the browser tests share (patch.mjs, import.mjs, search.mjs; dashboard.mjs uses launch):
// chromium through playwright-core, signing in, checks, screenshots, and a line protocol with the Rust test that
// runs the script (api/tests/it/browser.rs): the script prints a request on stdout and waits
// for the answer on stdin, so the test can check the database between steps.
//
//   node tests/browser/SCREEN.mjs BASE_URL API_KEY [ARG...]
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { join } from 'node:path';

export const [base, apiKey, ...args] = process.argv.slice(2);
export const artifacts = process.env.CONVEYOR_TEST_ARTIFACTS || 'target/test-artifacts';
// Generous: the machine running the tests is slow and busy.
export const TIMEOUT = 60_000;

let stdinLines = null;

// Asks the Rust test something (e.g. to check a table); fails unless it answers `ok`.
export async function askHarness(request) {
  stdinLines ||= createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  console.log(request);
  const { value } = await stdinLines.next();
  if (value !== 'ok') throw new Error(`the test answered ${value} to ${request}`);
}

export function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

export const step = (name) => console.error(`browser: ${name}`);

// Debian's chromium with one page; script errors are collected in `pageErrors`, console
// errors printed.
export async function launch(viewport, timeout) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') console.error(`page console: ${m.text()}`); });
  return { browser, context, page, pageErrors };
}

// Runs `body(page)` signed in, then checks no script failed; any failure leaves a screenshot
// `NAME-failure.png` and a non-zero exit.
export async function run(name, body) {
  if (!base || !apiKey) {
    console.error(`usage: ${name}.mjs BASE_URL API_KEY [ARG...]`);
    process.exit(2);
  }
  mkdirSync(artifacts, { recursive: true });
  const { browser, page, pageErrors } = await launch({ width: 1280, height: 860 }, TIMEOUT);
  try {
    // Anything the page asks of window.confirm (deleting a connection) is accepted.
    page.on('dialog', (d) => d.accept());
    step('sign in');
    await page.goto(`${base}/`);
    await page.fill('#api-key', apiKey);
    await page.click('#signin-form button[type=submit]');
    await page.locator('#jobs-view').waitFor();
    await body(page);
    check(pageErrors.length === 0, `no script errors: ${pageErrors.join('; ')}`);
    console.error(`browser: ${name}: all checks passed`);
  } catch (e) {
    await page.screenshot({ path: join(artifacts, `${name}-failure.png`), fullPage: true }).catch(() => {});
    console.error(`browser: ${name}: FAILED: ${e.stack || e}`);
    if (pageErrors.length) console.error(`page errors: ${pageErrors.join('; ')}`);
    process.exitCode = 1;
  } finally {
    await browser.close();
    process.exit(process.exitCode || 0);
  }
}

export async function screenshot(page, file) {
  await page.screenshot({ path: join(artifacts, file), fullPage: true });
}

// The hostile-tenant check: text that looks like markup was shown as text, and made nothing.
export async function nothingInjected(page) {
  const injected = await page.evaluate(() => ({
    images: document.querySelectorAll('img').length,
    scripts: [...document.scripts].filter((s) => !s.src.includes('/assets/')).length,
    pwned: window.__pwned === undefined ? null : window.__pwned,
  }));
  check(injected.images === 0 && injected.scripts === 0 && injected.pwned === null,
    `tenant text made elements or ran: ${JSON.stringify(injected)}`);
}
