// LayerRun's page: chat through /api/chat (NDJSON stream) and a live view fed by /live/events (SSE).
// Plain browser JavaScript: no build step, no libraries, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null, history: [], events: [], now: 0, rates: [], slots: 0, layers: 0,
  controller: null, barsDrawn: 0, messages: 0, lastLive: null,
};
window.layerrun = state; // read by the browser test (and handy in the console)

// ---- chat ------------------------------------------------------------------------------------
const key = $("apikey");
key.value = localStorage.getItem("layerrun-api-key") || "";
key.addEventListener("change", () => localStorage.setItem("layerrun-api-key", key.value));

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function ask(question) {
  state.history.push({ role: "user", content: question });
  addMessage("user", question);
  const out = addMessage("assistant", "");
  out.dataset.state = "streaming";
  const headers = { "Content-Type": "application/json" };
  if (key.value) headers.Authorization = "Bearer " + key.value;
  const body = {
    model: state.model || "", messages: state.history, stream: true,
    options: { temperature: Number($("temperature").value), num_predict: Number($("max_tokens").value) },
  };
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  let text = "", final = null;
  try {
    const r = await fetch("/api/chat", { method: "POST", headers, body: JSON.stringify(body), signal: state.controller.signal });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        const obj = JSON.parse(line);
        if (obj.error) throw new Error(obj.error);
        if (obj.message && obj.message.content) {
          text += obj.message.content;
          out.textContent = text;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (obj.done) final = obj;
      }
    }
    state.history.push({ role: "assistant", content: text });
    if (final) {
      const meta = document.createElement("span");
      meta.className = "meta";
      const secs = final.eval_duration / 1e9;
      meta.textContent = `${final.eval_count} tokens, ${(final.eval_count / Math.max(secs, 1e-9)).toFixed(1)} tok/s, ` +
        `first token after ${(final.prompt_eval_duration / 1e9).toFixed(2)} s (${final.done_reason})`;
      out.appendChild(meta);
    }
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    if (e.name !== "AbortError") { out.classList.add("error"); out.textContent = (text ? text + "\n" : "") + "error: " + e.message; }
    state.history.pop();
  } finally {
    state.controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("question").value.trim();
  if (!q || state.controller) return;
  $("question").value = "";
  ask(q);
});
$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.history = []; $("messages").textContent = ""; });

// ---- live view -------------------------------------------------------------------------------
const COLORS = { read: "#3b82f6", copy: "#a855f7", compute: "#16a34a", stall: "#dc2626" };
const KEEP_S = 30; // events older than this (server time) are dropped

function human(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}

function rows() {
  const r = [{ label: "compute", match: (e) => e.kind === "compute" || e.kind === "stall" }];
  for (let s = 0; s < state.slots; s++) r.push({ label: "slot " + s, match: (e) => e.slot === s && e.kind !== "compute" });
  r.push({ label: "load", match: (e) => e.slot === null && e.kind === "read" });
  return r;
}

function windowStart() {
  // the last three forward steps: from the third-last compute of layer 0 (a step's first layer)
  const starts = state.events.filter((e) => e.kind === "compute" && e.layer === 0).map((e) => e.t0);
  if (starts.length >= 3) return starts[starts.length - 3];
  if (starts.length) return starts[0];
  return state.now - 2;
}

