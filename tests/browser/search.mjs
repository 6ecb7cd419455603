// The collections screen end to end: the list with its counts, and searches from the page in
// each mode, the chunk ids of each sent to the Rust test to compare with the API's answer to
// the same query (askHarness). Chunks and metadata carry markup that must stay text.
//
//   node tests/browser/search.mjs BASE_URL API_KEY COLLECTION_ID DOCUMENTS CHUNKS
import { args, askHarness, check, nothingInjected, run, screenshot, step } from './screens.mjs';

const [collectionId, documents, chunks] = args;

// Runs a search from the form; returns the chunk ids shown, best first.
async function search(page, { query, mode, filter }) {
  await page.fill('#search-query', query);
  await page.selectOption('#search-mode', mode);
  await page.fill('#search-filter', filter ? JSON.stringify(filter) : '');
  await page.click('#search-form button[type=submit]');
  await page.locator(`#search-results[data-done="${mode}:${query}"]`).waitFor({ state: 'attached' });
  check(!(await page.getAttribute('#search-status', 'class') || '').includes('error'),
    `the search worked: ${await page.textContent('#search-status')}`);
  const ids = await page.locator('#search-results li').evaluateAll((items) => items.map((li) => Number(li.dataset.chunkId)));
  await askHarness(`search ${JSON.stringify({ query, mode, filter: filter || {}, k: 10, ids })}`);
  return ids;
}

const marks = (page) => page.locator('#search-results mark').allTextContents();

await run('search', async (page) => {
  step('the collections, with their counts');
  await page.click('#nav a[data-view="collections"]');
  const row = page.locator(`#collections tr[data-collection-id="${collectionId}"]`);
  await row.waitFor();
  check(await row.locator('.documents').textContent() === documents, 'the documents are counted');
  check(await row.locator('.chunks').textContent() === chunks, 'the chunks are counted');
  check((await row.locator('.name').textContent()).includes('<img'), 'the hostile name is text');
  await row.locator('button').click();

  step('keyword: the same chunks as the API, the matched words marked');
  const keyword = await search(page, { query: 'password reset', mode: 'keyword' });
  check(keyword.length > 0, 'keyword finds chunks');
  const keywordMarks = (await marks(page)).map((m) => m.toLowerCase());
  check(keywordMarks.length > 0 && keywordMarks.every((m) => /^(password|passwords|reset|resetting|resets)$/.test(m)),
    `the query's words are marked: ${keywordMarks}`);
  check(await page.locator('#search-results li').first().locator('.score').textContent() !== '', 'scores are shown');
  check(await page.locator('#search-results .metadata').count() > 0, 'metadata is shown');

  step('hybrid with a filter');
  const hybrid = await search(page, { query: 'forgot my password', mode: 'hybrid', filter: { lang: 'en' } });
  check(hybrid.length > 0, 'hybrid finds chunks');
  check((await marks(page)).length > 0, 'hybrid marks the words too');
  const langs = await page.locator('#search-results .metadata', { hasText: /^lang=/ }).allTextContents();
  check(langs.every((l) => l === 'lang=en'), `the filter holds: ${langs}`);
  // The hostile chunk and metadata are among the results, as text.
  const texts = await page.locator('#search-results .text').allTextContents();
  check(texts.some((t) => t.includes('<img src=x onerror="window.__pwned=1">')), 'markup in a chunk is text');
  const metadata = await page.locator('#search-results .metadata').allTextContents();
  check(metadata.some((m) => m.includes('<script>')), `markup in metadata is text: ${metadata}`);
  await nothingInjected(page);
  await screenshot(page, 'dashboard-search.png');

  step('vector: nothing to mark');
  const vector = await search(page, { query: 'how do I export a report', mode: 'vector' });
  check(vector.length > 0, 'vector finds chunks');
  check((await marks(page)).length === 0, 'a vector search marks no words');
  await nothingInjected(page);

  step('dark mode follows the system');
  await page.emulateMedia({ colorScheme: 'dark' });
  const background = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  check(background === 'rgb(15, 23, 42)', `a dark page: ${background}`);
  await screenshot(page, 'dashboard-search-dark.png');
});
