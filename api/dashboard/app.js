// Conveyor dashboard: plain JavaScript over the public API, signed in by session cookie.
// Live state comes from the tenant's SSE stream (GET /v1/events); the browser's EventSource
// reconnects by itself and sends Last-Event-ID, so the server replays whatever was missed.
'use strict';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
// The jobs table holds one page at a time, however many jobs the tenant has.
const PAGE_SIZE = 100;
// Jobs kept in memory from events and pages beyond those shown; the oldest finished go first.
const MAX_KNOWN = 2000;
// Example payloads for the submit form; other kinds start from {}.
const EXAMPLES = { canary: { steps: 20, step_ms: 200 } };

const $ = (id) => document.getElementById(id);
const jobs = new Map(); // id -> job (the API's shape, kept current by events)
let tenantStream = null; // EventSource on /v1/events
let lastTenantEventId = '';
let jobStream = null; // EventSource on /v1/jobs/{id}/events for the job page
let openJobId = null;
let renderQueued = false;
let queuesTimer = null;
// Pages older than the live first one: `cursors[i]` continues after page i (the API's cursor:
// a job's id); `older` holds the shown page's ids in the API's order; `next` is the API's
// cursor after the shown page (where its reading stopped: a filtered page may be short, or
// empty, and not the last); `load` numbers the first-page loads, so a stale one is dropped.
const pager = { index: 0, cursors: [], older: null, hasOlder: false, next: null, load: 0 };
// A filtered page follows the API's cursors for at most this many requests to fill itself:
// each request reads a bounded stretch of the tenant's jobs.
const MAX_PAGE_REQUESTS = 10;

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