function drawTimeline() {
  const c = $("timeline"), g = c.getContext("2d");
  const W = c.width, H = c.height, left = 60;
  g.clearRect(0, 0, W, H);
  const rs = rows(), rh = Math.min(28, (H - 20) / rs.length);
  const t0 = windowStart();
  let t1 = t0;
  for (const e of state.events) if (e.t1 > t1) t1 = e.t1;
  const span = Math.max(t1 - t0, 1e-3);
  const x = (t) => left + ((t - t0) / span) * (W - left - 8);
  g.font = "11px system-ui"; g.textBaseline = "middle";
  let bars = 0;
  rs.forEach((row, i) => {
    const y = 4 + i * rh;
    g.fillStyle = "#666"; g.fillText(row.label, 4, y + rh / 2);
    g.strokeStyle = "#eee"; g.beginPath(); g.moveTo(left, y + rh); g.lineTo(W, y + rh); g.stroke();
    for (const e of state.events) {
      if (e.t1 < t0 || !row.match(e)) continue;
      const a = x(Math.max(e.t0, t0)), b = x(e.t1);
      g.fillStyle = COLORS[e.kind] || "#999";
      g.fillRect(a, y + 2, Math.max(b - a, 1), rh - 4);
      if (b - a > 18) { g.fillStyle = "#fff"; g.fillText(String(e.layer), a + 2, y + rh / 2); }
      bars++;
    }
  });
  g.fillStyle = "#666";
  g.fillText(`${(span * 1000).toFixed(1)} ms`, W - 70, H - 8);
  $("window").textContent = ` — last ${(span * 1000).toFixed(0)} ms (three steps), number = layer`;
  state.barsDrawn = bars;
}

function drawMemory(mem, reader) {
  const ring = reader === "mmap" ? "staging ring (mmap: layers are read through the page cache)" : "staging ring";
  const parts = [["embeddings + head", "embeddings_head", "#64748b"], ["resident layers", "resident_layers", "#16a34a"],
    [ring, "ring", "#3b82f6"], ["KV cache", "kv_cache", "#f59e0b"]];
  const total = Math.max(mem.total, 1);
  const bar = parts.map(([n, k, col]) => `<div title="${n}: ${human(mem[k])}" style="width:${(100 * mem[k]) / total}%;background:${col}"></div>`).join("");
  const table = parts.map(([n, k, col]) => `<tr><td><span class="sw" style="background:${col}"></span>${n}</td><td>${human(mem[k])}</td></tr>`).join("");
  $("memory").innerHTML = `<div class="bar">${bar}</div><table>${table}<tr><td><b>total</b></td><td><b>${human(mem.total)}</b></td></tr></table>`;
}

function drawRate() {
  const c = $("rate"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const r = state.rates.slice(-180), max = Math.max(1, ...r);
  g.strokeStyle = "#16a34a"; g.beginPath();
  r.forEach((v, i) => { const x = (i / 179) * c.width, y = c.height - 4 - (v / max) * (c.height - 8); i ? g.lineTo(x, y) : g.moveTo(x, y); });
  g.stroke();
  g.fillStyle = "#666"; g.font = "11px system-ui"; g.fillText(`max ${max.toFixed(1)} tok/s (last 90 s)`, 6, 12);
}

function onLive(msg) {
  state.lastLive = msg; state.messages++;
  state.model = state.model || msg.model;
  state.now = msg.now; state.slots = msg.slots; state.layers = msg.layers;
  for (const [seq, kind, layer, slot, t0, t1, bytes] of msg.events) state.events.push({ seq, kind, layer, slot, t0, t1, bytes });
  state.events = state.events.filter((e) => e.t1 > msg.now - KEEP_S);
  state.rates.push(msg.tok_s);
  $("model").textContent = msg.model;
  $("mode").textContent = `${msg.mode}: ${msg.resident} resident, ${msg.streamed} streamed` +
    (msg.streamed ? `, prefetch ${msg.prefetch}, ${msg.reader}` : "") + ` · ${msg.device}/${msg.dtype}`;
  $("toks").textContent = `${msg.tok_s.toFixed(1)} tok/s · ${msg.running} running, ${msg.waiting} waiting`;
  $("plan").textContent = msg.plan.join("\n");
  drawMemory(msg.memory, msg.reader);
  drawTimeline();
  drawRate();
}

function connect() {
  const es = new EventSource("/live/events");
  es.addEventListener("live", (ev) => onLive(JSON.parse(ev.data)));
  es.onopen = () => { $("conn").textContent = "live"; $("conn").classList.remove("off"); };
  es.onerror = () => { $("conn").textContent = "reconnecting"; $("conn").classList.add("off"); };
}
connect();
