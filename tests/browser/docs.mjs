// The API reference (/docs): Swagger UI renders the OpenAPI document under the page's content
// security policy, with nothing refused by it and no script error.
//
//   node tests/browser/docs.mjs BASE_URL API_KEY
import { args, apiKey, base, check, launch, step, TIMEOUT } from './screens.mjs';

void args; void apiKey;
const { browser, page, pageErrors } = await launch({ width: 1280, height: 860 }, TIMEOUT);
const refused = [];
page.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) refused.push(m.text()); });
try {
  step('open the reference');
  const response = await page.goto(`${base}/docs`);
  const policy = response.headers()['content-security-policy'] || '';
  check(/script-src 'self' 'sha256-/.test(policy) && !/script-src[^;]*unsafe-inline/.test(policy), `a strict policy: ${policy}`);
  await page.locator('.swagger-ui .info .title').waitFor();
  const title = await page.textContent('.swagger-ui .info .title');
  check(title.startsWith('Conveyor'), `the title: ${title}`);
  await page.locator('.opblock').first().waitFor();
  const operations = await page.locator('.opblock').count();
  check(operations > 20, `the operations are listed: ${operations}`);
  check(refused.length === 0, `nothing refused by the policy: ${refused.join('; ')}`);
  check(pageErrors.length === 0, `no script errors: ${pageErrors.join('; ')}`);
  console.error('browser: docs: all checks passed');
} catch (e) {
  console.error(`browser: docs: FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit(process.exitCode || 0);
}
