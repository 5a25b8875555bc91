// MathJax settings for pymdownx.arithmatex (generic mode), as the mkdocs-material docs give them.
// MathJax itself is bundled beside this file (mathjax/tex-svg.js, Apache-2.0, see
// mathjax/NOTICE), so formulas render offline; SVG output needs no font files.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
