// initdoctor's tab. TensorBoard loads this module inside an iframe whose <base> is the plugin's
// route prefix, so './runs' reaches the backend. Everything is drawn here from JSON, as SVG.

const SVG = 'http://www.w3.org/2000/svg';
const SEV_RANK = {error: 0, warning: 1, info: 2};
const COLORS = {signal: '#0072B2', gradient: '#D55E00', error: '#C0392B', warning: '#E69F00',
                info: '#7F8C8D', band: '#E6E6E6'};

let BAND = [1e-2, 1e2];
let FIXES = {};  // code -> fix title, from the code table

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return '–';
  if (typeof v !== 'number') return String(v);
  if (v === 0) return '0';
  const a = Math.abs(v);
  return (a >= 1e4 || a < 1e-3) ? v.toExponential(2) : String(+v.toPrecision(digits));
}

function positive(v) {
  return typeof v === 'number' && isFinite(v) && v > 0;
}

// each value over the first usable one, as log10; null where it cannot sit on a log axis
function logRatios(values) {
  const first = values.find(positive);
  return values.map((v) => (first !== undefined && positive(v)) ? Math.log10(v / first) : null);
}

function ranLayers(layers) {
  return (layers || []).filter((l) => l.index >= 0).sort((a, b) => a.index - b.index);
}

function sortedFindings(findings) {
  return [...(findings || [])].sort((a, b) => SEV_RANK[a.severity] - SEV_RANK[b.severity]);
}

// --- the rule page ---------------------------------------------------------------------------

async function explain(code) {
  const panel = document.getElementById('explain');
  panel.replaceChildren(el('div', {class: 'explain-head'}, el('b', {}, code),
                           el('button', {class: 'close', onclick: () => panel.classList.remove('open')}, 'close')));
  panel.classList.add('open');
  try {
    const page = await getJSON(`./explain?code=${encodeURIComponent(code)}`);
    panel.append(el('pre', {class: 'page'}, page.page));
  } catch (e) {
    panel.append(el('p', {class: 'failure'}, String(e)));
  }
}

// --- findings --------------------------------------------------------------------------------

function findingsView(d) {
  const box = el('section', {class: 'findings'}, el('h3', {}, 'Findings'));
  const list = sortedFindings(d.findings);
  if (!list.length) box.append(el('p', {class: 'none'}, 'No findings: nothing to fix.'));
  const plan = Object.fromEntries((d.plan || []).map((p) => [p.layer, p]));
  for (const f of list) {
    const planned = f.layers.map((n) => plan[n]).filter(Boolean);
    const fixes = planned.filter((p) => p.scheme !== 'keep')
      .map((p) => `${p.layer}: ${p.scheme}${p.gain !== 1 ? ` gain ${fmt(p.gain)}` : ''}, ${p.mode}`);
    // every layer it names is one the plan keeps on purpose: say so, not the code's generic fix
    const kept = planned.length === f.layers.length && planned.length > 0 && !fixes.length;
    const item = el('div', {class: `finding ${f.severity}`, 'data-code': f.code, title: 'show the rule page',
                            onclick: () => explain(f.code)},
      el('div', {class: 'head'}, el('span', {class: `sev ${f.severity}`}, f.severity),
         el('b', {}, ` ${f.code} `), el('span', {class: 'name'}, f.name)),
      el('div', {class: 'layers'}, 'layers: ', el('code', {}, f.layers.join(', ') || '(model)')),
      el('div', {class: 'message'}, f.message));
    if (kept) {
      item.append(el('div', {class: 'fix kept'}, 'plan: keep — ', planned[0].reason +
                     (planned.length > 1 ? ` (${planned[0].layer} and ${planned.length - 1} more)` : '')));
    } else if (FIXES[f.code] && (f.severity !== 'info' || fixes.length)) {
      // a note (info) is no problem to fix unless the plan re-draws its layers: no generic advice
      item.append(el('div', {class: 'fix'}, 'fix: ', FIXES[f.code]));
    }
    if (fixes.length) item.append(el('div', {class: 'fix'}, 'plan: ', fixes.slice(0, 4).join('; ') +
                                     (fixes.length > 4 ? ` (+${fixes.length - 4} more)` : '')));
    box.append(item);
  }
  if ((d.after || {}).findings) {
    const fired = d.after.findings.filter((f) => f.severity !== 'info');
    box.append(el('p', {class: 'after-note'}, fired.length
      ? `After --fix: ${fired.map((f) => `${f.code} (${f.severity})`).join(', ')} remain.`
      : 'After --fix: no warning or error remains.'));
  }
  return box;
}

