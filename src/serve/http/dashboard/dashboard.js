// The edgemoe dashboard: a chat box streaming through the OpenAI endpoints (server-sent events)
// and panels that poll /v1/stats once a second. The server computes every figure, including
// each heat-map cell's heat and the tiers' colours; this script only lays them out.
"use strict";

const POLL_MS = 1000;
const SPARK_POINTS = 60;
const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  key: sessionStorage.getItem("edgemoe-api-key") || "",
  chatTemplate: null,
  history: [],
  tps: [],
  busy: false,
};

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function count(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
}

function pct(x) {
  return x === null || x === undefined || !isFinite(x) ? "–" : (100 * x).toFixed(1) + "%";
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status" + (kind ? " " + kind : "");
}

// ---- stats ----

async function poll() {
  try {
    const r = await fetch("/v1/stats", { headers: authHeaders(), cache: "no-store" });
    if (r.status === 401) {
      $("key-form").hidden = false;
      setStatus("API key needed", "error");
      return;
    }
    if (r.status === 503) {
      setStatus("loading the model…");
      return;
    }
    if (!r.ok) {
      setStatus("stats: HTTP " + r.status, "error");
      return;
    }
    render(await r.json());
    setStatus("live", "ok");
  } catch (e) {
    setStatus("server unreachable", "error");
  }
}

function render(s) {
  $("model").textContent = s.model || "";
  if (state.chatTemplate !== s.chat_template) {
    state.chatTemplate = s.chat_template;
    $("chat-mode").textContent = s.chat_template
      ? "· /v1/chat/completions"
      : "· no chat template: text completion (/v1/completions)";
  }
  // Throughput.
  $("tokens-per-s").textContent = s.tokens_per_s.toFixed(1);
  state.tps.push(s.tokens_per_s);
  if (state.tps.length > SPARK_POINTS) state.tps.shift();
  spark($("tps-spark"), state.tps);
  const q = s.requests;
  $("generated-tokens").textContent = count(q.completion_tokens);
  $("prompt-tokens").textContent = count(q.prompt_tokens);
  $("weight-bytes").textContent = bytes(s.runtime.weight_bytes);
  // Queue.
  $("queue-active").textContent = s.queue.active;
  $("queue-waiting").textContent = s.queue.waiting;
  const finished = q.finished_stop + q.finished_length + q.finished_cancelled + q.finished_error;
  $("finished").textContent = count(finished) + (q.finished_error ? " (" + q.finished_error + " failed)" : "");
  $("rejected").textContent = count(q.rejected_queue_full);
  $("rss").textContent = bytes(s.memory.resident_bytes);
  // KV cache.
  $("kv-bytes").textContent = bytes(s.kv.bytes);
  $("kv-evictions").textContent = count(s.kv.evictions);
  kvTable(s.kv.sequences);
  // Experts.
  experts(s.experts);
}

function spark(canvas, values) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#1f7ae0";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (w * i) / (SPARK_POINTS - 1);
    const y = h - 2 - ((h - 4) * v) / max;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function kvTable(rows) {
  const body = $("kv-sequences").querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = body.insertRow();
    const td = tr.insertCell();
    td.colSpan = 5;
    td.className = "empty";
    td.textContent = "no request running";
    return;
  }
  rows.forEach((r, i) => {
    const tr = body.insertRow();
    const policy = r.budget ? r.policy + " (" + r.budget + ")" : r.policy;
    [String(i + 1), policy, count(r.slots), bytes(r.allocated_bytes), count(r.evictions)].forEach((t) => {
      tr.insertCell().textContent = t;
    });
  });
}

function experts(x) {
  const c = x.cache;
  $("placement").textContent = x.paged
    ? "· paged: " + c.slots + " RAM slots of " + bytes(c.slot_bytes)
    : "· in place (no --mem): every expert in RAM";
  $("hit-rate").textContent = c ? pct(c.hit_rate) : "–";
  $("bytes-read").textContent = c ? bytes(c.bytes_read) : "–";
  $("prefetch-accuracy").textContent = c && c.prefetches
    ? pct(c.prefetch_hits / c.prefetches) + " of " + count(c.prefetches)
    : "–";
  const p = x.prediction;
  $("prediction").textContent = p ? pct(p.precision) + " / " + pct(p.recall) : "–";
  heatmap(x);
}

// The heat map: one <rect> per (layer, expert), kept across polls and updated in place.
const CELL = 26, GAP = 2, LEFT = 62, TOP = 22;

