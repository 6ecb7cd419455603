// The jobs page with 10,000 jobs: one page of rows at a time through the API's cursor, the
// first page live; the submit form used from the keyboard alone, its focus visible.
//
//   node tests/browser/jobs.mjs BASE_URL API_KEY PAGE1 PAGE2 PAGE3 FOREIGN FAILED
// PAGEn: the ids (comma-separated, newest first) of the tenant's n-th 100 jobs; FOREIGN: another
// tenant's job, never to be shown; FAILED: the tenant's one failed job, its oldest, past what
// one filtered request of the API reads.
import { args, check, run, screenshot, step } from './screens.mjs';

const [first, second, third] = args.slice(0, 3).map((ids) => ids.split(','));
const [foreign, failed] = args.slice(3, 5);

const shownIds = (page) => page.locator('#jobs tr').evaluateAll((rows) => rows.map((r) => r.dataset.jobId));

async function expectPage(page, ids, label) {
  await page.locator(`#jobs tr[data-job-id="${ids[0]}"]`).waitFor();
  await page.waitForFunction((n) => document.querySelectorAll('#jobs tr').length === n, ids.length);
  const shown = await shownIds(page);
  check(JSON.stringify(shown) === JSON.stringify(ids), `${label} holds the API's jobs in order: ${shown[0]}…${shown[shown.length - 1]}`);
  const rows = await page.evaluate(() => document.querySelectorAll('tr').length);
  check(rows <= 300, `the whole page holds ${rows} table rows`);
  check(!(await page.content()).includes(foreign), 'another tenant\'s job is nowhere');
}

await run('jobs', async (page) => {
  step('10,000 jobs: the first page is the newest 100');
  await expectPage(page, first, 'page 1');
  check(await page.isDisabled('#jobs-newer'), 'no newer page than the first');
  check((await page.textContent('#jobs-page')).includes('jobs 1–100'), `the page says where it is: ${await page.textContent('#jobs-page')}`);

  step('older pages through the cursor, and back');
  await page.click('#jobs-older');
  await expectPage(page, second, 'page 2');
  check((await page.textContent('#jobs-page')).includes('jobs 101–200'), await page.textContent('#jobs-page'));
  await page.click('#jobs-older');
  await expectPage(page, third, 'page 3');
  await page.click('#jobs-newer');
  await expectPage(page, second, 'page 2 again');
  await page.click('#jobs-newer');
  await expectPage(page, first, 'page 1 again');

  step('a filter whose one match is past what a request reads: the page follows the cursors');
  await page.selectOption('#filter-status', 'failed');
  await expectPage(page, [failed], 'the failed jobs');
  await page.selectOption('#filter-status', '');
  await expectPage(page, first, 'page 1, unfiltered');

  step('the submit form from the keyboard: Tab moves through it, focus visible on each control');
  await page.locator('#submit-kind option[value="canary"]').waitFor({ state: 'attached' });
  await page.focus('#submit-kind');
  await page.selectOption('#submit-kind', 'canary');
  const visited = [];
  for (const expected of ['submit-payload', 'submit-attempts']) {
    await page.keyboard.press('Tab');
    const focus = await page.evaluate(() => {
      const node = document.activeElement;
      const style = getComputedStyle(node);
      return { id: node.id, outline: `${style.outlineStyle} ${style.outlineWidth}` };
    });
    visited.push(focus);
    check(focus.id === expected, `Tab reaches ${expected}: ${JSON.stringify(visited)}`);
    check(focus.outline === 'solid 2px', `the focus on ${expected} is drawn: ${focus.outline}`);
    if (expected === 'submit-payload') {
      await page.keyboard.press('Control+A');
      await page.keyboard.type('{"steps": 1}');
    }
  }
  await page.keyboard.type('2');
  await page.keyboard.press('Tab');
  const button = await page.evaluate(() => ({
    text: document.activeElement.textContent,
    outline: getComputedStyle(document.activeElement).outlineStyle,
  }));
  check(button.text === 'Submit' && button.outline === 'solid', `Tab reaches the button, visibly: ${JSON.stringify(button)}`);
  await screenshot(page, 'dashboard-focus.png');
  await page.keyboard.press('Enter');
  const id = await page.locator('#submit-result a[data-job-id]').getAttribute('data-job-id');
  step('the new job tops the live first page, which stays one page long');
  await page.locator(`#jobs tr[data-job-id="${id}"]`).waitFor();
  const shown = await shownIds(page);
  check(shown[0] === id && shown.length === 100, `the live page: ${shown.length} rows, first ${shown[0]}`);
  const job = await page.evaluate(async (jobId) => (await fetch(`/v1/jobs/${jobId}`)).json(), id);
  check(job.max_attempts === 2 && job.payload.steps === 1, `the form's values were sent: ${JSON.stringify(job)}`);
  check(await page.textContent(`#jobs tr[data-job-id="${id}"] .status`) !== '', 'a status is a word, not only a colour');
});
