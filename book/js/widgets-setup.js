// Loaded on pages with widgets, after require.js and before the ipywidgets HTML manager
// (see nb_ipywidgets_js in _config.yml).
(function () {
  // ipywidgets 8 typesets widget labels with MathJax 2's API (MathJax.Hub.Queue), but the
  //    book uses MathJax 3. Offer the old call, forwarded to MathJax 3's typesetPromise.
  function queue(job) {
    var element = job && job[2];
    var mathjax = window.MathJax;
    if (element && mathjax && typeof mathjax.typesetPromise === "function") {
      mathjax.typesetPromise([element]).catch(function () {});
    }
  }
  var config = (window.MathJax = window.MathJax || {});
  config.Hub = { Queue: queue };
  config.startup = config.startup || {};
  var ready = config.startup.ready;
  config.startup.ready = function () {
    if (ready) {
      ready();
    } else {
      window.MathJax.startup.defaultReady();
    }
    window.MathJax.Hub = { Queue: queue };
  };
})();