function heatmap(x) {
  const m = x.map;
  const svg = $("heatmap");
  const shape = m.layers.join(",") + "x" + m.experts;
  if (svg.dataset.shape !== shape) {
    svg.replaceChildren();
    svg.dataset.shape = shape;
    const width = LEFT + m.experts * (CELL + GAP);
    const height = TOP + m.layers.length * (CELL + GAP);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(height));
    for (let e = 0; e < m.experts; e++) {
      label(svg, LEFT + e * (CELL + GAP) + CELL / 2, TOP - 8, String(e), "middle");
    }
    m.layers.forEach((layer, r) => {
      const y = TOP + r * (CELL + GAP);
      label(svg, LEFT - 6, y + CELL / 2 + 4, "layer " + layer, "end");
      for (let e = 0; e < m.experts; e++) {
        const rect = document.createElementNS(SVG_NS, "rect");
        rect.setAttribute("class", "cell");
        rect.setAttribute("x", String(LEFT + e * (CELL + GAP)));
        rect.setAttribute("y", String(y));
        rect.setAttribute("width", String(CELL));
        rect.setAttribute("height", String(CELL));
        rect.dataset.layer = String(layer);
        rect.dataset.expert = String(e);
        rect.appendChild(document.createElementNS(SVG_NS, "title"));
        rect.addEventListener("mouseenter", () => { $("heat-detail").textContent = rect.dataset.detail; });
        svg.appendChild(rect);
      }
    });
  }
  const total = m.counts.flat().reduce((a, b) => a + b, 0);
  const cells = svg.querySelectorAll("rect.cell");
  m.layers.forEach((layer, r) => {
    for (let e = 0; e < m.experts; e++) {
      const rect = cells[r * m.experts + e];
      const n = m.counts[r][e], tier = m.tiers[r][e];
      const reads = x.reads ? x.reads[r][e] : null;
      rect.setAttribute("fill", x.palette[tier]);
      rect.setAttribute("fill-opacity", (x.min_opacity + (1 - x.min_opacity) * m.heat[r][e]).toFixed(3));
      rect.dataset.count = String(n);
      rect.dataset.tier = tier;
      const detail = "layer " + layer + " · expert " + e + ": " + count(n) + " tokens (" +
        pct(total ? n / total : 0) + " of layer-expert picks), in " + tier.toUpperCase() +
        (reads === null ? "" : ", read " + count(reads) + "× from the file");
      rect.dataset.detail = detail;
      rect.firstChild.textContent = detail;
    }
  });
  legend(x, m);
}

function label(svg, x, y, text, anchor) {
  const t = document.createElementNS(SVG_NS, "text");
  t.setAttribute("x", String(x));
  t.setAttribute("y", String(y));
  t.setAttribute("text-anchor", anchor);
  t.textContent = text;
  svg.appendChild(t);
}

// Tiers that occur (GPU only when the server reports an expert there), then the heat scale.
function legend(x, m) {
  const present = new Set(m.tiers.flat());
  const box = $("legend");
  box.replaceChildren();
  Object.keys(x.palette).filter((t) => present.has(t)).forEach((t) => {
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = x.palette[t];
    item.append(sw, t.toUpperCase());
    item.dataset.tier = t;
    box.appendChild(item);
  });
  const scale = document.createElement("span");
  scale.className = "muted";
  scale.textContent = "opacity: tokens routed (log scale; hottest " + count(Math.max(0, ...m.counts.flat())) + ")";
  box.appendChild(scale);
}

// ---- chat ----

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Reads a server-sent event stream, calling onData with each `data:` payload's JSON.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  state.busy = true;
  $("send").disabled = true;
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  out.dataset.chunks = "0";
  const chat = state.chatTemplate === true;
  const body = {
    stream: true,
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value),
  };
  if (chat) {
    state.history.push({ role: "user", content: text });
    body.messages = state.history.slice();
  } else {
    body.prompt = text;
  }
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || "HTTP " + r.status);
    }
    await readEvents(r, (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      const choice = ev.choices && ev.choices[0];
      const piece = choice ? (chat ? choice.delta && choice.delta.content : choice.text) : "";
      if (piece) {
        out.textContent += piece;
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    });
    if (chat) state.history.push({ role: "assistant", content: out.textContent });
    out.dataset.state = "done";
  } catch (e) {
    if (chat) state.history.pop();
    out.classList.add("error");
    out.textContent += (out.textContent ? "\n" : "") + "error: " + e.message;
    out.dataset.state = "error";
  } finally {
    state.busy = false;
    $("send").disabled = false;
    poll();
  }
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("edgemoe-api-key", state.key);
  $("key-form").hidden = true;
  poll();
});

poll();
setInterval(poll, POLL_MS);
