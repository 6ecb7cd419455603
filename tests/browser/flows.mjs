// The workflow screens end to end: a two-step pipeline submitted from the page, its steps
// followed live to success; a schedule (its name markup, shown as text) paused from the page;
// a webhook's deliveries with their attempts, status code and latency, and one replayed.
//
//   node tests/browser/flows.mjs BASE_URL API_KEY SCHEDULE_ID WEBHOOK_ID
import { args, askHarness, check, nothingInjected, run, screenshot, step, TIMEOUT } from './screens.mjs';

const [scheduleId, webhookId] = args;

await run('flows', async (page) => {
  step('submit a two-step pipeline from the page');
  await page.click('#nav a[data-view="pipelines"]');
  await page.locator('#pipeline-body').waitFor();
  await page.fill('#pipeline-body', JSON.stringify({
    name: 'two steps',
    steps: [
      { name: 'first', kind: 'canary', payload: { steps: 10, step_ms: 200 } },
      { name: 'second', kind: 'canary', needs: ['first'], payload: { steps: 5, step_ms: 200 } },
    ],
  }));
  await page.click('#pipeline-form button[type=submit]');
  const pipelineId = await page.locator('#pipeline-result code[data-pipeline-id]').getAttribute('data-pipeline-id');

  step('its steps, in order, live');
  // While the first runs, the second waits; then each succeeds.
  await page.locator('#pipeline-steps li[data-step="first"][data-state="running"]').waitFor();
  check(await page.locator('#pipeline-steps li[data-step="second"]').getAttribute('data-state') === 'waiting',
    'the second step waits for the first');
  await page.locator('#pipeline-steps li[data-step="second"][data-state="running"]').waitFor();
  await page.locator('#pipeline-steps li[data-step="second"][data-state="succeeded"]').waitFor();
  await page.locator('#pipeline-status', { hasText: 'succeeded' }).waitFor();
  const order = await page.locator('#pipeline-steps li').evaluateAll((items) =>
    items.map((li) => [li.dataset.step, li.dataset.state]));
  check(JSON.stringify(order) === JSON.stringify([['first', 'succeeded'], ['second', 'succeeded']]),
    `both steps succeeded, in order: ${JSON.stringify(order)}`);
  await page.locator(`#pipelines tr[data-pipeline-id="${pipelineId}"]`).waitFor();
  await screenshot(page, 'dashboard-pipeline.png');
  await askHarness(`pipeline ${pipelineId}`);

  step('pause a schedule from the page');
  await page.click('#nav a[data-view="schedules"]');
  const row = page.locator(`#schedules tr[data-schedule-id="${scheduleId}"]`);
  await row.waitFor();
  check(await row.locator('.next-fires li').count() === 3, 'its next firings are shown');
  check((await row.locator('td.name').textContent()).startsWith('<img'), 'the name is shown as text');
  await nothingInjected(page);
  await row.locator('button.toggle').click();
  await page.locator(`#schedules tr[data-schedule-id="${scheduleId}"][data-paused="true"]`).waitFor();
  check(await row.locator('.next-fires li').count() === 0, 'no next firings while paused');
  await screenshot(page, 'dashboard-schedules.png');
  await askHarness(`paused ${scheduleId}`);

  step("a webhook's deliveries, and a replay");
  await page.click('#nav a[data-view="webhooks"]');
  const hook = page.locator(`#webhooks tr[data-webhook-id="${webhookId}"]`);
  await hook.waitFor();
  // The pipeline's delivery goes out within a second or two: read the list until it has.
  const delivered = page.locator('#deliveries tr[data-status="delivered"]');
  const deadline = Date.now() + TIMEOUT;
  while (await delivered.count() === 0) {
    check(Date.now() < deadline, 'the delivery was made');
    await hook.locator('button').click();
    await page.waitForTimeout(500);
  }
  const cells = await delivered.first().evaluate((tr) => ({
    event: tr.cells[0].textContent, attempts: tr.querySelector('.attempts').textContent,
    code: tr.querySelector('.code').textContent, latency: tr.querySelector('.latency').textContent,
  }));
  check(cells.event === 'pipeline.finished' && cells.attempts === '1' && cells.code === '204' &&
    /^\d+ ms$/.test(cells.latency), `the delivery's attempts, code and latency: ${JSON.stringify(cells)}`);
  await screenshot(page, 'dashboard-deliveries.png');
  await delivered.first().locator('button').click();
  await askHarness('replayed');
  await nothingInjected(page);
});
