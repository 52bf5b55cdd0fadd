// The engine tab: the tabs themselves, and a live view of /v1/stats/stream (one event a second, the numbers
// of /metrics) with a small canvas chart of generated tokens/s. The feed is read only while the tab is shown.
"use strict";
const statsView = (() => {
  const HISTORY = 120;
  const points = [];
  let controller = null;

  function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %"; }
  function num(x, d = 1) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }
  function bytes(x) {
    if (x === null || x === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return x.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function cards(s) {
    const out = [
      ["Running", s.running], ["Waiting", s.waiting],
      ["KV blocks", s.kv_blocks_used + " / " + s.kv_blocks_total],
      ["KV cache", bytes(s.kv_cache_bytes)], ["KV policy", s.kv_policy || "–"],
      ["Prefix-cache hits", pct(s.prefix_cache_hit_rate)], ["Preemptions", s.preemptions],
      ["Generated tok/s", num(s.generation_tokens_per_s)], ["Prompt tok/s", num(s.prompt_tokens_per_s)],
      ["Generated tokens", s.generation_tokens], ["Prompt tokens", s.prompt_tokens], ["Engine steps", s.steps],
    ];
    const e = s.experts;
    if (e) out.push(["Expert cache hits", pct(e.hit_rate)], ["Expert bytes / token", bytes(e.bytes_read_per_token)],
                    ["Expert I/O stall / token", num(1000 * e.io_stall_per_token, 2) + " ms"],
                    ["Expert cache", bytes(e.cache_bytes)]);
    return out;
  }

  function render(s) {
    const grid = document.getElementById("stat-grid");
    grid.replaceChildren();
    for (const [label, value] of cards(s)) {
      const card = document.createElement("div");
      card.className = "card";
      const l = document.createElement("div"), v = document.createElement("div");
      l.className = "label";
      v.className = "value";
      l.textContent = label;
      v.textContent = String(value);
      v.dataset.stat = label;
      card.append(l, v);
      grid.appendChild(card);
    }
    draw();
  }

  function draw() {
    const canvas = document.getElementById("tps-chart");
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 600, h = canvas.clientHeight || 160;
    canvas.width = w * ratio;
    canvas.height = h * ratio;
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    const css = getComputedStyle(document.documentElement);
    const max = Math.max(1, ...points);
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = css.getPropertyValue("--muted");
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText(max.toFixed(0) + " tok/s", 4, 12);
    ctx.strokeStyle = css.getPropertyValue("--line");
    ctx.lineWidth = 1;
    for (const f of [0, 0.5, 1]) {  // grid: 0, half and full scale
      const y = Math.round(h - 4 - f * (h - 20)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(0, y);
      ctx.lineTo(w, y);
      ctx.stroke();
    }
    if (!points.length) return;
    const xy = (p, i) => [w - (points.length - 1 - i) * (w / (HISTORY - 1)), h - 4 - (p / max) * (h - 20)];
    ctx.beginPath();
    points.forEach((p, i) => { const [x, y] = xy(p, i); if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y); });
    ctx.strokeStyle = css.getPropertyValue("--accent");
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.lineTo(w, h - 4);
    ctx.lineTo(xy(points[0], 0)[0], h - 4);
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = css.getPropertyValue("--accent");
    ctx.fill();
    ctx.globalAlpha = 1;
  }

  async function start() {
    if (controller) return;
    controller = new AbortController();
    const status = document.getElementById("stats-status");
    try {
      const r = await api.request("/v1/stats/stream", { signal: controller.signal });
      status.textContent = "live, updated every second";
      await api.readSSE(r, (s) => {
        if (s.generation_tokens_per_s !== null) {
          points.push(s.generation_tokens_per_s);
          if (points.length > HISTORY) points.shift();
        }
        render(s);
      });
    } catch (e) {
      if (e.name !== "AbortError") status.textContent = "stats unavailable: " + e.message;
    }
    controller = null;
  }

  function stop() {
    if (controller) controller.abort();
    controller = null;
  }

  function show(tab) {
    const chat = tab === "chat";
    document.getElementById("chat-view").hidden = !chat;
    document.getElementById("stats-view").hidden = chat;
    document.getElementById("tab-chat").setAttribute("aria-selected", String(chat));
    document.getElementById("tab-stats").setAttribute("aria-selected", String(!chat));
    if (chat) stop(); else start();
    if (location.hash !== "#" + tab) history.replaceState(null, "", "#" + tab);
  }

  document.getElementById("tab-chat").addEventListener("click", () => show("chat"));
  document.getElementById("tab-stats").addEventListener("click", () => show("stats"));
  window.addEventListener("ferry-key", () => { if (location.hash === "#stats") { stop(); start(); } });
  show(location.hash === "#stats" ? "stats" : "chat");
  return { show };
})();
