// The workflow screens: pipelines (#/pipelines: the list, a submit form, and the chosen
// pipeline's steps in order with their live states from /v1/pipelines/{id}/events), schedules
// (#/schedules: next firings, pause/resume, each schedule's firings) and webhooks
// (#/webhooks: each endpoint's deliveries with attempts, status codes and latency, and replay).
// Names, URLs, reasons and errors are the tenant's data: always set as text.
'use strict';

const PIPELINE_EXAMPLE = {
  name: 'example',
  steps: [
    { name: 'first', kind: 'canary', payload: { steps: 5, step_ms: 200 } },
    { name: 'second', kind: 'canary', needs: ['first'], payload: { steps: 5, step_ms: 200 } },
  ],
};

let pipelineStream = null; // EventSource on the chosen pipeline's events
let openPipeline = null; // the chosen pipeline, as GET /v1/pipelines/{id} shows it
let pipelineReload = null; // a pending re-read of the chosen pipeline
let openWebhook = null; // the webhook whose deliveries are shown

const readOnly = () => document.body.dataset.role === 'read';

// A problem's field errors, or its message, into a status line.
function showError(node, error) {
  node.className = 'error';
  node.textContent = problemText(error);
}

// ---------- pipelines ----------

function closePipelineStream() {
  if (pipelineStream) pipelineStream.close();
  pipelineStream = null;
}

async function loadPipelines() {
  let page;
  try {
    page = await api('GET', '/v1/pipelines?limit=50');
  } catch (e) {
    console.warn('pipelines', e);
    return;
  }
  $('pipelines').replaceChildren(...page.pipelines.map((p) => {
    const open = el('a', { href: '#/pipelines', text: p.id.slice(-12), title: p.id });
    open.addEventListener('click', (event) => { event.preventDefault(); choosePipeline(p.id); });
    const done = p.steps.filter((s) => s.state === 'succeeded').length;
    return el('tr', { 'data-pipeline-id': p.id, class: openPipeline && openPipeline.id === p.id ? 'selected' : '' },
      el('td', { class: 'id' }, open), el('td', { text: p.name || '' }),
      el('td', { class: `status status-${p.status}`, text: p.status }),
      el('td', { text: `${done}/${p.steps.length} succeeded` }),
      el('td', { text: span(since(p.created_at)) }));
  }));
  $('pipelines-none').hidden = page.pipelines.length > 0;
}

// The steps in submitted order: each with its state, what it needs, its job and its reason.
function renderPipeline(pipeline) {
  openPipeline = pipeline;
  $('pipeline-empty').hidden = true;
  $('pipeline-name').textContent = pipeline.name || '';
  $('pipeline-id').textContent = pipeline.id;
  $('pipeline-status').textContent = pipeline.status;
  $('pipeline-status').className = `status status-${pipeline.status}`;
  $('pipeline-cancel').disabled = readOnly() || pipeline.status !== 'running';
  $('pipeline-steps').replaceChildren(...pipeline.steps.map((s) => {
    const job = s.job_id ? el('a', { href: `#/jobs/${s.job_id}`, text: `job ${s.job_id.slice(-12)}` }) : '';
    return el('li', { 'data-step': s.name, 'data-state': s.state },
      el('span', { class: 'step-name', text: s.name }), el('span', { class: 'pill', text: s.kind }),
      el('span', { class: `state status status-${s.state}`, text: s.state }),
      el('span', { class: 'muted', text: s.needs.length ? `needs ${s.needs.join(', ')}` : 'needs nothing' }),
      job, el('span', { class: 'reason error', text: s.reason || '' }));
  }));
}

async function readPipeline(id) {
  try {
    const pipeline = await api('GET', `/v1/pipelines/${id}`);
    if (openPipeline && openPipeline.id === id) renderPipeline(pipeline);
  } catch (e) {
    showError($('pipeline-error'), e);
  }
}

