// twllm console. Every value from the server is put into the page with textContent (never as
// markup); the key lives in sessionStorage only and travels as a bearer header (no cookies).
"use strict";

const TEXT = {
  "zh-TW": {
    title: "twllm 管理主控台", login_title: "登入", api_key: "API 金鑰", login: "登入", logout: "登出",
    login_note: "管理者請用主金鑰；租戶請用自己的 API 金鑰。金鑰只存在此分頁（sessionStorage）。",
    health: "元件健康狀態", component: "元件", kind: "類型", status: "狀態", restarts: "重啟次數", detail: "說明",
    tenants: "租戶", name: "名稱", created: "建立時間", active_keys: "有效金鑰", create_tenant: "建立租戶",
    disable: "停用", enable: "啟用", disabled: "已停用", active: "啟用中", revoked: "已撤銷", expired: "已過期",
    keys: "API 金鑰", tenant: "租戶", key_name: "金鑰名稱", models: "模型", models_hint: "a,b（空白＝全部）",
    budget: "預算", period: "期間", monthly: "每月", daily: "每日", total: "總計", expires_in: "有效期",
    create_key: "建立金鑰", secret_once: "請立即複製這把金鑰：它只會顯示這一次。", done: "完成",
    prefix: "前綴", spend: "花費", remaining: "剩餘預算", expires: "到期", revoke: "撤銷", rotate: "輪替",
    usage: "用量與花費", window: "天數", by_day: "每日", by_model: "依模型", by_tenant: "依租戶",
    requests: "請求數", cost: "花費", guard_events: "近期防護事件", time: "時間", model: "模型", stage: "階段",
    action: "動作", categories: "類別", all_models: "全部", none: "無", no_health: "無法取得健康狀態：",
    deployment: "部署", confirm_revoke: "確定撤銷此金鑰？", confirm_disable: "確定停用此租戶？", admin: "管理者",
    display_name: "顯示名稱", display_name_hint: "例：臺大醫院 放射科（選填）",
  },
  en: {
    title: "twllm console", login_title: "Log in", api_key: "API key", login: "Log in", logout: "Log out",
    login_note: "Administrators use the master key; tenants use their own API key. The key stays in this tab (sessionStorage).",
    health: "Components' health", component: "Component", kind: "Kind", status: "Status", restarts: "Restarts", detail: "Detail",
    tenants: "Tenants", name: "Name", created: "Created", active_keys: "Active keys", create_tenant: "Create tenant",
    disable: "Disable", enable: "Enable", disabled: "disabled", active: "active", revoked: "revoked", expired: "expired",
    keys: "API keys", tenant: "Tenant", key_name: "Key name", models: "Models", models_hint: "a,b (empty = all)",
    budget: "Budget", period: "Period", monthly: "monthly", daily: "daily", total: "total", expires_in: "Expires in",
    create_key: "Create key", secret_once: "Copy this key now: it is shown this once only.", done: "Done",
    prefix: "Prefix", spend: "Spend", remaining: "Budget left", expires: "Expires", revoke: "Revoke", rotate: "Rotate",
    usage: "Usage and spend", window: "Days", by_day: "Per day", by_model: "Per model", by_tenant: "Per tenant",
    requests: "Requests", cost: "Cost", guard_events: "Recent guard events", time: "Time", model: "Model", stage: "Stage",
    action: "Action", categories: "Categories", all_models: "all", none: "none", no_health: "Health unavailable: ",
    deployment: "Deployment", confirm_revoke: "Revoke this key?", confirm_disable: "Disable this tenant?", admin: "administrator",
    display_name: "Display name", display_name_hint: "e.g. 臺大醫院 放射科 (optional)",
  },
};
const KEY_STORE = "twllm.console.key";
const LANG_STORE = "twllm.console.lang";
const $ = (id) => document.getElementById(id);
const charts = {};
let lang = sessionStorage.getItem(LANG_STORE) || "zh-TW";
let role = null;

const t = (name) => TEXT[lang][name] ?? name;

