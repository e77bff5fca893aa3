// Open the example workflows in ComfyUI's browser UI, check that every node is known, and save screenshots.
//
// Usage (ComfyUI must already be running with this pack linked into custom_nodes/):
//
//   NODE_PATH=/path/to/node_modules CHROMIUM=/usr/bin/chromium \
//     node scripts/screenshot_workflows.mjs --url http://127.0.0.1:8190 --out docs
//
// Options:
//   --url URL          ComfyUI address (default http://127.0.0.1:8190)
//   --out DIR          where the PNGs go (default docs); workflow_<name>.png, where <name> is the
//                      workflow file name without "fantasyportrait_" and ".json"
//   --workflows A,B    workflow files (default: every workflows/*.json)
//   --width/--height   viewport (default 1920x1080)
//   --run NAME=FILE,.. run workflow NAME (e.g. single) before the screenshot: the UI queues it as a
//                      user would (app.queuePrompt), the request is answered with the API prompt in
//                      FILE instead (scripts/check_in_comfyui.py writes these: the same graph with
//                      tiny stand-in models), and the script waits until it has run, so previews,
//                      shown text and grown nodes are in the picture
//
// Needs: npm "playwright-core" (found through NODE_PATH, e.g. `npm install playwright-core` in some
// folder outside the pack and NODE_PATH=<that folder>/node_modules) and a Chromium executable given by
// the CHROMIUM env var (default /usr/bin/chromium). Nothing is downloaded: playwright-core ships no
// browser, and every request that does not go to the ComfyUI host is aborted. The negative prompt is
// Chinese: without a CJK font (Debian: fonts-wqy-microhei) it shows as boxes in the screenshot.
//
// For each workflow it runs app.loadGraphData(json) and reports: dialogs/toasts about missing nodes
// or models, node types that LiteGraph does not know, nodes with has_errors or that are placeholders
// for a missing type, links that did not attach, widget values that changed on load or are not in
// their combo's options, required inputs left unconnected, and whether app.graphToPrompt() works.
// It then fits the view to the whole graph and saves a screenshot. Layout: overlapping nodes are
// found from the node rectangles LiteGraph reports (title bar included), after the run when --run
// is given; any overlap, and any node the frontend had to enlarge beyond its saved size, is listed,
// and an overlap makes the exit status 1.
// Model files named in the workflows need not exist for the node check; to make the combos show the
// names, start ComfyUI with --extra-model-paths-config pointing at a folder of empty placeholder files.
// Exit status: 0 if every workflow is clean, 1 otherwise.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const ROOT = path.dirname(path.dirname(fileURLToPath(import.meta.url)));

function parseArgs(argv) {
  const a = {
    url: 'http://127.0.0.1:8190',
    out: 'docs',
    workflows: fs.readdirSync(path.join(ROOT, 'workflows')).filter((f) => f.endsWith('.json')).sort()
      .map((f) => path.join('workflows', f)),
    width: 1920,
    height: 1080,
    run: {},
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = argv[i + 1];
    if (k === '--url') { a.url = v; i++; }
    else if (k === '--out') { a.out = v; i++; }
    else if (k === '--workflows') { a.workflows = v.split(','); i++; }
    else if (k === '--width') { a.width = Number(v); i++; }
    else if (k === '--height') { a.height = Number(v); i++; }
    else if (k === '--run') {
      a.run = Object.fromEntries(v.split(',').map((kv) => kv.split('=')));
      i++;
    }
    else if (k === '-h' || k === '--help') {
      console.log('node scripts/screenshot_workflows.mjs --url http://127.0.0.1:8190 --out docs [--workflows a.json,b.json]');
      process.exit(0);
    } else { console.error(`unknown argument ${k}`); process.exit(2); }
  }
  return a;
}

const args = parseArgs(process.argv.slice(2));
const resolve = (p) => (path.isAbsolute(p) ? p : path.resolve(process.cwd(), p));
const host = new URL(args.url).host;

