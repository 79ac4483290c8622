// The stealer dashboard: state from /api/events (server-sent events), plots drawn on canvas.
// No libraries, nothing from the internet.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
let series = [];          // per-second samples {t, fps, p50, p99}
let historyMax = 600;
let events = [];          // newest last
const EVENTS_SHOWN = 100;

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n === 0) return "unlimited";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
}
function rate(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return n.toFixed(0) + " B/s";
  return n < 1048576 ? (n / 1024).toFixed(0) + " KB/s" : (n / 1048576).toFixed(1) + " MB/s";
}
function pct(x) { return x === null || x === undefined ? "–" : Math.round(100 * x) + "%"; }
function num(x) { return x === null || x === undefined ? "–" : String(x); }
function secs(x) {
  if (x === null || x === undefined) return "–";
  return x < 1 ? (1000 * x).toFixed(0) + " ms" : x.toFixed(2) + " s";
}
function ago(x) {
  if (x === null || x === undefined) return "never";
  if (x < 1.5) return "now";
  return x < 120 ? x.toFixed(0) + " s ago" : (x / 60).toFixed(0) + " min ago";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }

// ------------------------------------------------------------------ the shelf
function renderNodes(nodes) {
  const box = $("nodes");
  box.replaceChildren();
  $("node-count").textContent = nodes.length + (nodes.length === 1 ? " node" : " nodes");
  for (const n of nodes) {
    const card = el("div", "node " + n.role);
    card.dataset.id = n.id;
    if (!n.self && (n.seen === null || n.seen > 10)) card.classList.add("stale");
    const head = el("div", "head");
    head.append(el("span", "id", n.id.slice(0, 8)));
    const badges = el("span");
    badges.append(el("span", "badge " + n.role, n.role));
    if (n.self) badges.append(el("span", "badge me", "this node"));
    head.append(badges);
    card.append(head);
    const bar = el("div", "bar");
    const fill = el("i");
    fill.style.width = n.busy === null ? "0" : Math.round(100 * n.busy) + "%";
    if (n.busy !== null && n.busy > 0.9) fill.style.background = "var(--warn)";
    bar.append(fill);
    bar.title = "busy " + pct(n.busy);
    card.append(bar);
    const t = el("table");
    const rows = [
      ["busy", pct(n.busy)],
      ["cores · speed", n.cores + " · " + (n.speed ? (n.speed / 1e9).toFixed(2) + " GFLOP/s" : "not measured")],
      ["memory offered", bytes(n.memory)],
      ["tasks · stolen", num(n.tasks) + " · " + num(n.stolen)],
      ["queued", num(n.queued)],
      ["in · out", rate(n.in) + " · " + rate(n.out)],
      ["last seen", n.self ? "this node" : ago(n.seen) + (n.rtt !== null ? " · rtt " + secs(n.rtt) : "")],
    ];
    for (const [k, v] of rows) {
      const tr = el("tr");
      tr.append(el("td", "", k), el("td", "", v));
      t.append(tr);
    }
    card.append(t);
    box.append(card);
  }
}

// ------------------------------------------------------------------ plots
function plot(canvas, lines, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const left = 52, right = 10, top = 8, bottom = 22;
  const pw = w - left - right, ph = h - top - bottom;
  const now = series.length ? series[series.length - 1].t : Date.now() / 1000;
  const span = Math.max(60, series.length ? now - series[0].t : 60);
  let ymax = 0, points = 0;
  for (const line of lines) for (const s of series) {
    const v = s[line.key];
    if (v !== null && v !== undefined) { ymax = Math.max(ymax, v); points++; }
  }
  ymax = ymax > 0 ? niceCeil(ymax * 1.1) : 1;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#6b7280";
  g.strokeStyle = "#e5e7eb";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {       // horizontal grid and y labels
    const y = top + ph - (i / 4) * ph;
    g.beginPath(); g.moveTo(left, y + 0.5); g.lineTo(left + pw, y + 0.5); g.stroke();
    const v = (ymax * i) / 4;
    g.textAlign = "right"; g.textBaseline = "middle";
    g.fillText(unit === "s" ? secs(v) : v.toFixed(v < 10 ? 1 : 0), left - 6, y);
  }
  g.textAlign = "center"; g.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {       // x labels: seconds before now
    const x = left + (i / 4) * pw;
    const back = span * (1 - i / 4);
    g.fillText(back < 1 ? "now" : "-" + (back >= 120 ? (back / 60).toFixed(0) + " min" : back.toFixed(0) + " s"), x, top + ph + 5);
  }
  for (const line of lines) {
    g.strokeStyle = line.color; g.fillStyle = line.color; g.lineWidth = 2;
    g.beginPath();
    let started = false, last = null;
    for (const s of series) {
      const v = s[line.key];
      if (v === null || v === undefined) { started = false; continue; }
      const x = left + pw * (1 - (now - s.t) / span);
      const y = top + ph - (v / ymax) * ph;
      if (started) g.lineTo(x, y); else g.moveTo(x, y);
      started = true; last = [x, y];
    }
    g.stroke();
    if (last) { g.beginPath(); g.arc(last[0], last[1], 3, 0, 2 * Math.PI); g.fill(); }
  }
  canvas.dataset.points = String(points);
}
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function renderPlots() {
  plot($("fps-plot"), [{key: "fps", color: "#16a34a"}], "fps");
  plot($("latency-plot"), [{key: "p50", color: "#2563eb"}, {key: "p99", color: "#dc2626"}], "s");
}

