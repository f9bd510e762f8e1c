// Legate dashboard: polls the admin API and renders it. Plain JavaScript, no dependencies.
// The admin token, when given, lives in this variable only: never in storage or a cookie.
"use strict";

let token = "";
let selected = null; // revision whose diff is shown
let routesFor = null; // graph hash the route table was drawn for
let routeData = null;
const POLL_MS = 2000;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

const short = (r) => (r ? String(r).slice(0, 12) : "–");
const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–");

async function api(path, opts) {
  const o = Object.assign({ headers: {} }, opts || {});
  if (token) o.headers.Authorization = "Bearer " + token;
  const r = await fetch(path, o);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  return { status: r.status, body };
}

const STATE_CLASS = {
  verified: "ok", "verified-unobserved": "ok", verifying: "warn", degraded: "bad",
  pinned: "warn", "from-cache": "warn",
  Applied: "ok", Verifying: "warn", Degraded: "bad", Rejected: "bad", RolledBack: "bad",
  Interrupted: "", Superseded: "",
};

function badge(node, text) {
  node.textContent = text || "–";
  node.className = "badge " + (STATE_CLASS[text] || "");
}

function renderStatus(st) {
  $("live-revision").textContent = short(st.applied);
  $("live-revision").title = st.applied || "";
  const c = st.live && st.live.commit;
  $("live-commit").textContent = c ? `"${c.summary}" by ${c.author}` : "";
  badge($("live-state"), st.state);
  $("mode").textContent = st.mode + (st.pinned ? " at " + short(st.pinned) : "");
  $("source").textContent = st.source || "–";
  $("head").textContent = short(st.head);
  const behind = !!(st.head && st.applied && st.head !== st.applied);
  $("out-of-sync").hidden = !behind;
  let why = "";
  if (behind) {
    if (st.pinned) why = "pinned: the source has moved on";
    else if (st.last_attempt && st.last_attempt.revision === st.head) why = "the head is " + st.last_attempt.outcome;
    else why = "the head is not applied yet";
  }
  $("sync-why").textContent = why;
  $("verified").textContent = short(st.verified);
  const w = st.window;
  $("window").textContent = w
    ? `${short(w.revision)}: ${w.judged} changed route(s), ends in ${Math.ceil(w.ends_in_ms / 1000)} s`
    : "–";
  const rt = st.retry;
  $("retry").textContent = rt ? `${short(rt.revision)} (${rt.kind}) attempt ${rt.attempts + 1} at ${when(rt.next_at)}` : "–";
  $("source-error").textContent = st.source_error ? `${st.source_error} (${st.consecutive_failures} in a row)` : "–";
  $("unpin").disabled = !st.pinned;

  const a = st.last_attempt;
  $("attempt-revision").textContent = a ? short(a.revision) : "–";
  badge($("attempt-outcome"), a && a.outcome);
  $("attempt-reason").textContent = a ? (a.reason || (a.verdict && a.verdict.summary) || "") : "";
  const list = $("diagnostics");
  list.replaceChildren(...((a && a.diagnostics) || []).map((d) =>
    el("li", { class: "diag" },
      el("code", {}, `${d.file}:${d.line}`), " ", el("strong", {}, d.severity), ` ${d.message}`,
      d.help ? el("span", { class: "muted" }, ` (${d.help})`) : null)));
}

