// The chat tab: streaming over /v1/chat/completions, stop, regenerate, edit, settings, per-message stats.
// Model text reaches the DOM only through md.render (textContent). Conversations live in store.js.
"use strict";
// -- rendering -------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function button(text, onClick, cls) {
  const b = el("button", cls, text);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}
function renderConvs() {
  const ul = $("convs");
  ul.replaceChildren();
  for (const c of state.convs) {
    const li = el("li", "", c.title || "New chat");
    li.tabIndex = 0;
    li.setAttribute("aria-current", String(c.id === state.current));
    const open = () => { if (!state.controller) { state.current = c.id; save(); renderAll(); } };
    li.addEventListener("click", open);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    ul.appendChild(li);
  }
}
function fmt(x, digits = 1) { return x === undefined || x === null || !isFinite(x) ? "–" : x.toFixed(digits); }
function statsText(s) {
  if (!s) return "";
  const parts = [];
  if (s.ttft_ms !== undefined) parts.push("TTFT " + fmt(s.ttft_ms, 0) + " ms");
  if (s.prompt_tokens !== undefined) parts.push("prompt " + s.prompt_tokens + " tok, " + fmt(s.prompt_tps) + " tok/s");
  if (s.completion_tokens !== undefined) parts.push("generated " + s.completion_tokens + " tok, " + fmt(s.gen_tps) + " tok/s");
  if (s.finish) parts.push("finish: " + s.finish);
  return parts.join(" · ");
}
function paintMessage(node, m) {
  const body = node.querySelector(".body");
  if (m.role === "assistant") body.replaceChildren(md.render(m.content));
  else body.textContent = m.content;
  node.querySelector(".stats").textContent = m.error ? "" : statsText(m.stats);
  if (m.error) body.appendChild(el("div", "error", "error: " + m.error));
}
function renderMessages() {
  const c = conv(), box = $("messages");
  box.replaceChildren();
  const busy = !!state.controller;
  c.messages.forEach((m, i) => {
    const node = el("div", "msg " + m.role);
    node.dataset.index = i;
    node.append(el("div", "who", m.role), el("div", "body"), el("div", "stats"));
    const actions = el("div", "actions");
    if (!busy && m.role === "user") actions.appendChild(button("Edit", () => editMessage(node, i), "edit"));
    if (!busy && m.role === "assistant" && i === c.messages.length - 1)
      actions.appendChild(button("Regenerate", regenerate, "regenerate"));
    node.appendChild(actions);
    paintMessage(node, m);
    box.appendChild(node);
  });
  box.scrollTop = box.scrollHeight;
}
function renderAll() {
  renderConvs();
  renderMessages();
  $("system").value = conv().system || "";
}
function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// -- generation ------------------------------------------------------------------------------------
function settings() {
  try { return JSON.parse(localStorage.getItem(SETTINGS) || "{}"); } catch (_) { return {}; }
}
function requestBody(c) {
  const messages = [];
  if (c.system) messages.push({ role: "system", content: c.system });
  for (const m of c.messages) if (!m.error) messages.push({ role: m.role, content: m.content });  // failed answers
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const s = settings();
  for (const [k, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", parseInt], ["seed", parseInt]])
    if (s[k] !== undefined && s[k] !== "" && isFinite(parse(s[k]))) body[k] = parse(s[k]);
  if (body.max_tokens === undefined) body.max_tokens = 256;
  return body;
}
function updateStats(st, t0, tFirst, counted) {
  const now = performance.now();
  if (tFirst !== null) st.ttft_ms = tFirst - t0;
  if (st.completion_tokens === undefined || !st.usage) st.completion_tokens = counted;
  if (tFirst !== null && st.completion_tokens > 1 && now > tFirst)
    st.gen_tps = (st.completion_tokens - 1) / ((now - tFirst) / 1000);
  if (st.prompt_tokens !== undefined && st.ttft_ms) st.prompt_tps = st.prompt_tokens / (st.ttft_ms / 1000);
}
// Streams an answer to the conversation as it stands into a new assistant message.
async function generate() {
  const c = conv();
  const body = requestBody(c);
  const reply = { role: "assistant", content: "", stats: {} };
  c.messages.push(reply);
  state.controller = new AbortController();
  setBusy(true);
  renderMessages();
  const node = $("messages").lastElementChild;
  const t0 = performance.now();
  let tFirst = null, counted = 0;
  try {
    const r = await api.request("/v1/chat/completions",
      { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    await api.readSSE(r, (ev) => {
      if (ev.error) throw new Error(ev.error.message || "server error");
      if (ev.usage) {
        reply.stats.usage = true;
        reply.stats.prompt_tokens = ev.usage.prompt_tokens;
        reply.stats.completion_tokens = ev.usage.completion_tokens;
      }
      for (const ch of ev.choices || []) {
        const d = ch.delta && ch.delta.content;
        if (d) {
          if (tFirst === null) tFirst = performance.now();
          reply.content += d;
          counted++;
        }
        if (ch.finish_reason) reply.stats.finish = ch.finish_reason;
      }
      updateStats(reply.stats, t0, tFirst, counted);
      paintMessage(node, reply);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  } catch (e) {
    if (e.name === "AbortError") reply.stats.finish = "stopped";
    else reply.error = e.message;
  } finally {
    updateStats(reply.stats, t0, tFirst, counted);
    delete reply.stats.usage;
    state.controller = null;
    setBusy(false);
    save();
    renderMessages();
  }
}
function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  const c = conv();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.trim().slice(0, 40);
  $("input").value = "";
  save();
  renderConvs();
  generate();
}
function regenerate() {
  const c = conv();
  if (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  generate();
}
function editMessage(node, i) {
  const c = conv(), body = node.querySelector(".body");
  const area = el("textarea");
  area.value = c.messages[i].content;
  area.rows = Math.min(10, area.value.split("\n").length + 1);
  const submit = () => {
    c.messages[i].content = area.value;
    c.messages.length = i + 1; // everything after the edited message is regenerated
    save();
    generate();
  };
  area.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); } });
  body.replaceChildren(area, button("Save & send", submit, "save-edit"), button("Cancel", renderMessages));
  area.focus();
}

// -- wiring ----------------------------------------------------------------------------------------
function wireSettings() {
  const s = settings();
  for (const k of ["temperature", "top_p", "max_tokens", "seed"]) {
    $(k).value = s[k] ?? "";
    $(k).addEventListener("change", () => {
      const now = settings();
      now[k] = $(k).value;
      localStorage.setItem(SETTINGS, JSON.stringify(now));
    });
  }
  $("system").addEventListener("change", () => { conv().system = $("system").value; save(); });
}
function wireTheme() {
  const saved = localStorage.getItem("ferry.theme");
  if (saved) document.documentElement.dataset.theme = saved;
  $("theme").addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme
      ? document.documentElement.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    document.documentElement.dataset.theme = dark ? "light" : "dark";
    localStorage.setItem("ferry.theme", document.documentElement.dataset.theme);
  });
}
function showKeyForm(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("key").focus();
}
async function loadModel() {
  try {
    const r = await api.request("/v1/models");
    state.model = (await r.json()).data[0].id;
    $("model").textContent = state.model;
    $("key-form").hidden = true;
    return true;
  } catch (e) {
    if (e.status !== 401) $("model").textContent = "server unreachable: " + e.message;
    return false;
  }
}
function wireChat() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-conv").addEventListener("click", () => { if (!state.controller) { newConv(); renderAll(); } });
  $("delete-conv").addEventListener("click", () => {
    if (state.controller) return;
    state.convs = state.convs.filter((c) => c.id !== state.current);
    if (state.convs.length) state.current = state.convs[0].id; else newConv();
    save();
    renderAll();
  });
  $("export").addEventListener("click", exportConv);
  $("import").addEventListener("change", (e) => { if (e.target.files[0]) importConv(e.target.files[0]); e.target.value = ""; });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    api.setKey($("key").value.trim());
    if (await loadModel()) window.dispatchEvent(new Event("ferry-key"));
  });
  api.onUnauthorized = showKeyForm;
}

load();
wireTheme();
wireSettings();
wireChat();
renderAll();
loadModel();
