// The feature browser: a feature list (search by token, sort, density) and a feature page
// (statistics, activation histogram, examples coloured by activation, logit effects).
//
// Data arrive as scripts, not fetch(), so the site also works from file://:
//   site-index.js           sets window.SAE_SITE_INDEX = {dictionary, n_tokens, hist_edges, features: [[id, density, max, [tokens]]]}
//   feature-<id>.js         calls SAE_SITE.feature({...one feature document...}), id zero-padded to 6 digits
// Every string from the corpus reaches the page through textContent or createTextNode, never
// innerHTML: tokens are text, whatever they contain.
(function () {
  "use strict";
  var INDEX = window.SAE_SITE_INDEX;
  var PAGE = 200;
  var shown = PAGE;
  var pending = {};
  var cache = {};

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return node;
  }

  function fmt(x) {
    if (x === 0) return "0";
    var a = Math.abs(x);
    return a >= 1000 || a < 0.001 ? x.toExponential(2) : x.toPrecision(3);
  }

  function pad(id) { var s = String(id); while (s.length < 6) s = "0" + s; return s; }

  // --- the feature list ---------------------------------------------------------------------
  function renderList() {
    var query = document.getElementById("search").value.trim().toLowerCase();
    var sort = document.getElementById("sort").value;
    var hideDead = document.getElementById("hide-dead").checked;
    var rows = INDEX.features.filter(function (r) {
      if (hideDead && r[1] === 0) return false;
      if (!query) return true;
      return r[3].some(function (t) { return t.toLowerCase().indexOf(query) !== -1; });
    });
    if (sort === "density") rows.sort(function (a, b) { return b[1] - a[1] || a[0] - b[0]; });
    if (sort === "max") rows.sort(function (a, b) { return b[2] - a[2] || a[0] - b[0]; });
    var body = document.querySelector("#features tbody");
    body.textContent = "";
    rows.slice(0, shown).forEach(function (r) {
      var tokens = el("td", {}, r[3].map(function (t) { return el("span", {"class": "chip", text: visible(t)}); }));
      var tr = el("tr", {"class": "row", "data-feature": String(r[0])}, [
        el("td", {}, [el("a", {href: "#feature=" + r[0], text: String(r[0])})]),
        el("td", {"class": "num", text: fmt(r[1])}),
        el("td", {"class": "num", text: fmt(r[2])}),
        tokens]);
      tr.addEventListener("click", function () { location.hash = "feature=" + r[0]; });
      body.appendChild(tr);
    });
    document.getElementById("count").textContent = rows.length + " of " + INDEX.features.length + " features";
    var more = document.getElementById("more");
    more.textContent = "";
    if (rows.length > shown) {
      var button = el("button", {text: "show " + Math.min(PAGE, rows.length - shown) + " more"});
      button.addEventListener("click", function () { shown += PAGE; renderList(); });
      more.appendChild(button);
    }
  }

  function visible(token) { return token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

  // --- a feature page -----------------------------------------------------------------------
  function loadFeature(id, done) {
    if (cache[id]) return done(cache[id]);
    pending[id] = done;
    var script = el("script", {src: "feature-" + pad(id) + ".js"});
    script.onerror = function () { delete pending[id]; showError("no data for feature " + id); };
    document.body.appendChild(script);
  }

  window.SAE_SITE = {
    feature: function (doc) {
      cache[doc.feature] = doc;
      var done = pending[doc.feature];
      delete pending[doc.feature];
      if (done) done(doc);
    }
  };

  function showError(message) {
    var view = document.getElementById("feature-view");
    view.textContent = "";
    view.appendChild(el("p", {text: message}));
  }

  function tokenSpan(token, act, max, isCenter) {
    var span = el("span", {"class": "tok" + (isCenter ? " center" : ""), title: token.length ? fmt(act) : ""});
    span.setAttribute("data-act", String(act));
    var parts = token.split("\n");
    parts.forEach(function (part, i) {
      if (i > 0) { span.appendChild(el("span", {"class": "nl", text: "\u21b5"})); span.appendChild(document.createTextNode("\n")); }
      if (part) span.appendChild(document.createTextNode(part));
    });
    if (act > 0 && max > 0) span.style.backgroundColor = "rgba(247, 144, 9, " + Math.min(1, 0.12 + 0.88 * act / max).toFixed(3) + ")";
    return span;
  }

  function exampleRow(example, max) {
    var row = el("div", {"class": "example"}, [el("span", {"class": "value", text: fmt(example.activation)})]);
    example.tokens.forEach(function (t, i) { row.appendChild(tokenSpan(t, example.acts[i], max, i === example.center)); });
    return row;
  }

  function histogram(counts, edges) {
    var first = counts.findIndex(function (c) { return c > 0; });
    if (first < 0) return el("p", {text: "never fired"});
    var last = counts.length - 1;
    while (counts[last] === 0) last--;
    var ns = "http://www.w3.org/2000/svg", w = 560, h = 120, n = last - first + 1, peak = Math.max.apply(null, counts);
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "hist");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 18);
    for (var i = first; i <= last; i++) {
      var bar = document.createElementNS(ns, "rect"), bh = Math.max(1, h * counts[i] / peak);
      bar.setAttribute("x", (i - first) * w / n); bar.setAttribute("width", Math.max(1, w / n - 1));
      bar.setAttribute("y", h - bh); bar.setAttribute("height", bh);
      var tip = document.createElementNS(ns, "title");
      tip.textContent = fmt(edges[i]) + " \u2013 " + fmt(edges[i + 1]) + ": " + counts[i];
      bar.appendChild(tip);
      svg.appendChild(bar);
    }
    [[0, edges[first]], [w - 40, edges[last + 1]]].forEach(function (p) {
      var label = document.createElementNS(ns, "text");
      label.setAttribute("x", p[0]); label.setAttribute("y", h + 14); label.textContent = fmt(p[1]);
      svg.appendChild(label);
    });
    return svg;
  }

  function logitTable(title, rows) {
    return el("div", {}, [el("h3", {text: title}), el("table", {"class": "logits"}, rows.map(function (r) {
      return el("tr", {}, [el("td", {}, [el("span", {"class": "chip", text: visible(r[0])})]), el("td", {text: fmt(r[1])})]);
    }))]);
  }

  function renderFeature(doc) {
    var view = document.getElementById("feature-view");
    view.textContent = "";
    view.appendChild(el("h2", {text: "Feature " + doc.feature}));
    view.appendChild(el("div", {"class": "stats"}, [
      el("span", {}, ["density ", el("b", {text: fmt(doc.density)})]),
      el("span", {}, ["fired on ", el("b", {text: String(doc.count)}), " tokens"]),
      el("span", {}, ["max ", el("b", {text: fmt(doc.max)})]),
      el("span", {}, ["mean when active ", el("b", {text: fmt(doc.mean)})])]));
    view.appendChild(el("h3", {text: "Activation histogram (log-spaced bins)"}));
    view.appendChild(histogram(doc.histogram, INDEX.hist_edges));
    view.appendChild(el("div", {"class": "columns"}, [logitTable("Promoted tokens", doc.logits.top),
                                                      logitTable("Suppressed tokens", doc.logits.bottom)]));
    var top = el("section", {id: "top-examples"}, [el("h3", {text: "Top activations"})]);
    doc.top.forEach(function (e) { top.appendChild(exampleRow(e, doc.max)); });
    view.appendChild(top);
    var levels = el("section", {id: "level-examples"}, [el("h3", {text: "Across the activation range"})]);
    doc.levels.forEach(function (level) {
      if (!level.examples.length) return;
      levels.appendChild(el("div", {"class": "level-title", text: "(" + fmt(level.low) + ", " + fmt(level.high) + "]"}));
      level.examples.forEach(function (e) { levels.appendChild(exampleRow(e, doc.max)); });
    });
    view.appendChild(levels);
    var random = el("section", {id: "random-examples"}, [el("h3", {text: "Random activating tokens"})]);
    doc.random.forEach(function (e) { random.appendChild(exampleRow(e, doc.max)); });
    view.appendChild(random);
  }

  function route() {
    var match = /^#feature=(\d+)$/.exec(location.hash);
    document.getElementById("list-view").hidden = !!match;
    document.getElementById("feature-view").hidden = !match;
    if (match) {
      var view = document.getElementById("feature-view");
      view.textContent = "loading\u2026";
      loadFeature(parseInt(match[1], 10), function (doc) { renderFeature(doc); document.body.setAttribute("data-loaded", String(doc.feature)); });
    } else {
      renderList();
      document.body.setAttribute("data-loaded", "list");
    }
  }

  function tooltip() {
    var tip = el("div", {id: "tooltip"});
    document.body.appendChild(tip);
    document.addEventListener("mouseover", function (e) {
      var t = e.target.closest ? e.target.closest(".tok") : null;
      if (!t) { tip.style.display = "none"; return; }
      tip.textContent = "activation " + fmt(parseFloat(t.getAttribute("data-act")));
      tip.style.display = "block";
    });
    document.addEventListener("mousemove", function (e) { tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; });
  }

  if (!INDEX) { document.body.textContent = "site-index.js is missing: rematerialize the feature_site asset."; return; }
  document.getElementById("subtitle").textContent = INDEX.dictionary + " \u00b7 " + INDEX.features.length +
    " features \u00b7 " + INDEX.n_tokens + " tokens";
  ["search", "sort", "hide-dead"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", function () { shown = PAGE; renderList(); });
  });
  window.addEventListener("hashchange", route);
  tooltip();
  route();
})();
