// Sigma console: plain JavaScript, no build step, nothing fetched from another origin.
// Signed in by POST /ui/session (an HttpOnly cookie: this script never holds the token after
// it sent it); live by one server-sent stream, /v1/console?watch=true, which brings a "state"
// message (pool, nodes with their instances, apps) after each change, and every event.
// Every value from the cluster is put in the page as text (textContent), never as HTML.
"use strict";

const S = {
  me: null,            // {name, role, csrf}
  state: null,         // the newest state message
  events: [],          // newest last, at most MAX_EVENTS
  history: [],         // pool samples, oldest first
  every: 15,           // seconds between two samples
  stream: null,        // the EventSource
  label: "",           // the label key the pool page groups by
  filter: "",          // the events page's filter
  detail: null,        // what the open app or instance page fetched
  detailKey: "",
  detailAt: 0,
  logs: {},            // container -> log tail text (null: not served)
  logsAt: 0,
};
const MAX_EVENTS = 1000;
const DETAIL_EVERY = 2000;  // ms between two fetches of an open app or instance page
const LOGS_EVERY = 5000;
const LOG_LINES = 100;
const SVG = "http://www.w3.org/2000/svg";
const FIGURES = ["allocatable", "requested", "limits", "used"];
const $ = (id) => document.getElementById(id);

// -- DOM ------------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  return fill(el, attrs, kids);
}

function s(tag, attrs, ...kids) {
  return fill(document.createElementNS(SVG, tag), attrs, kids);
}

function fill(el, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function table(headers, rows, attrs) {
  return h("div", {class: "scroll"}, h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {class: x.num ? "num" : null},
      x.name || x)))),
    h("tbody", {}, rows)));
}

function badge(text) {
  return h("span", {class: `badge ${text}`}, text || "—");
}

// -- numbers --------------------------------------------------------------------------------

function milli(r) {  // millicores of a {cpu_m} or {cpu: cores} figure, null when absent
  if (!r) return null;
  if (typeof r.cpu_m === "number") return r.cpu_m;
  if (typeof r.cpu === "number") return Math.round(r.cpu * 1000);
  return null;
}

function bytesOf(r) {
  return r && typeof r.memory === "number" ? r.memory : null;
}

function cores(m) {
  if (m === null || m === undefined) return "—";
  const c = m / 1000;
  return `${Number.isInteger(c) ? c : c.toFixed(2)} CPU`;
}

