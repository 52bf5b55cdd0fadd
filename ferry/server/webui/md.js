// Markdown to DOM nodes, safely: model output is untrusted, so every piece of it goes in through textContent
// or createTextNode, never as HTML markup. Supports fenced code, headings, lists, quotes, paragraphs, `code`,
// **bold**, *em*. Links stay plain text.
"use strict";
const md = (() => {
  function el(tag, text) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // inline: `code`, **bold**, *em* (no nesting past one level: enough for chat answers)
  function inline(parent, text) {
    const re = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)/g;
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      if (m[1]) parent.appendChild(el("code", m[1].slice(1, -1)));
      else if (m[2]) parent.appendChild(el("strong", m[2].slice(2, -2)));
      else parent.appendChild(el("em", m[3].slice(1, -1)));
      last = re.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
    return parent;
  }

  function render(text) {
    const frag = document.createDocumentFragment();
    const lines = text.split("\n");
    let i = 0, para = [];
    const flush = () => {
      if (para.length) frag.appendChild(inline(el("p"), para.join("\n")));
      para = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
      if (fence) {
        flush();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        i++; // closing fence (or end of a still-streaming block)
        const pre = el("pre"), code = el("code", body.join("\n"));
        if (fence[2]) code.dataset.lang = fence[2];
        pre.appendChild(code);
        frag.appendChild(pre);
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      const li = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (h) {
        flush();
        frag.appendChild(inline(el("h" + Math.min(6, h[1].length + 2)), h[2]));
      } else if (li) {
        flush();
        const ordered = /\d/.test(li[1]);
        const list = el(ordered ? "ol" : "ul");
        while (i < lines.length) {
          const m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
          if (!m || /\d/.test(m[1]) !== ordered) break;
          list.appendChild(inline(el("li"), m[2]));
          i++;
        }
        frag.appendChild(list);
        continue;
      } else if (line.startsWith(">")) {
        flush();
        frag.appendChild(inline(el("blockquote"), line.replace(/^>\s?/, "")));
      } else if (line.trim() === "") {
        flush();
      } else {
        para.push(line);
      }
      i++;
    }
    flush();
    return frag;
  }

  return { render };
})();
