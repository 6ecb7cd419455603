// End-to-end test of the dashboard in Debian's chromium, driven by playwright-core.
//
//   node tests/browser/dashboard.mjs BASE_URL API_KEY
//
// Run by api/tests/it/browser.rs, which serves the API and a worker. To cut the dashboard's
// SSE connection mid-job, this script prints `restart-api` and waits for `restarted` on stdin
// while the test stops the API and starts it again on the same port.
// Screenshots go to $CONVEYOR_TEST_ARTIFACTS (default target/test-artifacts).
import { check, launch, step } from './screens.mjs';
import { mkdirSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { join } from 'node:path';

const [base, apiKey] = process.argv.slice(2);
if (!base || !apiKey) {
  console.error('usage: dashboard.mjs BASE_URL API_KEY');
  process.exit(2);
}
const artifacts = process.env.CONVEYOR_TEST_ARTIFACTS || 'target/test-artifacts';
mkdirSync(artifacts, { recursive: true });
const TIMEOUT = 30_000;

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function askHarness(request, expected) {
  console.log(request);
  const { value } = await stdinLines.next();
  if (value !== expected) throw new Error(`harness answered ${value} to ${request}`);
}

const { browser, context, page, pageErrors } = await launch({ width: 1400, height: 900 }, TIMEOUT);
try {

  step('sign in');
  await page.goto(`${base}/`);
  await page.locator('#signin').waitFor();
  await page.fill('#api-key', apiKey);
  await page.click('#signin-form button[type=submit]');
  await page.locator('#jobs-view').waitFor();
  await page.locator('#connection[data-state="live"]').waitFor();
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === 'conveyor_session');
  check(session && session.httpOnly && session.sameSite === 'Strict', `session cookie ${JSON.stringify(cookies)}`);
  check(!cookies.some((c) => c.value.includes(apiKey)), 'the key is not in a cookie');
  check(!page.url().includes(apiKey), 'the key is not in the URL');
  const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
  check(!stored.includes(apiKey), 'the key is not in web storage');
  check(await page.inputValue('#api-key') === '', 'the key field is cleared');
  const role = await page.textContent('#role');
  check(role === 'admin key', `the header shows the key's role: ${JSON.stringify(role)}`);

  // Submits through the form; returns the new job's id.
  const submitted = new Set();
  async function submit(payload) {
    await page.locator('#submit-kind option[value="canary"]').waitFor({ state: 'attached' });
    await page.selectOption('#submit-kind', 'canary');
    await page.fill('#submit-payload', JSON.stringify(payload));
    return submitForm();
  }
  // Sends the submit form as it stands; returns the new job's id.
  async function submitForm() {
    await page.click('#submit-form button[type=submit]');
    const id = await page.waitForFunction((known) => {
      const link = document.querySelector('#submit-result a[data-job-id]');
      return link && !known.includes(link.dataset.jobId) && link.dataset.jobId;
    }, [...submitted]).then((handle) => handle.jsonValue());
    submitted.add(id);
    return id;
  }
  const row = (id) => page.locator(`#jobs tr[data-job-id="${id}"]`);
  const progressOf = (id) => row(id).locator('progress').evaluate((p) => p.value);

  step('submit a canary job and watch it run live');
  const first = await submit({ steps: 10, step_ms: 200 });
  await row(first).waitFor();
  const seen = new Set();
  const deadline = Date.now() + TIMEOUT;
  while ((await row(first).getAttribute('data-status')) !== 'succeeded') {
    check(Date.now() < deadline, 'the first job succeeds in time');
    seen.add(await progressOf(first));
    await page.waitForTimeout(50);
  }
  check([...seen].some((p) => p > 0 && p < 1), `progress moved live without reload: ${[...seen]}`);
  check(await progressOf(first) === 1, 'the bar is full');
  check((await row(first).locator('.pct').textContent()) === '100%', 'the bar reads 100%');
  check((await row(first).locator('.status').textContent()) === 'succeeded', 'status cell');
  check((await row(first).locator('.duration').textContent()) !== '', 'a duration is shown');

  step('filters');
  await page.selectOption('#filter-status', 'failed');
  await row(first).waitFor({ state: 'detached' });
  await page.selectOption('#filter-status', 'succeeded');
  await page.selectOption('#filter-kind', 'canary');
  await row(first).waitFor();
  await page.selectOption('#filter-status', '');
  await page.selectOption('#filter-kind', '');

  step('queues screen');
  await page.click('#nav a[data-view="queues"]');
  await page.locator('#queues tr[data-queue="canary"]').waitFor();
  const waiting = await page.locator('#queues tr[data-queue="canary"] td.waiting').textContent();
  check(/^\d+$/.test(waiting), `the canary backlog reads ${waiting}`);
  await page.locator('#workers tr').first().waitFor();
  await page.click('#nav a[data-view="jobs"]');
  await page.locator('#jobs-view').waitFor();

  step('upload a dataset and import it from its row');
  await page.setInputFiles('#upload-file', {
    name: 'Orders.csv', mimeType: 'text/csv',
    buffer: Buffer.from('id,city,amount\n' + Array.from({ length: 40 }, (_, i) =>
      `${i + 1},${['Lyon', 'Oslo', 'Porto'][i % 3]},${(10 + (i * 7) % 23).toFixed(2)}\n`).join('')),
  });
  await page.click('#upload-form button[type=submit]');
  const datasetId = await page.locator('#upload-result code[data-dataset-id]').getAttribute('data-dataset-id');
  const datasetRow = page.locator(`#datasets tr[data-dataset-id="${datasetId}"]`);
  await datasetRow.waitFor();
  check((await datasetRow.locator('td').nth(1).textContent()) === 'csv', 'the format is shown');
  await datasetRow.locator('button[data-kind="synthesis"]').click();
  check(await page.inputValue('#submit-kind') === 'synthesis', 'synthesis fills the form');
  check(JSON.parse(await page.inputValue('#submit-payload')).dataset_id === datasetId, 'synthesis names the dataset');
  const synthesis = await submitForm();
  await page.locator(`#jobs tr[data-job-id="${synthesis}"][data-status="succeeded"]`).waitFor();

  step('the synthesis report on its job page: a chart per learned column, sandboxed');
  await page.click(`#submit-result a[data-job-id="${synthesis}"]`);
  await page.locator('#job-report-card:not([hidden])').waitFor();
  const report = page.frameLocator('#job-report');
  await report.locator('figure[data-column]').first().waitFor();
  const charted = await report.locator('figure[data-column]').evaluateAll(
    (figures) => figures.map((f) => f.dataset.column).sort());
  check(JSON.stringify(charted) === '["amount","city"]', `charts for ${charted}`);
  check(await report.locator('figure[data-column="amount"] svg rect').count() > 2, 'bars are drawn');
  const scripted = await report.locator('body').evaluate(() => {
    try { return typeof document.cookie === 'string' && window.parent.document !== null; } catch { return false; }
  });
  check(scripted === false, 'the report runs in its own origin, reaching neither cookie nor dashboard');
  await page.screenshot({ path: join(artifacts, 'dashboard-synthesis-report.png'), fullPage: true });
  await page.click('a[href="#/"]');
  await page.locator('#jobs-view').waitFor();

  await datasetRow.locator('button[data-kind="import"]').click();
  check(await page.inputValue('#submit-kind') === 'import', 'import fills the form');
  const importPayload = JSON.parse(await page.inputValue('#submit-payload'));
  check(importPayload.dataset_id === datasetId && importPayload.target.table === 'orders',
    `import payload ${JSON.stringify(importPayload)}`);
  const imported = await submitForm();
  await page.locator(`#jobs tr[data-job-id="${imported}"][data-status="succeeded"]`).waitFor();

  step('cancel a long job from its page');
  const long = await submit({ steps: 600, step_ms: 100 });
  await page.click(`#submit-result a[data-job-id="${long}"]`);
  await page.locator('#job-view').waitFor();
  check((await page.textContent('#job-id')) === long, 'the job page shows the job');
  await page.locator('#job-status', { hasText: 'running' }).waitFor();
  await page.locator('#timeline li[data-type="progress"]').first().waitFor();
  check(JSON.parse(await page.textContent('#job-payload')).steps === 600, 'the payload is shown');
  await page.click('#job-cancel');
  await page.locator('#job-status', { hasText: 'cancelled' }).waitFor();
  await page.locator('#timeline li[data-type="cancelled"]').waitFor();
  check(await page.isEnabled('#job-retry'), 'retry is offered for a cancelled job');
  check(await page.isDisabled('#job-cancel'), 'cancel is not offered any more');
  await page.screenshot({ path: join(artifacts, 'dashboard-job-cancelled.png'), fullPage: true });
  await page.click('a[href="#/"]');
  await page.locator('#jobs-view').waitFor();
  await page.locator(`#jobs tr[data-job-id="${long}"][data-status="cancelled"]`).waitFor();

  step('the SSE connection is cut mid-job: the table catches up');
  const third = await submit({ steps: 30, step_ms: 150 });
  await page.waitForFunction((id) => {
    const bar = document.querySelector(`#jobs tr[data-job-id="${id}"] progress`);
    return bar && bar.value > 0 && bar.value < 0.5;
  }, third);
  const before = await progressOf(third);
  await askHarness('restart-api', 'restarted');
  await page.locator('#connection[data-state="live"]').waitFor();
  await page.locator(`#jobs tr[data-job-id="${third}"][data-status="succeeded"]`).waitFor();
  check(await progressOf(third) === 1, `the bar caught up from ${before} to 100%`);
  check((await row(third).locator('.pct').textContent()) === '100%', 'reads 100% after the restart');
  await page.screenshot({ path: join(artifacts, 'dashboard.png'), fullPage: true });

  step('sign out');
  await page.click('#sign-out');
  await page.locator('#signin').waitFor();
  const status = await page.evaluate(() => fetch('/v1/jobs').then((r) => r.status));
  check(status === 401, `signed out, /v1/jobs answers ${status}`);
  check(pageErrors.length === 0, `no script errors: ${pageErrors.join('; ')}`);

  step('the API reference at /docs renders from /openapi.json, with nothing from elsewhere');
  const elsewhere = [];
  page.on('request', (r) => { if (!r.url().startsWith(base)) elsewhere.push(r.url()); });
  await page.goto(`${base}/docs`);
  await page.locator('.swagger-ui .opblock').first().waitFor();
  const paths = await page.locator('.swagger-ui .opblock-summary-path').allTextContents();
  for (const path of ['/v1/jobs', '/v1/datasets', '/v1/collections/{id}/search']) {
    check(paths.some((p) => p.replace(/\u200b/g, '') === path), `/docs lists ${path}: ${paths.length} paths`);
  }
  check(elsewhere.length === 0, `requests left the API: ${elsewhere.join(', ')}`);
  await page.screenshot({ path: join(artifacts, 'docs.png') });
  check(pageErrors.length === 0, `no script errors on /docs: ${pageErrors.join('; ')}`);
  console.error('browser: all checks passed');
} catch (e) {
  await page.screenshot({ path: join(artifacts, 'dashboard-failure.png'), fullPage: true }).catch(() => {});
  console.error(`browser: FAILED: ${e.stack || e}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join('; ')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit(process.exitCode || 0);
}
