// The server's API as the page uses it: the API key (sessionStorage), fetch with it, and an SSE reader for
// streamed responses (fetch, not EventSource, so that the Authorization header can be sent).
"use strict";
const api = (() => {
  const KEY = "ferry.apiKey";
  let onUnauthorized = () => {};

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function request(path, options = {}) {
    const r = await fetch(path, { ...options, headers: headers() });
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { message = (await r.json()).error.message || message; } catch (_) { /* not JSON */ }
      if (r.status === 401) onUnauthorized(message);
      throw new HttpError(r.status, message);
    }
    return r;
  }

  // Calls onEvent(parsed JSON) for each `data:` event until [DONE] or the end of the body.
  async function readSSE(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  return {
    request, readSSE, HttpError,
    setKey: (k) => sessionStorage.setItem(KEY, k),
    hasKey: () => !!sessionStorage.getItem(KEY),
    set onUnauthorized(f) { onUnauthorized = f; },
  };
})();
