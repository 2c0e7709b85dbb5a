// Glue between the scripts the site serves itself (see _ext/site_assets.py).
(function () {
  // This file's folder is the site's _static/ folder, wherever the page is.
  var here = document.currentScript ? document.currentScript.src.replace(/[^\/]*$/, "") : "";

  // The ipywidgets HTML manager finds its fonts next to the AMD modules it defines
  // ("@jupyter-widgets/html-manager/dist/...", "@jupyter-widgets/controls", ...), whose
  // addresses RequireJS resolves from the page's folder. Point them at the local copy.
  if (window.require && window.require.config && here) {
    window.require.config({
      paths: {
        "@jupyter-widgets/html-manager/dist": here + "html-manager",
        "@jupyter-widgets": here + "html-manager",
      },
    });
  }

  // The widget manager typesets labels with MathJax 2's MathJax.Hub.Queue; the site loads
  // MathJax 3, which has no Hub. Map the old call onto MathJax 3's typesetPromise.
  var hub = {
    Queue: function (job) {
      var element = Array.isArray(job) ? job[2] : undefined;
      var mathjax = window.MathJax;
      if (mathjax && mathjax.typesetPromise) {
        mathjax.typesetPromise(element ? [element] : undefined).catch(function () {});
      }
    },
  };
  var config = window.MathJax || {};
  var startup = config.startup || {};
  var ready = startup.ready;
  startup.ready = function () {
    if (ready) { ready(); } else { window.MathJax.startup.defaultReady(); }
    window.MathJax.Hub = hub;
  };
  config.startup = startup;
  config.Hub = hub; // until MathJax 3 has loaded and replaced this object
  window.MathJax = config;
})();