// Every call carries the CSRF header: the API requires it for cookie-signed requests that
// change something.
async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { 'X-Conveyor-CSRF': '1' } };
  if (body instanceof Blob) {
    init.body = body; // a file, streamed as the raw body
  } else if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (response.status === 401 && path !== '/v1/session') showSignIn();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// ---------- formatting ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function span(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '';
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.floor(seconds % 60)} s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} m`;
  return `${Math.floor(seconds / 86400)} d`;
}

const since = (iso) => (iso ? (Date.now() - Date.parse(iso)) / 1000 : null);
const percent = (p) => `${Math.round((p || 0) * 100)}%`;

function duration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return Math.max(0, (end - Date.parse(job.started_at)) / 1000);
}

// ---------- sign-in ----------

// The dashboard's screens, one <main> each; the header's nav links to all but the job page.
const VIEWS = ['jobs', 'job', 'queues', 'patch', 'import', 'collections', 'pipelines', 'schedules', 'webhooks'];

function showView(name) {
  for (const view of VIEWS) $(`${view}-view`).hidden = view !== name;
  for (const link of $('nav').querySelectorAll('a')) {
    if (link.dataset.view === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function showSignIn() {
  stopStreams();
  $('signin').hidden = false;
  for (const view of VIEWS) $(`${view}-view`).hidden = true;
  $('nav').hidden = true;
  $('sign-out').hidden = true;
  $('connection').hidden = true;
  $('tenant').textContent = '';
  $('role').textContent = '';
  delete document.body.dataset.role;
}

async function signIn(event) {
  event.preventDefault();
  $('signin-error').textContent = '';
  try {
    const session = await api('POST', '/v1/session', { api_key: $('api-key').value.trim() });
    $('api-key').value = '';
    signedIn(session);
  } catch (e) {
    $('signin-error').textContent = e.message;
  }
}

async function signOut() {
  try { await api('DELETE', '/v1/session'); } catch { /* signed out either way */ }
  jobs.clear();
  showSignIn();
}

function signedIn(session) {
  $('signin').hidden = true;
  $('nav').hidden = false;
  $('sign-out').hidden = false;
  $('tenant').textContent = `tenant ${session.tenant}`;
  // A read key sees everything but may change nothing: the forms that would are disabled.
  $('role').textContent = `${session.role} key`;
  document.body.dataset.role = session.role;
  const readOnly = session.role === 'read';
  for (const form of ['submit-form', 'upload-form', 'patch-form', 'connection-form', 'import-form', 'pipeline-form']) {
    for (const control of $(form).elements) control.disabled = readOnly;
  }
  connectTenantStream();
  route();
}

// ---------- the live jobs table ----------

// Applies an event to the job it names; an event older than what is known is ignored, so the
// initial list and replayed events can arrive in any order.
function applyEvent(event) {
  if (event.type === 'log') return;
  let job = jobs.get(event.job_id);
  if (!job) {
    job = { id: event.job_id, kind: event.kind, created_at: event.at, progress: 0 };
    jobs.set(job.id, job);
  }
  if (job.updated_at && Date.parse(event.at) < Date.parse(job.updated_at)) return;
  job.status = event.status;
  job.progress = event.progress;
  job.updated_at = event.at;
  if (event.type === 'queued') { job.started_at = null; job.finished_at = null; }
  if (event.type === 'started') { job.started_at = event.at; job.finished_at = null; }
  if (event.message !== null && event.message !== undefined) job.message = event.message;
  if (TERMINAL.has(event.status)) {
    job.finished_at = event.at;
    if (event.status === 'succeeded') job.result = event.data;
  }
}

function mergeJob(row) {
  const known = jobs.get(row.id);
  if (!known || !known.updated_at || Date.parse(row.updated_at) >= Date.parse(known.updated_at)) {
    jobs.set(row.id, row);
  }
}

function filters() {
  return { kind: $('filter-kind').value, status: $('filter-status').value };
}

// One page of the list, newest first, after `cursor` (none: the first page): up to PAGE_SIZE
// jobs from as many requests as fill it (MAX_PAGE_REQUESTS at most); `next_cursor` is where
// the next page starts, null after the last job.
async function fetchJobs(cursor) {
  const { kind, status } = filters();
  const found = [];
  let next = cursor;
  for (let request = 0; request < MAX_PAGE_REQUESTS; request++) {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE - found.length) });
    if (kind) query.set('kind', kind);
    if (status) query.set('status', status);
    if (next) query.set('cursor', next);
    const page = await api('GET', `/v1/jobs?${query}`);
    page.jobs.forEach(mergeJob);
    found.push(...page.jobs);
    next = page.next_cursor;
    if (!next || found.length >= PAGE_SIZE) break;
  }
  return { jobs: found, next_cursor: next };
}

// Back to the live first page (after sign-in, or when a filter changes).
async function loadJobs() {
  const load = ++pager.load;
  Object.assign(pager, { index: 0, cursors: [], older: null, hasOlder: false, next: null });
  try {
    const page = await fetchJobs(null);
    if (load !== pager.load) return; // a later filter's load owns the pager
    pager.hasOlder = page.next_cursor !== null;
    pager.next = page.next_cursor;
    scheduleRender();
  } catch (e) {
    console.warn('jobs list', e);
  }
}

// Page `index` (0: the live one); the cursors of the pages before it are known.
async function showJobsPage(index) {
  $('jobs-older').disabled = true;
  $('jobs-newer').disabled = true;
  const load = ++pager.load;
  try {
    const page = await fetchJobs(index === 0 ? null : pager.cursors[index - 1]);
    if (load !== pager.load) return; // a later load (a filter changed) owns the pager
    pager.older = index === 0 ? null : page.jobs.map((j) => j.id);
    pager.hasOlder = page.next_cursor !== null;
    pager.next = page.next_cursor;
    pager.index = index;
    pager.cursors.length = index;
    renderTable();
  } catch (e) {
    console.warn('jobs page', e);
    renderTable();
  }
}

// A full page continues after its last row (the live first page may hold jobs that arrived
// since it was fetched); a short or empty one where the API stopped reading.
function olderPage() {
  const shown = [...$('jobs').querySelectorAll('tr')];
  const cursor = shown.length >= PAGE_SIZE ? shown[shown.length - 1].dataset.jobId : pager.next;
  if (!cursor) return;
  pager.cursors[pager.index] = cursor;
  showJobsPage(pager.index + 1);
}

// Forgets the oldest finished jobs beyond MAX_KNOWN that no page shows: a long-open page stays
// small however many jobs go by.
function forgetOldJobs(shown) {
  if (jobs.size <= MAX_KNOWN) return;
  const keep = new Set(shown.map((j) => j.id));
  const old = [...jobs.values()].filter((j) => TERMINAL.has(j.status) && !keep.has(j.id) && j.id !== openJobId)
    .sort((a, b) => (a.id < b.id ? -1 : 1));
  for (const job of old.slice(0, jobs.size - MAX_KNOWN)) jobs.delete(job.id);
}

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderTable();
    if (openJobId && jobs.has(openJobId)) renderJobHeader(jobs.get(openJobId));
  });
}

function renderTable() {
  const { kind, status } = filters();
  // The first page is live: the newest jobs, new ones arriving on top. Older pages are the
  // API's, their rows kept current by events.
  const rows = pager.older
    ? pager.older.map((id) => jobs.get(id)).filter(Boolean)
    : [...jobs.values()]
      .filter((j) => (!kind || j.kind === kind) && (!status || j.status === status))
      // None older than where the API stopped reading: those belong to the next page.
      .filter((j) => !pager.next || j.id >= pager.next)
      .sort((a, b) => (a.id < b.id ? 1 : -1)) // UUIDv7: newest first
      .slice(0, PAGE_SIZE);
  forgetOldJobs(rows);
  const first = pager.index * PAGE_SIZE + 1;
  $('jobs-page').textContent = rows.length
    ? `${pager.index === 0 ? 'newest, live: ' : `page ${pager.index + 1}: `}jobs ${first}\u2013${first + rows.length - 1}`
    : '';
  $('jobs-page').dataset.page = String(pager.index + 1);
  $('jobs-newer').disabled = pager.index === 0;
  $('jobs-older').disabled = pager.index === 0 ? rows.length < PAGE_SIZE && !pager.hasOlder : !pager.hasOlder;
  const body = $('jobs');
  body.replaceChildren(...rows.map((job) => {
    const bar = el('progress', { max: '1', value: String(job.progress || 0) });
    const link = el('a', { href: `#/jobs/${job.id}`, text: job.id.slice(-12) });
    return el('tr', { 'data-job-id': job.id, 'data-status': job.status },
      el('td', { class: 'id' }, link),
      el('td', { class: 'kind', text: job.kind }),
      el('td', { class: `status status-${job.status}`, text: job.status }),
      el('td', { class: 'progress' }, bar, el('span', { class: 'pct', text: percent(job.progress) })),
      el('td', { class: 'message', text: job.error || job.message || '' }),
      el('td', { class: 'age', text: span(since(job.created_at)) }),
      el('td', { class: 'duration', text: span(duration(job)) }));
  }));
  $('jobs-empty').hidden = rows.length > 0;
  $('jobs-empty').textContent = pager.hasOlder
    ? 'No matching jobs among those read so far: Older reads further back.'
    : 'No jobs yet.';
}

