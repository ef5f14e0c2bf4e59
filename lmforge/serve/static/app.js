// The lmforge page: one tab per task, each talking to the JSON API of the same server (no libraries, offline).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const ENTITY_COLOURS = { PER: "#ffd7a8", LOC: "#b9e4c9", ORG: "#c9d4ff", MISC: "#f3c4e6" };
const history = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function status(panel, text, isError = false) {
  const el = $(".status", panel);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function call(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error ? data.error.message : `HTTP ${response.status}`);
  return data;
}

async function timed(panel, work) {
  const button = $("button[type=submit]", panel);
  button.disabled = true;
  const started = performance.now();
  status(panel, "working…");
  try {
    const model = await work();
    status(panel, `answered by ${model} in ${Math.round(performance.now() - started)} ms`);
  } catch (error) {
    status(panel, error.message, true);
  } finally {
    button.disabled = false;
  }
}

// --- tabs and models ---------------------------------------------------------------------------------
document.querySelectorAll("nav button").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((t) => t.setAttribute("aria-selected", String(t === tab)));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== tab.dataset.tab; });
}));

async function loadModels() {
  const response = await fetch("v1/models", { headers: headers() });
  const data = await response.json();
  if (!response.ok) {
    document.querySelectorAll(".panel").forEach((p) => status(p, data.error.message, true));
    return;
  }
  document.querySelectorAll(".panel").forEach((panel) => {
    const select = $(".model", panel);
    select.innerHTML = "";
    const served = data.data.filter((m) => m.task === panel.dataset.task);
    served.forEach((m) => select.add(new Option(m.id, m.id)));
    if (!served.length) status(panel, `no ${panel.dataset.task} model is served`, true);
  });
}
$("#api-key").addEventListener("change", () => { localStorage.setItem("lmforge-key", $("#api-key").value); loadModels(); });
$("#api-key").value = localStorage.getItem("lmforge-key") || "";

// --- chat: streamed with server-sent events ------------------------------------------------------------
function bubble(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("#chat-log").append(el);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return el;
}

async function streamChat(model, el) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model, messages: history, stream: true, temperature: 0.8, top_p: 0.9 }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.error ? data.error.message : `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (event === "[DONE]") return;
      const chunk = JSON.parse(event);
      if (chunk.error) throw new Error(chunk.error.message);
      el.textContent += chunk.choices[0].delta.content || "";
      $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
    }
  }
}

$("#chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  bubble("user", text);
  history.push({ role: "user", content: text });
  const el = bubble("assistant streaming", "");
  const model = $("#chat .model").value;
  timed($("#chat"), async () => {
    try {
      await streamChat(model, el);
      history.push({ role: "assistant", content: el.textContent });
    } finally {
      el.classList.remove("streaming");
      el.dataset.done = "true";
    }
    return model;
  });
});
$("#chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#chat-reset").addEventListener("click", () => { history.length = 0; $("#chat-log").innerHTML = ""; });

// --- classification: label and probability bars --------------------------------------------------------
$("#classify form").addEventListener("submit", (event) => {
  event.preventDefault();
  const model = $("#classify .model").value;
  timed($("#classify"), async () => {
    const data = await call("v1/classify", { model, input: [$("#classify-input").value] });
    const result = data.data[0];
    const out = $("#classify-out");
    out.innerHTML = "";
    Object.entries(result.scores).sort((a, b) => b[1] - a[1]).forEach(([label, p]) => {
      const row = document.createElement("div");
      row.className = `label-row${label === result.label ? " top" : ""}`;
      row.innerHTML = '<span class="name"></span><div class="bar-track"><div class="bar-fill"></div></div><span class="prob"></span>';
      $(".name", row).textContent = label;
      $(".bar-fill", row).style.width = `${(100 * p).toFixed(1)}%`;
      $(".prob", row).textContent = `${(100 * p).toFixed(1)}%`;
      out.append(row);
    });
    return data.model;
  });
});

// --- entities: the text with each entity highlighted by type --------------------------------------------
function highlight(text, entities) {
  const container = document.createElement("div");
  container.className = "ner-text";
  let at = 0;
  [...entities].sort((a, b) => a.start - b.start).forEach((e) => {
    if (e.start < at) return;
    container.append(document.createTextNode(text.slice(at, e.start)));
    const mark = document.createElement("mark");
    mark.className = `ent ent-${e.type}`;
    mark.dataset.type = e.type;
    mark.title = `${e.type} (${(100 * e.score).toFixed(0)}%)`;
    mark.style.setProperty("--ent", ENTITY_COLOURS[e.type] || "#e6e6e6");
    mark.textContent = text.slice(e.start, e.end);
    container.append(mark);
    at = e.end;
  });
  container.append(document.createTextNode(text.slice(at)));
  return container;
}

$("#ner form").addEventListener("submit", (event) => {
  event.preventDefault();
  const model = $("#ner .model").value;
  const text = $("#ner-input").value;
  timed($("#ner"), async () => {
    const data = await call("v1/ner", { model, input: [text] });
    const entities = data.data[0].entities;
    $("#ner-out").replaceChildren(highlight(text, entities));
    const types = [...new Set(entities.map((e) => e.type))];
    $("#ner-legend").innerHTML = types.length ? "" : "no entities found";
    types.forEach((t) => {
      const item = document.createElement("span");
      item.innerHTML = `<i style="background:${ENTITY_COLOURS[t] || "#e6e6e6"}"></i>`;
      item.append(document.createTextNode(t));
      $("#ner-legend").append(item);
    });
    return data.model;
  });
});

