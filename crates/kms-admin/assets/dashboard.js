// Operator dashboard: reads /api/v1 and renders it. Client-supplied text (workstation
// names, addresses) is only ever inserted with textContent.
"use strict";

const REFRESH_MS = 5000;
const state = { token: sessionStorage.getItem("kms-token") || "", search: "" };

// "#token=...&search=..." lets a link (or a test) open the page already authenticated and
// filtered; the token is then removed from the address bar.
(function readHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  if (params.get("token")) {
    state.token = params.get("token");
    sessionStorage.setItem("kms-token", state.token);
  }
  if (params.get("search")) state.search = params.get("search");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
})();

class Unauthorized extends Error {}

async function api(path) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(path, { headers });
  if (response.status === 401) throw new Unauthorized("token required");
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + message);
  }
  return response.json();
}

function $(id) { return document.getElementById(id); }

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

function time(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function kv(label, value) {
  return row([el("th", label), el("td", value)]);
}

function renderStatus(s) {
  $("node-id").textContent = s.node_id;
  $("node-role").textContent = s.role;
  $("node-leader").textContent = s.leader_id === null ? "none" : s.leader_id;
  $("total-requests").textContent = s.total_requests;
  $("failed-requests").textContent = s.failed_requests;
  $("registered-clients").textContent = s.registered_clients;
  $("intervals").textContent = s.activation_interval + " min / " + s.renewal_interval + " min";

  fill("counts", s.applications.map((a) => {
    const bar = el("div", null, "bar" + (a.threshold_met ? " met" : ""));
    const inner = el("div");
    const pct = a.threshold > 0 ? Math.min(100, (100 * a.current_count) / a.threshold) : 0;
    inner.style.width = pct.toFixed(0) + "%";
    bar.appendChild(inner);
    const barCell = el("td");
    barCell.appendChild(bar);
    const statusCell = el("td");
    statusCell.appendChild(el("span", a.threshold_met ? "activating" : "below threshold",
      a.threshold_met ? "status-met" : "status-below"));
    return row([el("td", a.name), el("td", a.current_count, "count"), el("td", a.threshold, "threshold"),
      barCell, statusCell], { "data-app": a.name, "data-met": String(a.threshold_met) });
  }));

  const dns = s.dns.enabled
    ? s.dns.domains.map((d) => d.zone + " (priority " + d.priority + ", weight " + d.weight + ")").join("; ")
    : "off";
  fill("host", [
    kv("KMS listeners", s.listen.kms.join(", ")),
    kv("Admin", s.listen.admin),
    kv("Product policy", s.product_policy),
    kv("Product catalog", s.catalog ? s.catalog.version + " (" + s.catalog.source + ")" : "–"),
    ...(s.catalog ? s.catalog.installed : []).map((k) =>
      kv("Host key: " + k.application, k.host_key + (k.configured ? "" : " (default)"))),
    kv("HWID", s.hwid || "–"),
    kv("Host build", s.host_build || "–"),
    kv("DNS publishing", dns),
    kv("Version", s.version),
  ]);

  const ls = s.requests_by_license_status;
  fill("license-status", [row(Object.keys(ls).map((k) => el("td", k.replace(/_/g, " ") + ": " + ls[k])))]);
}

function renderCluster(c) {
  fill("members", c.members.map((m) => {
    const isLeader = m.id === c.leader_id;
    return row([el("td", m.id, isLeader ? "leader" : ""), el("td", isLeader ? "leader" : m.role),
      el("td", m.raft_addr), el("td", m.admin_addr), el("td", m.lag === null ? "–" : m.lag)],
      { "data-member": String(m.id), "data-leader": String(isLeader) });
  }));
}

function renderActivations(page) {
  fill("activations", page.events.map((e) => {
    const f = e.fields || {};
    const refused = f.result && f.result !== "0x00000000";
    return row([el("td", time(e.time_ms)), el("td", f.client), el("td", f.workstation), el("td", f.product),
      el("td", (f.license_status || "").replace(/_/g, " ")), el("td", f.count),
      el("td", refused ? "refused " + f.result : (f.activated ? "activated" : "count below N"), refused ? "refused" : "")],
      { "data-seq": String(e.seq) });
  }));
}

function renderClients(page) {
  $("clients-total").textContent = "(" + page.total + (state.search ? " matching" : "") + ")";
  fill("clients", page.clients.map((c) => row([el("td", c.workstation), el("td", c.product), el("td", c.application),
    el("td", c.address || "–"), el("td", c.license_status.replace(/_/g, " ")), el("td", time(c.last_seen_ms)),
    el("td", c.last_count), el("td", c.activated ? "yes" : "no")], { "data-cmid": c.cmid })));
}

async function loadClients() {
  const q = new URLSearchParams({ limit: "50" });
  if (state.search) q.set("search", state.search);
  renderClients(await api("/api/v1/clients?" + q.toString()));
}

async function refresh() {
  try {
    const [status, cluster, events] = await Promise.all([
      api("/api/v1/status"),
      api("/api/v1/cluster").catch(() => ({ leader_id: null, members: [] })),
      api("/api/v1/events?event_id=12290&limit=20"),
    ]);
    renderStatus(status);
    renderCluster(cluster);
    renderActivations(events);
    await loadClients();
    $("token-form").hidden = true;
    $("main").hidden = false;
    $("error").hidden = true;
    $("updated").textContent = "updated " + time(Date.now());
    document.body.dataset.loaded = "1";
  } catch (e) {
    if (e instanceof Unauthorized) {
      $("main").hidden = true;
      $("token-form").hidden = false;
      $("token-error").textContent = state.token ? "wrong token" : "";
    } else {
      $("error").textContent = "Cannot reach the admin API: " + e.message;
      $("error").hidden = false;
    }
  }
  try {
    const ready = await fetch("/readyz");
    const badge = $("node-ready");
    badge.textContent = ready.ok ? "ready" : "not ready";
    badge.className = "badge " + (ready.ok ? "ok" : "bad");
  } catch (_) { /* shown by the error line */ }
}

document.addEventListener("DOMContentLoaded", () => {
  const search = $("client-search");
  search.value = state.search;
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.search = search.value.trim(); loadClients().catch(() => {}); }, 250);
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("kms-token", state.token);
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
});
