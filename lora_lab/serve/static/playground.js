// lora_lab playground: a client of the server's OpenAI API, nothing more (see lora_lab/serve/playground.py).
// One prompt goes to every column at once; each column streams its own answer (Server-Sent Events) and shows its
// token count and speed. Plain browser JavaScript: no framework, no build step.
"use strict";

const MAX_COLUMNS = 4;
const $ = (id) => document.getElementById(id);
const state = { models: [], base: null, controllers: [] };

// ---- talking to the API -----------------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  // OpenAI-style errors: {"error": {"message": ...}}; anything else: the status line and the body's start
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    if (body && body.detail) return `${response.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers() } :
    { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorMessage(response));
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.text();
}

// ---- models and adapters ----------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const list = await api("v1/models");
    state.models = list.data.map((m) => m.id);
    const base = list.data.find((m) => !m.parent) || list.data[0];
    state.base = base ? base.id : null;
    $("server-info").textContent = `base ${state.base}, ${state.models.length - 1} adapter(s)`;
    renderModelList(list.data);
    refreshColumnSelects();
    setAdapterMessage("");
  } catch (e) {
    setAdapterMessage(`could not list the models (${e.message})`, true);
  }
}

function renderModelList(data) {
  const ul = $("model-list");
  ul.replaceChildren();
  for (const m of data) {
    const li = document.createElement("li");
    li.dataset.model = m.id;
    const name = document.createElement("strong");
    name.textContent = m.id;
    li.append(name, document.createTextNode(m.parent ? `  adapter (${m.root})` : "  base model"));
    if (m.parent) {
      const unload = document.createElement("button");
      unload.type = "button";
      unload.textContent = "Unload";
      unload.className = "unload";
      unload.addEventListener("click", () => unloadAdapter(m.id));
      li.append(unload);
    }
    ul.append(li);
  }
}

function setAdapterMessage(text, isError = false) {
  const el = $("adapter-message");
  el.textContent = text;
  el.classList.toggle("error-text", isError);
}

async function loadAdapter() {
  const name = $("adapter-name").value.trim();
  const path = $("adapter-path").value.trim();
  if (!name || !path) { setAdapterMessage("give the adapter a name and its directory on the server", true); return; }
  setAdapterMessage(`loading ${name} ...`);
  try {
    setAdapterMessage(String(await api("v1/load_lora_adapter", { lora_name: name, lora_path: path })));
    await loadModels();
    setAdapterMessage(`loaded ${name}`);
  } catch (e) {
    setAdapterMessage(e.message, true);
  }
}

async function unloadAdapter(name) {
  try {
    await api("v1/unload_lora_adapter", { lora_name: name });
    await loadModels();
    setAdapterMessage(`unloaded ${name}`);
  } catch (e) {
    setAdapterMessage(e.message, true);
  }
}

// ---- columns ----------------------------------------------------------------------------------------------------
function columns() { return Array.from(document.querySelectorAll("#columns .column")); }

function addColumn(model) {
  if (columns().length >= MAX_COLUMNS) return;
  const column = $("column-template").content.firstElementChild.cloneNode(true);
  column.querySelector(".remove").addEventListener("click", () => {
    if (columns().length > 1) { column.remove(); updateColumnButtons(); }
  });
  $("columns").append(column);
  fillSelect(column.querySelector("select.model"), model);
  updateColumnButtons();
}

function fillSelect(select, wanted) {
  const current = wanted || select.value;
  select.replaceChildren(...state.models.map((id) => new Option(id === state.base ? `${id} (base)` : id, id)));
  if (state.models.includes(current)) select.value = current;
}

function refreshColumnSelects() {
  if (!columns().length) {  // first time: the base, and next to it the first adapter if there is one
    addColumn(state.base);
    if (state.models.length > 1) addColumn(state.models.find((m) => m !== state.base));
  }
  for (const column of columns()) fillSelect(column.querySelector("select.model"));
}

function updateColumnButtons() {
  const n = columns().length;
  $("add-column").disabled = n >= MAX_COLUMNS;
  for (const b of document.querySelectorAll("#columns .remove")) b.disabled = n <= 1;
}

// ---- sending ----------------------------------------------------------------------------------------------------
function settings() {
  const number = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
  const stop = $("stop").value.split("|").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
  return { max_tokens: number("max-tokens"), temperature: number("temperature"), top_p: number("top-p"),
           seed: number("seed"), stop: stop.length ? stop : null };
}

function requestFor(model, index) {
  const s = settings();
  const body = { model, stream: true, stream_options: { include_usage: true } };
  for (const k of ["max_tokens", "temperature", "top_p", "stop"]) if (s[k] !== null) body[k] = s[k];
  // same seed: every column samples from the same random numbers, so what differs is the model's doing
  if (s.seed !== null) body.seed = $("same-seed").checked ? s.seed : s.seed + index;
  const prompt = $("prompt").value;
  if ($("mode").value === "chat") {
    const system = $("system").value.trim();
    body.messages = (system ? [{ role: "system", content: system }] : []).concat([{ role: "user", content: prompt }]);
    return ["v1/chat/completions", body];
  }
  body.prompt = prompt;
  return ["v1/completions", body];
}

async function runColumn(column, index) {
  const output = column.querySelector(".output");
  const error = column.querySelector(".error");
  const stats = column.querySelector(".stats");
  const model = column.querySelector("select.model").value;
  output.textContent = "";
  error.hidden = true;
  error.textContent = "";
  stats.textContent = "waiting ...";
  column.classList.add("running");
  const controller = new AbortController();
  state.controllers.push(controller);
  const [path, body] = requestFor(model, index);
  const t0 = performance.now();
  let firstToken = null, usage = null, finish = null, pieces = 0;
  const showError = (message) => { error.textContent = message; error.hidden = false; };
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                         signal: controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one Server-Sent Event per blank-line-terminated block
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { showError(chunk.error.message || JSON.stringify(chunk.error)); continue; }
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const text = choice.delta ? (choice.delta.content || "") : (choice.text || "");
          if (text) {
            if (firstToken === null) firstToken = performance.now();
            output.textContent += text;
            pieces += 1;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      const seconds = (performance.now() - t0) / 1000;
      stats.textContent = `${pieces} chunks, ${seconds.toFixed(1)} s ...`;
    }
    const seconds = (performance.now() - t0) / 1000;
    const tokens = usage ? usage.completion_tokens : pieces;
    const ttft = firstToken === null ? "" : `, first token ${((firstToken - t0) / 1000).toFixed(2)} s`;
    stats.textContent = `${tokens} tokens (prompt ${usage ? usage.prompt_tokens : "?"}), ` +
      `${(tokens / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s${ttft}, finish: ${finish || "?"}`;
    column.dataset.finish = finish || "";
  } catch (e) {
    if (e.name === "AbortError") {
      stats.textContent = "stopped";
    } else {
      showError(e.message);
      stats.textContent = "";
    }
  } finally {
    column.classList.remove("running");
  }
}

async function send() {
  if (state.controllers.length) return;  // already running: Stop first
  $("send").disabled = true;
  $("stop-button").disabled = false;
  $("status").textContent = "generating ...";
  for (const c of columns()) delete c.dataset.finish;
  try {
    await Promise.all(columns().map((column, i) => runColumn(column, i)));
  } finally {
    state.controllers = [];
    $("send").disabled = false;
    $("stop-button").disabled = true;
    $("status").textContent = "done";
  }
}

function stopAll() {
  for (const c of state.controllers) c.abort();
}

// ---- wiring -----------------------------------------------------------------------------------------------------
function init() {
  $("api-key").value = sessionStorage.getItem("lora_lab_api_key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("lora_lab_api_key", $("api-key").value.trim());
    loadModels();
  });
  $("mode").addEventListener("change", () => { $("system-label").hidden = $("mode").value !== "chat"; });
  $("add-column").addEventListener("click", () => addColumn(state.base));
  $("send").addEventListener("click", send);
  $("stop-button").addEventListener("click", stopAll);
  $("load-adapter").addEventListener("click", loadAdapter);
  $("refresh-models").addEventListener("click", loadModels);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
  });
  loadModels().then(() => { document.body.dataset.ready = "1"; });
}

init();
