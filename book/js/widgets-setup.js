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

(function () {
  // An ipywidgets Image carries no alt text; the only text it has is its tooltip (the
  // `title` attribute). Chapter 4's explorer puts each image's description there
  // (lora_tutorial.book.explorer): make it the image's alt text, which is what it is,
  // rather than a tooltip that would cover the figure under the mouse.
  function describe(root) {
    var images = root.querySelectorAll ? root.querySelectorAll("img.widget-image[title]") : [];
    for (var i = 0; i < images.length; i++) {
      images[i].alt = images[i].getAttribute("title");
      images[i].removeAttribute("title");
    }
  }
  function watch() {
    describe(document);
    new MutationObserver(function () {
      describe(document);
    }).observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ["title"] });
  }
  if (document.body) {
    watch();
  } else {
    document.addEventListener("DOMContentLoaded", watch);
  }
})();