// An event of one of the steps' jobs: its step shows the job's status at once; a job not yet
// known (a step just started) has the pipeline read again.
function applyStepEvent(event) {
  const step = openPipeline.steps.find((s) => s.job_id === event.job_id);
  if (step && event.type !== 'log') {
    step.state = event.status;
    renderPipeline(openPipeline);
  }
  if (!step) {
    clearTimeout(pipelineReload);
    pipelineReload = setTimeout(() => readPipeline(openPipeline.id), 100);
  }
}

function choosePipeline(id) {
  closePipelineStream();
  $('pipeline-error').textContent = '';
  openPipeline = { id, steps: [] };
  readPipeline(id).then(loadPipelines);
  const stream = new EventSource(`/v1/pipelines/${id}/events`);
  pipelineStream = stream;
  for (const type of ['queued', 'started', 'progress', 'retrying', 'succeeded', 'failed', 'cancelled']) {
    stream.addEventListener(type, (message) => {
      if (pipelineStream === stream) applyStepEvent(JSON.parse(message.data));
    });
  }
  // The last event carries the pipeline as it ended; the server then closes the stream.
  stream.addEventListener('pipeline.finished', (message) => {
    if (pipelineStream !== stream) return;
    closePipelineStream();
    renderPipeline(JSON.parse(message.data));
    loadPipelines();
  });
}

async function submitPipeline(event) {
  event.preventDefault();
  const out = $('pipeline-result');
  out.className = '';
  let body;
  try {
    body = JSON.parse($('pipeline-body').value);
  } catch (e) {
    out.className = 'error';
    out.textContent = `not JSON: ${e.message}`;
    return;
  }
  try {
    const pipeline = await api('POST', '/v1/pipelines', body);
    out.replaceChildren('submitted ', el('code', { text: pipeline.id, 'data-pipeline-id': pipeline.id }));
    choosePipeline(pipeline.id);
  } catch (e) {
    showError(out, e);
  }
}

async function cancelPipeline() {
  try {
    renderPipeline(await api('POST', `/v1/pipelines/${openPipeline.id}/cancel`));
  } catch (e) {
    showError($('pipeline-error'), e);
  }
}

function openPipelinesScreen() {
  if (!$('pipeline-body').value) $('pipeline-body').value = JSON.stringify(PIPELINE_EXAMPLE, null, 2);
  loadPipelines();
}

// ---------- schedules ----------

const when = (iso) => (iso ? new Date(iso).toLocaleString() : '');

function makes(schedule) {
  if (schedule.pipeline) return `pipeline ${schedule.pipeline.name || ''} (${schedule.pipeline.steps.length} steps)`;
  return schedule.job ? `job ${schedule.job.kind}` : '';
}

async function loadSchedules() {
  // Every page: a page ends early once its bytes pass the server's bound.
  const list = { schedules: [] };
  try {
    let cursor = '';
    do {
      const page = await api('GET', `/v1/schedules?limit=100${cursor ? `&cursor=${cursor}` : ''}`);
      list.schedules.push(...page.schedules);
      cursor = page.next_cursor;
    } while (cursor);
  } catch (e) {
    showError($('schedules-error'), e);
    return;
  }
  $('schedules').replaceChildren(...list.schedules.map((s) => {
    const toggle = el('button', { type: 'button', class: 'small toggle', text: s.paused ? 'Resume' : 'Pause' });
    toggle.disabled = readOnly();
    toggle.addEventListener('click', () => setPaused(s.id, !s.paused));
    const history = el('button', { type: 'button', class: 'small', text: 'Firings' });
    history.addEventListener('click', () => showFirings(s));
    const next = el('ul', { class: 'next-fires' }, ...s.next_fires.slice(0, 3).map((t) => el('li', { text: when(t) })));
    return el('tr', { 'data-schedule-id': s.id, 'data-paused': String(s.paused) },
      el('td', { class: 'name', text: s.name }), el('td', { text: `${s.cron} (${s.timezone})` }),
      el('td', { text: makes(s) }), el('td', { class: 'state', text: s.paused ? 'paused' : 'active' }),
      el('td', {}, next), el('td', { text: String(s.skipped) }), el('td', { class: 'actions' }, toggle, history));
  }));
  $('schedules-none').hidden = list.schedules.length > 0;
}

