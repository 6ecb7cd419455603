// The queues screen (#/queues): each queue's backlog and workers now (GET /v1/queues,
// /v1/workers, read by app.js' loadQueues), and its last hour as two small charts from the
// workers' per-minute rollup (GET /v1/queues/history). Charts are SVG built node by node; each
// has its numbers beside it in text, and succeeded and failed differ by side (up and down), not
// only by colour.
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';
const CHART_WIDTH = 240;
const CHART_HEIGHT = 60;
let historyTimer = null;

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

const clock = (iso) => new Date(iso).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
const sum = (minutes, field) => minutes.reduce((total, m) => total + m[field], 0);

// Succeeded per minute as bars up from the middle line, failed as bars down from it.
function throughputChart(queue) {
  const minutes = queue.minutes;
  const mid = CHART_HEIGHT / 2;
  const step = CHART_WIDTH / minutes.length;
  const peak = Math.max(1, ...minutes.map((m) => Math.max(m.succeeded, m.failed)));
  const length = (count) => Math.max(1, (count / peak) * (mid - 1));
  const succeeded = sum(minutes, 'succeeded');
  const failed = sum(minutes, 'failed');
  const chart = svg('svg', {
    class: 'chart throughput', viewBox: `0 0 ${CHART_WIDTH} ${CHART_HEIGHT}`, role: 'img',
    'aria-label': `${queue.kind}: ${succeeded} succeeded and ${failed} failed in the last hour, at most ${peak} a minute`,
  }, svg('line', { class: 'axis', x1: 0, x2: CHART_WIDTH, y1: mid, y2: mid }));
  minutes.forEach((m, i) => {
    if (!m.succeeded && !m.failed) return;
    const x = (i * step).toFixed(2);
    const width = Math.max(1, step - 1).toFixed(2);
    const bar = svg('g', { class: 'minute', 'data-minute': m.minute },
      svg('title', {}, `${clock(m.minute)}: ${m.succeeded} succeeded, ${m.failed} failed`));
    if (m.succeeded) {
      bar.append(svg('rect', { class: 'ok', x, width, y: (mid - length(m.succeeded)).toFixed(2),
        height: length(m.succeeded).toFixed(2), 'data-count': m.succeeded }));
    }
    if (m.failed) {
      bar.append(svg('rect', { class: 'bad', x, width, y: mid, height: length(m.failed).toFixed(2),
        'data-count': m.failed }));
    }
    chart.append(bar);
  });
  return chart;
}

// Jobs waiting, the most seen each minute, as a line; a minute the rollup did not sample is a
// gap, not a zero.
function waitingChart(queue) {
  const minutes = queue.minutes;
  // Inset by a dot's size, so a dot at an edge is drawn whole.
  const inset = 3;
  const step = (CHART_WIDTH - 2 * inset) / Math.max(1, minutes.length - 1);
  const sampled = minutes.filter((m) => m.waiting !== null);
  const peak = Math.max(1, ...sampled.map((m) => m.waiting));
  const y = (waiting) => (CHART_HEIGHT - inset - (waiting / peak) * (CHART_HEIGHT - 2 * inset)).toFixed(2);
  const chart = svg('svg', {
    class: 'chart depth', viewBox: `0 0 ${CHART_WIDTH} ${CHART_HEIGHT}`, role: 'img',
    'aria-label': `${queue.kind}: at most ${sampled.length ? peak : 0} jobs waiting in the last hour`,
  }, svg('line', { class: 'axis', x1: 0, x2: CHART_WIDTH, y1: CHART_HEIGHT - inset, y2: CHART_HEIGHT - inset }));
  let run = [];
  const dot = ([x, yAt]) => chart.append(svg('circle', { class: 'dot', cx: x, cy: yAt, r: 2 }));
  const flush = () => {
    if (run.length === 1) dot(run[0]); // a lone minute
    if (run.length > 1) chart.append(svg('polyline', { class: 'line', points: run.map((p) => p.join(',')).join(' ') }));
    run = [];
  };
  minutes.forEach((m, i) => {
    if (m.waiting === null) { flush(); return; }
    run.push([(inset + i * step).toFixed(2), y(m.waiting)]);
  });
  const last = run[run.length - 1];
  flush();
  if (last) dot(last); // where it stands now
  return chart;
}

function legendItem(cls, label, value, field, title) {
  return el('span', { class: `key ${cls}`, title }, `${label} `, el('b', { 'data-total': field, text: String(value) }));
}

function queueFigure(queue) {
  const minutes = queue.minutes;
  const sampled = minutes.filter((m) => m.waiting !== null);
  const last = sampled.length ? sampled[sampled.length - 1].waiting : null;
  const peakWaiting = sampled.length ? Math.max(...sampled.map((m) => m.waiting)) : null;
  return el('figure', { class: 'queue-chart', 'data-queue': queue.kind },
    el('figcaption', {}, el('strong', { text: queue.kind }),
      el('span', { class: 'muted', text: ` ${clock(minutes[0].minute)}–${clock(minutes[minutes.length - 1].minute)}` })),
    el('div', { class: 'chart-row' }, throughputChart(queue),
      el('p', { class: 'legend' },
        legendItem('ok', '\u25B2 succeeded', sum(minutes, 'succeeded'), 'succeeded', 'jobs that succeeded in the hour: bars up'), el('br'),
        legendItem('bad', '\u25BC failed', sum(minutes, 'failed'), 'failed', 'jobs that failed for good in the hour: bars down'))),
    el('div', { class: 'chart-row' }, waitingChart(queue),
      el('p', { class: 'legend' },
        legendItem('line', '\u25CF waiting', last === null ? '–' : last, 'waiting', 'most jobs waiting in the latest minute'), el('br'),
        legendItem('line', '\u2500 peak', peakWaiting === null ? '–' : peakWaiting, 'peak', 'most jobs waiting in any minute of the hour'))));
}

async function loadHistory() {
  try {
    const history = await api('GET', '/v1/queues/history');
    $('queue-charts').replaceChildren(...history.queues.map(queueFigure));
    $('queue-charts').dataset.to = history.to;
    $('queue-charts-error').textContent = '';
  } catch (e) {
    $('queue-charts-error').textContent = e.message;
  }
}

function openQueuesScreen() {
  loadQueues();
  loadHistory();
  clearInterval(historyTimer);
  // Only while the screen is shown: the rollup moves every 15 s.
  historyTimer = setInterval(() => {
    if ($('queues-view').hidden) {
      clearInterval(historyTimer);
      historyTimer = null;
    } else {
      loadHistory();
    }
  }, 10_000);
}