function applyLang() {
  document.documentElement.lang = lang === "zh-TW" ? "zh-Hant-TW" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = lang === "zh-TW" ? "English" : "中文";
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function api(path, body) {
  const key = sessionStorage.getItem(KEY_STORE) || "";
  const response = await fetch("/console/api/" + path, {
    method: body === undefined ? "GET" : "POST",
    headers: { Authorization: "Bearer " + key, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

// One table row per item; each cell is text (set with textContent) or a ready-made element.
function fill(tbodyId, items, cells) {
  const tbody = $(tbodyId);
  tbody.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const cell of cells(item)) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = cell ?? "";
      tr.append(td);
    }
    tbody.append(tr);
  }
}

function button(label, onClick, danger = false) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (danger) b.className = "danger";
  b.addEventListener("click", () => onClick().catch((e) => say(e.message, true)));
  return b;
}

function statusText(status) {
  const span = document.createElement("span");
  span.className = "status-" + status;
  span.textContent = t(status);
  return span;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString(lang) : "");
const money = (value) => (value === null || value === undefined ? "" : Number(value).toFixed(4));
const models = (list) => (list ? list.join(", ") : t("all_models"));
// What people see for a tenant: its display name (any text, shown as text) where it has one.
const tenantLabel = (name, displayName) => displayName || name;
const tenantLong = (name, displayName) => (displayName ? `${displayName} (${name})` : name);

// A bar chart of requests and a line of cost (one per currency) for usage rows.
function drawUsage(canvasId, rows) {
  if (charts[canvasId]) charts[canvasId].destroy();
  const groups = [...new Set(rows.map((r) => r.group))];
  const labelOf = new Map(rows.map((r) => [r.group, r.label ?? r.group]));
  const labels = groups.map((g) => labelOf.get(g));
  const currencies = [...new Set(rows.map((r) => r.currency))];
  const sum = (group, field, currency) => rows
    .filter((r) => r.group === group && (!currency || r.currency === currency))
    .reduce((total, r) => total + r[field], 0);
  const datasets = [{ type: "bar", label: t("requests"), data: groups.map((g) => sum(g, "requests")), yAxisID: "y" }];
  for (const currency of currencies) {
    datasets.push({ type: "line", label: `${t("cost")} (${currency})`, data: groups.map((g) => sum(g, "cost", currency)), yAxisID: "cost" });
  }
  charts[canvasId] = new Chart($(canvasId), {
    data: { labels, datasets },
    options: {
      animation: false, maintainAspectRatio: false,
      scales: { y: { beginAtZero: true, position: "left" }, cost: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } } },
    },
  });
}

async function loadHealth() {
  const health = await api("health");
  if (!health.available) {
    $("health-summary").textContent = t("no_health") + health.reason;
    fill("health-rows", [], () => []);
    return;
  }
  $("health-summary").textContent = `${t("deployment")} ${health.name}: ${health.status}`;
  fill("health-rows", health.components, (c) => [c.name, c.kind, statusText(c.status), String(c.restarts), c.detail]);
}

async function loadTenants() {
  const tenants = await api("tenants");
  fill("tenant-rows", tenants, (tn) => [
    tn.name, tn.display_name ?? "", when(tn.created_at), String(tn.active_keys), statusText(tn.disabled ? "disabled" : "active"),
    tn.disabled
      ? button(t("enable"), () => api(`tenants/${encodeURIComponent(tn.name)}/enable`, {}).then(loadTenants))
      : button(t("disable"), async () => {
        if (confirm(t("confirm_disable"))) { await api(`tenants/${encodeURIComponent(tn.name)}/disable`, {}); await loadTenants(); }
      }, true),
  ]);
  const select = $("key-tenant");
  const chosen = select.value;
  select.replaceChildren(...tenants.map((tn) => {
    const o = document.createElement("option");
    o.value = tn.name;
    o.textContent = tenantLong(tn.name, tn.display_name);
    return o;
  }));
  if (chosen) select.value = chosen;
}

function showSecret(secret) {
  $("secret").textContent = secret;
  $("secret-box").hidden = false;
}

async function loadKeys() {
  const keys = await api("keys");
  fill("key-rows", keys, (k) => {
    const actions = document.createElement("span");
    if (k.status === "active") {
      actions.append(
        button(t("rotate"), async () => { showSecret((await api(`keys/${k.id}/rotate`, {})).secret); await loadKeys(); }),
        button(t("revoke"), async () => { if (confirm(t("confirm_revoke"))) { await api(`keys/${k.id}/revoke`, {}); await loadKeys(); } }, true),
      );
    }
    return [String(k.id), k.prefix, tenantLabel(k.tenant, k.tenant_display_name), k.name, statusText(k.status), models(k.models), k.rpm, k.tpm,
      k.budget === null ? "" : `${money(k.budget)} / ${t(k.budget_period)}`, money(k.spend), when(k.expires_at), actions];
  });
}