function setConnection(state) {
  const node = $('connection');
  node.hidden = false;
  node.textContent = state;
  node.dataset.state = state;
}

function connectTenantStream() {
  if (tenantStream) tenantStream.close();
  // After a page load there is no cursor: the stream starts at its end and the list comes
  // from GET /v1/jobs. The browser resends Last-Event-ID on its own reconnects; when it gives
  // up (an HTTP error), reopen with the cursor in ?after=.
  const url = lastTenantEventId ? `/v1/events?after=${encodeURIComponent(lastTenantEventId)}` : '/v1/events';
  const stream = new EventSource(url);
  tenantStream = stream;
  const onEvent = (message) => {
    lastTenantEventId = message.lastEventId || lastTenantEventId;
    applyEvent(JSON.parse(message.data));
    scheduleRender();
  };
  for (const type of ['queued', 'started', 'progress', 'retrying', 'succeeded', 'failed', 'cancelled']) {
    stream.addEventListener(type, onEvent);
  }
  let opened = false;
  stream.onopen = () => {
    setConnection('live');
    // The first list is read once the stream is open, so no change falls between the two.
    if (!opened && !lastTenantEventId) loadJobs();
    opened = true;
  };
  stream.onerror = () => {
    if (tenantStream !== stream) return;
    setConnection('reconnecting');
    if (stream.readyState === EventSource.CLOSED) {
      setTimeout(() => { if (tenantStream === stream) connectTenantStream(); }, 2000);
    }
  };
}