function size(b) {
  if (b === null || b === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, v = b;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString([], {hour12: false}) : "—";
}

function ago(t) {
  if (!t) return "—";
  const d = Date.now() / 1000 - t;
  if (d < 60) return `${Math.max(0, Math.round(d))}s ago`;
  if (d < 3600) return `${Math.round(d / 60)}m ago`;
  return `${Math.round(d / 3600)}h ago`;
}

// -- talking to the master ------------------------------------------------------------------

class SignedOut extends Error {}

async function get(path, text) {
  const r = await fetch(path, {credentials: "same-origin", cache: "no-store",
    headers: {Accept: text ? "text/plain" : "application/json"}});
  if (r.status === 401) { signedOut(); throw new SignedOut(path); }
  if (!r.ok) {
    const err = new Error(`${path}: ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return text ? r.text() : r.json();
}

async function boot() {
  $("signin").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => { S.detail = null; S.detailKey = ""; render(); });
  try {
    S.me = await get("/ui/session");
  } catch (e) {
    if (!(e instanceof SignedOut)) showError(e);
    return;
  }
  start();
}

async function signIn(ev) {
  ev.preventDefault();
  const field = $("token");
  $("signin-error").textContent = "";
  const r = await fetch("/ui/session", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: field.value.trim()})});
  field.value = "";
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    $("signin-error").textContent = (body.error && body.error.message) || `refused (${r.status})`;
    return;
  }
  S.me = body;
  start();
}

async function signOut() {
  await fetch("/ui/session", {method: "DELETE", credentials: "same-origin",
    headers: {"X-Sigma-CSRF": S.me ? S.me.csrf : ""}}).catch(() => null);
  signedOut();
}

function signedOut() {
  if (S.stream) S.stream.close();
  Object.assign(S, {me: null, state: null, stream: null, events: [], history: []});
  $("signin").hidden = false;
  $("nav").hidden = true;
  $("live").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("main").replaceChildren();
  $("token").focus();
}

async function start() {
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("live").hidden = false;
  $("who").textContent = `${S.me.name} (${S.me.role})`;
  try {
    const hist = await get("/v1/console/history");
    S.history = hist.items;
    S.every = hist.every;
  } catch (e) {
    if (e instanceof SignedOut) return;
  }
  connect();
  render();
}

function connect() {
  if (S.stream) S.stream.close();
  live("connecting…", true);
  const es = new EventSource("/v1/console?watch=true", {withCredentials: true});
  S.stream = es;
  es.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.type === "state") onState(msg);
    else if (msg.type === "event") onEvent(msg.event);
  };
  es.onerror = async () => {
    live("reconnecting…", true);
    if (es.readyState !== EventSource.CLOSED) return;  // the browser retries by itself
    try {
      await get("/ui/session");  // still signed in: the stream was refused or ended
      setTimeout(() => { if (S.me && S.stream === es) connect(); }, 2000);
    } catch (e) { /* signedOut() ran */ }
  };
}

function live(text, down) {
  const el = $("live");
  el.textContent = text;
  el.classList.toggle("down", !!down);
}

function onState(msg) {
  S.state = msg;
  live(`live · revision ${msg.revision}`, false);
  const last = S.history[S.history.length - 1];
  if (!last || msg.at - last.at >= S.every) {
    S.history.push(sampleOf(msg.pool, msg.at));
    if (S.history.length > 3600 / S.every) S.history.shift();
  }
  render();
}

function onEvent(e) {
  S.events.push(e);
  if (S.events.length > MAX_EVENTS) S.events.splice(0, S.events.length - MAX_EVENTS);
  const page = route()[0];
  if (page === "events" || page === "instances") render();
}

function sampleOf(pool, at) {
  const pick = (x) => Object.fromEntries(FIGURES.filter((f) => x[f]).map((f) => [f, x[f]]));
  const byLabel = {};
  for (const [k, vals] of Object.entries(pool.by_label || {})) {
    byLabel[k] = Object.fromEntries(Object.entries(vals).map(([v, x]) => [v, pick(x)]));
  }
  return {at, ...pick(pool), by_label: byLabel};
}

// -- pages ----------------------------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean)
    .map(decodeURIComponent);
  return parts.length ? parts : ["pool"];
}

function render() {
  if (!S.me) return;
  const [page, ...rest] = route();
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("on", a.dataset.page === page ||
      (a.dataset.page === "apps" && page === "instances"));
  }
  const main = $("main");
  if (!S.state) { main.replaceChildren(h("p", {class: "mute"}, "Waiting for the master…")); return; }
  const pages = {pool: poolPage, nodes: nodesPage, apps: rest.length ? appPage : appsPage,
    instances: instancePage, events: eventsPage};
  const build = pages[page] || poolPage;
  const y = window.scrollY;
  const focused = document.activeElement && document.activeElement.id;
  main.replaceChildren(...[build(...rest)].flat());
  if (focused && $(focused)) {
    const el = $(focused);
    el.focus();
    if (el.setSelectionRange) el.setSelectionRange(el.value.length, el.value.length);
  }
  window.scrollTo(0, y);
}

function showError(e) {
  $("main").replaceChildren(h("p", {class: "error"}, String(e.message || e)));
}

// pool

function figureRow(scope, name, key, f, summary) {
  return h("tr", {}, h("th", {}, name), ["allocatable", "schedulable", "requested", "limits",
    "used", "free"].map((part) => {
    const v = summary[part] ? f(summary[part]) : null;
    return h("td", {class: "num", "data-scope": scope, "data-figure": `${part}.${key}`,
      "data-raw": v === null ? "" : v}, key === "cpu_m" ? cores(v) : size(v));
  }));
}

function figures(scope, summary) {
  return table(["", ...["allocatable", "schedulable", "requested", "limits", "used", "free"]
    .map((n) => ({name: n, num: true}))], [
    figureRow(scope, "CPU", "cpu_m", milli, summary),
    figureRow(scope, "Memory", "memory", bytesOf, summary),
  ]);
}

function legend() {
  return h("div", {class: "legend"}, FIGURES.map((f) => h("span", {},
    h("span", {class: `key ${f}`}), f)));
}

function bars(groups, get, fmt) {
  // groups: [[label, summary]]: one row of four bars each, scaled to the largest figure
  const rowH = 44, labelW = 90, w = 420;
  let most = 1;
  for (const [, x] of groups) for (const f of FIGURES) most = Math.max(most, get(x[f]) || 0);
  const svg = s("svg", {viewBox: `0 0 ${w} ${groups.length * rowH + 4}`, role: "img"});
  groups.forEach(([label, x], i) => {
    const y = i * rowH + 2;
    svg.append(s("text", {x: 0, y: y + 24}, label));
    FIGURES.forEach((f, j) => {
      const v = get(x[f]);
      const len = v === null ? 0 : Math.max(1, (w - labelW - 90) * v / most);
      const r = s("rect", {x: labelW, y: y + j * 10, width: len, height: 8, class: f});
      r.append(s("title", {}, `${label} ${f}: ${v === null ? "—" : fmt(v)}`));
      svg.append(r, s("text", {x: labelW + len + 4, y: y + j * 10 + 8},
        v === null ? "—" : fmt(v)));
    });
  });
  return svg;
}

function lines(samples, get, fmt) {
  const w = 420, ht = 150, pad = 40, now = Date.now() / 1000, from = now - 3600;
  let most = 1;
  for (const p of samples) for (const f of FIGURES) most = Math.max(most, get(p[f]) || 0);
  const x = (t) => pad + (w - pad - 4) * (t - from) / 3600;
  const y = (v) => ht - 18 - (ht - 30) * v / most;
  const svg = s("svg", {viewBox: `0 0 ${w} ${ht}`, role: "img"},
    s("line", {x1: pad, y1: ht - 18, x2: w - 4, y2: ht - 18, class: "axis"}),
    s("text", {x: 0, y: 14}, fmt(most)), s("text", {x: 0, y: ht - 20}, "0"),
    s("text", {x: pad, y: ht - 4}, "-60 min"), s("text", {x: w - 30, y: ht - 4}, "now"));
  for (const f of FIGURES) {
    const pts = samples.filter((p) => p.at >= from && get(p[f]) !== null)
      .map((p) => `${x(p.at).toFixed(1)},${y(get(p[f])).toFixed(1)}`);
    if (pts.length) svg.append(s("polyline", {points: pts.join(" "), class: f}));
  }
  return svg;
}

function poolPage() {
  const pool = S.state.pool;
  const keys = Object.keys(pool.by_label || {});
  if (!keys.includes(S.label)) S.label = keys[0] || "";
  const out = [h("h1", {}, `Pool: ${pool.nodes} Ready nodes, ${pool.instances} instances`),
    figures("overall", pool), legend(),
    h("div", {class: "charts"},
      h("div", {class: "card"}, h("h3", {}, "CPU, the last hour"),
        lines(S.history, milli, cores)),
      h("div", {class: "card"}, h("h3", {}, "Memory, the last hour"),
        lines(S.history, bytesOf, size)))];
  if (!keys.length) {
    out.push(h("p", {class: "mute"}, "No node has labels: nothing to group by."));
    return out;
  }
  out.push(h("h2", {}, "By label"), h("div", {class: "tabs"}, keys.map((k) =>
    h("button", {type: "button", class: k === S.label ? "on" : null, "data-label": k,
      onclick: () => { S.label = k; render(); }}, k))));
  const groups = Object.entries(pool.by_label[S.label]).map(([v, x]) => [v, x]);
  out.push(h("div", {class: "charts"},
    h("div", {class: "card"}, h("h3", {}, `CPU by ${S.label}`), bars(groups, milli, cores)),
    h("div", {class: "card"}, h("h3", {}, `Memory by ${S.label}`),
      bars(groups, bytesOf, size))));
  for (const [v, x] of groups) {
    out.push(h("h2", {}, `${S.label}=${v}: ${x.nodes} nodes, ${x.instances} instances`),
      figures(`${S.label}=${v}`, x));
  }
  return out;
}

// nodes (topology)

function nodesPage() {
  const nodes = S.state.nodes;
  return [h("h1", {}, `Nodes (${nodes.length})`), h("div", {class: "grid"}, nodes.map(nodeCard))];
}

function meter(label, used, total, fmt) {
  const pct = total ? Math.min(100, 100 * used / total) : 0;
  return h("div", {},
    h("div", {class: "label"}, `${label}: ${fmt(used)} of ${fmt(total)} requested`),
    s("svg", {viewBox: "0 0 100 6", preserveAspectRatio: "none", class: "meter"},
      s("rect", {x: 0, y: 0, width: 100, height: 6, class: "allocatable", opacity: 0.3}),
      s("rect", {x: 0, y: 0, width: pct, height: 6, class: "requested"})));
}

function nodeCard(n) {
  const chips = n.placed.map((i) => h("a", {
    class: `chip ${i.state}${["Running", "Starting", "Scheduled", "Pending"].includes(i.state) ? "" : " bad"}`,
    href: `#/instances/${enc(i.namespace)}/${enc(i.name)}`, title: `${i.state} ${i.reason || ""}`},
    `${i.namespace}/${i.name}${i.arriving ? " ←" : ""}`));
  if (n.placed_total > n.placed.length) {
    chips.push(h("span", {class: "chip"}, `+${n.placed_total - n.placed.length} more`));
  }
  return h("div", {class: "card", "data-node": n.name, "data-status": n.status},
    h("h3", {}, n.name, badge(n.status)),
    h("div", {class: "label"}, Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`)
      .join(" · ") || "no labels"),
    h("div", {class: "label"}, `heartbeat: ${n.heartbeat} · ${n.address || "—"} · `
      + `SSD ${n.ssd ? `${n.ssd.free}/${n.ssd.total} free` : "—"}`),
    meter("CPU", milli(n.requested), milli(n.schedulable), cores),
    meter("Memory", bytesOf(n.requested), bytesOf(n.schedulable), size),
    h("div", {class: "chips"}, chips.length ? chips : h("span", {class: "mute"}, "no instances")));
}

function enc(x) { return encodeURIComponent(x); }

// apps

function appsPage() {
  const apps = S.state.apps;
  return [h("h1", {}, `Apps (${apps.length})`), table(["App", {name: "Replicas", num: true},
    "Instances", {name: "Generation", num: true}], apps.map((a) => h("tr", {
    "data-app": `${a.namespace}/${a.app}`},
    h("td", {}, h("a", {href: `#/apps/${enc(a.namespace)}/${enc(a.app)}`},
      `${a.namespace}/${a.app}`)),
    h("td", {class: "num"}, a.replicas),
    h("td", {}, Object.entries(a.states).map(([st, c]) => [badge(st), ` ${c} `])),
    h("td", {class: "num"}, `${a.generation} (template ${a.template_generation})`))))];
}