// Text of visible dialogs and toasts.
async function overlays(page) {
  return page.evaluate(() => {
    const vis = (e) => e.offsetParent !== null || getComputedStyle(e).position === 'fixed';
    return {
      dialogs: [...document.querySelectorAll('.p-dialog')].filter(vis).map((d) => d.innerText.trim().replace(/\s+/g, ' ').slice(0, 400)),
      toasts: [...document.querySelectorAll('.p-toast-message')].map((d) => d.innerText.trim().replace(/\s+/g, ' ').slice(0, 400)),
    };
  });
}

async function closeDialogs(page) {
  for (let i = 0; i < 5; i++) {
    const n = await page.evaluate(() => document.querySelectorAll('.p-dialog').length);
    if (!n) return;
    await page.evaluate(() => { try { window.app.extensionManager.dialog.closeDialog(); } catch (e) { /* older frontends */ } });
    await page.keyboard.press('Escape');
    await page.waitForTimeout(300);
  }
}

// Everything checked inside the page for one loaded workflow.
async function inspect(page, wf) {
  return page.evaluate(async (wf) => {
    const app = window.app;
    const LG = window.LiteGraph;
    const graph = app.graph;
    const res = { nodes: 0, links: 0, unknownTypes: [], errorNodes: [], placeholders: [], badLinks: [],
      widgetDiffs: [], comboNotInOptions: [], unlinkedRequired: [], prompt: null, promptError: null };
    const nodes = graph._nodes || graph.nodes;
    res.nodes = nodes.length;
    const types = [...new Set(wf.nodes.map((n) => n.type))];
    res.unknownTypes = types.filter((t) => !LG.registered_node_types[t]);
    const getLink = (id) => (graph.links instanceof Map ? graph.links.get(id) : graph.links[id]);

    for (const n of nodes) {
      const tag = `#${n.id} ${n.type}`;
      if (n.has_errors) res.errorNodes.push(tag);
      const ctor = n.constructor;
      const virtual = n.isVirtualNode || (ctor.prototype && ctor.prototype.isVirtualNode); // Note, Reroute: frontend-only
      if (!LG.registered_node_types[n.type] || (!ctor.nodeData && !virtual) || ctor === LG.LGraphNode) res.placeholders.push(tag);
      // combo values that are not among the options
      for (const w of n.widgets || []) {
        if (w.type === 'combo') {
          let vals = w.options && w.options.values;
          if (typeof vals === 'function') vals = vals(w, n);
          if (Array.isArray(vals) && !vals.includes(w.value)) res.comboNotInOptions.push(`${tag}.${w.name}=${JSON.stringify(w.value)}`);
        }
      }
      // required non-widget inputs must be linked
      const req = (ctor.nodeData && ctor.nodeData.input && ctor.nodeData.input.required) || {};
      for (const inp of n.inputs || []) {
        if (inp.link == null && req[inp.name] && !inp.widget) res.unlinkedRequired.push(`${tag}.${inp.name}`);
      }
    }
    // widget values as saved vs. as loaded
    for (const jn of wf.nodes) {
      const n = graph.getNodeById(jn.id);
      if (!n) { res.errorNodes.push(`#${jn.id} ${jn.type} (not in graph)`); continue; }
      const got = n.serialize().widgets_values;
      if (JSON.stringify(got ?? []) !== JSON.stringify(jn.widgets_values ?? [])) {
        res.widgetDiffs.push(`#${jn.id} ${jn.type}: saved ${JSON.stringify(jn.widgets_values)} loaded ${JSON.stringify(got)}`);
      }
    }
    // every link attached at both ends with matching types
    for (const [id, o, os, t, ts, type] of wf.links) {
      const l = getLink(id);
      const tn = graph.getNodeById(t);
      const on = graph.getNodeById(o);
      const problems = [];
      if (!l) problems.push('missing in graph');
      else if (l.origin_id !== o || l.origin_slot !== os || l.target_id !== t || l.target_slot !== ts) problems.push('ends differ');
      if (!tn || !tn.inputs || !tn.inputs[ts] || tn.inputs[ts].link !== id) problems.push('target input not linked');
      if (!on || !on.outputs || !on.outputs[os] || !(on.outputs[os].links || []).includes(id)) problems.push('origin output not linked');
      else if (tn && tn.inputs && tn.inputs[ts]) {
        const ot = on.outputs[os].type, it = tn.inputs[ts].type;
        if (!LG.isValidConnection(ot, it)) problems.push(`type ${ot} -> ${it}`);
      }
      if (problems.length) res.badLinks.push(`link ${id} (#${o}:${os} -> #${t}:${ts} ${type}): ${problems.join(', ')}`);
      else res.links++;
    }
    try {
      const p = await app.graphToPrompt();
      const out = p.output;
      const ids = Object.keys(out);
      const dangling = [];
      for (const id of ids) {
        for (const [k, v] of Object.entries(out[id].inputs)) {
          if (Array.isArray(v) && v.length === 2 && typeof v[1] === 'number' && !out[String(v[0])]) dangling.push(`${id}.${k}->${v[0]}`);
        }
      }
      res.prompt = { nodes: ids.length, classTypes: [...new Set(ids.map((i) => out[i].class_type))].sort(), dangling };
    } catch (e) {
      res.promptError = String((e && e.stack) || e);
    }
    return res;
  }, wf);
}

