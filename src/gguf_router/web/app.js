// gguf-router's page: the model list (live, from /models/sse), load/unload, usage per key (for
// admins), and a streamed chat.
// Plain JavaScript, no build step, nothing from the network but this router.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem("gguf-router-key") || "";

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  const reply = await fetch(path, { ...options, headers });
  if (reply.status === 401) {
    $("key-form").hidden = false;
    throw new Error("an API key is needed");
  }
  return reply;
}

function size(bytes) {
  if (!bytes) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return bytes.toFixed(i ? 1 : 0) + " " + units[i];
}

function describe(status) {
  if (status.value === "downloading")
    return `downloading ${Math.round(status.progress * 100)} % of ${size(status.total_bytes) || "?"}`;
  if (status.value === "loading" && status.progress !== undefined) return `loading ${Math.round(status.progress * 100)} %`;
  if (status.value === "loaded" && status.in_flight) return `serving ${status.in_flight}`;
  if (status.failed) return `${status.value}: ${status.error}` + (status.exit_code !== undefined ? ` (exit ${status.exit_code})` : "");
  return status.value;
}

async function refresh() {
  const models = (await (await api("/models")).json()).data;
  const body = $("models").tBodies[0];
  body.replaceChildren();
  for (const m of models) {
    const row = body.insertRow();
    row.dataset.model = m.id;
    row.insertCell().textContent = m.id;
    const state = row.insertCell();
    state.textContent = describe(m.status);
    state.className = "state state-" + m.status.value + (m.status.failed ? " failed" : "");
    if (m.status.value === "downloading") {
      const bar = document.createElement("progress");
      bar.max = 1;
      bar.value = m.status.progress;
      state.append(" ", bar);
    }
    row.insertCell().textContent = size(m.gguf && m.gguf.size);
    row.insertCell().textContent = size(m.status.memory_estimate_bytes);
    row.insertCell().textContent = size(m.status.memory_bytes);
    // (unloading a download cancels it, as in llama.cpp)
    const running = ["loading", "loaded", "downloading"].includes(m.status.value);
    const button = document.createElement("button");
    button.textContent = m.status.value === "downloading" ? "Cancel" : running ? "Unload" : "Load";
    button.disabled = m.status.value === "invalid" || m.status.value === "unloading";
    button.onclick = () => api(running ? "/models/unload" : "/models/load",
      { method: "POST", body: JSON.stringify({ model: m.id }), headers: { "Content-Type": "application/json" } });
    row.insertCell().append(button);
  }
  const loaded = models.filter((m) => m.status.value === "loaded").length;
  $("summary").textContent = `${loaded} of ${models.length} models loaded`;
  showBudget(models, await (await api("/props")).json());
  await showUsage();
  const picker = $("picker");
  const chosen = picker.value;
  picker.replaceChildren(...models.filter((m) => !["invalid", "downloading"].includes(m.status.value)).map((m) => new Option(m.id, m.id)));
  if (chosen) picker.value = chosen;
}

// What each key used, per model: for admin keys (others get 403, and the table stays hidden).
async function showUsage() {
  const reply = await api("/usage?by=both");
  $("usage-section").hidden = !reply.ok;
  if (!reply.ok) return;
  const body = $("usage").tBodies[0];
  body.replaceChildren();
  for (const row of (await reply.json()).data) {
    const cut = row.name.indexOf("/");  // a key's name holds no "/", a model's id may
    const line = body.insertRow();
    line.dataset.key = row.name.slice(0, cut);
    for (const value of [row.name.slice(0, cut), row.name.slice(cut + 1), row.requests, row.errors,
                         row.prompt_tokens, row.completion_tokens, row.seconds.toFixed(1)]) {
      line.insertCell().textContent = value;
    }
  }
}

// The memory budget as a bar: a segment per running model, as wide as what the budget counts it
// at (its estimate, or its peak if higher), darker as far as it really uses. Then one bar per
// device, a segment per model running there, as wide as what it is counted at on the device.
function showBudget(models, props) {
  const budget = props.memory_budget_bytes;
  $("budget").hidden = !budget;
  if (budget) {
    fillBar($("budget-bar"), budget, models.filter((m) => m.status.memory_counted_bytes), (m) => m.status.memory_counted_bytes,
            (m) => m.status.memory_bytes);
    $("budget-text").textContent = `memory budget ${size(budget)}: ${size(props.memory_reserved_bytes) || "0 B"} counted`;
  }
  const devices = $("devices");
  devices.replaceChildren();
  for (const d of props.devices || []) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.device = d.id;
    fillBar(bar, d.budget_bytes, models.filter((m) => m.status.device === d.id), (m) => m.status.device_counted_bytes,
            () => null);
    const text = document.createElement("span");
    text.className = "bar-text";
    text.textContent = `device ${d.id} (${d.description}): budget ${size(d.budget_bytes) || "0 B"}, ` +
      `${size(d.reserved_bytes) || "0 B"} counted` + (d.exclusive ? "; one model at a time" : "");
    devices.append(bar, text);
  }
}

function fillBar(bar, budget, models, counted, used) {
  bar.replaceChildren();
  for (const m of models) {
    const segment = document.createElement("div");
    segment.className = "counted";
    segment.dataset.model = m.id;
    segment.style.width = (100 * counted(m) / budget) + "%";
    segment.title = `${m.id}: counted ${size(counted(m))}` + (used(m) ? `, using ${size(used(m))}` : "");
    const share = document.createElement("div");
    share.className = "used";
    share.style.width = Math.min(100, 100 * (used(m) || 0) / counted(m)) + "%";
    segment.append(share, m.id);
    bar.append(segment);
  }
}

// Reads an SSE response body (fetch, not EventSource: EventSource cannot send the API key).
async function* sse(reply) {
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function follow() {
  for (;;) {
    try {
      const reply = await api("/models/sse");
      await refresh();
      let shown = 0;
      for await (const data of sse(reply)) {
        // A download reports ten times a second; the list follows it once a second.
        if (data.includes('"event": "download_progress"') && Date.now() - shown < 1000) continue;
        shown = Date.now();
        await refresh();
      }
    } catch (error) {
      console.warn("event stream:", error.message);
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

$("chat").onsubmit = async (event) => {
  event.preventDefault();
  const out = $("reply");
  out.textContent = "";
  out.dataset.chunks = "0";
  $("send").disabled = true;
  try {
    const reply = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("picker").value, stream: true, max_tokens: 64,
                             messages: [{ role: "user", content: $("prompt").value }] }),
    });
    if (!reply.ok) {
      out.textContent = (await reply.json()).error.message;
      return;
    }
    for await (const data of sse(reply)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) { out.textContent += "\n[" + chunk.error.message + "]"; break; }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        out.textContent += delta.content;
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
      }
    }
  } finally {
    $("send").disabled = false;
  }
};

$("key-form").onsubmit = (event) => {
  event.preventDefault();
  apiKey = $("key").value.trim();
  localStorage.setItem("gguf-router-key", apiKey);
  $("key-form").hidden = true;
  refresh();
};

follow();