// ------------------------------------------------------------------ cameras
function renderSources(sources) {
  for (const s of sources) updateFrame(s);
}
function updateFrame(s) {
  const box = $("cameras");
  const empty = box.querySelector(".empty");
  if (empty) empty.remove();
  let fig = box.querySelector('figure[data-source="' + CSS.escape(s.source) + '"]');
  if (!fig) {
    fig = el("figure");
    fig.dataset.source = s.source;
    const img = el("img");
    img.alt = "latest frame of " + s.source;
    fig.append(img, el("figcaption"));
    box.append(fig);
  }
  const img = fig.querySelector("img");
  if (img.dataset.frame !== String(s.frame)) {
    img.dataset.frame = String(s.frame);
    img.src = s.url + (q ? q + "&" : "?") + "frame=" + s.frame;   // a new URL per frame: no stale cache
  }
  fig.querySelector("figcaption").textContent =
    s.source.slice(0, 8) + "/" + s.source.split("/")[1] + " · frame " + s.frame + " · " +
    s.detections + (s.detections === 1 ? " detection" : " detections") + " · " + clock(s.at);
}

// ------------------------------------------------------------------ plan, events, summary
function renderPlan(p) {
  const dl = $("plan");
  dl.replaceChildren();
  const rows = [["grid", p.grid + (p.grid === "1x1" ? " (whole frames)" : "")], ["fused layers", p.layers],
                ["reuse scheme", p.scheme], ["tail", p.tail], ["plan key", p.key]];
  if (p.auto) {
    rows.push(["--grid auto", p.auto.choice + " for " + p.auto.objective + ", " + p.auto.inflight + " in flight"]);
    rows.push(["predicted", p.auto.fps.toFixed(3) + " fps, latency " + secs(p.auto.latency) + " (" + p.auto.bound + ")"]);
    if (p.auto.note) rows.push(["why", p.auto.note]);
  }
  for (const [k, v] of rows) dl.append(el("dt", "", k), el("dd", "", String(v)));
}
function describe(e) {
  const peer = e.peer ? e.peer.slice(0, 8) : "";
  switch (e.event) {
    case "peer-joined": return peer + " joined (" + e.role + ")";
    case "peer-lost": return peer + " lost (" + e.role + ")";
    case "requeued": return e.tasks + " task(s) queued again: " + e.why + (peer ? " (" + peer + ")" : "");
    case "takeover": return "this node took over as the gateway, epoch " + e.epoch;
    case "plan": return "plan " + e.plan + " for " + e.nodes + " node(s), predicted " + e.fps + " fps";
    case "starting": return "node started on port " + e.port;
    case "first-task": return "first task computed" + (e.stolen ? " (stolen)" : "");
    default: return JSON.stringify(e);
  }
}
function addEvents(list) {
  for (const e of list) if (!events.length || e.seq > events[events.length - 1].seq) events.push(e);
  events = events.slice(-EVENTS_SHOWN);
  const ol = $("events");
  ol.replaceChildren();
  if (!events.length) ol.append(el("li", "muted", "nothing yet"));
  for (const e of events.slice().reverse()) {
    const li = el("li", "ev-" + e.event);
    li.append(el("time", "", clock(e.time)), el("span", "kind", e.event), el("span", "", describe(e)));
    ol.append(li);
  }
}
function renderSummary(st) {
  const s = st.sample || {};
  const parts = [["role", st.node.role], ["frames", st.totals.frames],
                 ["frames/s", s.fps === undefined ? "–" : s.fps.toFixed(2)],
                 ["p50", secs(s.p50)], ["p99", secs(s.p99)],
                 ["requeued", st.totals.requeued], ["takeovers", st.totals.takeovers]];
  const box = $("summary");
  box.replaceChildren();
  for (const [k, v] of parts) {
    const span = el("span", "", k + " ");
    span.append(el("b", "", String(v)));
    box.append(span);
  }
}

function render(st) {
  renderSummary(st);
  renderNodes(st.nodes);
  renderPlan(st.plan);
  renderSources(st.sources);
  addEvents(st.events);
  renderPlots();
}

// ------------------------------------------------------------------ the stream
function connect() {
  const src = new EventSource("/api/events" + q);
  const live = $("live");
  src.addEventListener("open", () => { live.className = "live on"; live.textContent = "live"; });
  src.addEventListener("error", () => { live.className = "live off"; live.textContent = "reconnecting…"; });
  src.addEventListener("state", (ev) => {
    const st = JSON.parse(ev.data);
    historyMax = st.history;
    series = st.series || [];
    events = [];
    render(st);
  });
  src.addEventListener("update", (ev) => {
    const st = JSON.parse(ev.data);
    if (st.sample && (!series.length || st.sample.t > series[series.length - 1].t)) {
      series.push(st.sample);
      if (series.length > historyMax) series.splice(0, series.length - historyMax);
    }
    render(st);
  });
  src.addEventListener("frame", (ev) => updateFrame(JSON.parse(ev.data)));
}
window.addEventListener("resize", renderPlots);
connect();
