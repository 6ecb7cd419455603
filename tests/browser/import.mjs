// The import screen end to end: a CSV uploaded from the page, its inferred columns shown as a
// mapping (a hostile column name shown as text, renamed; a text column retyped numeric), the
// import run with bad rows skipped, and its first rejected rows shown as a table.
//
//   node tests/browser/import.mjs BASE_URL API_KEY
import { askHarness, check, nothingInjected, run, screenshot, step } from './screens.mjs';

// A column name and values that are markup: they must stay text.
// (No quotes in it: the upload's schema keeps a header's doubled quotes as they are.)
const HOSTILE = '<img src=x onerror=window.__pwned=1>';
const ROWS = 12;
// Every 4th amount is not a number (`4x`): lines 5, 9 and 13 (the header is line 1) are rejected.
const csv = `id,${HOSTILE},amount\n` + Array.from({ length: ROWS }, (_, n) => {
  const i = n + 1;
  return `${i},<b>label ${i}</b>,${i % 4 === 0 ? `${i}x` : `${i}.5`}\n`;
}).join('');

await run('import', async (page) => {
  step('upload a CSV');
  await page.setInputFiles('#upload-file', { name: 'ledger.csv', mimeType: 'text/csv', buffer: Buffer.from(csv) });
  await page.click('#upload-form button[type=submit]');
  const datasetId = await page.locator('#upload-result code[data-dataset-id]').getAttribute('data-dataset-id');

  step('its inferred columns as a mapping');
  await page.click('#nav a[data-view="import"]');
  await page.locator(`#import-dataset option[value="${datasetId}"]`).waitFor({ state: 'attached' });
  await page.selectOption('#import-dataset', datasetId);
  await page.locator('#import-columns tr').nth(2).waitFor();
  const mapping = await page.locator('#import-columns tr').evaluateAll((rows) => rows.map((row) => ({
    source: row.querySelector('.source').textContent, inferred: row.querySelector('.inferred').textContent,
    name: row.querySelector('.import-name').value, type: row.querySelector('.import-type').value,
  })));
  check(JSON.stringify(mapping.map((c) => c.source)) === JSON.stringify(['id', HOSTILE, 'amount']),
    `the file's columns, the hostile one as text: ${JSON.stringify(mapping)}`);
  check(mapping[0].inferred === 'bigint' && mapping[2].inferred === 'text' && mapping[2].type === 'text',
    `inferred types: ${JSON.stringify(mapping)}`);
  check(/^[a-z0-9_]+$/.test(mapping[1].name), `a name the table accepts is proposed: ${mapping[1].name}`);
  await nothingInjected(page);
  check(await page.inputValue('#import-table') === 'ledger', 'the table is named after the file');
  await page.locator('#import-columns tr').nth(1).locator('.import-name').fill('label');
  await page.locator('#import-columns tr').nth(2).locator('.import-type').selectOption('numeric');
  await page.selectOption('#import-on-error', 'skip');
  await screenshot(page, 'dashboard-import-mapping.png');

  step('import: the rejected rows in a table');
  await page.click('#import-form button[type=submit]');
  await page.locator('#import-result[data-status="succeeded"]').waitFor();
  await page.locator('#import-rejected-card:not([hidden])').waitFor();
  const rejected = await page.locator('#import-rejected tr').evaluateAll((rows) => rows.map((row) =>
    [...row.querySelectorAll('td')].map((td) => td.textContent)));
  check(JSON.stringify(rejected.map(([line, column]) => [line, column])) ===
    JSON.stringify([['5', 'amount'], ['9', 'amount'], ['13', 'amount']]), `rejected rows: ${JSON.stringify(rejected)}`);
  check(rejected.every(([, , reason]) => reason.length > 0), 'each says why');
  check(rejected[0][3].includes('<b>label 4</b>') && rejected[0][3].includes('4x'),
    `the record as the file had it, as text: ${rejected[0][3]}`);
  check(await page.locator('#import-rejected b').count() === 0, 'no markup from the record');
  await nothingInjected(page);
  await askHarness('imported');
  await screenshot(page, 'dashboard-import.png');
});