async function fetchDetail(key, load) {
  // Fetch what an open page shows, again at most every DETAIL_EVERY ms while it is open.
  const now = Date.now();
  if (S.detailKey === key && now - S.detailAt < DETAIL_EVERY) return;
  S.detailAt = now;
  if (S.detailKey !== key) { S.detailKey = key; S.detail = null; S.logs = {}; S.logsAt = 0; }
  try {
    const got = await load();
    if (S.detailKey === key) { S.detail = got; render(); }
  } catch (e) {
    if (S.detailKey === key && !(e instanceof SignedOut)) { S.detail = {error: e}; render(); }
  }
}

async function optional(path) {  // a JSON answer, or null when this master has no such route
  try { return await get(path); } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

function appPage(ns, app) {
  const key = `app:${ns}/${app}`;
  fetchDetail(key, async () => {
    const base = `/v1/apps/${enc(ns)}/${enc(app)}`;
    const q = `namespace=${enc(ns)}&app=${enc(app)}`;
    const [rec, list, rollout] = await Promise.all([get(base), get(`/v1/instances?${q}`),
      optional(`/v1/rollouts/${enc(ns)}/${enc(app)}`)]);
    return {rec, items: list.items, rollout};
  });
  const out = [h("h1", {}, `App ${ns}/${app}`)];
  const d = S.detailKey === key ? S.detail : null;
  if (!d) return [...out, h("p", {class: "mute"}, "Loading…")];
  if (d.error) return [...out, h("p", {class: "error"}, String(d.error.message))];
  out.push(h("dl", {}, h("dt", {}, "replicas"), h("dd", {}, `${d.rec.running} running of ${d.rec.replicas}`),
    h("dt", {}, "generation"), h("dd", {}, `${d.rec.generation} (template ${d.rec.template_generation})`),
    h("dt", {}, "updated"), h("dd", {}, ago(d.rec.updated))));
  out.push(h("h2", {}, "Instances"), table(["Instance", "State", "Reason", "Node", "IP",
    {name: "Restarts", num: true}, {name: "Generation", num: true}], d.items.map((i) =>
    h("tr", {"data-instance": i.name},
      h("td", {}, h("a", {href: `#/instances/${enc(ns)}/${enc(i.name)}`}, i.name)),
      h("td", {}, badge(i.state)), h("td", {class: "msg"}, i.reason || ""),
      h("td", {}, i.node ? (i.next_node ? `${i.node} → ${i.next_node}` : i.node) : "—"),
      h("td", {}, i.ip || "—"), h("td", {class: "num"}, i.restarts),
      h("td", {class: "num"}, i.generation)))));
  out.push(h("h2", {}, "Rollout"));
  out.push(d.rollout ? rolloutView(d.rollout) : h("p", {class: "mute"}, "— (no rollout)"));
  return out;
}

function rolloutView(r) {
  // The rollout record's fields as they are (its shape belongs to the rollout controller).
  return h("div", {class: "card", "data-rollout": "1"}, h("dl", {},
    Object.entries(r).map(([k, v]) => [h("dt", {}, k),
      h("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))])));
}

// instance

function instancePage(ns, name) {
  const key = `inst:${ns}/${name}`;
  fetchDetail(key, () => get(`/v1/instances/${enc(ns)}/${enc(name)}`));
  const out = [h("h1", {}, `Instance ${ns}/${name}`)];
  const i = S.detailKey === key ? S.detail : null;
  if (!i) return [...out, h("p", {class: "mute"}, "Loading…")];
  if (i.error) return [...out, h("p", {class: "error"}, String(i.error.message))];
  fetchLogs(ns, name, i.containers.map((c) => c.name));
  const ports = Object.entries(i.host_ports || {}).map(([p, v]) => `${p}:${v}`).join(", ");
  out.push(h("dl", {},
    h("dt", {}, "state"), h("dd", {}, badge(i.state), " ", i.reason || ""),
    h("dt", {}, "app"), h("dd", {}, h("a", {href: `#/apps/${enc(ns)}/${enc(i.app)}`}, `${ns}/${i.app}`)),
    h("dt", {}, "node"), h("dd", {}, i.node || "—", i.next_node ? ` → ${i.next_node}` : ""),
    h("dt", {}, "ip"), h("dd", {}, i.ip || "—"),
    h("dt", {}, "host ports"), h("dd", {}, ports || "—"),
    h("dt", {}, "request"), h("dd", {}, `${cores(milli(i.request))}, ${size(bytesOf(i.request))}`),
    h("dt", {}, "restarts"), h("dd", {}, i.restarts),
    h("dt", {}, "generation"), h("dd", {}, i.generation),
    h("dt", {}, "SSDs"), h("dd", {}, (i.ssds || []).map((d) => `${d.volume}: ${d.disk}`).join(", ") || "—")));
  out.push(h("h2", {}, "Containers"), table(["Container", "ID", "State", {name: "Exit", num: true},
    "Started", "Finished", "Ready", "Limit"], i.containers.map((c) => h("tr", {"data-container": c.name},
    h("td", {}, c.name), h("td", {}, (c.id || "").slice(0, 12) || "—"), h("td", {}, badge(c.state)),
    h("td", {class: "num"}, c.exit_code === null || c.exit_code === undefined ? "—" : c.exit_code),
    h("td", {}, c.started_at || "—"), h("td", {}, c.finished_at || "—"),
    h("td", {}, c.ready ? "yes" : "no"),
    h("td", {}, `${cores(milli(c.limit) || null)}, ${size(bytesOf(c.limit) || null)}`)))));
  const terms = [...(i.terminations || [])].reverse();
  out.push(h("h2", {}, `Terminations (${terms.length})`), terms.length ? table(
    ["When", "Container", "Reason", "ID", "Last lines"], terms.map((t) => h("tr", {"data-termination": t.container},
      h("td", {}, `${clock(t.at)} (${ago(t.at)})`), h("td", {}, t.container),
      h("td", {class: "msg"}, t.reason), h("td", {}, (t.container_id || "").slice(0, 12) || "—"),
      h("td", {class: "msg"}, lastLines(t))))) : h("p", {class: "mute"}, "none"));
  out.push(h("h2", {}, "Log tail"));
  for (const c of i.containers) {
    const text = S.logs[c.name];
    out.push(h("div", {class: "label"}, c.name), h("pre", {"data-logs": c.name},
      text === undefined ? "…" : text === null ? "— (no log tail: this master does not serve one for this container)" : text || "(no output)"));
  }
  const mine = S.events.filter((e) => e.kind === "instance" && e.namespace === ns && e.name === name);
  out.push(h("h2", {}, "Events"), eventsTable(mine.slice(-100).reverse()));
  return out;
}

function lastLines(t) {
  const v = t.lines || t.logs || t.tail;
  if (!v) return "—";
  return Array.isArray(v) ? v.join("\n") : String(v);
}

async function fetchLogs(ns, name, containers) {
  const now = Date.now();
  if (now - S.logsAt < LOGS_EVERY) return;
  S.logsAt = now;
  const key = S.detailKey;
  const got = {};
  for (const c of containers) {
    const path = `/v1/instances/${enc(ns)}/${enc(name)}/logs?container=${enc(c)}&tail=${LOG_LINES}`;
    try { got[c] = await get(path, true); } catch (e) {
      if (e instanceof SignedOut) return;
      got[c] = e.status === 404 ? null : `— (${e.message})`;
    }
  }
  if (S.detailKey === key) { S.logs = got; render(); }
}

// events

function eventsTable(items) {
  if (!items.length) return h("p", {class: "mute"}, "none yet");
  return table(["Time", "Type", "Kind", "Object", "Message"], items.map((e) => {
    const obj = e.kind === "node" ? e.name : `${e.namespace}/${e.name}`;
    const link = e.kind === "instance" ? `#/instances/${enc(e.namespace)}/${enc(e.name)}`
      : e.kind === "app" ? `#/apps/${enc(e.namespace)}/${enc(e.name)}` : "#/nodes";
    return h("tr", {class: `ev-${e.type}`}, h("td", {}, clock(e.time)), h("td", {}, badge(e.type)),
      h("td", {}, e.kind), h("td", {}, h("a", {href: link}, obj)), h("td", {class: "msg"}, e.message));
  }));
}

function eventsPage() {
  const f = S.filter.toLowerCase();
  const items = S.events.filter((e) => !f || `${e.kind} ${e.namespace}/${e.name} ${e.type} ${e.message}`
    .toLowerCase().includes(f));
  return [h("h1", {}, `Events (${S.events.length}, newest first)`),
    h("input", {type: "search", id: "filter", placeholder: "filter", value: S.filter,
      oninput: (ev) => { S.filter = ev.target.value; render(); }}),
    eventsTable(items.slice(-300).reverse())];
}

document.addEventListener("DOMContentLoaded", boot);