async function loadUsage() {
  const days = $("usage-days").value;
  for (const by of ["day", "model", "tenant"]) {
    const report = await api(`usage?by=${by}&days=${days}`);
    drawUsage(`chart-${by}`, report.rows);
  }
}

async function loadGuard() {
  const events = await api("guard-events?limit=50");
  const rows = events.flatMap((e) => e.stages.map((s) => ({
    ...s, ts: e.ts, tenant: e.tenant && tenantLabel(e.tenant, e.tenant_display_name), model: e.model,
  })));
  fill("guard-rows", rows, (r) => [when(r.ts), r.tenant ?? t("admin"), r.model, r.stage, r.action,
    [...r.categories, ...r.rules].join(", ") || t("none")]);
}

async function loadTenantView() {
  const me = await api("me");
  $("tenant-title").textContent = `${t("tenant")}: ${tenantLong(me.tenant, me.display_name)}`;
  fill("my-key-rows", me.keys, (k) => [k.prefix, k.name, statusText(k.status), models(k.models), k.rpm, k.tpm,
    k.budget === null ? "" : `${money(k.budget)} / ${t(k.budget_period)}`, money(k.spend), money(k.remaining), when(k.expires_at)]);
  drawUsage("chart-my-day", me.usage.day);
  drawUsage("chart-my-model", me.usage.model);
}

async function refresh() {
  if (role === "admin") {
    await Promise.all([loadHealth(), loadTenants(), loadKeys(), loadGuard()]);
    await loadUsage();
  } else if (role === "tenant") {
    await loadTenantView();
  }
}

async function start() {
  if (!sessionStorage.getItem(KEY_STORE)) return;
  try {
    const who = await api("whoami");
    role = who.role;
  } catch (e) {
    sessionStorage.removeItem(KEY_STORE);
    say(e.message, true);
    return;
  }
  $("login").hidden = true;
  $("logout").hidden = false;
  if (role === "admin") {
    $("tenant").remove();
    $("admin").hidden = false;
    $("who").textContent = t("admin");
  } else {
    $("admin").remove(); // a tenant's page holds no admin views at all
    $("tenant").hidden = false;
    $("who").textContent = `${t("tenant")}: ${role === "tenant" ? who.tenant : ""}`;
  }
  applyLang();
  await refresh().catch((e) => say(e.message, true));
  document.body.dataset.ready = role;
}

function on(id, event, handler) {
  const el = $(id);
  if (el) el.addEventListener(event, (ev) => { if (event === "submit") ev.preventDefault(); handler(ev).catch((e) => say(e.message, true)); });
}

document.addEventListener("DOMContentLoaded", () => {
  applyLang();
  on("login-form", "submit", async () => {
    sessionStorage.setItem(KEY_STORE, $("login-key").value.trim());
    $("login-key").value = "";
    await start();
  });
  on("logout", "click", async () => { sessionStorage.removeItem(KEY_STORE); location.reload(); });
  on("lang", "click", async () => {
    lang = lang === "zh-TW" ? "en" : "zh-TW";
    sessionStorage.setItem(LANG_STORE, lang);
    applyLang();
    await refresh();
    document.body.dataset.lang = lang;
  });
  on("tenant-form", "submit", async () => {
    const tenant = await api("tenants", { name: $("tenant-name").value, display_name: $("tenant-display-name").value });
    $("tenant-name").value = "";
    $("tenant-display-name").value = "";
    say(`${t("tenant")} ${tenantLong(tenant.name, tenant.display_name)} ✓`);
    await loadTenants();
  });
  on("key-form", "submit", async () => {
    const budget = $("key-budget").value;
    const created = await api("keys", {
      tenant: $("key-tenant").value, name: $("key-name").value, models: $("key-models").value,
      rpm: $("key-rpm").value, tpm: $("key-tpm").value, budget,
      budget_period: budget ? $("key-period").value : null, expires: $("key-expires").value,
    });
    showSecret(created.secret);
    await loadKeys();
  });
  on("secret-close", "click", async () => { $("secret").textContent = ""; $("secret-box").hidden = true; });
  on("usage-days", "change", loadUsage);
  start();
});
