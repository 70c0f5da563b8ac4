// The built-in chat page: OpenAI chat completions streamed over fetch, a stop button that aborts
// the request (the server sees the client go and ends it), live figures from /metrics.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "paged-engine.api-key";
const history = [];  // the conversation so far: {role, content}
let controller = null;  // the AbortController of the stream in flight

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text) { $("status").textContent = text || ""; }

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModels() {
  const select = $("model");
  const resp = await fetch("/v1/models", { headers: authHeaders() });
  if (!resp.ok) { setStatus("models: " + await errorText(resp)); return; }
  const body = await resp.json();
  const current = select.value;
  select.replaceChildren(...body.data.map((m) => {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.parent ? `${m.id} (adapter of ${m.parent})` : m.id;
    return opt;
  }));
  if (current) select.value = current;
  setStatus("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; div.appendChild(meta); }
  meta.textContent = text;
}

// Reads an SSE body, calling onEvent(json) per "data:" event until [DONE].
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || controller) return;
  $("prompt").value = "";
  history.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const answer = addMessage("assistant", "");
  const text = answer.querySelector(".text");
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const body = {
    model: $("model").value || undefined,
    messages,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("");
  const started = performance.now();
  let tokens = 0;
  let finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        text.textContent += choice.delta.content;
        answer.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    const secs = (performance.now() - started) / 1000;
    setMeta(answer, `${tokens} tokens, ${(tokens / secs).toFixed(1)} tok/s, finish: ${finish}`);
  } catch (err) {
    if (err.name === "AbortError") {
      setMeta(answer, "stopped");
    } else {
      setMeta(answer, "error");
      setStatus(err.message);
    }
  } finally {
    history.push({ role: "assistant", content: text.textContent });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// ---- live figures from the Prometheus text of /metrics ---------------------------------------
let lastTokens = null;
let lastTime = null;

function metricSum(textBody, name) {
  let total = null;
  for (const line of textBody.split("\n")) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== " " && rest[0] !== "{") continue;
    const value = Number(line.trim().split(/\s+/).pop());
    if (!Number.isNaN(value)) total = (total || 0) + value;
  }
  return total;
}

async function pollMetrics() {
  try {
    const resp = await fetch("/metrics", { headers: authHeaders() });
    if (!resp.ok) return;
    const body = await resp.text();
    const now = performance.now();
    const generated = metricSum(body, "vllm:generation_tokens_total");
    if (generated !== null && lastTokens !== null) {
      $("tps").textContent = ((generated - lastTokens) / ((now - lastTime) / 1000)).toFixed(1);
    }
    lastTokens = generated;
    lastTime = now;
    const kv = metricSum(body, "vllm:kv_cache_usage_perc");
    if (kv !== null) $("kv").textContent = (100 * kv).toFixed(1) + "%";
    const running = metricSum(body, "vllm:num_requests_running");
    if (running !== null) $("running").textContent = String(running);
  } catch (e) {
    // the server may be restarting: try again on the next tick
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });
  loadModels();
  pollMetrics();
  setInterval(pollMetrics, 1000);
}

init();