async function fitView(page) {
  await page.evaluate(() => {
    const app = window.app;
    const canvas = app.canvas;
    if (canvas.deselectAll) canvas.deselectAll();
    const nodes = app.graph._nodes || app.graph.nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
      const b = n.getBounding(); // [x, y, w, h] including the title bar
      x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
      x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
    }
    for (const g of app.graph._groups || app.graph.groups || []) {
      const b = g._bounding || g.boundingRect || g.bounding;
      if (b) { x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
    }
    // canvas size in CSS pixels; leave room for the zoom controls at the bottom
    const r = canvas.canvas.getBoundingClientRect();
    const m = 24, mb = 70;
    const scale = Math.min((r.width - 2 * m) / (x1 - x0), (r.height - m - mb) / (y1 - y0), 1.0);
    const ds = canvas.ds;
    ds.scale = scale;
    ds.offset[0] = (r.width / scale - (x1 - x0)) / 2 - x0;
    ds.offset[1] = m / scale - y0;
    // draw titles and widgets even when zoomed out (screenshot only; not saved to settings)
    if ('_lowQualityZoomThreshold' in canvas) canvas._lowQualityZoomThreshold = 0.05;
    if ('low_quality_zoom_threshold' in canvas) canvas.low_quality_zoom_threshold = 0.05;
    app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(1500); // image/video previews
  await page.evaluate(() => window.app.graph.setDirtyCanvas(true, true));
  await page.waitForTimeout(300);
  return page.evaluate(() => window.app.canvas.ds.scale);
}

// Queue the loaded graph from the UI and wait until the server has run it (see --run).
async function runWorkflow(page, apiPrompt, arm, result) {
  arm(apiPrompt);
  const t0 = Date.now();
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  let q = null;
  while (!(q = result()) && Date.now() - t0 < 30000) await page.waitForTimeout(200);
  if (!q || !q.prompt_id) return { status: 'not queued', seconds: (Date.now() - t0) / 1000, detail: JSON.stringify(q).slice(0, 500), outputs: 0 };
  for (;;) {
    const h = await (await fetch(`${args.url}/history/${q.prompt_id}`)).json();
    const entry = h[q.prompt_id];
    const st = entry && entry.status;
    if (st && (st.completed || st.status_str === 'error' || st.status_str === 'success')) {
      const err = (st.messages || []).find((m) => m[0] === 'execution_error');
      await page.waitForTimeout(3000); // previews, videos and shown text render
      return { status: st.status_str, seconds: (Date.now() - t0) / 1000,
        detail: err ? String(err[1].exception_message).slice(0, 500) : '', outputs: Object.keys(entry.outputs || {}).length };
    }
    if (Date.now() - t0 > 1800000) return { status: 'timeout', seconds: (Date.now() - t0) / 1000, outputs: 0 };
    await page.waitForTimeout(1000);
  }
}

// Node rectangles as LiteGraph has them now (title bar included): overlaps, nodes outside the group
// they were saved in, nodes larger than saved.
async function checkLayout(page, wf) {
  return page.evaluate((wf) => {
    const graph = window.app.graph;
    const nodes = graph._nodes || graph.nodes;
    const bs = nodes.map((n) => [n, n.getBounding()]);
    const tag = (n) => `#${n.id} ${n.title}`;
    const overlaps = [];
    for (let i = 0; i < bs.length; i++) for (let j = i + 1; j < bs.length; j++) {
      const [a, ba] = bs[i], [b, bb] = bs[j];
      const w = Math.min(ba[0] + ba[2], bb[0] + bb[2]) - Math.max(ba[0], bb[0]);
      const h = Math.min(ba[1] + ba[3], bb[1] + bb[3]) - Math.max(ba[1], bb[1]);
      if (w > 1 && h > 1) overlaps.push(`${tag(a)} / ${tag(b)} (${Math.round(w)}x${Math.round(h)})`);
    }
    const groups = (wf.groups || []).map((g) => g.bounding);
    const saved = Object.fromEntries(wf.nodes.map((n) => [n.id, n]));
    const outsideGroup = [];
    const grown = [];
    for (const [n, b] of bs) {
      const s = saved[n.id];
      if (!s) continue;
      const home = groups.find((g) => g[0] <= s.pos[0] && s.pos[0] < g[0] + g[2] && g[1] <= s.pos[1] && s.pos[1] < g[1] + g[3]);
      if (home && (b[0] < home[0] || b[1] < home[1] || b[0] + b[2] > home[0] + home[2] + 1 || b[1] + b[3] > home[1] + home[3] + 1)) {
        outsideGroup.push(`${tag(n)} (${b.map(Math.round).join(',')} vs group ${home.join(',')})`);
      }
      if (n.size[0] > s.size[0] + 1 || n.size[1] > s.size[1] + 1) {
        grown.push(`${tag(n)} ${s.size.map(Math.round).join('x')} -> ${[...n.size].map(Math.round).join('x')}`);
      }
    }
    return { overlaps, outsideGroup, grown };
  }, wf);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-quic'],
});
let allOk = true;
try {
  const page = await browser.newPage({ viewport: { width: args.width, height: args.height } });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e).slice(0, 300)));
  // Only the ComfyUI host; anything else (update checks, CDNs) is aborted.
  await page.route((u) => {
    const s = u.toString();
    if (s.startsWith('data:') || s.startsWith('blob:')) return false;
    try { return new URL(s).host !== host; } catch (e) { return true; }
  }, (r) => r.abort());

  // --run: the UI's own queue request is answered with the check's API prompt for this graph.
  let pendingPrompt = null;
  let queued = null;
  await page.route((u) => { try { const x = new URL(u.toString()); return x.host === host && x.pathname.endsWith('/prompt'); } catch (e) { return false; } },
    async (route) => {
      const req = route.request();
      if (req.method() !== 'POST' || !pendingPrompt) return route.continue();
      const body = JSON.parse(req.postData() || '{}');
      body.prompt = pendingPrompt;
      pendingPrompt = null;
      const resp = await route.fetch({ postData: JSON.stringify(body) });
      const text = await resp.text();
      try { queued = JSON.parse(text); } catch (e) { queued = { error: text.slice(0, 500) }; }
      await route.fulfill({ response: resp, body: text });
    });

  await page.goto(args.url, { waitUntil: 'domcontentloaded', timeout: 60000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && window.LiteGraph.registered_node_types && window.LiteGraph.registered_node_types.FantasyPortraitSampler
    && window.app.extensionManager, null, { timeout: 90000 });
  await page.waitForTimeout(2000);
  await closeDialogs(page); // e.g. the first-run template browser
  // keep the minimap from covering nodes (page-local CSS; no setting is changed)
  await page.addStyleTag({ content: '.minimap-main-container { display: none !important; }' });

  fs.mkdirSync(resolve(args.out), { recursive: true });
  for (const wfPath of args.workflows) {
    const file = path.isAbsolute(wfPath) || fs.existsSync(resolve(wfPath)) ? resolve(wfPath) : path.join(ROOT, wfPath);
    const wf = JSON.parse(fs.readFileSync(file, 'utf8'));
    const name = path.basename(file, '.json').replace(/^fantasyportrait_/, '');
    await page.evaluate(() => document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach((b) => b.click()));
    const errBefore = pageErrors.length;
    let loadError = null;
    try {
      await page.evaluate(async (wf) => { await window.app.loadGraphData(structuredClone(wf)); }, wf);
    } catch (e) { loadError = String(e).slice(0, 500); }
    await page.waitForTimeout(1000);
    const ov = await overlays(page);
    const res = await inspect(page, wf);
    const missingMsgs = [...ov.dialogs, ...ov.toasts].filter((t) => /missing|not found|not installed/i.test(t));
    await closeDialogs(page);
    let run = null;
    if (args.run[name]) {
      run = await runWorkflow(page, JSON.parse(fs.readFileSync(resolve(args.run[name]), 'utf8')),
        (p) => { pendingPrompt = p; queued = null; }, () => queued);
      await closeDialogs(page);
    }
    const scale = await fitView(page);
    const layout = await checkLayout(page, wf);
    const png = path.join(resolve(args.out), `workflow_${name}.png`);
    await page.screenshot({ path: png, fullPage: true });

    const ok = !loadError && !missingMsgs.length && !res.unknownTypes.length && !res.errorNodes.length
      && !res.placeholders.length && !res.badLinks.length && !res.unlinkedRequired.length && !res.promptError
      && res.prompt && !res.prompt.dangling.length && !layout.overlaps.length && !layout.outsideGroup.length
      && (!run || run.status === 'success');
    allOk = allOk && ok;
    console.log(`== ${path.relative(process.cwd(), file)}: ${ok ? 'OK' : 'PROBLEMS'}`);
    console.log(`   nodes ${res.nodes} (file ${wf.nodes.length}), links attached ${res.links}/${wf.links.length}`);
    console.log(`   load error: ${loadError || 'none'}`);
    console.log(`   missing-node dialogs/toasts: ${missingMsgs.length ? missingMsgs.join(' | ') : 'none'}`);
    if (ov.dialogs.length || ov.toasts.length) console.log(`   other dialogs/toasts: ${JSON.stringify([...ov.dialogs, ...ov.toasts])}`);
    console.log(`   unknown types: ${res.unknownTypes.join(', ') || 'none'}`);
    console.log(`   nodes with errors: ${res.errorNodes.join(', ') || 'none'}; placeholders: ${res.placeholders.join(', ') || 'none'}`);
    console.log(`   bad links: ${res.badLinks.join('; ') || 'none'}`);
    console.log(`   unconnected required inputs: ${res.unlinkedRequired.join(', ') || 'none'}`);
    console.log(`   widget values changed on load: ${res.widgetDiffs.join('; ') || 'none'}`);
    console.log(`   combo values not in options: ${res.comboNotInOptions.join(', ') || 'none'}`);
    if (run) console.log(`   run: ${run.status} in ${run.seconds.toFixed(1)} s${run.detail ? ' ' + run.detail : ''}; outputs shown by ${run.outputs} node(s)`);
    console.log(`   overlapping nodes${run ? ' after the run' : ''} (from node rectangles): ${layout.overlaps.join('; ') || 'none'}`);
    console.log(`   nodes leaving their group: ${layout.outsideGroup.join('; ') || 'none'}`);
    console.log(`   nodes the frontend enlarged beyond their saved size: ${layout.grown.join('; ') || 'none'}`);
    console.log(`   graphToPrompt: ${res.promptError ? 'ERROR ' + res.promptError
      : `ok, ${res.prompt.nodes} nodes${res.prompt.dangling.length ? ', dangling ' + res.prompt.dangling.join(',') : ''}`}`);
    if (pageErrors.length > errBefore) console.log(`   page errors: ${pageErrors.slice(errBefore).join(' | ')}`);
    console.log(`   screenshot: ${png} (zoom ${scale.toFixed(2)})`);
  }
} finally {
  await browser.close();
}
process.exit(allOk ? 0 : 1);
