// Renders the \( ... \) and \[ ... \] spans that pymdownx.arithmatex (generic mode) leaves, with the KaTeX shipped
// in assets/katex; Material's instant navigation swaps pages without a reload, so render on each page change.
function renderMath() {
  renderMathInElement(document.body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
