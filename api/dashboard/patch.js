// The patch review screen (#/patch): preflight, a dry run's before/after diff, Execute after a
// confirmation that repeats the row count and risk, live progress, Roll back; and the tenant's
// connections. Uses app.js's helpers ($, el, api, followJob). Tenant data (cells, names,
// reasons) only ever goes into the page as text.
'use strict';

// Colour is not the only signal: each risk has an icon and its word.
const RISK_ICONS = { low: '\u2713', medium: '!', high: '\u2716' }; // ✓ ! ✖

// What the screen knows of the statement in the form: its preflight, its dry run, its execute.
let patch = { preflight: null, dryRun: null, executeJob: null };
// The last execute and its rollback, kept for this tab so a reload shows them again.
const PATCH_RUN_KEY = 'conveyor.patch-run';

function rememberRun(run) {
  sessionStorage.setItem(PATCH_RUN_KEY, JSON.stringify(run));
}

function rememberedRun() {
  try {
    return JSON.parse(sessionStorage.getItem(PATCH_RUN_KEY)) || {};
  } catch {
    return {};
  }
}

function patchPayload(mode) {
  const payload = { sql: $('patch-sql').value, mode };
  const connection = $('patch-connection').value;
  if (connection) payload.connection_id = connection;
  const size = $('patch-batch-size').value;
  if (size) payload.batch_size = Number(size);
  const pause = $('patch-pause').value;
  if (pause) payload.pause_ms = Number(pause);
  if ($('patch-full-table').checked) payload.allow_full_table = true;
  return payload;
}

// The table's own name, as a person types it: `"t_1"."orders"` -> `orders`.
function bareTable(qualified) {
  const last = qualified.match(/(?:"((?:[^"]|"")*)"|([^."]+))$/);
  if (!last) return qualified;
  return last[1] !== undefined ? last[1].replace(/""/g, '"') : last[2];
}

function riskBadge(node, risk) {
  node.className = `risk risk-${risk}`;
  node.dataset.risk = risk;
  node.textContent = `${RISK_ICONS[risk] || ''} ${risk} risk`;
}

function patchError(message) {
  $('patch-error').textContent = message || '';
}

// Any edit of the form invalidates what was shown for the previous statement.
function resetPatch() {
  patch = { preflight: null, dryRun: null, executeJob: null };
  $('patch-dry-run').disabled = true;
  $('patch-execute').disabled = true;
  $('patch-preflight').hidden = true;
  $('patch-dry').hidden = true;
}

async function runPreflight(event) {
  event.preventDefault();
  patchError('');
  resetPatch();
  try {
    const assessment = await api('POST', '/v1/patches/preflight', patchPayload('dry_run'));
    patch.preflight = assessment;
    showPreflight(assessment);
    $('patch-dry-run').disabled = document.body.dataset.role === 'read';
  } catch (e) {
    patchError(problemText(e));
  }
}

function showPreflight(a) {
  riskBadge($('patch-risk'), a.risk);
  $('patch-table').textContent = a.table;
  $('patch-operation').textContent = a.operation;
  $('patch-key').textContent = `${a.key.join(', ')} (${a.key_source})`;
  $('patch-estimated').textContent =
    `${Math.round(a.estimated_rows)} of about ${Math.round(a.table_rows)} rows (planner's estimate)`;
  $('patch-reasons').replaceChildren(...(a.reasons.length ? a.reasons : ['no risk found'])
    .map((reason) => el('li', { text: reason })));
  $('patch-statement').textContent = a.statement;
  $('patch-preflight').hidden = false;
}

async function submitPatch(payload) {
  return api('POST', '/v1/jobs', { kind: 'patch', payload });
}

async function runDryRun() {
  patchError('');
  $('patch-dry-run').disabled = true;
  $('patch-execute').disabled = true;
  try {
    const job = await submitPatch(patchPayload('dry_run'));
    $('patch-dry-job').replaceChildren(el('a', { href: `#/jobs/${job.id}`, text: 'job', 'data-job-id': job.id }));
    $('patch-dry-rows').textContent = 'running…';
    $('patch-dry').hidden = false;
    $('patch-diff').replaceChildren();
    const done = await followJob(job.id);
    if (done.status !== 'succeeded') throw new Error(`the dry run ${done.status}: ${done.error || ''}`);
    patch.dryRun = done.result;
    // The preflight as the dry run saw it: the risk the confirmation repeats.
    patch.preflight = done.result.preflight || patch.preflight;
    showPreflight(patch.preflight);
    showDiff(done.result);
    $('patch-execute').disabled = false;
  } catch (e) {
    patchError(problemText(e));
  } finally {
    $('patch-dry-run').disabled = false;
  }
}

const cell = (value) => (value === undefined ? '' : JSON.stringify(value));

