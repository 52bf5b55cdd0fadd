// Conversations kept in the browser (localStorage): the list, the current one, JSON export and import.
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "ferry.convs", CURRENT = "ferry.current", SETTINGS = "ferry.settings";
const state = { convs: [], current: null, controller: null, model: null };

function load() {
  try { state.convs = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (_) { state.convs = []; }
  if (!Array.isArray(state.convs)) state.convs = [];
  state.current = localStorage.getItem(CURRENT);
  if (!state.convs.some((c) => c.id === state.current)) newConv();
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(state.convs));
  localStorage.setItem(CURRENT, state.current);
}
const conv = () => state.convs.find((c) => c.id === state.current);
function newConv() {
  const c = { id: "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
              system: "", messages: [], created: Date.now() };
  state.convs.unshift(c);
  state.current = c.id;
  save();
  return c;
}

// -- export / import -------------------------------------------------------------------------------
function exportConv() {
  const c = conv();
  const blob = new Blob([JSON.stringify({ format: "ferry-chat", version: 1, conversation: c }, null, 2)],
                        { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = (c.title || "chat").replace(/[^\w.-]+/g, "_").slice(0, 40) + ".json";
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
async function importConv(file) {
  try {
    const data = JSON.parse(await file.text());
    const src = data.conversation || data;
    if (!Array.isArray(src.messages)) throw new Error("no messages array");
    const c = newConv();
    c.title = String(src.title || file.name).slice(0, 80);
    c.system = String(src.system || "");
    c.messages = src.messages.filter((m) => m && ["user", "assistant", "system"].includes(m.role))
      .map((m) => ({ role: m.role, content: String(m.content ?? ""), stats: m.stats && typeof m.stats === "object" ? m.stats : undefined }));
    save();
    renderAll();
  } catch (e) {
    alert("Could not import " + file.name + ": " + e.message);
  }
}

