// Progressive enhancements only: every page works without this file.
"use strict";
document.addEventListener("submit", (ev) => {
  const form = ev.target;
  const question = form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) ev.preventDefault();
});
document.addEventListener("DOMContentLoaded", () => {
  // "Go to line L, column C" of a policy error: put the caret there.
  const go = document.querySelector("a.goto");
  const area = document.getElementById("policy");
  if (go && area) {
    const place = () => {
      const line = +go.dataset.line, col = +go.dataset.column;
      const lines = area.value.split("\n");
      let pos = 0;
      for (let i = 0; i < line - 1 && i < lines.length; i++) pos += lines[i].length + 1;
      pos += Math.max(0, col - 1);
      area.focus();
      area.setSelectionRange(pos, pos + 1);
    };
    go.addEventListener("click", (ev) => { ev.preventDefault(); place(); });
  }
  const key = document.querySelector("code.copy");
  if (key && navigator.clipboard) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = "Copy";
    b.addEventListener("click", () => navigator.clipboard.writeText(key.textContent).then(() => { b.textContent = "Copied"; }));
    key.after(" ", b);
  }
});