// One row per sampled row: its key, then every column some row changed, the changed cells
// marked (class, icon and before → after), deleted rows struck through.
function showDiff(result) {
  const sample = result.sample || [];
  const keys = sample.length ? Object.keys(sample[0].key) : [];
  const changed = [...new Set(sample.flatMap((row) => Object.keys(row.changes)))]
    .filter((name) => !keys.includes(name));
  $('patch-dry-rows').textContent = `${result.rows} rows would change`;
  $('patch-dry-rows').dataset.rows = String(result.rows);
  const head = el('tr', {}, ...keys.map((k) => el('th', { text: k })),
    ...changed.map((c) => el('th', { text: c })), el('th', { text: '' }));
  const body = sample.map((row) => {
    const cells = keys.map((k) => el('td', { class: 'key', text: cell(row.key[k]) }));
    for (const column of changed) {
      const change = row.changes[column];
      if (!change) {
        cells.push(el('td', { class: 'same', text: '' }));
        continue;
      }
      cells.push(el('td', { class: 'changed', 'data-column': column, title: 'changed' },
        el('del', { text: cell(change.before) }), ' \u2192 ', el('ins', { text: cell(change.after) })));
    }
    cells.push(el('td', { class: 'muted', text: row.deleted ? 'deleted' : '' }));
    return el('tr', { class: row.deleted ? 'deleted' : '', 'data-key': JSON.stringify(row.key) }, ...cells);
  });
  $('patch-diff').replaceChildren(el('thead', {}, head), el('tbody', {}, ...body));
}

// The confirmation repeats what will happen; a high risk also wants the table's name typed.
function confirmExecute() {
  const a = patch.preflight;
  const rows = patch.dryRun.rows;
  const verb = a.operation === 'delete' ? 'delete' : 'update';
  $('patch-confirm-text').textContent =
    `This will ${verb} ${rows} rows of ${a.table}. Risk: ${RISK_ICONS[a.risk]} ${a.risk}` +
    (a.reasons.length ? ` (${a.reasons.join('; ')})` : '') + '.';
  $('patch-confirm-text').dataset.rows = String(rows);
  $('patch-confirm-text').dataset.risk = a.risk;
  const high = a.risk === 'high';
  $('patch-confirm-type-label').hidden = !high;
  $('patch-confirm-table').textContent = bareTable(a.table);
  $('patch-confirm-type').value = '';
  $('patch-confirm-ok').disabled = high;
  $('patch-confirm').showModal();
  if (high) $('patch-confirm-type').focus();
}

function typedTableMatches() {
  const typed = $('patch-confirm-type').value.trim();
  const a = patch.preflight;
  return typed === bareTable(a.table) || typed === a.table;
}

async function confirmClosed() {
  if ($('patch-confirm').returnValue !== 'execute') return;
  if (patch.preflight.risk === 'high' && !typedTableMatches()) return;
  patchError('');
  $('patch-execute').disabled = true;
  $('patch-dry-run').disabled = true;
  try {
    const job = await submitPatch(patchPayload('execute'));
    patch.executeJob = job.id;
    rememberRun({ execute: job.id });
    await followExecute(job.id);
  } catch (e) {
    patchError(problemText(e));
  }
}

async function followExecute(id) {
  $('patch-run').hidden = false;
  $('patch-run-job').replaceChildren(el('a', { href: `#/jobs/${id}`, text: id, 'data-job-id': id }));
  $('patch-rollback').disabled = true;
  $('patch-rollback-status').textContent = '';
  $('patch-batches').textContent = '0';
  $('patch-longest-lock').textContent = '';
  $('patch-snapshot').textContent = '';
  const status = (text) => {
    $('patch-run-status').textContent = text;
    $('patch-run-status').className = `status status-${text}`;
    $('patch-run').dataset.status = text;
  };
  status('queued');
  const done = await followJob(id, (type, event) => {
    if (event.status) status(event.status);
    $('patch-progress').value = event.progress || 0;
    if (type === 'progress' && event.message) $('patch-progress-text').textContent = event.message;
    // The job reports its batches and longest lock as `log` events with data.
    const figures = event.data;
    if (type === 'log' && figures && figures.batches !== undefined) {
      $('patch-batches').textContent = String(figures.batches);
      $('patch-longest-lock').textContent = `${figures.longest_lock_ms.toFixed(1)} ms`;
    }
  });
  status(done.status);
  if (done.status !== 'succeeded') {
    patchError(`the patch ${done.status}: ${done.error || ''}`);
    return;
  }
  const r = done.result;
  $('patch-progress').value = 1;
  $('patch-progress-text').textContent = `${r.rows} rows changed`;
  $('patch-batches').textContent = String(r.batches);
  if (r.longest_lock_ms !== undefined) $('patch-longest-lock').textContent = `${r.longest_lock_ms.toFixed(1)} ms`;
  $('patch-snapshot').textContent = (r.snapshots || []).map((s) =>
    `${s.table}: ${s.rows} rows, until ${s.expires_at}`).join('; ');
  $('patch-rollback').disabled = document.body.dataset.role === 'read';
}