// --- why? token attributions from /v1/explain, shaded like `lmforge explain`'s HTML ---------------------
function shade(score, scale) {
  const t = scale > 0 ? Math.min(Math.abs(score) / scale, 1) : 0;
  const c = (x) => Math.round(255 * x);
  return score >= 0 ? `rgb(255,${c(1 - 0.75 * t)},${c(1 - 0.75 * t)})` : `rgb(${c(1 - 0.75 * t)},${c(1 - 0.55 * t)},255)`;
}

function explained(e) {
  const line = document.createElement("div");
  line.className = "why-line";
  const head = document.createElement("div");
  head.className = "why-head";
  head.textContent = `${e.target} · ${e.value.toFixed(3)} · ${e.method}`;
  const body = document.createElement("div");
  body.className = "why-text";
  const scale = Math.max(0, ...e.tokens.map((t) => Math.abs(t.score)));
  let at = 0;
  [...e.tokens].sort((a, b) => a.start - b.start).forEach((t) => {
    if (t.start < at) return;
    body.append(document.createTextNode(e.text.slice(at, t.start)));
    const span = document.createElement("span");
    span.style.background = shade(t.score, scale);
    span.title = `${t.score >= 0 ? "+" : ""}${t.score.toFixed(4)}`;
    span.dataset.score = String(t.score);
    span.textContent = e.text.slice(t.start, t.end);
    body.append(span);
    at = t.end;
  });
  body.append(document.createTextNode(e.text.slice(at)));
  line.append(head, body);
  return line;
}

function whyButton(task) {
  const button = $(`#${task}-why`);
  button.addEventListener("click", () => {
    const panel = $(`#${task}`);
    const model = $(`#${task} .model`).value;
    const body = { model, input: $(`#${task}-input`).value, method: $(`#${task}-method`).value };
    button.disabled = true;
    const started = performance.now();
    status(panel, "explaining…");
    call("v1/explain", body).then((data) => {
      const out = $(`#${task}-why-out`);
      out.replaceChildren(...data.data.map(explained));
      if (!data.data.length) out.textContent = "nothing to explain (no entity found)";
      status(panel, `explained by ${data.model} in ${Math.round(performance.now() - started)} ms`);
    }).catch((error) => status(panel, error.message, true)).finally(() => { button.disabled = false; });
  });
}
whyButton("classify");
whyButton("ner");
["classify", "ner"].forEach((task) => $(`#${task} form`).addEventListener("submit", () => {
  $(`#${task}-why-out`).replaceChildren();
  setTimeout(() => { $(`#${task}-why`).disabled = false; }, 0);
}));

// --- translation ------------------------------------------------------------------------------------
$("#translate form").addEventListener("submit", (event) => {
  event.preventDefault();
  const model = $("#translate .model").value;
  timed($("#translate"), async () => {
    const data = await call("v1/translate", { model, input: [$("#translate-input").value] });
    const out = document.createElement("div");
    out.className = "translation";
    out.textContent = data.data[0].translation;
    $("#translate-out").replaceChildren(out);
    return data.model;
  });
});

loadModels();
