// The collections screen (#/collections): the tenant's collections with their counts, and a
// search (vector, keyword or hybrid, with a metadata filter) whose ranked chunks show their
// score and metadata, the query's words marked for keyword and hybrid. Chunk text and metadata
// are the tenant's data, hostile: marks are built from text nodes, never parsed as HTML.
'use strict';

let searchCollection = null; // the collection searched: {id, name}

// Words PostgreSQL's english configuration drops: not marked, since they never match.
const STOP_WORDS = new Set(('a an and are as at be but by for from has have i if in into is it its ' +
  'me my no not of on or our so such that the their then there these they this to was we were ' +
  'what when where which who will with you your').split(' '));

// A crude English stem, enough to mark `passwords` for `password` or `reset` for `resetting`;
// the ranking itself is PostgreSQL's.
function stem(word) {
  const w = word.toLowerCase();
  for (const suffix of ['ing', 'ed', 'es', 's', 'ly']) {
    if (w.length > suffix.length + 2 && w.endsWith(suffix)) return w.slice(0, -suffix.length).replace(/(.)\1$/, '$1');
  }
  return w;
}

const WORD = /[\p{L}\p{N}]+/gu;

function queryStems(query) {
  return new Set((query.match(WORD) || []).filter((w) => !STOP_WORDS.has(w.toLowerCase())).map(stem));
}

// The text as text nodes and <mark> elements: the words whose stem the query has, marked.
function marked(text, stems) {
  const nodes = [];
  let at = 0;
  for (const match of text.matchAll(WORD)) {
    if (!stems.has(stem(match[0]))) continue;
    if (match.index > at) nodes.push(document.createTextNode(text.slice(at, match.index)));
    nodes.push(el('mark', { text: match[0] }));
    at = match.index + match[0].length;
  }
  if (at < text.length) nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

async function loadCollections() {
  let page;
  try {
    page = await api('GET', '/v1/collections?limit=100');
  } catch (e) {
    console.warn('collections', e);
    return;
  }
  $('collections').replaceChildren(...page.collections.map((c) => {
    const choose = el('button', { type: 'button', class: 'small', text: 'Search' });
    choose.addEventListener('click', () => chooseCollection(c));
    return el('tr', { 'data-collection-id': c.id, class: searchCollection && searchCollection.id === c.id ? 'selected' : '' },
      el('td', { class: 'name', text: c.name, title: c.id }),
      el('td', { class: 'documents', text: String(c.documents) }),
      el('td', { class: 'chunks', text: String(c.chunks) }), el('td', {}, choose));
  }));
  $('collections-empty').hidden = page.collections.length > 0;
  if (!searchCollection && page.collections.length) chooseCollection(page.collections[0]);
}

function chooseCollection(collection) {
  searchCollection = { id: collection.id, name: collection.name };
  $('search-collection').textContent = `in ${collection.name}`;
  $('search-form').querySelector('button[type=submit]').disabled = false;
  for (const row of $('collections').querySelectorAll('tr')) {
    row.classList.toggle('selected', row.dataset.collectionId === collection.id);
  }
  $('search-query').focus();
}

async function search(event) {
  event.preventDefault();
  if (!searchCollection) return;
  const out = $('search-status');
  out.className = '';
  const query = $('search-query').value;
  const mode = $('search-mode').value;
  const body = { query, mode, k: Number($('search-k').value || 10) };
  const filter = $('search-filter').value.trim();
  if (filter) {
    try {
      body.filter = JSON.parse(filter);
    } catch (e) {
      out.className = 'error';
      out.textContent = `filter is not JSON: ${e.message}`;
      return;
    }
  }
  out.textContent = 'searching…';
  delete $('search-results').dataset.done;
  try {
    const { results } = await api('POST', `/v1/collections/${searchCollection.id}/search`, body);
    const stems = mode === 'vector' ? new Set() : queryStems(query);
    $('search-results').replaceChildren(...results.map((hit) => resultItem(hit, stems)));
    out.textContent = `${results.length} chunks, ${mode}`;
  } catch (e) {
    out.className = 'error';
    out.textContent = problemText(e);
    $('search-results').replaceChildren();
  }
  $('search-results').dataset.done = `${mode}:${query}`;
}

function resultItem(hit, stems) {
  const meta = el('div', { class: 'meta' },
    el('span', { class: 'score', text: `score ${hit.score.toFixed(4)}` }),
    el('span', { class: 'document', text: `document ${hit.document_id} #${hit.ordinal}` }),
    el('span', { class: 'chunk', text: `chunk ${hit.chunk_id}` }),
    ...Object.entries(hit.metadata || {}).map(([key, value]) =>
      el('code', { class: 'metadata', text: `${key}=${typeof value === 'string' ? value : JSON.stringify(value)}` })));
  return el('li', { 'data-chunk-id': String(hit.chunk_id) }, meta, el('p', { class: 'text' }, ...marked(hit.text, stems)));
}

function openCollectionsScreen() {
  loadCollections();
}

function startCollectionsScreen() {
  $('search-form').addEventListener('submit', search);
}