// --- depth profile ---------------------------------------------------------------------------

function depthProfile(d) {
  const layers = ranLayers(d.layers);
  const names = layers.map((l) => l.name);
  const series = [
    {key: 'signal', label: 'signal', values: logRatios(layers.map((l) => l.signal)), dash: ''},
    {key: 'gradient', label: 'gradient G', values: logRatios(layers.map((l) => l.grad_q)), dash: ''},
  ];
  if (d.after && d.after.layers) {
    const pos = Object.fromEntries(names.map((n, i) => [n, i]));
    const after = new Array(names.length).fill(null).map(() => ({}));
    for (const l of d.after.layers) if (l.name in pos) after[pos[l.name]] = l;
    series.push({key: 'signal', label: 'signal after fix', values: logRatios(after.map((l) => l.signal)), dash: '6 4'});
    series.push({key: 'gradient', label: 'G after fix', values: logRatios(after.map((l) => l.grad_q)), dash: '6 4'});
  }
  const fired = sortedFindings(d.findings).filter((f) => f.severity !== 'info');
  const ys = series.flatMap((s) => s.values).filter((v) => v !== null);
  let lo = Math.min(Math.log10(BAND[0]) - 0.5, ...ys), hi = Math.max(Math.log10(BAND[1]) + 0.5, ...ys);
  lo = Math.floor(lo); hi = Math.ceil(hi);
  const n = Math.max(names.length, 1);
  const W = 760, left = 56, right = 190, top = 28, plotH = 240;
  const track = fired.length ? 16 * fired.length + 12 : 0;
  const labelH = Math.min(130, 14 + 5 * Math.max(...names.map((s) => s.length), 1));
  const H = top + plotH + track + labelH + 10;
  const pw = W - left - right;
  const x = (i) => left + (n === 1 ? pw / 2 : (i * pw) / (n - 1));
  const y = (v) => top + ((hi - v) / (hi - lo)) * plotH;
  const root = svg('svg', {class: 'depth-profile', viewBox: `0 0 ${W} ${H}`, width: '100%',
                           role: 'img', 'aria-label': 'depth profile'});
  root.append(svg('text', {x: left, y: 16, class: 'chart-title'},
                  'ratio to the first layer, log scale' + (d.after ? ' — solid: before, dashed: after --fix' : '')));
  root.append(svg('rect', {x: left, y: y(Math.log10(BAND[1])), width: pw,
                           height: y(Math.log10(BAND[0])) - y(Math.log10(BAND[1])), fill: COLORS.band}));
  const every = Math.max(1, Math.ceil((hi - lo) / 10));  // at most ~10 labelled decades
  for (let e = lo; e <= hi; e++) {
    if (e % every !== 0) continue;
    root.append(svg('line', {x1: left, x2: left + pw, y1: y(e), y2: y(e), class: e === 0 ? 'axis-one' : 'grid'}));
    root.append(svg('text', {x: left - 6, y: y(e) + 4, class: 'tick', 'text-anchor': 'end'}, `1e${e}`));
  }
  for (const s of series) {
    let path = '';
    s.values.forEach((v, i) => {
      if (v === null) return;
      path += `${path && s.values[i - 1] !== null ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
    });
    root.append(svg('path', {d: path, class: `curve ${s.key}`, stroke: COLORS[s.key], fill: 'none',
                             'stroke-width': 2, 'stroke-dasharray': s.dash}));
    s.values.forEach((v, i) => {
      if (v === null) return;
      const c = svg('circle', {cx: x(i), cy: y(v), r: 3.2, class: `point ${s.key}`, fill: s.dash ? 'white' : COLORS[s.key],
                               stroke: COLORS[s.key], 'data-layer': names[i]});
      c.append(svg('title', {}, `${names[i]} — ${s.label}: ${fmt(10 ** v)} × first layer`));
      root.append(c);
    });
  }
  // legend
  series.forEach((s, k) => {
    const ly = top + 10 + 18 * k;
    root.append(svg('line', {x1: left + pw + 12, x2: left + pw + 36, y1: ly, y2: ly, stroke: COLORS[s.key],
                             'stroke-width': 2, 'stroke-dasharray': s.dash}));
    root.append(svg('text', {x: left + pw + 40, y: ly + 4, class: 'legend'}, s.label));
  });
  root.append(svg('text', {x: left + pw + 12, y: top + 18 * series.length + 18, class: 'legend'},
                  `grey: [${fmt(BAND[0])}, ${fmt(BAND[1])}]`));
  // findings track: one row per fired finding, a mark at each layer it names
  const pos = Object.fromEntries(names.map((nm, i) => [nm, i]));
  fired.forEach((f, k) => {
    const ty = top + plotH + 16 + 16 * k;
    root.append(svg('text', {x: left + pw + 12, y: ty + 4, class: `legend ${f.severity}`}, `${f.code} ${f.name}`));
    for (const nm of f.layers) {
      if (!(nm in pos)) continue;
      const m = svg('rect', {x: x(pos[nm]) - 4, y: ty - 4, width: 8, height: 8, fill: COLORS[f.severity],
                             class: `mark ${f.severity}`, transform: f.severity === 'error' ? `rotate(45 ${x(pos[nm])} ${ty})` : ''});
      m.append(svg('title', {}, `${f.code} ${f.name} at ${nm}`));
      root.append(m);
    }
  });
  // names lie flat where they fit between the points, and slant where they would overlap
  const longest = Math.max(...names.map((s) => s.length), 1);
  const flat = 6.5 * longest + 6 < (n === 1 ? pw : pw / (n - 1));
  names.forEach((nm, i) => {
    const ly = top + plotH + track + 14;
    root.append(svg('text', flat ? {x: x(i), y: ly, class: 'layer-name', 'text-anchor': 'middle'}
                                 : {x: x(i), y: ly, class: 'layer-name', transform: `rotate(-50 ${x(i)} ${ly})`,
                                    'text-anchor': 'end'}, nm));
  });
  return el('section', {class: 'profile'}, el('h3', {}, 'Depth profile'), root);
}

// --- per-layer table -------------------------------------------------------------------------

const COLUMNS = [
  ['#', (l) => l.index], ['layer', (l) => l.name], ['type', (l) => l.type], ['fan in', (l) => l.fan_in],
  ['fan out', (l) => l.fan_out], ['activation', (l) => l.activation], ['signal', (l) => l.signal],
  ['q', (l) => l.q], ['G', (l) => l.grad_q], ['saturated', (l) => l.saturated], ['dead', (l) => l.dead],
  ['plan', (l, plan) => plan[l.name] ? `${plan[l.name].scheme}${plan[l.name].scheme !== 'keep' ? ' ×' + fmt(plan[l.name].gain) : ''}` : null],
];

function layerTable(d) {
  const plan = Object.fromEntries((d.plan || []).map((p) => [p.layer, p]));
  const rows = ranLayers(d.layers);
  const flagged = new Set(sortedFindings(d.findings).filter((f) => f.severity !== 'info').flatMap((f) => f.layers));
  const table = el('table', {class: 'layers'});
  let sortBy = 0, asc = true;
  const head = el('tr');
  const body = el('tbody');
  const draw = () => {
    const get = COLUMNS[sortBy][1];
    const sorted = [...rows].sort((a, b) => {
      const va = get(a, plan), vb = get(b, plan);
      if (va === vb) return 0;
      if (va === null || va === undefined) return 1;
      if (vb === null || vb === undefined) return -1;
      return (va < vb ? -1 : 1) * (asc ? 1 : -1);
    });
    body.replaceChildren(...sorted.map((l) => el('tr', {class: flagged.has(l.name) ? 'flagged' : ''},
      ...COLUMNS.map(([, g]) => el('td', {}, fmt(g(l, plan)))))));
    [...head.children].forEach((th, i) => th.classList.toggle('sorted', i === sortBy));
  };
  COLUMNS.forEach(([name], i) => head.append(el('th', {title: 'sort', onclick: () => {
    asc = sortBy === i ? !asc : true; sortBy = i; draw();
  }}, name)));
  table.append(el('thead', {}, head), body);
  draw();
  return el('section', {class: 'table'}, el('h3', {}, 'Layers'), el('div', {class: 'scroll'}, table));
}

// --- layers x steps heatmap ------------------------------------------------------------------

function diverging(v, span) {
  // blue (below the first layer) - white - orange (above), like the figures' PuOr
  const t = Math.max(-1, Math.min(1, v / span));
  const [r, g, b] = t < 0 ? [255 + t * (255 - 33), 255 + t * (255 - 102), 255 + t * (255 - 172)]
                          : [255 - t * (255 - 230), 255 - t * (255 - 97), 255 - t * (255 - 1)];
  return `rgb(${r | 0},${g | 0},${b | 0})`;
}

function sequential(v) {
  const t = Math.max(0, Math.min(1, v));
  return `rgb(${(255 - t * 200) | 0},${(255 - t * 150) | 0},${(255 - t * 60) | 0})`;
}

function heatmapPanel(h, key, title) {
  const log = key === 'signal' || key === 'grad_q';
  const steps = h.steps, names = h.layers;
  let cells = h[key];
  if (log) {  // log10 of each layer over the first layer at the same step
    cells = names.map((_, i) => steps.map((_, j) => {
      const col = names.map((__, r) => h[key][r][j]);
      const first = col.find(positive);
      const v = h[key][i][j];
      return first !== undefined && positive(v) ? Math.log10(v / first) : null;
    }));
  }
  const vals = cells.flat().filter((v) => v !== null);
  if (!vals.length) return null;
  const span = log ? Math.max(2, ...vals.map(Math.abs)) : 1;
  const left = 12 + 6.2 * Math.max(...names.map((s) => s.length)), top = 22;
  const cw = Math.max(8, Math.min(36, 560 / steps.length)), ch = Math.max(8, Math.min(18, 360 / names.length));
  const W = left + cw * steps.length + 90, H = top + ch * names.length + 34;
  const root = svg('svg', {class: `heatmap heatmap-${key}`, viewBox: `0 0 ${W} ${H}`, width: Math.min(W, 720)});
  root.append(svg('text', {x: 0, y: 14, class: 'chart-title'}, title));
  names.forEach((nm, i) => {
    if (names.length <= 40 || i % Math.ceil(names.length / 40) === 0) {
      root.append(svg('text', {x: left - 4, y: top + ch * i + ch / 2 + 4, class: 'tick', 'text-anchor': 'end'}, nm));
    }
    steps.forEach((s, j) => {
      const v = cells[i][j];
      const r = svg('rect', {x: left + cw * j, y: top + ch * i, width: cw - 1, height: ch - 1, class: 'cell',
                             fill: v === null ? '#f4f4f4' : (log ? diverging(v, span) : sequential(v))});
      r.append(svg('title', {}, `${nm} at step ${s}: ${v === null ? 'not measured' : (log ? `${fmt(10 ** v)} × first layer` : fmt(v))}`));
      root.append(r);
    });
  });
  const every = Math.ceil(steps.length / 12);
  steps.forEach((s, j) => {
    if (j % every === 0) root.append(svg('text', {x: left + cw * j + cw / 2, y: top + ch * names.length + 14,
                                                  class: 'tick', 'text-anchor': 'middle'}, s));
  });
  root.append(svg('text', {x: left + cw * steps.length + 8, y: top + 10, class: 'legend'},
                  log ? `±${fmt(span)} decades` : '0 … 1'));
  return root;
}

function heatmapView(h) {
  const box = el('section', {class: 'history'}, el('h3', {}, 'Layers × steps'));
  const panels = [
    ['signal', 'log10 signal / first layer'], ['grad_q', 'log10 gradient G / first layer'],
    ['saturated', 'saturated share'], ['dead', 'dead-unit share'],
  ].map(([k, t]) => heatmapPanel(h, k, t)).filter(Boolean);
  box.append(...panels);
  box.append(el('p', {class: 'hint'}, 'Blue: below the first layer, orange: above; a row that changes colour is a layer that changed during training.'));
  return box;
}

// --- one run ---------------------------------------------------------------------------------

async function runPanel(run, info) {
  const panel = el('div', {class: 'run', 'data-run': run});
  const body = el('div', {class: 'run-body'});
  const select = el('select', {class: 'step-select', 'aria-label': `step of ${run}`});
  for (const s of info.steps) select.append(el('option', {value: s}, `step ${s}`));
  select.value = String(info.steps[info.steps.length - 1]);
  const badge = el('span', {class: 'badge'});
  const kind = info.source === 'check' ? `check${info.role ? ' · ' + info.role : ''}` : (info.source || '');
  panel.append(el('div', {class: 'run-head'}, el('h2', {}, run), el('span', {class: 'kind'}, kind), badge,
                  el('label', {}, 'step ', select)), body);
  let history = null;
  const show = async () => {
    const d = await getJSON(`./diagnosis?run=${encodeURIComponent(run)}&step=${select.value}`);
    const errs = (d.findings || []).filter((f) => f.severity === 'error').length;
    const warns = (d.findings || []).filter((f) => f.severity === 'warning').length;
    badge.className = `badge ${errs ? 'error' : warns ? 'warning' : 'ok'}`;
    badge.textContent = errs || warns ? `${errs} error${errs === 1 ? '' : 's'}, ${warns} warning${warns === 1 ? '' : 's'}` : 'healthy';
    panel.dataset.step = select.value;
    const parts = [findingsView(d), depthProfile(d), layerTable(d)];
    if (info.steps.length > 1) {
      history = history || await getJSON(`./history?run=${encodeURIComponent(run)}`);
      parts.push(heatmapView(history));
    }
    body.replaceChildren(...parts);
  };
  select.addEventListener('change', () => show().catch((e) => body.replaceChildren(el('p', {class: 'failure'}, String(e)))));
  await show();
  return panel;
}

export async function render() {
  document.head.append(el('link', {rel: 'stylesheet', href: './style.css'}));
  const pick = el('div', {class: 'pick'}, el('b', {}, 'Runs: '));
  const runs = el('div', {class: 'runs'});
  document.body.append(el('header', {}, el('h1', {}, 'initdoctor'), pick), runs, el('aside', {id: 'explain'}));
  let listing;
  try {
    listing = await getJSON('./runs');
  } catch (e) {
    runs.append(el('p', {class: 'failure'}, String(e)));
    return;
  }
  BAND = listing.band || BAND;
  FIXES = listing.fixes || {};
  const names = Object.keys(listing.runs);
  if (!names.length) {
    runs.append(el('p', {}, 'No initdoctor data yet: run initdoctor.watch(...) or initdoctor check --tensorboard DIR.'));
    return;
  }
  const panels = {};
  for (const run of names) {
    const box = el('input', {type: 'checkbox', checked: '', 'data-run': run});
    box.addEventListener('change', () => { panels[run].hidden = !box.checked; });
    pick.append(el('label', {class: 'run-pick'}, box, ' ', run));
  }
  for (const run of names) {
    try {
      panels[run] = await runPanel(run, listing.runs[run]);
    } catch (e) {
      panels[run] = el('div', {class: 'run failure'}, `${run}: ${e}`);
    }
    runs.append(panels[run]);
  }
  document.body.dataset.ready = 'true';
}