function stopStreams() {
  if (tenantStream) tenantStream.close();
  tenantStream = null;
  closeJobStream();
  clearInterval(queuesTimer);
  queuesTimer = null;
}

// ---------- queues panel and submit form ----------

async function loadQueues() {
  try {
    const [queues, workers] = await Promise.all([api('GET', '/v1/queues'), api('GET', '/v1/workers')]);
    $('queues').replaceChildren(...queues.queues.map((q) => el('tr', { 'data-queue': q.kind },
      el('td', { text: q.kind }),
      // The backlog where it lives (its queued rows in PostgreSQL), as autoscalers count it.
      el('td', { class: 'waiting', text: String(q.waiting),
        title: `oldest waiting ${span(q.oldest_waiting_seconds)}` }),
      el('td', { text: String(q.running) }), el('td', { text: String(q.succeeded_last_hour) }),
      el('td', { text: String(q.failed_last_hour) }),
      el('td', { text: `${q.workers} × ${q.concurrency}` }))));
    $('workers').replaceChildren(...workers.workers.map((w) => el('tr', {},
      el('td', { class: 'id', text: w.name }),
      el('td', { text: Object.entries(w.queues).map(([k, n]) => `${k}=${n}`).join(', ') }),
      el('td', { text: String(w.running) }),
      el('td', { text: `${span(since(w.heartbeat_at))} ago` }))));
    fillKinds(queues.queues.map((q) => q.kind));
  } catch (e) {
    console.warn('queues', e);
  }
}

function fillKinds(kinds) {
  for (const select of [$('submit-kind'), $('filter-kind')]) {
    const have = new Set([...select.options].map((o) => o.value));
    for (const kind of kinds) if (!have.has(kind)) select.append(el('option', { value: kind, text: kind }));
  }
  if (!$('submit-payload').value) exampleFor($('submit-kind').value);
}

function exampleFor(kind) {
  $('submit-payload').value = JSON.stringify(EXAMPLES[kind] || {}, null, 2);
}

// ---------- datasets: upload, then fill the submit form for an import, synthesis or ingest ----------

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

// A table name from a file name: `Orders 2024.csv.gz` -> `orders_2024`.
function tableName(fileName) {
  const stem = fileName.toLowerCase().replace(/(\.(gz|zst))?$/, '').replace(/\.[a-z0-9]+$/, '');
  const name = stem.replace(/[^a-z0-9_]+/g, '_').replace(/^_+|_+$/g, '') || 'imported';
  return (/^[0-9]/.test(name) ? `t_${name}` : name).slice(0, 63);
}

// What each job kind starts from for a dataset; documents only go to ingest.
function datasetPayloads(dataset) {
  const ingest = { collection_id: 'COLLECTION-ID', documents: [{ dataset_id: dataset.id }] };
  if (dataset.format === 'document') return { ingest };
  return {
    import: { dataset_id: dataset.id, target: { table: tableName(dataset.name) }, mode: 'create' },
    synthesis: { dataset_id: dataset.id, rows: 1000, synthesizer: 'gaussian_copula' },
    ingest,
  };
}

function prefill(kind, payload) {
  const select = $('submit-kind');
  if (![...select.options].some((o) => o.value === kind)) select.append(el('option', { value: kind, text: kind }));
  select.value = kind;
  $('submit-payload').value = JSON.stringify(payload, null, 2);
  $('submit-result').textContent = `${kind} payload filled in: review it and submit`;
  $('submit-payload').focus();
}