async function rollBack() {
  const id = patch.executeJob;
  if (!id) return;
  $('patch-rollback').disabled = true;
  const out = $('patch-rollback-status');
  try {
    const job = await api('POST', '/v1/jobs', { kind: 'patch_rollback', payload: { patch_job_id: id } });
    rememberRun({ execute: id, rollback: job.id });
    await followRollback(job.id);
  } catch (e) {
    out.className = 'error';
    out.dataset.status = 'failed';
    out.textContent = problemText(e);
    $('patch-rollback').disabled = false;
  }
}

async function followRollback(id) {
  const out = $('patch-rollback-status');
  $('patch-rollback').disabled = true;
  out.className = '';
  out.dataset.status = 'running';
  out.textContent = 'rolling back…';
  const done = await followJob(id);
  out.dataset.status = done.status;
  if (done.status === 'succeeded') {
    const rows = done.result && done.result.rows_restored !== undefined ? `${done.result.rows_restored} rows ` : '';
    out.replaceChildren(`rolled back: ${rows}restored by `, el('a', { href: `#/jobs/${id}`, text: 'job' }));
  } else {
    out.className = 'error';
    out.textContent = `the rollback ${done.status}: ${done.error || ''}`;
    $('patch-rollback').disabled = false;
  }
}

// After a reload: the execute this tab last ran, followed again from its first event (or its
// final row), with its statement back in the form and its rollback's outcome.
async function restoreRun() {
  const run = rememberedRun();
  if (!run.execute || patch.executeJob) return;
  patch.executeJob = run.execute;
  try {
    const job = await api('GET', `/v1/jobs/${run.execute}`);
    if (!$('patch-sql').value) $('patch-sql').value = job.payload.sql || '';
    await followExecute(run.execute);
    if (run.rollback) await followRollback(run.rollback);
  } catch (e) {
    // Gone (deleted, retention) or another tenant's since: nothing to show.
    sessionStorage.removeItem(PATCH_RUN_KEY);
    patch.executeJob = null;
    $('patch-run').hidden = true;
  }
}

// ---------- connections ----------

async function loadConnections() {
  let list = [];
  try {
    list = await api('GET', '/v1/connections');
  } catch (e) {
    console.warn('connections', e);
    return;
  }
  const readOnly = document.body.dataset.role === 'read';
  $('connections').replaceChildren(...list.map((c) => {
    const remove = el('button', { type: 'button', class: 'small secondary', text: 'Delete' });
    remove.disabled = readOnly;
    remove.addEventListener('click', () => deleteConnection(c));
    return el('tr', { 'data-connection-id': c.id },
      el('td', { text: c.name }), el('td', { class: 'id', text: c.display }), el('td', {}, remove));
  }));
  // The targets patches and imports may choose; the default target stays first.
  for (const select of [$('patch-connection'), $('import-connection')]) {
    const chosen = select.value;
    select.replaceChildren(el('option', { value: '', text: 'default target' }),
      ...list.map((c) => el('option', { value: c.id, text: `${c.name} (${c.display})` })));
    if (list.some((c) => c.id === chosen)) select.value = chosen;
  }
}

async function addConnection(event) {
  event.preventDefault();
  const out = $('connection-result');
  out.className = '';
  out.textContent = 'checking the connection…';
  const body = { name: $('connection-name').value.trim(), url: $('connection-url').value };
  // The URL holds a password: out of the form as soon as it is sent, whatever the answer.
  $('connection-url').value = '';
  try {
    const created = await api('POST', '/v1/connections', body);
    $('connection-form').reset();
    out.textContent = `added ${created.name}`;
    await loadConnections();
  } catch (e) {
    out.className = 'error';
    out.textContent = problemText(e);
  }
}

async function deleteConnection(connection) {
  const out = $('connection-result');
  out.className = '';
  if (!window.confirm(`Delete the connection ${connection.name}?`)) return;
  try {
    await api('DELETE', `/v1/connections/${connection.id}`);
    out.textContent = `deleted ${connection.name}`;
  } catch (e) {
    out.className = 'error';
    out.textContent = problemText(e);
  }
  await loadConnections();
}

function openPatchScreen() {
  loadConnections();
  restoreRun();
}

function startPatchScreen() {
  $('patch-form').addEventListener('submit', runPreflight);
  for (const id of ['patch-sql', 'patch-connection', 'patch-full-table']) {
    $(id).addEventListener('input', resetPatch);
  }
  $('patch-dry-run').addEventListener('click', runDryRun);
  $('patch-execute').addEventListener('click', confirmExecute);
  $('patch-confirm-type').addEventListener('input', () => {
    $('patch-confirm-ok').disabled = !typedTableMatches();
  });
  $('patch-confirm').addEventListener('close', confirmClosed);
  $('patch-rollback').addEventListener('click', rollBack);
  $('connection-form').addEventListener('submit', addConnection);
}