function renderHistory(entries) {
  const rows = entries.map((e) => {
    const t = e.timings || {};
    const stages = ["fetch", "compile", "preflight", "swap", "verify"]
      .map((s) => `${s} ${t[s + "_ms"] || 0}`).join(" · ");
    const show = el("button", { class: "link", type: "button", "data-revision": e.revision }, short(e.revision));
    show.addEventListener("click", () => showDiff(e.revision));
    const servable = e.outcome !== "Rejected";
    let pin = null;
    if (servable) {
      pin = el("button", { class: "pin", type: "button", "data-revision": e.revision }, "Pin");
      pin.addEventListener("click", () => act("/api/pin/" + encodeURIComponent(e.revision), "pin " + short(e.revision)));
    }
    const tr = el("tr", { "data-revision": e.revision, "data-outcome": e.outcome },
      el("td", {}, show),
      el("td", {}, el("span", { class: "badge " + (STATE_CLASS[e.outcome] || "") }, e.outcome)),
      el("td", {}, e.commit ? e.commit.summary : (e.reason || "")),
      el("td", {}, e.commit ? e.commit.author : ""),
      el("td", {}, when(e.finished_at)),
      el("td", { class: "muted" }, stages),
      el("td", {}, pin));
    if (e.revision === selected) tr.classList.add("selected");
    return tr;
  });
  $("history").tBodies[0].replaceChildren(...rows);
}

async function showDiff(rev) {
  selected = rev;
  $("diff-title").textContent = `of ${short(rev)} against the revision before it`;
  const r = await api(`/api/revisions/${encodeURIComponent(rev)}/diff`);
  if (r.status === 200) {
    $("diff-text").textContent = r.body.text || "(no route changes)";
    $("diff-title").textContent = `of ${short(rev)} against ${r.body.base ? short(r.body.base) : "no routes"}`;
  } else {
    $("diff-text").textContent = (r.body && r.body.error) || `HTTP ${r.status}`;
  }
  for (const tr of $("history").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.revision === rev);
}

function fmt(n, digits) {
  return n === null || n === undefined ? "–" : Number(n).toFixed(digits);
}

function renderTraffic(t) {
  $("traffic").tBodies[0].replaceChildren(...t.routes.map((r) =>
    el("tr", {},
      el("td", {}, r.route),
      el("td", { class: "num" }, fmt(r.per_second, 2)),
      el("td", { class: "num" + (r.error_ratio > 0.05 ? " bad" : "") }, r.error_ratio === null ? "–" : fmt(r.error_ratio * 100, 1) + "%"),
      el("td", { class: "num" }, r.p99_ms === null ? "> 10 s" : "≤ " + r.p99_ms + " ms"),
      el("td", { class: "num" }, r.requests))));
  if (!t.routes.length) $("traffic").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "no requests in this window")));
  $("upstreams").tBodies[0].replaceChildren(...t.upstreams.map((u) =>
    el("tr", {},
      el("td", {}, u.upstream),
      el("td", { class: "num" }, u.addresses),
      el("td", { class: "num" + (u.ejected ? " bad" : "") }, u.ejected),
      el("td", { class: "num" + (u.unhealthy ? " bad" : "") }, u.unhealthy),
      el("td", { class: "num" }, u.ejections))));
  if (!t.upstreams.length) $("upstreams").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "no upstream uses health checks or outlier detection")));
}

function routeRows(rows, filter) {
  const out = [];
  rows.forEach((g, i) => {
    const members = (g.members || []).map((m) => [m, m.weight + "%", ""]);
    if (g.shadow) members.push([g.shadow, g.shadow.percent + "%", "shadow "]);
    for (const [m, share, kind] of members) {
      const text = [g.host, g.match, m.mapping, m.action].join(" ").toLowerCase();
      if (filter && !text.includes(filter)) continue;
      out.push(el("tr", { "data-mapping": m.mapping },
        el("td", { class: "num" }, i + 1), el("td", { class: "num" }, g.precedence),
        el("td", {}, g.host), el("td", {}, el("code", {}, g.match)), el("td", {}, m.mapping),
        el("td", { class: "num" }, share), el("td", {}, kind + m.action)));
    }
  });
  return out;
}

function renderRoutes() {
  if (!routeData) return;
  const filter = $("filter").value.trim().toLowerCase();
  const tables = (routeData.hosts || []).map((h) => [
    `Host ${h.host} (${h.hostname}; ${h.tls_secret ? "tls=" + h.tls_secret : "no tls"}; insecure=${h.insecure})`, h.routes]);
  if (!tables.length) tables.push(["Default Host (*)", routeData.fallback]);
  $("route-tables").replaceChildren(...tables.map(([title, rows]) => {
    const body = routeRows(rows || [], filter);
    return el("div", {}, el("h3", {}, title),
      el("table", { class: "routes" },
        el("thead", {}, el("tr", {}, ...["#", "prec", "host", "match", "mapping", "weight", "upstream"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...(body.length ? body : [el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "no routes"))]))));
  }));
}

