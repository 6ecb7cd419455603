// The patch review screen end to end: a connection added and deleted (its URL never shown),
// then preflight -> dry run -> execute (confirmed by typing the table) -> roll back of
// `accounts`, the Rust test checking the table after each step (askHarness).
//
//   node tests/browser/patch.mjs BASE_URL API_KEY WAREHOUSE_URL
import { args, askHarness, check, nothingInjected, run, screenshot, step } from './screens.mjs';

const [warehouseUrl] = args;

await run('patch', async (page) => {
  await page.click('#nav a[data-view="patch"]');
  await page.locator('#patch-view').waitFor();

  step('a connection is added, listed without its URL, offered as a target, and deleted');
  // The warehouse trusts loopback: the password is never checked, only never shown.
  const secret = 'pw-never-shown-7c1';
  const url = warehouseUrl.replace('@', `:${secret}@`);
  await page.fill('#connection-name', 'warehouse');
  await page.fill('#connection-url', url);
  await page.click('#connection-form button[type=submit]');
  const connectionRow = page.locator('#connections tr', { hasText: 'warehouse' });
  await connectionRow.waitFor();
  check(await page.inputValue('#connection-url') === '', 'the URL field is emptied');
  const html = await page.content();
  check(!html.includes(secret) && !html.includes(url), 'the URL is nowhere in the page');
  const address = await connectionRow.locator('td').nth(1).textContent();
  check(address.startsWith('127.0.0.1:') && !address.includes(secret), `the address shown: ${address}`);
  const connectionId = await connectionRow.getAttribute('data-connection-id');
  check(await page.locator(`#patch-connection option[value="${connectionId}"]`).count() === 1,
    'the connection is a target to choose');
  await connectionRow.locator('button').click();
  await connectionRow.waitFor({ state: 'detached' });
  check(await page.locator(`#patch-connection option[value="${connectionId}"]`).count() === 0,
    'a deleted connection is no target');

  step('preflight: risk badge with its icon and word, reasons, table, key, statement');
  await page.fill('#patch-sql', "UPDATE accounts SET plan = 'gold' WHERE id <= 2000");
  await page.fill('#patch-batch-size', '500');
  await page.fill('#patch-pause', '1000');
  await page.click('#patch-form button[type=submit]');
  await page.locator('#patch-risk[data-risk]').waitFor();
  check(await page.getAttribute('#patch-risk', 'data-risk') === 'high',
    `two thirds of a table of 3000 rows is high risk: ${await page.textContent('#patch-preflight')}`);
  check((await page.textContent('#patch-risk')) === '✖ high risk', 'the badge says it, not only its colour');
  check(await page.locator('#patch-reasons li').count() > 0, 'the reasons are listed');
  check((await page.textContent('#patch-table')).includes('accounts'), 'the table is named');
  check((await page.textContent('#patch-key')).startsWith('id'), 'the key is named');
  check(/^UPDATE .*accounts.* SET plan = 'gold' WHERE \(id <= 2000\)$/.test(await page.textContent('#patch-statement')),
    `the statement that will run: ${await page.textContent('#patch-statement')}`);
  check(await page.isDisabled('#patch-execute'), 'execute waits for a dry run');
  await askHarness('unchanged');

  step('dry run: the before/after diff, changed cells marked');
  await page.click('#patch-dry-run');
  await page.locator('#patch-dry-rows[data-rows]').waitFor();
  check(await page.getAttribute('#patch-dry-rows', 'data-rows') === '2000', 'the dry run counts 2000 rows');
  const cells = await page.locator('#patch-diff tbody td.changed[data-column="plan"]').evaluateAll(
    (tds) => tds.map((td) => [td.querySelector('del').textContent, td.querySelector('ins').textContent]));
  check(cells.length === 20 && cells.every(([b, a]) => b === '"free"' && a === '"gold"'),
    `every sampled row's plan goes from free to gold: ${JSON.stringify(cells)}`);
  check(await page.locator('#patch-diff td.changed[data-column="credits"]').count() === 0,
    'an unchanged column is not marked');
  await askHarness('unchanged');
  await screenshot(page, 'dashboard-patch-dry-run.png');

  step('execute: the confirmation repeats count and risk and wants the table typed');
  await page.click('#patch-execute');
  await page.locator('#patch-confirm[open]').waitFor();
  const text = await page.textContent('#patch-confirm-text');
  check(text.includes('update 2000 rows') && text.includes('high'), `the confirmation says ${text}`);
  check(await page.isDisabled('#patch-confirm-ok'), 'a high risk is not confirmed by a click alone');
  await page.fill('#patch-confirm-type', 'account');
  check(await page.isDisabled('#patch-confirm-ok'), 'a wrong name does not confirm');
  await page.fill('#patch-confirm-type', 'accounts');
  // Live figures: every (status, batches) the panel shows on the way, to check after.
  await page.evaluate(() => {
    window.__figures = [];
    const note = () => window.__figures.push([
      document.querySelector('#patch-run').dataset.status, document.querySelector('#patch-batches').textContent]);
    new MutationObserver(note).observe(document.querySelector('#patch-run'),
      { subtree: true, childList: true, characterData: true, attributes: true });
  });
  await page.click('#patch-confirm-ok');
  await page.locator('#patch-run[data-status="succeeded"]').waitFor();
  const figures = await page.evaluate(() => window.__figures);
  check(figures.some(([status, batches]) => status === 'running' && Number(batches) >= 1),
    `batches were counted live: ${JSON.stringify(figures.slice(-20))}`);
  check((await page.textContent('#patch-batches')) === '4', '2000 rows in batches of 500');
  check(/^\d+\.\d ms$/.test(await page.textContent('#patch-longest-lock')), 'the longest lock is shown');
  check(await page.locator('#patch-progress').evaluate((p) => p.value) === 1, 'the bar is full');
  await askHarness('executed');
  await screenshot(page, 'dashboard-patch.png');

  step('a reload shows the patch run again, ready to roll back');
  const executeJob = await page.getAttribute('#patch-run-job a', 'data-job-id');
  await page.reload();
  await page.locator('#patch-view').waitFor();
  await page.locator('#patch-run[data-status="succeeded"]').waitFor();
  check(await page.getAttribute('#patch-run-job a', 'data-job-id') === executeJob, 'the same job is shown');
  check((await page.textContent('#patch-batches')) === '4', 'its batches are back');
  check(/^\d+\.\d ms$/.test(await page.textContent('#patch-longest-lock')), 'its longest lock is back');
  check(await page.inputValue('#patch-sql') === "UPDATE accounts SET plan = 'gold' WHERE id <= 2000", 'its statement is back');
  await page.locator('#patch-rollback:not([disabled])').waitFor();

  step('roll back from the finished job');
  await page.click('#patch-rollback');
  await page.locator('#patch-rollback-status[data-status="succeeded"]').waitFor();
  await askHarness('rolled-back');

  step('hostile values in the diff are text');
  await page.fill('#patch-sql', "UPDATE accounts SET plan = '<img src=x onerror=\"window.__pwned=1\">' WHERE id = 1");
  await page.click('#patch-form button[type=submit]');
  await page.locator('#patch-risk[data-risk]').waitFor();
  await page.click('#patch-dry-run');
  await page.locator('#patch-dry-rows[data-rows="1"]').waitFor();
  const shown = await page.textContent('#patch-diff td.changed[data-column="plan"] ins');
  check(shown === '"<img src=x onerror=\\"window.__pwned=1\\">"', `the value is shown as text: ${shown}`);
  await nothingInjected(page);
  await askHarness('rolled-back');
});