async function loadDatasets() {
  try {
    const page = await api('GET', '/v1/datasets?limit=20');
    $('datasets').replaceChildren(...page.datasets.map((d) => {
      const actions = el('td', { class: 'actions' });
      for (const [kind, payload] of Object.entries(datasetPayloads(d))) {
        const button = el('button', { type: 'button', class: 'small', 'data-kind': kind, text: kind });
        button.addEventListener('click', () => prefill(kind, payload));
        actions.append(button);
      }
      const format = d.compression === 'none' ? d.format : `${d.format}+${d.compression}`;
      return el('tr', { 'data-dataset-id': d.id },
        el('td', { text: d.name, title: d.id }), el('td', { text: format }),
        el('td', { text: bytes(d.size_bytes) }), actions);
    }));
  } catch (e) {
    console.warn('datasets', e);
  }
}

async function uploadDataset(event) {
  event.preventDefault();
  const file = $('upload-file').files[0];
  const out = $('upload-result');
  if (!file) return;
  out.className = '';
  out.textContent = `uploading ${file.name} (${bytes(file.size)})…`;
  try {
    const dataset = await api('POST', `/v1/datasets?name=${encodeURIComponent(file.name)}`, file);
    out.replaceChildren('uploaded ', el('code', { text: dataset.name, 'data-dataset-id': dataset.id }));
    $('upload-form').reset();
    await loadDatasets();
  } catch (e) {
    out.className = 'error';
    out.textContent = e.message;
  }
}

async function submitJob(event) {
  event.preventDefault();
  const out = $('submit-result');
  out.className = '';
  out.textContent = 'submitting…';
  let payload;
  try {
    payload = JSON.parse($('submit-payload').value || '{}');
  } catch (e) {
    out.className = 'error';
    out.textContent = `payload is not JSON: ${e.message}`;
    return;
  }
  const body = { kind: $('submit-kind').value, payload };
  const attempts = $('submit-attempts').value;
  if (attempts) body.max_attempts = Number(attempts);
  try {
    const job = await api('POST', '/v1/jobs', body);
    mergeJob(job);
    scheduleRender();
    out.replaceChildren('submitted ', el('a', { href: `#/jobs/${job.id}`, text: job.id, 'data-job-id': job.id }));
  } catch (e) {
    out.className = 'error';
    const fields = e.problem && e.problem.errors ? e.problem.errors.map((f) => `${f.field}: ${f.message}`) : [];
    out.textContent = fields.length ? fields.join('; ') : e.message;
  }
}

// ---------- following one job (the screens' own runs) ----------

// Follows a job's events until its terminal one; `onEvent(type, event)` sees each on the way.
// Resolves with the final job row (result, error). EventSource reconnects with Last-Event-ID
// by itself; the server closes the stream after the terminal event.
function followJob(id, onEvent) {
  return new Promise((resolve, reject) => {
    const stream = new EventSource(`/v1/jobs/${id}/events`);
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      stream.close();
      clearInterval(poll);
      api('GET', `/v1/jobs/${id}`).then(resolve, reject);
    };
    const handle = (message) => {
      const event = JSON.parse(message.data);
      if (onEvent) onEvent(message.type, event);
      if (TERMINAL.has(message.type) || message.type === 'snapshot') finish();
    };
    for (const type of ['queued', 'started', 'progress', 'log', 'retrying', 'succeeded', 'failed', 'cancelled', 'snapshot']) {
      stream.addEventListener(type, handle);
    }
    // A stream a proxy stalls, or one that drops between reconnects, must not leave the page
    // waiting: the job's state is also read every few seconds.
    const poll = setInterval(() => {
      api('GET', `/v1/jobs/${id}`).then((job) => { if (TERMINAL.has(job.status)) finish(); }, () => {});
    }, 3000);
  });
}

// A problem's field errors, or its message.
function problemText(error) {
  const fields = error.problem && error.problem.errors
    ? error.problem.errors.map((f) => `${f.field}: ${f.message}`) : [];
  return fields.length ? fields.join('; ') : error.message;
}

