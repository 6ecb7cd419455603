// The import screen (#/import): the dataset's inferred columns as a mapping to review (name,
// type) before submitting, then the job followed live and its first rejected rows as a table.
// Column names and rows are the tenant's data: they only ever go into the page as text.
'use strict';

// The types an import may give a column (contracts' NAMED_TYPES).
const IMPORT_TYPES = ['boolean', 'smallint', 'integer', 'bigint', 'real', 'double precision', 'numeric',
  'date', 'timestamp', 'timestamptz', 'uuid', 'jsonb', 'text'];
const REJECTED_SHOWN = 20;
// Enough of rejected.csv for the rows shown, however long the file is.
const REJECTED_BYTES = 256 * 1024;

let importDatasets = [];

// A column name the table accepts: the file's own when it is an identifier, else a cleaned one.
function columnName(source) {
  if (/^[A-Za-z_][A-Za-z0-9_$]{0,62}$/.test(source)) return source;
  const name = source.toLowerCase().replace(/[^a-z0-9_]+/g, '_').replace(/^_+|_+$/g, '') || 'column';
  return (/^[0-9]/.test(name) ? `c_${name}` : name).slice(0, 63);
}

async function loadImportDatasets() {
  try {
    const page = await api('GET', '/v1/datasets?limit=50');
    importDatasets = page.datasets.filter((d) => d.format !== 'document');
  } catch (e) {
    console.warn('datasets', e);
    return;
  }
  const select = $('import-dataset');
  const chosen = select.value;
  select.replaceChildren(el('option', { value: '', text: 'choose a dataset' }),
    ...importDatasets.map((d) => el('option', { value: d.id, text: d.name })));
  if (importDatasets.some((d) => d.id === chosen)) select.value = chosen;
}

function typeSelect(inferred) {
  const types = IMPORT_TYPES.includes(inferred) ? IMPORT_TYPES : [inferred, ...IMPORT_TYPES];
  const select = el('select', { class: 'import-type', 'aria-label': 'type in the table' },
    ...types.map((t) => el('option', { value: t, text: t })));
  select.value = inferred;
  return select;
}

async function showMapping() {
  const id = $('import-dataset').value;
  $('import-columns').replaceChildren();
  if (!id) return;
  let dataset;
  try {
    dataset = await api('GET', `/v1/datasets/${id}`);
  } catch (e) {
    $('import-result').textContent = problemText(e);
    return;
  }
  if (!$('import-table').value) $('import-table').value = tableName(dataset.name);
  $('import-columns').replaceChildren(...dataset.schema.map((column) => {
    const include = el('input', { type: 'checkbox', class: 'import-include', 'aria-label': 'import this column' });
    include.checked = true;
    const name = el('input', { class: 'import-name', value: columnName(column.name), maxlength: '63',
      'aria-label': 'name in the table', autocomplete: 'off' });
    const row = el('tr', {},
      el('td', {}, include), el('td', { class: 'source', text: column.name }),
      el('td', { class: 'inferred', text: column.type }), el('td', {}, name), el('td', {}, typeSelect(column.type)));
    row.dataset.source = column.name;
    return row;
  }));
}

// The payload the form describes; a type is sent only where it differs from the inferred one.
function importPayload() {
  const target = { table: $('import-table').value.trim() };
  const connection = $('import-connection').value;
  if (connection) target.connection_id = connection;
  const columns = [...$('import-columns').querySelectorAll('tr')]
    .filter((row) => row.querySelector('.import-include').checked)
    .map((row) => {
      const column = { source: row.dataset.source, name: row.querySelector('.import-name').value.trim() };
      const type = row.querySelector('.import-type').value;
      if (type !== row.querySelector('.inferred').textContent) column.type = type;
      return column;
    });
  const payload = {
    dataset_id: $('import-dataset').value, target, mode: $('import-mode').value,
    on_error: $('import-on-error').value, columns,
  };
  const keys = $('import-keys').value.split(',').map((k) => k.trim()).filter(Boolean);
  if (keys.length) payload.key_columns = keys;
  return payload;
}

async function submitImport(event) {
  event.preventDefault();
  const out = $('import-result');
  out.className = '';
  out.textContent = 'submitting…';
  $('import-rejected-card').hidden = true;
  try {
    const job = await api('POST', '/v1/jobs', { kind: 'import', payload: importPayload() });
    const link = el('a', { href: `#/jobs/${job.id}`, text: job.id, 'data-job-id': job.id });
    out.replaceChildren('import ', link, ' running…');
    out.dataset.status = 'running';
    const done = await followJob(job.id, (type, event) => {
      if (type === 'progress' && event.message) out.replaceChildren('import ', link, ` ${event.message}`);
    });
    out.dataset.status = done.status;
    if (done.status !== 'succeeded') {
      out.className = 'error';
      out.replaceChildren('import ', link, ` ${done.status}: ${done.error || ''}`);
      return;
    }
    const r = done.result;
    out.replaceChildren('import ', link,
      ` done: ${r.rows_imported} rows into ${r.table}, ${r.rows_rejected} rejected`);
    if (r.rows_rejected > 0) await showRejected(job.id, r.rows_rejected);
  } catch (e) {
    out.className = 'error';
    out.dataset.status = 'refused';
    out.textContent = problemText(e);
  }
}

// The head of rejected.csv (line, column, reason, record), read only as far as it is shown.
async function showRejected(jobId, total) {
  const response = await fetch(`/v1/jobs/${jobId}/artifacts/rejected.csv`, { credentials: 'same-origin' });
  if (!response.ok) throw new Error(`rejected rows: HTTP ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = '';
  while (text.length < REJECTED_BYTES) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  reader.cancel().catch(() => {});
  const [, ...records] = parseCsv(text, REJECTED_SHOWN + 1);
  $('import-rejected').replaceChildren(...records.map(([line, column, reason, record]) =>
    el('tr', { 'data-line': line },
      el('td', { class: 'line', text: line }), el('td', { class: 'column', text: column }),
      el('td', { class: 'reason', text: reason }), el('td', { class: 'record id', text: record }))));
  $('import-rejected-count').textContent =
    total > records.length ? `(the first ${records.length} of ${total})` : `(${total})`;
  $('import-rejected-card').hidden = false;
}

// RFC 4180 records, at most `limit`; an unfinished last record (a cut read) is dropped.
function parseCsv(text, limit) {
  const records = [];
  let record = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length && records.length < limit; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') { record.push(field); field = ''; }
    else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      record.push(field);
      records.push(record);
      record = [];
      field = '';
    } else field += c;
  }
  return records;
}

function openImportScreen() {
  loadImportDatasets();
  loadConnections();
}

function startImportScreen() {
  $('import-dataset').addEventListener('change', () => {
    $('import-table').value = '';
    showMapping();
  });
  $('import-form').addEventListener('submit', submitImport);
}
