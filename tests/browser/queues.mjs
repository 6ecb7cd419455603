// The queues screen: each queue's last hour as two small SVG charts with their numbers beside
// them, from GET /v1/queues/history (the workers' per-minute rollup).
//
//   node tests/browser/queues.mjs BASE_URL API_KEY SUCCEEDED FAILED WAITING
// SUCCEEDED and FAILED canary jobs ended in the last minutes; WAITING patch jobs are queued.
import { args, check, run, screenshot, step } from './screens.mjs';

const [succeeded, failed, waiting] = args.map(Number);

await run('queues', async (page) => {
  await page.click('#nav a[data-view="queues"]');
  await page.locator('#queues-view').waitFor();
  check(await page.getAttribute('#nav a[data-view="queues"]', 'aria-current') === 'page', 'the nav marks the screen');
  await page.locator('#queues tr[data-queue="canary"]').waitFor();

  step('the canary queue charts what ended, its numbers beside the bars');
  const canary = page.locator('figure.queue-chart[data-queue="canary"]');
  // The rollup runs every 15 s and the screen reads it every 10 s.
  await page.waitForFunction(([ok, bad]) => {
    const figure = document.querySelector('figure.queue-chart[data-queue="canary"]');
    const total = (field) => figure && figure.querySelector(`b[data-total="${field}"]`).textContent;
    return figure && total('succeeded') === String(ok) && total('failed') === String(bad);
  }, [succeeded, failed], { timeout: 60_000 });
  const bars = await canary.evaluate((figure) => {
    const counts = (cls) => [...figure.querySelectorAll(`svg.throughput rect.${cls}`)]
      .reduce((n, r) => n + Number(r.getAttribute('data-count')), 0);
    const mid = Number(figure.querySelector('svg.throughput line.axis').getAttribute('y1'));
    return {
      ok: counts('ok'), bad: counts('bad'),
      // Succeeded above the middle line, failed below: not only a colour apart.
      okAbove: [...figure.querySelectorAll('rect.ok')].every((r) => Number(r.getAttribute('y')) + Number(r.getAttribute('height')) <= mid + 0.01),
      badBelow: [...figure.querySelectorAll('rect.bad')].every((r) => Number(r.getAttribute('y')) >= mid),
      titles: [...figure.querySelectorAll('svg.throughput g.minute title')].map((t) => t.textContent),
      label: figure.querySelector('svg.throughput').getAttribute('aria-label'),
      legend: figure.querySelector('.legend').textContent,
    };
  });
  check(bars.ok === succeeded && bars.bad === failed, `the bars add up to the jobs: ${JSON.stringify(bars)}`);
  check(bars.okAbove && bars.badBelow, 'succeeded up, failed down');
  check(bars.titles.length > 0 && bars.titles.every((t) => /succeeded, \d+ failed$/.test(t)), `each minute says its numbers: ${bars.titles}`);
  check(bars.label.includes(`${succeeded} succeeded and ${failed} failed`), `the chart's label: ${bars.label}`);
  check(bars.legend.includes('succeeded') && bars.legend.includes('failed'), `the legend is words: ${bars.legend}`);

  step('the patch queue charts its waiting jobs');
  const patch = page.locator('figure.queue-chart[data-queue="patch"]');
  await page.waitForFunction((n) => {
    const b = document.querySelector('figure.queue-chart[data-queue="patch"] b[data-total="waiting"]');
    return b && b.textContent === String(n);
  }, waiting, { timeout: 60_000 });
  check(await patch.locator('svg.depth circle.dot').count() >= 1, 'where the backlog stands is drawn');

  step('the numbers on the page are the API\'s');
  const api = await page.evaluate(async () => (await fetch('/v1/queues/history')).json());
  const queue = api.queues.find((q) => q.kind === 'canary');
  const sum = (field) => queue.minutes.reduce((n, m) => n + m[field], 0);
  check(sum('succeeded') === succeeded && sum('failed') === failed, `the API agrees: ${JSON.stringify(queue.minutes.filter((m) => m.succeeded || m.failed))}`);
  const external = await page.evaluate(() => [...document.querySelectorAll('svg [href], svg image, svg use')].length);
  check(external === 0, 'the charts load nothing');
  await screenshot(page, 'dashboard-queues.png');

  step('dark mode');
  await page.emulateMedia({ colorScheme: 'dark' });
  const colours = await page.evaluate(() => ({
    body: getComputedStyle(document.body).backgroundColor,
    card: getComputedStyle(document.querySelector('#queues-view .card')).backgroundColor,
    ok: getComputedStyle(document.querySelector('figure.queue-chart rect.ok')).fill,
  }));
  check(colours.body === 'rgb(15, 23, 42)' && colours.card === 'rgb(30, 41, 59)', `dark scheme: ${JSON.stringify(colours)}`);
  check(colours.ok === 'rgb(74, 222, 128)', `bars follow the scheme: ${colours.ok}`);
  await screenshot(page, 'dashboard-queues-dark.png');
});