// ---------- the job page ----------

function closeJobStream() {
  if (jobStream) jobStream.close();
  jobStream = null;
}

function renderJobHeader(job) {
  $('job-id').textContent = job.id;
  $('job-kind').textContent = job.kind;
  $('job-status').textContent = job.status;
  $('job-status').className = `status status-${job.status}`;
  $('job-progress').value = job.progress || 0;
  $('job-pct').textContent = percent(job.progress);
  $('job-message').textContent = job.message || '';
  const readOnly = document.body.dataset.role === 'read';
  $('job-cancel').disabled = readOnly || TERMINAL.has(job.status);
  $('job-retry').disabled = readOnly || !(job.status === 'failed' || job.status === 'cancelled');
}

function renderJobDetails(job) {
  renderJobHeader(job);
  const facts = [
    ['attempt', `${job.attempt ?? ''} of ${job.max_attempts ?? ''}`],
    ['created', job.created_at], ['started', job.started_at], ['finished', job.finished_at],
    ['duration', span(duration(job))], ['worker', job.worker],
  ];
  $('job-facts').replaceChildren(...facts.filter(([, v]) => v).flatMap(([k, v]) =>
    [el('dt', { text: k }), el('dd', { text: String(v) })]));
  $('job-payload').textContent = JSON.stringify(job.payload, null, 2);
  $('job-result-card').hidden = job.result === null || job.result === undefined;
  $('job-result').textContent = JSON.stringify(job.result, null, 2);
  // A synthesis's visual report, shown in place (served sandboxed: no script runs in it).
  const report = artifacts(job).includes('report.html')
    ? `/v1/jobs/${job.id}/artifacts/report.html?view=inline` : null;
  $('job-report-card').hidden = !report;
  if (report && $('job-report').getAttribute('src') !== report) $('job-report').setAttribute('src', report);
  if (!report) $('job-report').removeAttribute('src');
  $('job-artifacts').replaceChildren(...artifacts(job).map((name) =>
    el('li', {}, el('a', { href: `/v1/jobs/${job.id}/artifacts/${encodeURIComponent(name)}`, text: name, download: name }))));
  const errors = Array.isArray(job.attempt_errors) ? job.attempt_errors : [];
  $('job-error-card').hidden = !job.error && errors.length === 0;
  $('job-error').textContent = job.error || '';
  $('attempt-errors').replaceChildren(...errors.map((a) => el('tr', {},
    el('td', { text: String(a.attempt) }), el('td', { text: a.error }), el('td', { text: a.at || '' }))));
}

// `result.artifacts` may list names, or objects with a name.
function artifacts(job) {
  const list = job.result && job.result.artifacts;
  if (!list) return [];
  const items = Array.isArray(list) ? list : Object.keys(list);
  return items.map((a) => (typeof a === 'string' ? a : a && a.name)).filter(Boolean);
}

async function refreshJob(id) {
  try {
    const job = await api('GET', `/v1/jobs/${id}`);
    if (openJobId !== id) return;
    jobs.set(id, job);
    renderJobDetails(job);
    scheduleRender();
  } catch (e) {
    $('job-action-error').textContent = e.message;
  }
}

function addTimeline(type, event, id) {
  const at = event.at ? new Date(event.at).toLocaleTimeString() : '';
  const text = [type, event.status !== type ? event.status : '', event.message || '',
    type === 'progress' ? percent(event.progress) : ''].filter(Boolean).join(' · ');
  $('timeline').append(el('li', { 'data-type': type, 'data-id': id || '' },
    el('time', { text: at }), el('span', { text: text })));
}