async function explain(ev) {
  ev.preventDefault();
  const q = new URLSearchParams({ method: $("explain-method").value, host: $("explain-host").value, path: $("explain-path").value });
  for (const line of $("explain-headers").value.split("\n")) if (line.includes(":")) q.append("header", line.trim());
  const r = await api("/api/routes/explain?" + q.toString());
  const v = r.body || {};
  const out = [];
  const t = v.table;
  out.push(el("p", { class: "muted" }, "table: " + (typeof t === "string" ? t : `Host ${t.host} (${t.hostname})`)));
  const rows = (v.candidates || []).map((c) => el("tr", { class: "lost" },
    el("td", { class: "num" }, c.position), el("td", {}, el("code", {}, c.match)), el("td", {}, (c.mappings || []).join(", ")), el("td", {}, "lost: " + c.lost)));
  if (v.matched) {
    rows.push(el("tr", { class: "win" }, el("td", { class: "num" }, v.position), el("td", {}, el("code", {}, v.match)),
      el("td", {}, v.members.map((m) => `${m.mapping} (${m.weight}%)`).join(", ")),
      el("td", {}, "wins: " + v.members.map((m) => `${m.action} → ${m.upstream_path || "-"}`).join("; "))));
  }
  if (rows.length) out.push(el("table", { id: "explain-table" }, el("tbody", {}, ...rows)));
  out.push(el("p", { id: "explain-verdict", class: v.matched ? "win" : "bad" },
    v.matched ? `served by ${v.members.map((m) => m.mapping).join(", ")}` : "no route: the gateway answers 404"));
  $("explain-out").replaceChildren(...out);
}

async function act(path, what) {
  const res = $("action-result");
  res.textContent = what + "…";
  try {
    const r = await api(path, { method: "POST" });
    if (r.status === 401) res.textContent = `${what}: needs the admin token (enter it above)`;
    else if (r.status >= 400) res.textContent = `${what}: ${(r.body && (r.body.error || (r.body.entry && r.body.entry.reason))) || "HTTP " + r.status}`;
    else res.textContent = `${what}: ${r.body.result}${r.body.entry ? " " + r.body.entry.outcome : ""}`;
  } catch (e) {
    res.textContent = `${what}: ${e}`;
  }
  refresh();
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [st, hist, tr] = await Promise.all([
      api("/api/status"), api("/api/revisions"), api("/api/traffic?minutes=" + $("minutes").value)]);
    if (st.status !== 200) throw new Error("status: HTTP " + st.status);
    renderStatus(st.body);
    if (hist.status === 200) renderHistory(hist.body);
    if (tr.status === 200) renderTraffic(tr.body);
    if (st.body.graph !== routesFor) {
      const r = await api("/api/routes");
      if (r.status === 200) { routeData = r.body; routesFor = st.body.graph; renderRoutes(); }
    }
    if (!selected && st.body.applied) showDiff(st.body.applied);
    $("conn").textContent = "live · updated " + new Date().toLocaleTimeString();
    $("conn").className = "muted";
  } catch (e) {
    $("conn").textContent = "cannot reach the admin API: " + e.message;
    $("conn").className = "bad";
  } finally {
    busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    $("token-state").textContent = token ? "token set for this tab" : "no token";
  });
  $("sync").addEventListener("click", () => act("/api/sync", "sync"));
  $("unpin").addEventListener("click", () => act("/api/unpin", "unpin"));
  $("filter").addEventListener("input", renderRoutes);
  $("minutes").addEventListener("change", refresh);
  $("explain-form").addEventListener("submit", explain);
  refresh();
  setInterval(refresh, POLL_MS);
});