async function setPaused(id, pause) {
  $('schedules-error').textContent = '';
  try {
    await api('POST', `/v1/schedules/${id}/${pause ? 'pause' : 'resume'}`);
  } catch (e) {
    showError($('schedules-error'), e);
  }
  loadSchedules();
}

async function showFirings(schedule) {
  $('schedule-history-card').hidden = false;
  $('schedule-history-name').textContent = schedule.name;
  try {
    const page = await api('GET', `/v1/schedules/${schedule.id}/history?limit=50`);
    $('schedule-history').replaceChildren(...page.firings.map((f) => {
      const made = f.job_id ? el('a', { href: `#/jobs/${f.job_id}`, text: 'job' }) : f.made;
      return el('tr', { 'data-made': f.made },
        el('td', { text: when(f.fire_at) }), el('td', {}, made),
        el('td', { class: `status status-${f.status}`, text: f.status }), el('td', { text: f.reason || '' }));
    }));
  } catch (e) {
    showError($('schedules-error'), e);
  }
}

function openSchedulesScreen() {
  loadSchedules();
}

// ---------- webhooks ----------

async function loadWebhooks() {
  let list;
  try {
    list = await api('GET', '/v1/webhooks');
  } catch (e) {
    console.warn('webhooks', e);
    return;
  }
  $('webhooks').replaceChildren(...list.webhooks.map((w) => {
    const show = el('button', { type: 'button', class: 'small', text: 'Deliveries' });
    show.addEventListener('click', () => showDeliveries(w));
    return el('tr', { 'data-webhook-id': w.id },
      el('td', { class: 'url', text: w.url }), el('td', { text: w.events.join(', ') }),
      el('td', { text: w.failing_since ? `failing since ${when(w.failing_since)}` : 'ok' }),
      el('td', {}, show));
  }));
  $('webhooks-none').hidden = list.webhooks.length > 0;
}

async function showDeliveries(webhook) {
  openWebhook = webhook;
  $('deliveries-card').hidden = false;
  $('deliveries-url').textContent = webhook.url;
  $('deliveries-error').textContent = '';
  let page;
  try {
    page = await api('GET', `/v1/webhooks/${webhook.id}/deliveries?limit=50`);
  } catch (e) {
    showError($('deliveries-error'), e);
    return;
  }
  $('deliveries').replaceChildren(...page.deliveries.map((d) => {
    const replay = el('button', { type: 'button', class: 'small', text: 'Replay' });
    replay.disabled = readOnly() || d.status === 'pending';
    replay.addEventListener('click', () => replayDelivery(d.id));
    return el('tr', { 'data-delivery-id': d.id, 'data-status': d.status },
      el('td', { text: d.event }), el('td', { class: `status status-${d.status}`, text: d.status }),
      el('td', { class: 'attempts', text: String(d.attempts) }),
      el('td', { class: 'code', text: d.last_status_code === null ? '' : String(d.last_status_code) }),
      el('td', { class: 'latency', text: d.last_latency_ms === null ? '' : `${d.last_latency_ms} ms` }),
      el('td', { text: when(d.last_attempt_at) }), el('td', { class: 'error', text: d.last_error || '' }),
      el('td', {}, replay));
  }));
}

async function replayDelivery(id) {
  try {
    await api('POST', `/v1/webhooks/${openWebhook.id}/deliveries/${id}/replay`);
  } catch (e) {
    showError($('deliveries-error'), e);
    return;
  }
  showDeliveries(openWebhook);
}

function openWebhooksScreen() {
  loadWebhooks();
  if (openWebhook) showDeliveries(openWebhook);
}

function startFlowScreens() {
  $('pipeline-form').addEventListener('submit', submitPipeline);
  $('pipeline-cancel').addEventListener('click', cancelPipeline);
}