function openJobStream(id, after) {
  closeJobStream();
  const stream = new EventSource(`/v1/jobs/${id}/events${after ? `?after=${encodeURIComponent(after)}` : ''}`);
  jobStream = stream;
  let last = after || '';
  const onEvent = (message) => {
    if (jobStream !== stream) return;
    const event = JSON.parse(message.data);
    last = message.lastEventId || last;
    addTimeline(message.type, event, message.lastEventId);
    if (message.type !== 'snapshot') applyEvent(event);
    scheduleRender();
    // The server closes a job's stream after its terminal event: stop the browser from
    // reconnecting, and read the final row (result, error, attempts).
    if (TERMINAL.has(message.type) || message.type === 'snapshot') {
      stream.close();
      stream.lastId = last;
      refreshJob(id);
    }
  };
  for (const type of ['queued', 'started', 'progress', 'log', 'retrying', 'succeeded', 'failed', 'cancelled', 'snapshot']) {
    stream.addEventListener(type, onEvent);
  }
  stream.lastId = last;
}

async function jobAction(action) {
  const id = openJobId;
  $('job-action-error').textContent = '';
  try {
    const job = await api('POST', `/v1/jobs/${id}/${action}`);
    mergeJob(job);
    renderJobDetails(job);
    // A retried job starts a new run: follow its stream again from where the timeline is.
    if (action === 'retry' && (!jobStream || jobStream.readyState === EventSource.CLOSED)) {
      openJobStream(id, jobStream ? jobStream.lastId : '');
    }
  } catch (e) {
    $('job-action-error').textContent = e.message;
  }
}

function showJob(id) {
  openJobId = id;
  showView('job');
  $('timeline').replaceChildren();
  $('job-action-error').textContent = '';
  $('job-result-card').hidden = true;
  $('job-report-card').hidden = true;
  $('job-error-card').hidden = true;
  if (jobs.has(id)) renderJobHeader(jobs.get(id));
  refreshJob(id);
  openJobStream(id, '');
}

function showJobs() {
  showView('jobs');
  scheduleRender();
}

// Screens other than the jobs: each loads what it shows when opened.
const SCREENS = {
  '#/queues': () => { showView('queues'); openQueuesScreen(); },
  '#/patch': () => { showView('patch'); openPatchScreen(); },
  '#/import': () => { showView('import'); openImportScreen(); },
  '#/collections': () => { showView('collections'); openCollectionsScreen(); },
  '#/pipelines': () => { showView('pipelines'); openPipelinesScreen(); },
  '#/schedules': () => { showView('schedules'); openSchedulesScreen(); },
  '#/webhooks': () => { showView('webhooks'); openWebhooksScreen(); },
};

function route() {
  if (!$('signin').hidden) return;
  const match = location.hash.match(/^#\/jobs\/([0-9a-f-]{36})$/);
  if (!match) {
    openJobId = null;
    closeJobStream();
  }
  if (location.hash !== '#/pipelines') closePipelineStream();
  if (match) showJob(match[1]);
  else if (SCREENS[location.hash]) SCREENS[location.hash]();
  else showJobs();
  if (!queuesTimer) {
    loadQueues();
    loadDatasets();
    queuesTimer = setInterval(loadQueues, 3000);
  }
}

async function start() {
  $('signin-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', signOut);
  $('submit-form').addEventListener('submit', submitJob);
  $('submit-kind').addEventListener('change', (e) => exampleFor(e.target.value));
  $('upload-form').addEventListener('submit', uploadDataset);
  for (const id of ['filter-kind', 'filter-status']) {
    $(id).addEventListener('change', () => { scheduleRender(); loadJobs(); });
  }
  $('jobs-older').addEventListener('click', olderPage);
  $('jobs-newer').addEventListener('click', () => showJobsPage(pager.index - 1));
  $('job-cancel').addEventListener('click', () => jobAction('cancel'));
  $('job-retry').addEventListener('click', () => jobAction('retry'));
  startPatchScreen();
  startImportScreen();
  startCollectionsScreen();
  startFlowScreens();
  window.addEventListener('hashchange', route);
  setInterval(scheduleRender, 1000); // ages and running durations
  try {
    signedIn(await api('GET', '/v1/session'));
  } catch {
    showSignIn();
  }
}

document.addEventListener('DOMContentLoaded', start);
